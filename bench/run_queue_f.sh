#!/usr/bin/env bash
# Issue 5's allocation grid on the CPU: uniform / OWL / AlphaPruning × Wanda / SparseGPT / ALPS at 70%, an ε sweep
# for AlphaPruning at 70% (Wanda, SparseGPT; ε chosen on C4, see bench/allocation.py), then 80% and 60% with the
# chosen ε. 32 × 512 C4 calibration, seed 0, all blocks; WikiText-2/PTB/C4 on the first 10 windows of 1024
# tokens each. Finished cells are skipped and running ones are claimed, so one copy per core can run at once.
set -u
cd "$(dirname "$0")/.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-$(realpath ../shared/data)} HF_HUB_OFFLINE=1
common=(--model bench/out/smollm2-hf --nsamples 32 --seqlen 512 --eval-windows 10 --eval-seqlen 1024
        --threads "${THREADS:-1}" --root bench/out/allocation)
for s in ${STAGES:-0.7 eps 0.8 0.6}; do
  case "$s" in
    eps) python bench/allocation.py "${common[@]}" --methods wanda,sparsegpt --sparsities 0.7 --allocations alpha \
             --epsilons 0.1,0.3 ;;
    0.7) python bench/allocation.py "${common[@]}" --sparsities 0.7 ;;
    *)   python bench/allocation.py "${common[@]}" --sparsities "$s" --epsilons auto ;;
  esac
done
