"""``python -m benchmarks.report`` on a small synthetic pytest-benchmark JSON."""

from __future__ import annotations

import json

import pytest

from .report import main

GPU = "NVIDIA H100 80GB HBM3"


def _info(provider, tokens, peak_mib):
    d, v = 4096, 128256
    return {"provider": provider, "variant": "tisdpo", "ours": provider.startswith("tisdpo"), "head": "llama3-8b",
            "hidden_size": d, "vocab_size": v, "sequences": 2, "tokens_per_sequence": tokens,
            "response_tokens": 2 * tokens, "logits": "random", "dtype": "bfloat16", "flops": 6 * 2 * tokens * d * v,
            "peak_memory_bytes": None if peak_mib is None else peak_mib * 2**20, "entropy_nats": 11.2}


def _bench(provider, tokens, median_s, peak_mib):
    return {"name": f"test[{provider}-{tokens}]", "group": "g", "extra_info": _info(provider, tokens, peak_mib),
            "stats": {"median": median_s}}


@pytest.fixture
def bench_json(tmp_path):
    data = {
        "datetime": "2026-11-23T00:00:00",
        "benchmarks": [
            _bench("tisdpo_triton", 1024, 0.010, 100), _bench("naive", 1024, 0.025, 4000),
            _bench("tisdpo_triton", 4096, 0.040, 400),
        ],
        "tisdpo": {"device": GPU, "device_slug": "nvidia-h100-80gb-hbm3", "bf16_peak_tflops": 989.4,
                   "versions": {"torch": "2.11"}, "command": "pytest benchmarks", "smoke": False, "rounds": [10, 2],
                   "not_run": [{**_info("naive", 4096, None), "status": "OOM", "reason": "CUDA out of memory"},
                               {**_info("cce", 1024, None), "status": "unavailable", "reason": "not importable"}]},
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def test_report_tables_plots_and_raw_json(bench_json, tmp_path, capsys):
    out = tmp_path / "results"
    main(["--json", str(bench_json), "--out", str(out), "--note", "an idle machine"])
    md = (out / "nvidia-h100-80gb-hbm3.md").read_text()
    assert GPU in md and "`pytest benchmarks`" in md and "Note: an idle machine" in md
    assert "10 timed rounds, after 2 warm-up" in md
    # naive is 2.5x slower and 40x larger than ours at 2 x 1024, and out of memory at 2 x 4096
    assert "| 2 x 1024 | 10.0 (1.00x) | 25.0 (2.50x) |" in md
    assert "| 2 x 1024 | 100 (1.00x) | 4000 (40.00x) |" in md
    assert "| 2 x 4096 | 40.0 (1.00x) | OOM |" in md
    # 6*N*D*V / t at 2 x 1024 tokens: 645.5 TFLOP/s, 65% of the H100 bf16 peak
    assert "| 2 x 1024 | 645.5 (65%) |" in md
    assert "- `cce`: not importable" in md
    for name in ("nvidia-h100-80gb-hbm3-time.png", "nvidia-h100-80gb-hbm3-memory.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    raw = json.loads((out / "nvidia-h100-80gb-hbm3.json").read_text())
    assert raw["tisdpo"]["report_command"].startswith("python -m benchmarks.report --json")
    assert str(out / "nvidia-h100-80gb-hbm3.md") in capsys.readouterr().out


def test_report_refuses_foreign_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(SystemExit, match="not written by `pytest benchmarks`"):
        main(["--json", str(path), "--out", str(tmp_path)])


def test_report_merges_runs_of_one_device(bench_json, tmp_path):
    data = json.loads(bench_json.read_text())
    second = json.loads(bench_json.read_text())
    data["benchmarks"], second["benchmarks"] = data["benchmarks"][:1], data["benchmarks"][1:]
    second["tisdpo"]["not_run"], second["tisdpo"]["command"] = [], "pytest benchmarks -k naive"
    first_path, second_path = tmp_path / "a.json", tmp_path / "b.json"
    first_path.write_text(json.dumps(data))
    second_path.write_text(json.dumps(second))
    main(["--json", str(first_path), str(second_path), "--out", str(tmp_path / "merged")])
    md = (tmp_path / "merged" / "nvidia-h100-80gb-hbm3.md").read_text()
    assert "| 2 x 1024 | 10.0 (1.00x) | 25.0 (2.50x) |" in md
    assert "`pytest benchmarks && pytest benchmarks -k naive`" in md
    second["tisdpo"]["device_slug"] = "cpu"
    second_path.write_text(json.dumps(second))
    with pytest.raises(SystemExit, match="cannot merge"):
        main(["--json", str(first_path), str(second_path), "--out", str(tmp_path / "merged")])
