#!/usr/bin/env bash
# A first slice of the DSnoT and allocation grids on the CPU at 70%, with the anchors' protocol (32 × 512 C4
# calibration, WikiText-2 on 20 × 1024 tokens), into bench/out/cpu70 beside the uniform rows.
set -u
cd "$(dirname "$0")/.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-$(realpath ../shared/data)} HF_HUB_OFFLINE=1
common=(--model bench/out/smollm2-hf --nsamples 32 --seqlen 512 --eval-windows 20 --eval-seqlen 1024
        --threads "${THREADS:-2}" --root bench/out/cpu70 --eval wikitext2 --sparsities 0.7 --no-dense)
python bench/sweep.py "${common[@]}" --methods wanda,sparsegpt --refines dsnot
python bench/sweep.py "${common[@]}" --methods wanda,sparsegpt --allocations owl,alpha
