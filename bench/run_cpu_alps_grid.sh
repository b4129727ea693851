#!/usr/bin/env bash
# Whole-model ALPS table on the CPU at 80, 90 and 60% (70% is in run_priority.sh): the five per-matrix methods,
# calibration 32 × 512 C4 tokens, WikiText-2 on the first 20 windows of 1024 tokens, one thread per cell.
set -u
cd "$(dirname "$0")/.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-$(realpath ../shared/data)} HF_HUB_OFFLINE=1
python bench/prepare_model.py
for s in 0.8 0.9 0.6; do
  python bench/sweep.py --model bench/out/smollm2-hf --nsamples 32 --seqlen 512 --eval-windows 20 --eval-seqlen 1024 \
      --threads "${THREADS:-1}" --root bench/out/cpu_alps --eval wikitext2 --no-dense \
      --methods sparsegpt,alps,alps-fast,wanda,magnitude --sparsities $s
done
