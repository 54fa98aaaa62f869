"""`tisdpo demo --model smollm2` (tisdpo/demo_smollm2.py) at its --quick size through the `tisdpo` entry point, on the
real SmolLM2-135M-Instruct (marker `realmodel`): the table's numbers are finite and consistent with the results file,
the weight picture and the figures are written, and a rerun's weight estimation is served by the cache."""

from __future__ import annotations

import json
import math
import os

import pytest

from tisdpo import cli
from tisdpo.demo_smollm2 import QUICK, SmolLM2DemoConfig, load_dialogues, split_dialogues, token_weights

pytestmark = pytest.mark.realmodel

RUNS = ("DPO", "TIS-DPO")


def test_quick_demo_through_the_cli(smollm2_dir, smollm2_fp32, smollm2_tokenizer, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--model", "smollm2", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    n = results["held_out_pairs"]
    assert (results["train_pairs"], n) == (QUICK["train_pairs"], QUICK["held_out_pairs"])
    assert not results["weights_reused"]  # a fresh output directory: the weights were computed
    table = printed[printed.index("held-out reward accuracy"):]
    for name in RUNS:
        accuracy, correct, margin = (results[k][name] for k in ("reward_accuracy", "correct", "mean_margin"))
        first, last = results["loss"][name]
        assert 0 <= correct <= n and accuracy == correct / n, (name, accuracy, correct)
        assert math.isfinite(margin) and math.isfinite(last) and last > 0, (name, margin, last)
        # step 1: the policy is the reference, so the margin is 0 and the loss -log sigmoid(0) = ln 2, up to float32
        # rounding of the per-response log-ratio sums (eps 1.2e-7 x ~100 tokens x |log p| <= 10, times beta / 2)
        assert abs(first - math.log(2)) <= 1e-5, (name, first)
        row = f"{accuracy:.3f} ({correct}/{n})", f"{margin:+.4f}", f"{first:.4f}", f"{last:.4f}"
        assert any(line.split()[:1] == [name] and line.split()[1:] == " ".join(row).split()
                   for line in table.splitlines()), (name, row, table)
    # the weight picture: the highest and lowest tokens of a chosen and a rejected response, 5 each
    for label in ("highest", "lowest"):
        lines = [line for line in printed.splitlines() if line.strip().startswith(label)]
        assert len(lines) == 2 and all(line.count(" w=") == 5 for line in lines), lines
    assert (out / "weights.png").stat().st_size > 1000 and (out / "weights.html").stat().st_size > 1000
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary file left

    # a rerun's step 3 (the same training pairs, model and cache) is served by the cache: no forward call
    cfg = SmolLM2DemoConfig(output_dir=str(out), **QUICK)
    train, _ = split_dialogues(load_dialogues(), cfg.held_out_pairs, cfg.train_pairs, cfg.seed)
    calls = []
    handle = smollm2_fp32.register_forward_hook(lambda *args: calls.append(1))
    try:
        weighted, reused = token_weights(train, smollm2_fp32, smollm2_tokenizer, smollm2_dir, cfg, print)
    finally:
        handle.remove()
    assert reused and calls == [] and len(weighted) == len(train)
    assert all(len(w) > 0 for w in weighted["chosen_weights"])
