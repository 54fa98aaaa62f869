"""Smoke test of ``benchmarks/algorithm_study.py`` at tiny sizes (seconds): one transform and DPO on the synthetic
task, the JSON's fields, the paired summary, resuming after an interruption, and the markdown report."""

from __future__ import annotations

import json

import pytest

from benchmarks import algorithm_study as study
from tisdpo.demo import build_model, build_tokenizer, make_preference_dataset, reward_accuracy


def _run(path, transforms, seeds=(0,), lines=None):
    log = (lines.append if lines is not None else (lambda msg: None))
    return study.run_study("synthetic", list(seeds), str(path), preset="tiny", transforms=transforms, log=log)


def test_runs_records_and_resumes(tmp_path):
    path = tmp_path / "study.json"
    lines = []
    results = _run(path, ["rank_based"], lines=lines)
    on_disk = json.loads(path.read_text())
    assert on_disk["runs"] == results["runs"]
    assert [(r["seed"], r["name"]) for r in on_disk["runs"]] == [(0, "DPO"), (0, "TIS-DPO/rank_based")]
    for run in on_disk["runs"]:
        assert {"reward_accuracy", "reward_margin", "true_reward", "final_train_loss", "seconds"} <= set(run)
        assert 0.0 <= run["reward_accuracy"] <= 1.0
    assert set(on_disk["seed_info"]["0"]) == {"key_token_auc", "sft_true_reward", "setup_seconds"}
    assert on_disk["settings"] == study.settings_of("synthetic", "tiny")
    assert len(on_disk["invocations"]) == 1 and "versions" in on_disk["invocations"][0]
    # one progress line per run
    assert sum(line.startswith("[") and "/2] seed 0" in line for line in lines) == 2

    dpo, tis = on_disk["runs"]
    paired = on_disk["summary"]["TIS-DPO/rank_based"]["reward_margin"]["vs_dpo"]
    assert paired["differences"] == [tis["reward_margin"] - dpo["reward_margin"]]
    assert paired["wins"] + paired["ties"] + paired["losses"] == 1
    assert paired["reliable_win"] is False  # one seed is never enough (MIN_SEEDS)
    assert "vs_dpo" not in on_disk["summary"]["DPO"]["reward_margin"]

    # a finished study is not rerun; an interrupted one (its last run missing) redoes only that run, identically
    lines.clear()
    _run(path, ["rank_based"], lines=lines)
    assert "0 runs to do, 2 already" in lines[0] and len(json.loads(path.read_text())["runs"]) == 2
    on_disk["runs"].pop()
    path.write_text(json.dumps(on_disk))
    lines.clear()
    resumed = _run(path, ["rank_based"], lines=lines)
    assert "1 runs to do, 1 already" in lines[0]
    assert [r["name"] for r in resumed["runs"]] == ["DPO", "TIS-DPO/rank_based"]
    for key in ("reward_accuracy", "reward_margin", "true_reward", "final_train_loss"):
        assert resumed["runs"][1][key] == tis[key], key  # CPU, one thread, fixed seeds: bit-identical

    text = study.report([str(path)], str(tmp_path / "study.md"))
    assert "| TIS-DPO/rank_based |" in text and "| DPO |" in text and "python -m benchmarks.algorithm_study" in text


def test_other_settings_are_refused(tmp_path):
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"task": "synthetic", "settings": {"preset": "quick"}, "runs": []}))
    with pytest.raises(SystemExit, match="other settings"):
        _run(path, ["origin"])


def test_margins_agree_with_the_demos_accuracy():
    """``reward_margins`` > 0 on exactly the pairs ``tisdpo.demo.reward_accuracy`` counts (same sums, so the
    comparison is exact), on an untrained model against another one."""
    tokenizer = build_tokenizer()
    data = make_preference_dataset(24, seed=3)
    model, ref = build_model(tokenizer, hidden_size=16, num_layers=1, seed=1), build_model(tokenizer, hidden_size=16,
                                                                                           num_layers=1, seed=2)
    margins = study.reward_margins(model, ref, data, tokenizer, beta=0.1)
    assert len(margins) == 24
    assert sum(m > 0 for m in margins) / 24 == reward_accuracy(model, ref, data, tokenizer)
