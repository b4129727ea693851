# Sourced by the bench queues: environment and `zs MODEL OUT_JSON` (nine tasks, --limit $LIMIT, skipped when done).
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-$(realpath ../shared/data)} HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${THREADS:-1}
TASKS=piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,rte,openbookqa,lambada_openai
LIMIT=${LIMIT:-100}
zs() {
  [ -f "$2" ] || lmprune eval --model "$1" --tasks $TASKS --limit $LIMIT --out "$2"
}
