#!/usr/bin/env bash
# The CPU whole-model benchmark cells in priority order, resumable (finished cells are skipped).
# Calibration 32 × 512 C4 tokens (docs 1100–1999), seed 0, as in ../shared/notes/anchors.md.
#  1. 70% unstructured, every per-matrix method, WikiText-2 on the first 20 windows of 1024 tokens (the anchors' table).
#  2. The foundation table: dense, magnitude/Wanda/SparseGPT at 50% and 2:4, WikiText-2/PTB/C4 (20 windows each).
set -u
cd "$(dirname "$0")/.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-$(realpath ../shared/data)} HF_HUB_OFFLINE=1
python bench/prepare_model.py
common=(--model bench/out/smollm2-hf --nsamples 32 --seqlen 512 --eval-windows 20 --eval-seqlen 1024
        --threads "${THREADS:-2}")
python bench/sweep.py "${common[@]}" --root bench/out/cpu70 --eval wikitext2 \
    --methods sparsegpt,alps-fast,alps,wanda,magnitude --sparsities 0.7
python bench/sweep.py "${common[@]}" --root bench/out/foundation --eval wikitext2,ptb,c4 \
    --methods magnitude,wanda,sparsegpt --sparsities 0.5 --patterns unstructured,2:4
