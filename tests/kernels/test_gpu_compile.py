"""What the launchers launch compiles well for an H100/H200 (sm_90a), checked on a machine without a GPU.

``tests/kernels/compile_for_gpu.py`` records every launch of the real launchers (Triton's own
specializations: stride-1 and divisible-by-16 arguments, constexprs, warps, stages) at the Llama-3-8B
head and at D=2048, V=32000 with a row count that is not a multiple of 16, and compiles each down to a
cubin. ``compile_for_gpu.problems`` then holds, for every launch:

- shared memory within the 227 KiB a block may opt into on sm_90;
- no register spills in a kernel launched for bf16/fp16 inputs (a spill is a local-memory round trip in
  the inner loop; the compile check once found the KL forward spilling);
- every bf16 kernel with a ``tl.dot`` uses Hopper's ``wgmma`` (not the older ``mma.sync`` path).

The check itself is checked: three planted kernels (a spill, a one-warp bf16 dot, a 512 KiB pipeline)
must each fail it, for its own reason, and ``problems`` flags hand-made results of each kind. Each
compiling test runs in a subprocess without ``TRITON_INTERPRET`` (the 186 launches: about 4.5 minutes on 2
cores with a cold Triton cache; the planted kernels: under a minute).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .compile_for_gpu import H100_MAX_SHARED_BYTES, SHAPES, problems

REPO_ROOT = Path(__file__).resolve().parents[2]


def _compile(*args) -> list[dict]:
    """``compile_for_gpu`` in a subprocess: the per-launch results (their count checked against the record)."""
    triton_backends = pytest.importorskip("triton.backends")
    if "nvidia" not in triton_backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.compile_for_gpu", "--arch", "90", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    recorded, results = lines[0]["recorded_launches"], lines[1:]
    assert len(results) == recorded
    return results


@pytest.mark.slow
def test_every_launch_compiles_for_sm90a_without_spills_and_with_wgmma():
    results = _compile()
    labels = {lb for r in results for lb in r["labels"]}
    for shape in SHAPES:  # every backend, KL mode and dtype was recorded at both shapes
        for kl in (0, 1, 2):
            for dtype in ("bfloat16", "float16", "float32"):
                assert f"split-kl{kl}-{dtype}-{shape}" in labels, (shape, kl, dtype)
                assert f"triton-atomic-kl{kl}-{dtype}-{shape}" in labels, (shape, kl, dtype)
        # bf16 with and without a bias; the pair loss as the loss launches it
        for variant in ("atomic", "deterministic", "filtered"):
            assert {f"triton-{variant}-kl0-bfloat16-{shape}", f"triton-{variant}-kl0-bfloat16-{shape}-bias"} <= labels
        assert f"split-kl0-bfloat16-{shape}-bias" in labels
        for kl in (0, 1):  # the forwards with token statistics (the trainer's)
            for dtype in ("bfloat16", "float32"):
                assert {f"triton-stats-kl{kl}-{dtype}-{shape}", f"split-stats-kl{kl}-{dtype}-{shape}"} <= labels
        for source in ("dpo", "weights", "contrastive-origin", "contrastive-exp_clamp"):
            for kl in ("None", "tisdpo", "tdpo1"):
                assert f"pair-{source}-kl{kl}-{shape}" in labels, (source, kl, shape)
    assert any(n % 16 for n, _, _ in SHAPES.values())  # a row count Triton does not specialize as divisible by 16
    kernels = {r["kernel"] for r in results}
    assert {"_linear_fwd_kernel", "_linear_bwd_kernel", "_split_stats_kernel", "_split_dz_kernel",
            "_segment_sums_kernel", "_segment_sums_bwd_kernel"} <= kernels
    bad = []
    for r in results:
        summary = (f"{r['kernel']} {r['labels'][0]}: {r['registers']} registers, spills {r['spill_store_bytes']} B, "
                   f"shared {r['shared_bytes']} B, wgmma {r['wgmma']}")
        print(summary)
        assert r["cubin_bytes"] > 0, summary
        bad += [f"{summary}: {p}" for p in problems(r)]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_the_check_fails_on_planted_faults():
    """A spill, a bf16 dot on mma.sync and a 512 KiB pipeline, compiled like the real launches, each fail."""
    results = {r["labels"][0]: r for r in _compile("--planted")}
    assert set(results) == {"planted-spill-bfloat16", "planted-no-wgmma-bfloat16", "planted-shared-bfloat16"}
    spill, mma, shared = (results[f"planted-{k}-bfloat16"] for k in ("spill", "no-wgmma", "shared"))
    assert spill["spill_store_bytes"] > 0 and any(p.startswith("spills") for p in problems(spill)), spill
    assert mma["has_dot"] and not mma["wgmma"] and "a bf16 tl.dot without wgmma" in problems(mma), mma
    assert shared["shared_bytes"] > H100_MAX_SHARED_BYTES and \
        any(p.startswith("shared memory") for p in problems(shared)), shared


def _result(**overrides):
    good = {"input_dtypes": ["bfloat16"], "shared_bytes": 98304, "spill_store_bytes": 0, "spill_load_bytes": 0,
            "has_dot": True, "wgmma": True}
    return {**good, **overrides}


def test_problems_flags_each_fault():
    assert problems(_result()) == []
    assert problems(_result(shared_bytes=H100_MAX_SHARED_BYTES + 1)) == \
        [f"shared memory {H100_MAX_SHARED_BYTES + 1} B > {H100_MAX_SHARED_BYTES} B"]
    assert problems(_result(spill_load_bytes=8)) == ["spills 0 B stored, 8 B loaded"]
    assert problems(_result(input_dtypes=["float16"], spill_store_bytes=4)) == ["spills 4 B stored, 0 B loaded"]
    assert problems(_result(input_dtypes=["float32"], spill_store_bytes=4)) == []  # fp32 launches may spill
    assert problems(_result(wgmma=False)) == ["a bf16 tl.dot without wgmma"]
    assert problems(_result(wgmma=False, has_dot=False)) == []
