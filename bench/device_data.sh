#!/usr/bin/env bash
# Build, here, the data bench/gpu_pipeline.sh runs on, since a lent GPU reaches no network:
# .device_data/ (git-ignored) with the pretraining sample, the CORE eval bundle zipped, and a task
# data mirror (bench/shared_task_mirror.py: real ARC, MMLU, GSM8K, the word list; SmolTalk and
# MMLU auxiliary_train are stand-ins), and core_tasks.txt, the CORE tasks the bundle has data for.
# All from ../shared, which only such optional checks read.
# What travels to the device is capped at 64 MiB, this folder and .whl included.
#
#   bash bench/device_data.sh [SHARED_DATA_DIR]      # default ../shared/data
set -euo pipefail
SHARED=$(cd "${1:-$(dirname "$0")/../../shared/data}" && pwd)
cd "$(dirname "$0")/.."
rm -rf .device_data
mkdir -p .device_data/pretrain
cp "$SHARED"/pretrain/*.parquet .device_data/pretrain/
(cd "$SHARED/eval_bundle" && python3 -c "
import shutil, sys
shutil.make_archive(sys.argv[1], 'zip', '.')" "$OLDPWD/.device_data/eval_bundle")
python3 bench/shared_task_mirror.py --shared "$SHARED/chat" --out .device_data/task_mirror
# the CORE tasks whose data the bundle holds (../shared lacks one of the 22), for base-eval --tasks
PYTHONPATH=$PWD python3 -c "
import sys
from pathlib import Path
from picochat.core_eval import load_tasks
print(','.join(t.label for t in load_tasks(Path(sys.argv[1])) if t.path.exists()))" "$SHARED/eval_bundle" \
  > .device_data/core_tasks.txt
echo "CORE tasks with data: $(tr ',' '\n' < .device_data/core_tasks.txt | wc -l)"
du -sh .device_data/* .device_data
