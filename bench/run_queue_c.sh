#!/usr/bin/env bash
# Zero-shot rows for the methods the first zero-shot table lacked (magnitude, alps-fast, ALPS at 50%), then one
# comparison over every run with zero-shot scores. Same protocol as run_queue_b.sh (limit 100 per task).
set -u
cd "$(dirname "$0")/.."
source bench/zeroshot_env.sh
zs bench/out/cpu70/alps-fast_uniform_unstructured_s70 bench/out/cpu70/alps-fast_uniform_unstructured_s70/zeroshot.json
zs bench/out/cpu70/magnitude_uniform_unstructured_s70 bench/out/cpu70/magnitude_uniform_unstructured_s70/zeroshot.json
python bench/sweep.py --model bench/out/smollm2-hf --nsamples 32 --seqlen 512 --eval-windows 20 --eval-seqlen 1024 \
    --threads "${THREADS:-1}" --root bench/out/foundation --eval wikitext2,ptb,c4 --methods alps --sparsities 0.5
zs bench/out/foundation/alps_uniform_unstructured_s50 bench/out/foundation/alps_uniform_unstructured_s50/zeroshot.json
zs bench/out/foundation/magnitude_uniform_unstructured_s50 bench/out/foundation/magnitude_uniform_unstructured_s50/zeroshot.json
lmprune compare bench/out/foundation/dense \
    bench/out/foundation/{magnitude,sparsegpt,wanda,alps}_uniform_unstructured_s50 \
    bench/out/cpu70/{magnitude,sparsegpt,wanda,alps-fast,alps}_uniform_unstructured_s70 --out bench/out/zeroshot_compare2
