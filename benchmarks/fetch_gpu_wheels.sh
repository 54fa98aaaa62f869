#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that a GPU machine without network access lacks for the
# GPU tests and benchmarks (its image has torch, triton, transformers, accelerate, peft, pytest, pytest-benchmark,
# pyarrow, ...; not datasets, liger-kernel or cut-cross-entropy). Writes .whl/ in the repository root (ignored by
# git). On the GPU machine, before the tests:
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# Python 3.12 wheels by default (the GPU image's); override with PYTHON_VERSION=3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON_VERSION:-3.12}"
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
ls -l .whl
