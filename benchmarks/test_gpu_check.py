"""The prepared GPU command: its CPU dry run (``benchmarks/gpu_check.sh OUT --smoke``) runs, writes its outputs and
prints the preflight and the verdict with every field; the driver keeps what it measured when killed; the verdict
decides PASS/MISS on GPU-like rows; the versions survive a machine without git."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from . import gpu_check
from .gpu_check import PREFLIGHT_FIELDS, ROWS, VERDICT_FIELDS

REPO_ROOT = Path(__file__).resolve().parent.parent


def _printed_fields(text: str, title: str) -> dict:
    """``{field: value}`` of the ``== title ==`` block in ``text``."""
    lines = text.split(f"== {title} ==\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {k.strip(): v.strip() for k, v in (line.split(" : ", 1) for line in lines)}


def test_gpu_check_smoke_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--smoke"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"preflight", "bench", "tests", "verdict"}
    pre = summary["preflight"]
    assert all(pre[k]["tflops"] > 0 for k in ("square GEMM", "logits GEMM", "dH GEMM", "dW GEMM"))
    rows = summary["bench"]["rows"]
    assert {r["provider"] for r in rows} == {"naive", "tisdpo_split", "tisdpo_torch"}
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == rows
    for r in rows:
        assert r["status"] == "ok", r
        n_d_v = 80 * 48 * 1000  # N = 2 x 40, D = 48, V = 1000
        inside_only = r["reference"] == "inside" and not r["kl"]
        assert r["executed_flops"] == (12 if r["kl"] else 10 if inside_only else 8) * n_d_v
        assert r["model_flops"] == (8 if r["kl"] or inside_only else 6) * n_d_v
    assert summary["tests"]["returncode"] == 0
    assert "| tisdpo_split |" in (tmp_path / "summary.md").read_text()
    # the preflight first, the verdict last, each with every field and a value for it
    assert proc.stdout.index("== preflight ==") < proc.stdout.index("== verdict ==")
    printed = _printed_fields(proc.stdout, "preflight")
    assert list(printed) == list(PREFLIGHT_FIELDS) and all(printed.values())
    assert "ok" in printed["precision flags"] and "error" not in printed["precision flags"]
    printed = _printed_fields(proc.stdout, "verdict")
    assert list(printed) == list(VERDICT_FIELDS) and all(printed.values())
    assert printed == summary["verdict"]
    assert printed["forward ms"].endswith(" ms") and printed["GEMM route"].startswith("fp32")
    for key in VERDICT_FIELDS:
        if key.startswith(("target", "vs ")) or key == "extra memory net of gradients":
            assert printed[key].startswith(gpu_check.NO_CUDA), (key, printed[key])


def test_split_rows_come_first_each_in_its_own_process(tmp_path, monkeypatch):
    """A sticky CUDA error (or a hang) in one row leaves the others; the order is split, peers, triton; and a
    driver killed mid-bench leaves bench.json and the summary with every row measured so far."""
    groups = [r.group for r in ROWS]
    assert groups == sorted(groups, key=["split", "peers", "triton"].index)
    spawned = []

    def fake_spawn(args, out, log_name, limit, smoke):
        spawned.append(args)
        if args == ["--step", "preflight"]:
            (out / "preflight.json").write_text(json.dumps({"device": "stand-in", "shape": None}))
            return None
        name = args[1]
        if name == "liger-flce":
            raise KeyboardInterrupt  # the outer timeout kills the driver here
        row = next(r for r in ROWS if r.name == name)
        data = {**gpu_check.asdict(row), "status": "ok", "forward_s": 0.03, "backward_s": 0.07, "total_s": 0.1,
                "floor_s": 0.09, "vs_floor": 1.1, "gemm_tflops": 790.0, "peak_extra_bytes": 3 << 28,
                "grad_bytes": 1 << 28}
        (out / f"row-{name}.json").write_text(json.dumps(data))
        return None if name != "split-kl-tdpo1" else "exit 1 (see row-split-kl-tdpo1.log)"

    monkeypatch.setattr(gpu_check, "_spawn", fake_spawn)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.run_all(tmp_path, smoke=False)
    assert [a[1] for a in spawned[1:]] == ["split", "split-ref-inside", "split-kl-tisdpo", "split-kl-tdpo1",
                                           "liger-flce"]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert [r["status"] for r in bench["rows"]] == ["ok", "ok", "ok", "error"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"]["total ms"].startswith("100.0 ms")
    assert summary["verdict"]["target >= 1.2x faster than Liger"] == "n/a (no Liger comparison finished)"


def _row(name, total, **extra):
    row = next(r for r in ROWS if r.name == name)
    return {**gpu_check.asdict(row), "status": "ok", "forward_s": total / 3, "backward_s": 2 * total / 3,
            "total_s": total, **extra}


def test_verdict_pass_and_miss():
    pre = {"device": "NVIDIA H200", "shape": {"N": 16384, "D": 4096, "V": 128256, "dtype": "bfloat16"},
           "GEMM route": "out_dtype: ..."}
    head = _row("split", 0.100, floor_s=0.090, vs_floor=0.100 / 0.090, gemm_tflops=780.0,
                peak_extra_bytes=int(1.5 * 2**30), grad_bytes=2**30, gemm_route="out_dtype: torch.mm/addmm")
    rows = {r["name"]: r for r in (head, _row("split-ref-inside", 0.120), _row("split-kl-tisdpo", 0.140),
                                    _row("liger-flce", 0.150), _row("liger-dpo", 0.130),
                                    _row("liger-dpo-ref-inside", 0.160), _row("cce-exact", 0.110))}
    rows["cce-default"] = {**gpu_check.asdict(next(r for r in ROWS if r.name == "cce-default")),
                           "status": "unavailable", "reason": "cut_cross_entropy is not importable"}
    v = gpu_check.verdict(rows, pre, smoke=False)
    assert list(v) == list(VERDICT_FIELDS)
    assert v["target fwd+bwd <= 1.15x floor"] == "PASS (1.11x)"
    assert v["target >= 1.2x faster than Liger"].startswith("PASS (slowest margin 1.30x over 3")
    assert v["target extra memory <= 0.5 GiB"] == "PASS (0.500 GiB)"
    assert v["target kl=tisdpo <= 1.5x plain"] == "PASS (1.40x)"
    assert v["vs CCE exact"].startswith("1.10x (ours 100.0 ms, cce_exact 110.0 ms; reference precomputed)")
    assert v["vs CCE default"].startswith("n/a (unavailable: cut_cross_entropy")
    assert v["vs Liger fused linear DPO, reference inside"].startswith("1.33x (ours 120.0 ms")
    assert v["GEMM route"].startswith("out_dtype")
    rows["liger-dpo"] = _row("liger-dpo", 0.110)
    rows["split-kl-tisdpo"] = _row("split-kl-tisdpo", 0.160)
    rows["split"] = {**head, "vs_floor": 1.2}
    v = gpu_check.verdict(rows, pre, smoke=False)
    assert v["target >= 1.2x faster than Liger"].startswith("MISS (slowest margin 1.10x")
    assert v["target kl=tisdpo <= 1.5x plain"] == "MISS (1.60x)"
    assert v["target fwd+bwd <= 1.15x floor"] == "MISS (1.20x)"
    v = gpu_check.verdict({}, {}, smoke=False)  # nothing finished: still every field
    assert list(v) == list(VERDICT_FIELDS) and all(v.values())


def test_versions_without_git(monkeypatch):
    from . import env

    def no_git(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "git")

    monkeypatch.setattr(env.subprocess, "run", no_git)
    assert env.library_versions()["git_commit"].startswith("unknown (git: No such file or directory")
