#!/usr/bin/env bash
# The whole pipeline shrunk for a 2-core CPU (about 30 minutes there; a GPU is faster), unattended:
# set up, download a few shards, train and evaluate a tokenizer, pretrain a tiny model, evaluate
# it (a CORE subset), fine-tune it into a chat model, evaluate that (a chat-eval subset), write the
# report, and ask it something. Everything lands under $PICOCHAT_HOME (~/.cache/picochat).
#
# What to expect: a 4-layer model trained for minutes on ~300K tokens learns the chat format and
# babbles fluently-ish; its scores sit at the random baselines. The GPU recipe is runs/speedrun.sh
# (d24; the reference's published numbers for d12/d20/d24 are in the README).
#
# Knobs (environment):
#   PICOCHAT_DATASET   a named dataset (fineweb-edu, climbmix) or a folder of parquet files
#                      with a `text` column; a folder skips the download.
#   PICOCHAT_DATA_URL  a mirror for the download (http(s) URL or local folder).
#   PICOCHAT_EVAL_BUNDLE  a local copy of the CORE eval bundle (zip or folder).
#   PICOCHAT_TASK_DATA_URL  a mirror of the chat task data (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # OpenMP threads fighting over 2 shared cores made steps ~10x slower
start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# PyPI's Linux torch is the CUDA build (GBs of libraries); PICOCHAT_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes the small CPU-only build instead on a machine without a GPU.
python -m pip install -q torch==2.13.0 ${PICOCHAT_TORCH_INDEX:+--index-url "$PICOCHAT_TORCH_INDEX"}
python -m pip install -q -e '.[report]'

DATASET=${PICOCHAT_DATASET:-fineweb-edu}

stage "data"
if [ -d "$DATASET" ]; then
  echo "using the parquet folder $DATASET (no download)"
else
  picochat download -n 2 --dataset "$DATASET"
fi

stage "tokenizer"
picochat tok-train --dataset "$DATASET" --max-chars 50000000 --vocab-size 8192
picochat tok-eval --dataset "$DATASET"

# A 4-layer model on 128-token rows, 1024 tokens per step. Such a small batch gets an lr
# scale of sqrt(1024/2^19) = 1/22 from the depth rules, so the base lrs are raised 10x
# for the loss to move visibly in 300 steps. --overwrite: rerunning this recipe starts its
# "tiny" runs over (without it, a training stage refuses a tag that already has checkpoints).
stage "base-train"
picochat base-train --dataset "$DATASET" --model-tag tiny --overwrite \
  --depth 4 --head-dim 64 --max-seq-len 128 --window-pattern L \
  --device-batch-size 8 --total-batch-size 1024 --num-iterations 300 --warmup-steps 5 \
  --embedding-lr 3 --unembedding-lr 0.08 --matrix-lr 0.2 \
  --eval-every 100 --eval-tokens 8192 --core-metric-every -1 --sample-every 300

stage "base-eval"
picochat base-eval --dataset "$DATASET" --model-tag tiny --device-batch-size 8 --split-tokens 8192 \
  --tasks copa,winograd,arc_easy,bigbench_operators --max-per-task 32

# SFT inherits the sizes (T=128, 8 rows, 1024 tokens a step); its lrs are the base run's effective
# ones (the flags above x sqrt(1024/2^19)), given by hand: left unset, chat-sft inherits the
# unscaled flags, as the reference does, 22x too much at this batch. The first run downloads the
# task data (SmolTalk, MMLU auxiliary_train, GSM8K, the word list; about 1 GB).
stage "chat-sft"
picochat chat-sft --model-tag tiny --overwrite --num-iterations 200 \
  --embedding-lr 0.133 --unembedding-lr 0.0035 --matrix-lr 0.0088 \
  --spelling-bee 2000 --simple-spelling 2000 --eval-every 100 --eval-tokens 8192 --chatcore-every -1

stage "chat-eval"
picochat chat-eval -i sft -g tiny -a "ARC-Easy|MMLU|GSM8K|SpellingBee" -x 50 -b 8 -m 64

stage "report"
picochat report --base-tag tiny --sft-tag tiny

stage "chat"
picochat chat-cli -i sft -g tiny -t 0 --max-tokens 48 -p "What is the capital of France?"

echo
echo "done in $(( $(date +%s) - start )) s. The report: ./report.md. Talk to the model in a browser:"
echo "  . .venv/bin/activate && picochat chat-web -i sft -g tiny    # then open http://127.0.0.1:8000/"
