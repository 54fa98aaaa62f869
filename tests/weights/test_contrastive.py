"""tisdpo.contrastive: the S / D recipes as trainer configurations, training the pair, the command."""

import logging

import pytest
import torch

from tisdpo import TISDPOConfig
from tisdpo.contrastive import contrastive_configs, train_contrastive_models
from tisdpo.data import PreferenceCollator, load_preference_dataset, tokenize_row
from tisdpo.demo import build_model, build_tokenizer, make_preference_dataset
from tisdpo.modeling import token_logps


def _args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path / "run"), "max_steps": 12, "per_device_train_batch_size": 8,
            "learning_rate": 1e-2, "lr_scheduler_type": "constant", "report_to": [], "save_strategy": "no",
            "use_cpu": True, "disable_tqdm": True, "activation_checkpointing": False, "max_length": None,
            "max_prompt_length": None}
    return TISDPOConfig(**{**base, **kw})


def test_configs_of_each_method(tmp_path):
    args = _args(tmp_path, beta=0.3, kl="tdpo1")
    plus, minus = contrastive_configs(args, "S")
    assert (plus.loss_type, plus.reverse_preferences, minus.loss_type, minus.reverse_preferences) == (
        ["sft"], False, ["sft"], True)
    assert plus.kl is None and plus.output_dir.endswith("run/plus") and minus.output_dir.endswith("run/minus")
    plus, minus = contrastive_configs(args, "D")
    assert (plus.loss_type, minus.loss_type, minus.reverse_preferences) == (["sigmoid"], ["sigmoid"], True)
    assert plus.beta == 0.3 and plus.kl == "tdpo1" and plus.max_steps == 12
    mpo = _args(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], use_weighting=True)
    plus, _ = contrastive_configs(mpo, "S")
    assert (plus.loss_type, plus.loss_weights, plus.use_weighting) == (["sft"], None, False)
    with pytest.raises(ValueError, match="method P needs no training"):
        contrastive_configs(args, "P")
    with pytest.raises(TypeError, match="TISDPOConfig"):
        contrastive_configs(object(), "S")


def _response_logps(model, rows, tokenizer, side):
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        logps = token_logps(model, batch).sum(1)
    return logps[:len(rows)] if side == "chosen" else logps[len(rows):]


def test_method_s_trains_a_chosen_and_a_rejected_model(tmp_path):
    """After SFT on chosen (pi_plus) and on rejected (pi_minus), pi_plus prefers the chosen responses more
    than pi_minus does, and the other way round; the starting model is untouched; both are saved."""
    tokenizer = build_tokenizer()
    data = make_preference_dataset(48, seed=5)
    start = build_model(tokenizer, hidden_size=32, num_layers=1, seed=0)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    plus, minus = train_contrastive_models(start, data, "S", _args(tmp_path), processing_class=tokenizer)
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in before.items())
    rows = [tokenize_row(ex, tokenizer) for ex in data]
    chosen_margin = _response_logps(plus, rows, tokenizer, "chosen") - _response_logps(minus, rows, tokenizer, "chosen")
    rejected_margin = (_response_logps(plus, rows, tokenizer, "rejected")
                       - _response_logps(minus, rows, tokenizer, "rejected"))
    assert chosen_margin.mean() > rejected_margin.mean()
    for side in ("plus", "minus"):
        assert (tmp_path / "run" / side / "config.json").exists()
    with pytest.raises(ValueError, match="uses no reference model"):
        train_contrastive_models(start, data, "S", _args(tmp_path), processing_class=tokenizer, ref_model=start)


def test_command_line(tmp_path, caplog):
    """`tisdpo contrastive --method D` with trainer flags: two short DPO runs, saved side by side, each announced."""
    from tisdpo.cli import main

    caplog.set_level(logging.INFO, logger="tisdpo.contrastive")

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, num_layers=1, seed=0)
    model.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    make_preference_dataset(16, seed=6).to_json(str(tmp_path / "pairs.jsonl"), lines=True)
    status = main(["contrastive", "--method", "D", "--model_name_or_path", str(tmp_path / "sft"),
                   "--dataset_name", str(tmp_path / "pairs.jsonl"), "--output_dir", str(tmp_path / "pair"),
                   "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none",
                   "--save_strategy", "no", "--use_cpu", "true", "--max_prompt_length", "64"])
    assert status == 0
    for k, side in enumerate(("plus", "minus"), start=1):
        assert (tmp_path / "pair" / side / "model.safetensors").exists()
        assert (f"Method D, training {k} of 2: pi_{side} (loss_type=sigmoid, reverse_preferences={side == 'minus'}) "
                f"-> {tmp_path / 'pair' / side}") in caplog.text
    # the saved pair (with its tokenizer) feeds `tisdpo estimate-weights` directly
    assert main(["estimate-weights", "--method", "D", "--plus-model", str(tmp_path / "pair" / "plus"),
                 "--minus-model", str(tmp_path / "pair" / "minus"), "--dataset", str(tmp_path / "pairs.jsonl"),
                 "--output", str(tmp_path / "weighted"), "--cache-dir", str(tmp_path / "cache"),
                 "--no-progress"]) == 0
    weighted = load_preference_dataset(str(tmp_path / "weighted"))
    assert len(weighted) == 16 and len(weighted[0]["chosen_weights"]) == len(
        tokenize_row(weighted[0], tokenizer)["chosen_input_ids"])
    assert main(["contrastive", "--method", "P"]) == 2
