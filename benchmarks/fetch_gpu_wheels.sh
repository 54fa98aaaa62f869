#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that the offline GPU machine lacks for the GPU tests and
# benchmarks. Checked against that image (Python 3.12; torch 2.11, triton 3.6, transformers 5.17, accelerate,
# peft, pytest, pytest-benchmark, and datasets' own needs: filelock, numpy, pyarrow, pandas, tqdm, xxhash, fsspec,
# huggingface-hub, packaging, pyyaml): it has neither datasets nor its pinned dill and multiprocess, nor
# liger-kernel (needs torch>=2.1.2, triton>=2.3.1) or cut-cross-entropy (torch, triton). The pins below are the
# versions the CPU CI runs. Writes .whl/ in the repository root (ignored by git) and lists each wheel's
# requirements to compare with the image; benchmarks/gpu_check.sh installs .whl/ itself, otherwise:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# Python 3.12 wheels by default (the GPU image's); override with PYTHON_VERSION=3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON_VERSION:-3.12}"
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
python3 - <<'PY'
import pathlib, zipfile
for wheel in sorted(pathlib.Path(".whl").glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        needs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
                 if l.startswith(("Requires-Dist:", "Requires-Python:")) and "extra ==" not in l]
    print(f"{wheel.name} ({wheel.stat().st_size // 1024} KiB): {'; '.join(needs)}")
PY
