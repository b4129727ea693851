#!/usr/bin/env bash
# llm-compressor's own virtual environment, outside the repository and outside lmprune's dependencies.
# Usage: bash bench/peer/setup_venv.sh [VENV]   (default: $LMPRUNE_PEER_VENV or /work/peer-venv)
set -euo pipefail
VENV="${1:-${LMPRUNE_PEER_VENV:-/work/peer-venv}}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llmcompressor" 2>/dev/null; then
    echo "llm-compressor environment ready: $VENV"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install torch==2.13.0
"$VENV/bin/pip" install 'llmcompressor==0.14.*'
"$VENV/bin/python" -c "import llmcompressor, torch; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__)"
