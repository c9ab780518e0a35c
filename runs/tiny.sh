#!/usr/bin/env bash
# The small end-to-end run, sized for a laptop CPU (a few minutes; a GPU is faster):
# set up, download a few shards, train and evaluate a tokenizer, pretrain a tiny
# model, evaluate it, ask it something. Everything lands under $PICOCHAT_HOME (~/.cache/picochat).
#
# Knobs (environment):
#   PICOCHAT_DATASET   a named dataset (fineweb-edu, climbmix) or a folder of parquet files
#                      with a `text` column; a folder skips the download.
#   PICOCHAT_DATA_URL  a mirror for the download (http(s) URL or local folder).
#   PICOCHAT_EVAL_BUNDLE  a local copy of the CORE eval bundle (zip or folder).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0  # CPU wheel where one is provided, the standard build elsewhere
python -m pip install -q -e .

DATASET=${PICOCHAT_DATASET:-fineweb-edu}

if [ -d "$DATASET" ]; then
  echo "using the parquet folder $DATASET (no download)"
else
  picochat download -n 2 --dataset "$DATASET"
fi

picochat tok-train --dataset "$DATASET" --max-chars 50000000 --vocab-size 8192
picochat tok-eval --dataset "$DATASET"

# A 4-layer model on 128-token rows, 1024 tokens per step. Such a small batch gets an lr
# scale of sqrt(1024/2^19) = 1/22 from the depth rules, so the base lrs are raised 10x
# for the loss to move visibly in 120 steps. --overwrite: rerunning this recipe starts its
# "tiny" run over (without it, base-train refuses a tag that already has checkpoints).
picochat base-train --dataset "$DATASET" --model-tag tiny --overwrite \
  --depth 4 --head-dim 64 --max-seq-len 128 --window-pattern L \
  --device-batch-size 8 --total-batch-size 1024 --num-iterations 120 --warmup-steps 5 \
  --embedding-lr 3 --unembedding-lr 0.08 --matrix-lr 0.2 \
  --eval-every 40 --eval-tokens 8192 --core-metric-every -1 --sample-every 120

picochat base-eval --dataset "$DATASET" --model-tag tiny --device-batch-size 8 --split-tokens 8192 \
  --tasks copa,winograd,arc_easy,bigbench_operators --max-per-task 32

# Talk to it (a base model this small mostly babbles; chat-sft will teach it the chat format)
picochat chat-cli -i base -g tiny -t 0 --max-tokens 32 -p "The capital of France is"

python - <<'PY'
import json, os
home = os.environ.get("PICOCHAT_HOME") or os.path.expanduser("~/.cache/picochat")
path = os.path.join(home, "base_checkpoints", "tiny", "metrics.jsonl")
steps = [m for m in map(json.loads, open(path)) if "loss" in m]
print(f"loss curve: step {steps[0]['step']} loss {steps[0]['loss']:.4f} -> step {steps[-1]['step']} loss {steps[-1]['loss']:.4f}")
print(f"checkpoints and metrics: {os.path.dirname(path)}")
PY
