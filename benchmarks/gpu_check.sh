#!/usr/bin/env bash
# The prepared GPU check: run first thing on a GPU machine, then commit OUT/summary.{md,json} as
# benchmarks/results/<device>.{md,json} with this command, the versions and the device it printed.
# Offline machine: the carried wheels in .whl/ (benchmarks/fetch_gpu_wheels.sh, run where PyPI is
# reachable) are installed first. The whole command, install included, stays under 8 minutes; it prints
# the preflight first and one verdict block last (benchmarks/gpu_check.py).
#   benchmarks/gpu_check.sh OUT_DIR            # GPU
#   benchmarks/gpu_check.sh OUT_DIR --smoke    # CPU dry run at a tiny shape (CI); the arguments go in any order
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: benchmarks/gpu_check.sh OUT_DIR [--smoke]" >&2; exit 2; }
deadline=$((SECONDS + 480))
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
exec timeout "$((deadline - SECONDS))" python3 -m benchmarks.gpu_check "$@"
