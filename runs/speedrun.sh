#!/usr/bin/env bash
# The leaderboard recipe, "time to GPT-2", on one 8xH100 node: set up, fetch ClimbMix shards (a few
# first, the rest in the background while the tokenizer trains), tokenizer, base-train d24 at the
# reference's current speedrun settings (ratio 8, device batch 16, --fp8 where the GPU has it),
# base-eval (the full CORE), chat-sft, chat-eval, report.
# Prints the leaderboard time (base-train's training steps after the first 10, as the reference
# counts) and the CORE, and whether it beat GPT-2's 0.256525.
#
#   bash runs/speedrun.sh              # the recipe
#   bash runs/speedrun.sh --with-rl    # then chat-rl on GSM8K and its chat-eval
#
# Environment:
#   NPROC_PER_NODE   GPUs per node (default 8). Fewer GPUs, even one, give the same run: the total
#                    batch is fixed by --depth and gradient accumulation makes up the difference.
#   WANDB_RUN        a wandb run name to log to (default: dummy = no wandb)
#   FP8              1 = base-train --fp8, 0 = bf16; default: 1 on GPUs of compute capability 8.9+
#                    (H100), which fp8 needs, else 0
#   Several nodes: the standard torchrun rendezvous, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
#     and PICOCHAT_HOME on a file system every node shares (rank 0 writes the checkpoints that the
#     next stages load everywhere). Run this script on every node: node 0 fetches the data and
#     trains the tokenizer, the others wait for it; e.g.
#       NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash runs/speedrun.sh   # node 0
#       NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash runs/speedrun.sh   # node 1
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_RL=0
for arg in "$@"; do
  case "$arg" in
    --with-rl) WITH_RL=1 ;;
    *) echo "unknown argument: $arg (the only one is --with-rl)" >&2; exit 2 ;;
  esac
done
export OMP_NUM_THREADS=1
NPROC=${NPROC_PER_NODE:-8}
RUN=${WANDB_RUN:-dummy}
DATASET=climbmix
NODE_RANK=${NODE_RANK:-0}
if [ "${NNODES:-1}" -gt 1 ]; then
  : "${PICOCHAT_HOME:?several nodes need PICOCHAT_HOME on a file system they share}"
  : "${MASTER_ADDR:?several nodes need MASTER_ADDR (the address of node 0)}"
  LAUNCH=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
          --master_port "${MASTER_PORT:-29500}" --nproc_per_node "$NPROC")
else
  LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC")
fi

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[gpu,report]'
if [ "$RUN" != dummy ]; then python -m pip install -q -e '.[wandb]'; fi

HOME_DIR=${PICOCHAT_HOME:-$HOME/.cache/picochat}
READY="$HOME_DIR/.speedrun_data_ready"
if [ "$NODE_RANK" = 0 ]; then
  rm -f "$READY"
  # ~150 shards are needed at d24 ratio 8 (~7B tokens), 170 leave room (the reference's count)
  picochat download -n 8 --dataset "$DATASET"
  picochat download -n 170 --dataset "$DATASET" &
  DOWNLOAD=$!
  trap 'kill "$DOWNLOAD" 2>/dev/null || true' EXIT  # a failed tokenizer step stops the download too
  picochat tok-train --dataset "$DATASET" --max-chars 2000000000 --vocab-size 32768
  picochat tok-eval --dataset "$DATASET"
  wait "$DOWNLOAD"
  touch "$READY"
  # gone again when this node's run ends, however it ends: a later run's other nodes must not
  # take an old marker for this run's and start their rendezvous before node 0 is ready
  trap 'rm -f "$READY"' EXIT
else
  echo "waiting for node 0 to fetch the data and train the tokenizer ($READY)"
  while [ ! -f "$READY" ]; do sleep 10; done
fi

if [ -z "${FP8:-}" ]; then
  FP8=$(python -c "import torch as t; print(int(t.cuda.is_available() and t.cuda.get_device_capability() >= (8, 9)))")
fi
FP8_FLAG=""
if [ "$FP8" = 1 ]; then FP8_FLAG=--fp8
else echo "base-train in bf16 (FP8=$FP8; fp8 is the default on GPUs of compute capability 8.9+)"; fi

TAG=d24  # every stage names it: another d<N> run in the same home must not be picked up
"${LAUNCH[@]}" -m picochat base-train --dataset "$DATASET" --depth 24 --target-param-data-ratio 8 \
  --device-batch-size 16 $FP8_FLAG --model-tag "$TAG" --run "$RUN" --overwrite
"${LAUNCH[@]}" -m picochat base-eval --dataset "$DATASET" --device-batch-size 16 --model-tag "$TAG"
"${LAUNCH[@]}" -m picochat chat-sft --model-tag "$TAG" --run "$RUN" --overwrite
"${LAUNCH[@]}" -m picochat chat-eval -i sft -g "$TAG"
if [ "$WITH_RL" = 1 ]; then
  "${LAUNCH[@]}" -m picochat chat-rl --model-tag "$TAG" --run "$RUN" --overwrite
  "${LAUNCH[@]}" -m picochat chat-eval -i rl -g "$TAG" -a GSM8K
fi

if [ "$NODE_RANK" = 0 ]; then
  if [ "$WITH_RL" = 1 ]; then picochat report --base-tag "$TAG" --sft-tag "$TAG" --rl-tag "$TAG"
  else picochat report --base-tag "$TAG" --sft-tag "$TAG"; fi
fi
