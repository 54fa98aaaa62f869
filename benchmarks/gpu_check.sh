#!/usr/bin/env bash
# The prepared GPU check (docs/design.md §7): run first thing on a GPU machine, then commit OUT/summary.{md,json}
# as benchmarks/results/<device>.{md,json}. Offline machine: install the carried wheels first
# (benchmarks/fetch_gpu_wheels.sh, run where PyPI is reachable, writes .whl/).
#   benchmarks/gpu_check.sh OUT_DIR            # GPU, <= 8 minutes, each stage under its own timeout
#   benchmarks/gpu_check.sh OUT_DIR --smoke    # CPU dry run (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--smoke]}"
shift
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
exec timeout 480 python3 -m benchmarks.gpu_check "$out" "$@"
