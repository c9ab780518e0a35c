#!/usr/bin/env bash
# The main job's pipeline at d12 on one lent GPU, on the data bench/device_data.sh carried in
# .device_data: tok-train, tok-eval, base-train d12 at the reference's sizes (T=2048, 524,288
# tokens a step) for STEPS steps, base-eval (CORE capped at 500 examples a task: partial), a
# short chat-sft, a chat-eval subset and the report, copied to $OUT with the stage logs.
# Run it through gpu_run.sh, which puts the checkout on the path. Its numbers are base-train's
# tok/s and MFU and each stage's time; the sample holds about 0.5M tokens, so every step is an
# epoch of it and the scores say nothing about d12.
#
#   run(command="bash bench/gpu_run.sh pipeline", carry=[".whl", ".device_data"], timeout_s=540)
#
# Not yet run on a GPU; about 6 minutes is a guess (compiling, 60 steps, CORE, SFT, chat-eval).
# SMOKE=1 runs the same stages at toy sizes on the CPU (about a minute; tests/test_gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DEVICE_DATA:-$PWD/.device_data}  # pretrain/*.parquet, eval_bundle.zip, task_mirror/
[ -d "$D/pretrain" ] || { echo "no $D: run bench/device_data.sh first, and carry .device_data"; exit 1; }
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
D=$(cd "$D" && pwd)
cd "$OUT"  # the stages' working directory: the report's copy lands here, not in the checkout
export PICOCHAT_HOME=${PICOCHAT_HOME:-/tmp/picochat_gpu_pipeline} PICOCHAT_EVAL_BUNDLE=$D/eval_bundle.zip \
  PICOCHAT_TASK_DATA_URL=$D/task_mirror
: > "$OUT/times.txt"
rm -rf "$OUT/report"
start=$(date +%s)
stage() {  # stage NAME ARGS...: one picochat stage, its log in $OUT and its wall time in $OUT/times.txt
  local name=$1 t0
  shift
  t0=$(date +%s)
  echo "=== [$(( t0 - start )) s] $name"
  python3 -m picochat "$@" 2>&1 | tee "$OUT/$name.log"
  echo "$name $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"
}

if [ "${SMOKE:-0}" = 1 ]; then
  VOCAB=1024
  BASE=(--depth 2 --head-dim 64 --max-seq-len 128 --window-pattern L --device-batch-size 4 --total-batch-size 512
        --num-iterations 6 --eval-every 3 --eval-tokens 1024)
  CORE=(--max-per-task 16 --tasks copa,arc_easy --device-batch-size 4 --split-tokens 1024)
  SFT=(--num-iterations 4 --eval-every 2 --eval-tokens 1024 --spelling-bee 50 --simple-spelling 50)
  CHAT=(-a "ARC-Easy|GSM8K" -x 4 -b 4 -m 16)
else
  [ -s "$D/core_tasks.txt" ] || { echo "no $D/core_tasks.txt: run bench/device_data.sh again"; exit 1; }
  VOCAB=16384  # the reference's 32,768 needs more merges than the 2.6M-character sample holds (26,464)
  BASE=(--depth 12 --num-iterations "${STEPS:-60}" --eval-every 30 --eval-tokens 524288)
  CORE=(--max-per-task 500 --device-batch-size 32 --split-tokens 524288 --tasks "$(cat "$D/core_tasks.txt")")
  SFT=(--num-iterations 40 --eval-every 20)
  CHAT=(-a "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval" -x 100)
fi
stage tok-train tok-train --dataset "$D/pretrain" --vocab-size "$VOCAB"
stage tok-eval tok-eval --dataset "$D/pretrain"
stage base-train base-train --dataset "$D/pretrain" --model-tag d12 --overwrite "${BASE[@]}" \
  --core-metric-every -1 --sample-every -1
stage base-eval base-eval --dataset "$D/pretrain" --model-tag d12 "${CORE[@]}"
stage chat-sft chat-sft --model-tag d12 --overwrite --chatcore-every -1 "${SFT[@]}"
stage chat-eval chat-eval -i sft -g d12 "${CHAT[@]}"
stage report report --base-tag d12 --sft-tag d12
cp -r "$PICOCHAT_HOME/report" "$OUT/report"
echo "done in $(( $(date +%s) - start )) s"
