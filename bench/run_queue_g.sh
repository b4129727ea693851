#!/usr/bin/env bash
# A slice of issue 4's grid on the CPU at 80% under the paper's first-half protocol (blocks 0–14 pruned, 15–29
# dense), labelled as such: SparseGPT, SparseLLM(SparseGPT), Wanda, and DSnoT after each one-shot solver.
# 32 × 512 C4 calibration, seed 0; WikiText-2/PTB/C4 on the first 10 windows of 1024 tokens.
# METHODS (e.g. "sparsellm wanda+dsnot"), SPARSITY and BLOCKS override the cells.
set -u
cd "$(dirname "$0")/.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-$(realpath ../shared/data)} HF_HUB_OFFLINE=1
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
s=${SPARSITY:-0.8} blocks=${BLOCKS:-first-half}
for cell in ${METHODS:-sparsellm sparsegpt wanda wanda+dsnot sparsegpt+dsnot}; do
  m=${cell%+*} refine=none
  [ "$cell" != "$m" ] && refine=${cell#*+}
  out=bench/out/issue4/${cell}_${blocks}_s$(awk "BEGIN { printf \"%02.0f\", $s * 100 }")
  [ -f "$out/lmprune.json" ] || lmprune prune --model bench/out/smollm2-hf --method "$m" --refine "$refine" \
      --sparsity "$s" --blocks "$blocks" --nsamples 32 --seqlen 512 --seed 0 --eval wikitext2,ptb,c4 \
      --eval-windows 10 --eval-seqlen 1024 --out "$out" --quiet
done
