#!/usr/bin/env bash
# Set up a virtual environment (CPU torch) and run lint + the test suite.
# This is the README's test command; .ci/run calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# PyPI's Linux torch is the CUDA build (GBs of libraries); PICOCHAT_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes the small CPU-only build instead on a machine without a GPU.
python -m pip install -q torch==2.13.0 ${PICOCHAT_TORCH_INDEX:+--index-url "$PICOCHAT_TORCH_INDEX"}
python -m pip install -q -e '.[dev]'
# The chat page's browser test drives a real headless Chromium (Debian's packages); it skips, and
# says why, only where they cannot be installed.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; } \
    || echo "could not install chromium: the browser test will skip"
fi
ruff check .
# One OpenMP thread per test process (compiled CPU runs are only bitwise reproducible this way),
# and one process per core: each builds the shared test data once (conftest.py).
OMP_NUM_THREADS=1 python -m pytest -q -n auto "$@"
