#!/usr/bin/env bash
# Fetch, here (where PyPI answers), the wheels that picochat needs and a lent GPU's image lacks,
# into .whl/ (git-ignored), for bench/gpu_run.sh to install there. The image holds torch, numpy,
# pyarrow, tiktoken, safetensors, transformers, matplotlib and the rest, but not rustbpe (the
# tokenizer trainer), nor fastapi and uvicorn (chat-web) with pydantic: every picochat import that
# reaches them would fail there. The versions are the ones the test suite runs with here.
#
#   bash bench/device_wheels.sh          # then: run(command="bash bench/gpu_run.sh", carry=[".whl"])
#
# PYVER: the device's Python (3.12 on the lent H200s; see /work/.library/device/KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
rm -rf .whl.new
python3 -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl.new rustbpe==0.1.0 fastapi==0.165.0 uvicorn==0.55.0
rm -rf .whl && mv .whl.new .whl  # the earlier wheels stay until the new ones are all there
ls .whl
du -sh .whl
