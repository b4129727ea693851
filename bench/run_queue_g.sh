#!/usr/bin/env bash
# Cells of issue 4's grid on the CPU, one thread each: SparseGPT, SparseLLM(SparseGPT), Wanda, and DSnoT after each
# one-shot solver, by default at 80% under the paper's first-half protocol (blocks 0–14 pruned, 15–29 dense).
# 32 × 512 C4 calibration, seed 0; WikiText-2/PTB/C4 on the first 10 windows of 1024 tokens.
# METHODS overrides the cells: "method", "method+refiner" or "method@inner" (e.g. "sparsellm@alps-fast wanda+dsnot");
# SPARSITY, PATTERN (e.g. 2:4), BLOCKS and SEED (calibration sample; cells of seeds other than 0 end in _seedN)
# override the rest.
set -u
cd "$(dirname "$0")/.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-$(realpath ../shared/data)} HF_HUB_OFFLINE=1
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
s=${SPARSITY:-0.8} blocks=${BLOCKS:-first-half} pattern=${PATTERN:-unstructured}
setting=s$(awk "BEGIN { printf \"%02.0f\", $s * 100 }")
[ "$pattern" != unstructured ] && setting=${pattern/:/of}
seed=${SEED:-0}
[ "$seed" != 0 ] && setting=${setting}_seed$seed
for cell in ${METHODS:-sparsellm sparsegpt wanda wanda+dsnot sparsegpt+dsnot}; do
  m=${cell%%[+@]*} refine=none inner=()
  case $cell in
    *+*) refine=${cell#*+} ;;
    *@*) inner=(--inner "${cell#*@}") ;;
  esac
  out=bench/out/issue4/${cell}_${blocks}_${setting}
  [ -f "$out/lmprune.json" ] || lmprune prune --model bench/out/smollm2-hf --method "$m" --refine "$refine" "${inner[@]}" \
      --sparsity "$s" --pattern "$pattern" --blocks "$blocks" --nsamples 32 --seqlen 512 --seed "$seed" \
      --eval wikitext2,ptb,c4 --eval-windows 10 --eval-seqlen 1024 --out "$out" --quiet
done
