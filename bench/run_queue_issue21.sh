#!/usr/bin/env bash
# Issue 21: the papers' configurations beside lmprune's defaults, one run at a time, one thread, resumable.
# Protocol of issue 4's grid: 32 x 512 C4 calibration, WikiText-2/PTB/C4 on the first 10 windows of 1024 tokens,
# the HF directory from bench/prepare_model.py (same float32 weights as the GGUF).
# CELLS: space-separated "name:blocks:sparsity:seed" with name one of
#   sparsegpt | sparsellm (lmprune's defaults) | sparsellm-paper (--method-opt preset=paper)
#   wanda-peak | wanda-peakref | sparsegpt-peak | sparsegpt-peakref (AlphaPruning, ε = 0.3, x_min rule peak / peak_reference)
# ROOT (run directories), MODEL; a run directory that already has lmprune.json is skipped.
set -u
cd "$(dirname "$0")/.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-/work/shared/data} HF_HUB_OFFLINE=1
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
root=${ROOT:-/work/runs-issue21} model=${MODEL:-/work/runs-issue21/smollm2-hf}
for cell in $CELLS; do
  IFS=: read -r name blocks s seed <<<"$cell"
  setting=s$(awk "BEGIN { printf \"%02.0f\", $s * 100 }")
  out=$root/${name}_${blocks}_${setting}_seed$seed
  [ -f "$out/lmprune.json" ] && continue
  case $name in
    sparsegpt) args=(--method sparsegpt) ;;
    sparsellm) args=(--method sparsellm) ;;
    sparsellm-paper) args=(--method sparsellm --method-opt preset=paper) ;;
    wanda-peak) args=(--method wanda --allocation alpha --alloc-opt xmin_rule=peak) ;;
    wanda-peakref) args=(--method wanda --allocation alpha --alloc-opt xmin_rule=peak_reference) ;;
    sparsegpt-peak) args=(--method sparsegpt --allocation alpha --alloc-opt xmin_rule=peak) ;;
    sparsegpt-peakref) args=(--method sparsegpt --allocation alpha --alloc-opt xmin_rule=peak_reference) ;;
    *) echo "unknown cell $name" >&2; exit 2 ;;
  esac
  echo "$(date -Is) start $out"
  python -m lmprune.cli prune --model "$model" "${args[@]}" --sparsity "$s" --blocks "$blocks" \
      --nsamples 32 --seqlen 512 --seed "$seed" --eval wikitext2,ptb,c4 --eval-windows 10 --eval-seqlen 1024 \
      --out "$out" --quiet
  echo "$(date -Is) done $out rc=$?"
done
