#!/usr/bin/env bash
# The whole lmprune / llm-compressor study (issue 20) in one command, resumable:
#   LMPRUNE_DATA_DIR=/work/shared/data bash bench/peer/run.sh [study.py options, e.g. --seeds 0,1,2 --only 'wanda*']
# Creates llm-compressor's environment when missing, then runs every cell one at a time on one thread.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${LMPRUNE_PEER_VENV:-/work/peer-venv}"
: "${LMPRUNE_DATA_DIR:?set LMPRUNE_DATA_DIR (e.g. /work/shared/data)}"
bash "$HERE/setup_venv.sh" "$VENV"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 LMPRUNE_PEER_PYTHON="$VENV/bin/python"
cd "$REPO"
PYTHONPATH="$REPO/src" python bench/peer/study.py "$@"
