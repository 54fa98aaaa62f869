"""The prepared GPU command's CPU dry run (``benchmarks/gpu_check.sh OUT --smoke``) runs and writes its outputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--smoke"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"env", "bench", "tests"}
    assert all(r["gemm_tflops"][k] > 0 for r in (summary["env"],) for k in r["gemm_tflops"])
    rows = summary["bench"]["rows"]
    assert {r["provider"] for r in rows} == {"naive", "tisdpo_split", "tisdpo_torch"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["executed_flops"] == (12 if r["kl"] else 8) * 80 * 48 * 1000  # N = 2 x 40, D = 48, V = 1000
        assert r["model_flops"] == (8 if r["kl"] else 6) * 80 * 48 * 1000
    assert summary["tests"]["returncode"] == 0
    assert "| tisdpo_split |" in (tmp_path / "summary.md").read_text()
