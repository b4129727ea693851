#!/usr/bin/env bash
# After run_priority.sh: zero-shot scores of the dense model and the 50%/70% runs, the memory and precision benches.
set -u
cd "$(dirname "$0")/.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-$(realpath ../shared/data)} HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${THREADS:-1}
TASKS=piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,rte,openbookqa,lambada_openai
LIMIT=${LIMIT:-100}
zs() {  # zs MODEL OUT_JSON
  [ -f "$2" ] || lmprune eval --model "$1" --tasks $TASKS --limit $LIMIT --out "$2"
}
zs bench/out/smollm2-hf bench/out/foundation/dense/zeroshot.json
for d in bench/out/foundation/{sparsegpt,wanda}_uniform_unstructured_s50 bench/out/cpu70/{sparsegpt,wanda,alps}_uniform_unstructured_s70; do
  zs "$d" "$d/zeroshot.json"
done
lmprune compare bench/out/foundation/dense bench/out/foundation/{sparsegpt,wanda}_uniform_unstructured_s50 \
    bench/out/cpu70/{sparsegpt,wanda,alps}_uniform_unstructured_s70 --out bench/out/zeroshot_compare
python bench/memory.py --model bench/out/smollm2-hf --method sparsegpt --nsamples 32 --seqlen 512
python bench/memory.py --model bench/out/smollm2-hf --method sparsegpt --nsamples 32 --seqlen 512 --extra=--stream
python bench/precision.py --model bench/out/smollm2-hf --dtypes bfloat16 float16 --nsamples 16 --seqlen 512 --eval-windows 8
