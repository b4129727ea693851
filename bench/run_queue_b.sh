#!/usr/bin/env bash
# After run_priority.sh: zero-shot scores of the dense model and the 50%/70% runs, the memory and precision benches.
set -u
cd "$(dirname "$0")/.."
source bench/zeroshot_env.sh
zs bench/out/smollm2-hf bench/out/foundation/dense/zeroshot.json
for d in bench/out/foundation/{sparsegpt,wanda}_uniform_unstructured_s50 bench/out/cpu70/{sparsegpt,wanda,alps}_uniform_unstructured_s70; do
  zs "$d" "$d/zeroshot.json"
done
lmprune compare bench/out/foundation/dense bench/out/foundation/{sparsegpt,wanda}_uniform_unstructured_s50 \
    bench/out/cpu70/{sparsegpt,wanda,alps}_uniform_unstructured_s70 --out bench/out/zeroshot_compare
python bench/memory.py --model bench/out/smollm2-hf --method sparsegpt --nsamples 32 --seqlen 512
python bench/memory.py --model bench/out/smollm2-hf --method sparsegpt --nsamples 32 --seqlen 512 --extra=--stream
python bench/precision.py --model bench/out/smollm2-hf --dtypes bfloat16 float16 --nsamples 16 --seqlen 512 --eval-windows 8
