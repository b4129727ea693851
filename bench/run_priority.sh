#!/usr/bin/env bash
# The whole-model benchmark cells in priority order (70% first: the anchors' setting), resumable.
# Calibration 32 × 512 C4 tokens (docs 1100–1999), seed 0; WikiText-2 on the first 20 windows of 1024 tokens.
set -u
cd "$(dirname "$0")/.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-$(realpath ../shared/data)} HF_HUB_OFFLINE=1
python bench/prepare_model.py
common=(--model bench/out/smollm2-hf --nsamples 32 --seqlen 512 --eval wikitext2 --eval-windows 20 --eval-seqlen 1024
        --threads "${THREADS:-1}" --root bench/out/baseline)
python bench/sweep.py "${common[@]}" --methods sparsegpt,alps-fast,alps,wanda,magnitude --sparsities 0.7
python bench/sweep.py "${common[@]}" --no-dense --methods sparsegpt,wanda,magnitude,alps-fast --sparsities 0.5 --patterns unstructured,2:4
python bench/sweep.py "${common[@]}" --no-dense --methods wanda,sparsegpt --sparsities 0.7 --allocations owl,alpha
python bench/sweep.py "${common[@]}" --no-dense --methods sparsellm --sparsities 0.7
python bench/sweep.py "${common[@]}" --no-dense --methods wanda --refines dsnot --sparsities 0.7
python bench/sweep.py "${common[@]}" --no-dense --methods alps,sparsegpt,alps-fast --sparsities 0.8,0.9
