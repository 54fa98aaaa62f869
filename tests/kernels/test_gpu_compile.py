"""The Triton kernels compile for an H100/H200 (sm_90) on a machine without a GPU.

The CPU tests run the kernels through the Triton interpreter, which accepts programs that the GPU
compiler rejects; this runs Triton's full compiler, down to a cubin, for every variant the launchers
use (``tests/kernels/compile_for_gpu.py``), in a subprocess without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
H100_MAX_SHARED_BYTES = 227 * 1024  # opt-in dynamic shared memory per block on sm_90


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90():
    triton_backends = pytest.importorskip("triton.backends")
    if "nvidia" not in triton_backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    from .compile_for_gpu import _variants

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.compile_for_gpu", "--arch", "90"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in results] == [v[0] for v in _variants()]
    for r in results:
        assert r["cubin_bytes"] > 0, r
        assert r["shared_bytes"] <= H100_MAX_SHARED_BYTES, r
