#!/usr/bin/env bash
# The small end-to-end run, sized for a laptop CPU (a few minutes; a GPU is faster):
# set up, download a few shards, train and evaluate a tokenizer, pretrain a tiny
# model, evaluate it. Everything lands under $PICOCHAT_HOME (~/.cache/picochat).
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
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [ -d "$DATASET" ]; then
  echo "using the parquet folder $DATASET (no download)"
else
  picochat download -n 2 --dataset "$DATASET"
fi

picochat tok-train --dataset "$DATASET" --max-chars 50000000 --vocab-size 8192
picochat tok-eval --dataset "$DATASET"

picochat base-train --dataset "$DATASET" --model-tag tiny \
  --depth 4 --head-dim 64 --max-seq-len 256 --window-pattern L \
  --device-batch-size 8 --total-batch-size 2048 --num-iterations 200 \
  --eval-every 50 --eval-tokens 16384 --core-metric-every -1 --sample-every 200

picochat base-eval --dataset "$DATASET" --model-tag tiny --device-batch-size 8 --split-tokens 16384 \
  --tasks copa,winograd,arc_easy,bigbench_operators --max-per-task 32

python - <<'PY'
import json, os
home = os.environ.get("PICOCHAT_HOME") or os.path.expanduser("~/.cache/picochat")
path = os.path.join(home, "base_checkpoints", "tiny", "metrics.jsonl")
steps = [m for m in map(json.loads, open(path)) if "loss" in m]
print(f"loss curve: step {steps[0]['step']} loss {steps[0]['loss']:.4f} -> step {steps[-1]['step']} loss {steps[-1]['loss']:.4f}")
print(f"checkpoints and metrics: {os.path.dirname(path)}")
PY
