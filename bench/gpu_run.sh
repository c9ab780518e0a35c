#!/usr/bin/env bash
# The command to give a lent GPU: it puts this checkout on the path (picochat is not installed
# there), installs the carried wheels (bench/device_wheels.sh) if picochat's imports need them, and
# runs bench/gpu_check.py, its results block into $OUT (the folder the device tool brings back)
# and its log beside it.
#
#   run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=560)
#
# Arguments go to gpu_check.py (--deadline-s, --sections, --smoke). Append $OUT/gpu_check.md to
# bench/RESULTS.md afterwards, with the commit: the device gets the files without .git.
# `bash bench/gpu_run.sh pipeline` runs bench/gpu_pipeline.sh (the d12 pipeline) instead.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT" || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
imports() {  # what the device's Python lacks shows here in one line, not as a traceback minutes in
  (cd bench && python3 -c "import picochat.tokenizer, picochat.serve, bench_chat, bench_engine, bench_rl, bench_serve
print('picochat from', picochat.__file__)")
}
WHEELS=${WHEELS:-.whl}
if ! imports >/dev/null 2>&1 && [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "could not install the carried wheels in $WHEELS"; exit 1; }
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if ! imports 2>&1 | tail -1; then
  echo "picochat cannot be imported here: run bench/device_wheels.sh, and carry .whl"
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/nvidia_smi.txt"
if [ "${1:-}" = pipeline ]; then
  shift
  OUT=$OUT bash bench/gpu_pipeline.sh "$@"
  exit
fi
python3 bench/gpu_check.py --results "$OUT/gpu_check.md" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
