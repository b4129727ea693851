#!/usr/bin/env bash
# The zero-shot row that the zero-shot table lacked: SparseLLM (SparseGPT inner solver, lmprune defaults) at 70%,
# pruned with the same protocol as the other rows (32 × 512 C4 calibration, seed 0, all blocks; WikiText-2/PTB/C4
# on the first 20 windows of 1024 tokens), then nine zero-shot tasks at limit 100 and the comparison.
set -u
cd "$(dirname "$0")/.."
source bench/zeroshot_env.sh
python bench/sweep.py --model bench/out/smollm2-hf --nsamples 32 --seqlen 512 --eval-windows 20 --eval-seqlen 1024 \
    --threads "${THREADS:-1}" --root bench/out/cpu70 --eval wikitext2,ptb,c4 --methods sparsellm --sparsities 0.7 \
    --no-dense
zs bench/out/cpu70/sparsellm_uniform_unstructured_s70 bench/out/cpu70/sparsellm_uniform_unstructured_s70/zeroshot.json
