"""TISDPOConfig defaults and validation, and the `tisdpo` command line (tisdpo/config.py, tisdpo/cli.py,
tisdpo/commands/)."""

import importlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import yaml

from tests.trainer.tiny import ASSETS, HH_PATH, no_checkpointing, tiny_llama
from tisdpo import TISDPOConfig, cli
from tisdpo.commands.arguments import parse_train_args

RUN_YAML = os.path.join(ASSETS, "tiny_run.yaml")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(tmp_path, **kwargs):
    return TISDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)


def test_defaults(tmp_path):
    config = _config(tmp_path)
    # `gradient_checkpointing` is the field before transformers 5 and mirrors `activation_checkpointing` after
    assert config.gradient_checkpointing is True
    assert (config.beta, config.alpha, config.loss_type, config.kl) == (0.1, 0.5, ["sigmoid"], None)
    assert config.weight_transform == "origin" and config.padding_free is None
    assert config.resolved_model_init_kwargs() == {"dtype": torch.float32}  # CPU run
    assert _config(tmp_path, **no_checkpointing()).gradient_checkpointing is False


def test_dtype_resolution_and_json_kwargs(tmp_path):
    config = _config(tmp_path, model_init_kwargs='{"dtype": "bfloat16", "attn_implementation": "eager"}',
                     ref_model_init_kwargs={"torch_dtype": "float16"})
    assert config.resolved_model_init_kwargs() == {"dtype": torch.bfloat16, "attn_implementation": "eager"}
    assert config.resolved_model_init_kwargs("ref_model") == {"dtype": torch.float16}
    assert json.loads(json.dumps(config.to_dict()))["model_init_kwargs"]["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        _config(tmp_path, model_init_kwargs={"dtype": "float99"}).resolved_model_init_kwargs()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="kto"), "loss_type"),
        (dict(kl="forward"), "kl"),
        (dict(kl="tisdpo", loss_type="sft"), "sft"),
        (dict(kl="tdpo1", precompute_ref_log_probs=True), "precompute_ref_log_probs"),
        (dict(weight_transform="rank"), "weight_transform"),
        (dict(weight_transform="binary", weight_transform_kwargs={"top_fraction": 2.0}), "top_fraction"),
        (dict(weight_transform="exp_clamp", weight_transform_kwargs={"sigma": 1.0}), "transform_kwargs"),
        (dict(truncation_mode="middle"), "truncation_mode"),
        (dict(loss_backend="cuda"), "loss_backend"),
        (dict(beta=0.0), "beta"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(loss_type=["sigmoid", "kto"]), "loss_type"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights"),
        (dict(loss_type="exo_pair"), "label_smoothing"),
        (dict(loss_type="discopop", discopop_tau=-1.0), "discopop_tau"),
        (dict(ld_alpha=2.0), "ld_alpha"),
        (dict(loss_type="sft", use_weighting=True), "use_weighting"),
        (dict(loss_type="aot", use_weighting=True), "use_weighting"),
        (dict(loss_type=["sigmoid", "sft"], rpo_alpha=1.0), "rpo_alpha"),
        (dict(max_length=1), "max_length"),
    ],
)
def test_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **kwargs)


def test_loss_fields_mean_what_they_mean_in_trl(tmp_path):
    """TRL 1.16 DPOConfig semantics: a str loss_type becomes a list; label_smoothing does nothing to 'sigmoid' (a
    warning says so, naming 'cdpo', our old meaning); the deprecated rpo_alpha is an 'sft' term of that weight."""
    config = _config(tmp_path, loss_type="ipo", loss_weights=[0.5], ld_alpha=0.3, use_weighting=True,
                     discopop_tau=0.2)
    assert config.loss_type == ["ipo"] and not config.sft_only
    assert config.pair_loss_kwargs() == dict(loss_type=["ipo"], loss_weights=[0.5], label_smoothing=0.0,
                                             discopop_tau=0.2, ld_alpha=0.3, use_weighting=True)
    with pytest.warns(UserWarning, match="cdpo"):
        config = _config(tmp_path, label_smoothing=0.1)
    assert config.pair_loss_kwargs()["label_smoothing"] == 0.0
    assert _config(tmp_path, loss_type="cdpo", label_smoothing=0.1).pair_loss_kwargs()["label_smoothing"] == 0.1
    with pytest.warns(FutureWarning, match="rpo_alpha"):
        config = _config(tmp_path, loss_type="robust", label_smoothing=0.2, rpo_alpha=0.5)
    kwargs = config.pair_loss_kwargs()
    assert (kwargs["loss_type"], kwargs["loss_weights"], kwargs["label_smoothing"]) == (["robust", "sft"],
                                                                                        [1.0, 0.5], 0.2)
    assert _config(tmp_path, loss_type=["sft"]).sft_only and _config(tmp_path, loss_type=["sft", "sft"]).sft_only


def test_cli_loss_type_list_and_weights():
    argv = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o", "--use_cpu", "true",
            "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5", "--ld_alpha", "0.5"]
    _, config = parse_train_args(argv)
    assert config.loss_type == ["sigmoid", "sft"] and config.loss_weights == [1.0, 0.5] and config.ld_alpha == 0.5


def test_trainer_rejects_plain_training_arguments(tmp_path, tok):
    from transformers import TrainingArguments

    from tisdpo import TISDPOTrainer

    with pytest.raises(TypeError, match="TISDPOConfig"):
        TISDPOTrainer(tiny_llama(len(tok)), args=TrainingArguments(output_dir=str(tmp_path)), processing_class=tok)


def test_cli_train_from_yaml_with_flag_override(tmp_path, tok):
    """`tisdpo train --config tests/assets/tiny_run.yaml --model_name_or_path DIR ... --max_steps 2` loads a saved
    model by path (and its tokenizer), trains, saves model, tokenizer and trainer state."""
    model_dir = tmp_path / "model"
    tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    flags = ["--model_name_or_path", str(model_dir), "--dataset_name", HH_PATH, "--output_dir", str(out)]
    assert cli.main(["train", "--config", RUN_YAML, *flags, "--max_steps", "2", "--beta", "0.2"]) == 0
    with open(out / "trainer_state.json") as f:
        state = json.load(f)
    assert state["global_step"] == 2
    assert os.path.exists(out / "config.json") and os.path.exists(out / "tokenizer.json")

    _, parsed = parse_train_args(["--config", RUN_YAML, *flags, "--beta", "0.2"])
    assert parsed.beta == 0.2 and parsed.max_steps == 5 and parsed.learning_rate == 1e-3
    assert parsed.model_init_kwargs == {"dtype": "float32"}
    with open(RUN_YAML) as f:
        config = yaml.safe_load(f)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(config, betta=0.3)))
    with pytest.raises(SystemExit):
        parse_train_args(["--config", str(bad), *flags])


def test_cli_dispatch(monkeypatch, capsys):
    """`tisdpo <command>` imports the command's module from the table when it runs and passes it the rest of argv."""
    calls = []
    module = types.ModuleType("tisdpo_fake_command")

    def demo(argv):
        calls.append(argv)
        return 3

    module.main = demo
    monkeypatch.setitem(sys.modules, "tisdpo_fake_command", module)
    monkeypatch.setattr(cli, "COMMANDS", {"demo": ("tisdpo_fake_command:main", "Run the demo.")})
    assert cli.main(["demo", "--fast"]) == 3 and calls == [["--fast"]]
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_command_table_names_each_entry_point():
    """Every `COMMANDS` entry names a `main(argv)` of `tisdpo.commands` whose docstring starts with the summary the
    help prints."""
    assert list(cli.COMMANDS) == ["train", "estimate-weights", "contrastive", "visualize", "demo", "fetch-model"]
    for name, (target, summary) in cli.COMMANDS.items():
        module_name, _, function = target.partition(":")
        assert module_name.startswith("tisdpo.commands.") and function == "main", name
        entry = getattr(importlib.import_module(module_name), function)
        assert entry.__doc__.strip().splitlines()[0] == summary, name


def test_python_dash_m_tisdpo():
    """`python -m tisdpo` is the `tisdpo` command (`accelerate launch ... -m tisdpo train ...` runs it)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "tisdpo", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tisdpo <command> [args]")
    for name in cli.COMMANDS:
        assert f"  {name} " in done.stdout
    assert subprocess.run([sys.executable, "-m", "tisdpo"], capture_output=True, text=True, env=env).returncode == 2
