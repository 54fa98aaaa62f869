"""What the launchers launch compiles well for an H100/H200 (sm_90a), checked on a machine without a GPU.

``tests/kernels/compile_for_gpu.py`` records every launch of the real launchers (Triton's own
specializations: stride-1 and divisible-by-16 arguments, constexprs, warps, stages) at the Llama-3-8B
head and at D=2048, V=32000, and compiles each down to a cubin. Here, for every launch:

- shared memory within the 227 KiB a block may opt into on sm_90;
- no register spills in a kernel launched for bf16/fp16 inputs (a spill is a local-memory round trip in
  the inner loop; the KL forward once spilled, see the note on `fwd_kl` in `ops/_config.py`);
- every bf16 kernel with a ``tl.dot`` uses Hopper's ``wgmma`` (not the older ``mma.sync`` path).
Runs in a subprocess without ``TRITON_INTERPRET`` (about 2-3 minutes on 2 cores).
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
def test_every_launch_compiles_for_sm90a_without_spills_and_with_wgmma():
    triton_backends = pytest.importorskip("triton.backends")
    if "nvidia" not in triton_backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.compile_for_gpu", "--arch", "90"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    recorded, results = lines[0]["recorded_launches"], lines[1:]
    assert len(results) == recorded
    labels = {lb for r in results for lb in r["labels"]}
    for shape in ("llama3-8b", "d2048-v32000"):  # every backend, KL mode and dtype was recorded at both shapes
        for kl in (0, 1, 2):
            assert any(lb.startswith(f"split-kl{kl}-bfloat16-{shape}") for lb in labels), (shape, kl)
            assert any(lb.startswith(f"triton-atomic-kl{kl}-bfloat16-{shape}") for lb in labels), (shape, kl)
    kernels = {r["kernel"] for r in results}
    assert {"_linear_fwd_kernel", "_linear_bwd_kernel", "_split_stats_kernel", "_split_dz_kernel",
            "_segment_sums_kernel", "_segment_sums_bwd_kernel"} <= kernels
    for r in results:
        summary = (f"{r['kernel']} {r['labels'][0]}: {r['registers']} registers, spills {r['spill_store_bytes']} B, "
                   f"shared {r['shared_bytes']} B, wgmma {r['wgmma']}")
        print(summary)
        assert r["cubin_bytes"] > 0, summary
        assert r["shared_bytes"] <= H100_MAX_SHARED_BYTES, summary
        half = {"bfloat16", "float16"} & set(r["input_dtypes"])
        if half:
            assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, summary
        if "bfloat16" in r["input_dtypes"] and r["has_dot"]:
            assert r["wgmma"], summary
