"""Setup mistakes beyond a bad row (tisdpo/validation.py, tisdpo/commands/): chat messages with a missing or unknown
role, truncation that empties every pair, an unusable --output_dir, hub ids while offline, a model directory without
config.json, non-finite or negative learning_rate / beta, visualize on NaN or missing weights, a YAML key or --config
given twice, a negative --max_train_samples, and all-zero weights (a warning). Each is one line naming the file or
option, the row and the field, exit status 2, before any model loads where the check does not need one."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import transformers

from tests.trainer.test_bad_input import ROW, _run, _train_argv, _weighted, _write_lines, model_dir, no_model_loading
from tests.trainer.tiny import dataset_of, tiny_llama
from tisdpo import TISDPOConfig, TISDPOTrainer
from tisdpo.data import prepare_preference_dataset
from tisdpo.validation import InputError

__all__ = ["model_dir", "no_model_loading"]  # fixtures shared with test_bad_input.py

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _chat(i, role="assistant"):
    return {"prompt": [{"role": "user", "content": f"Name fruit {i}"}],
            "chosen": [{"role": role, "content": "apple"}], "rejected": [{"role": "assistant", "content": "rock"}]}


CHAT_CASES = {
    "missing-role": ({"from": "gpt", "value": "apple"}, "`chosen`[0] has no `role` (keys: from, value)"),
    "unknown-role": ({"role": "asistant", "content": "apple"}, "`chosen`[0] has the unknown role 'asistant'"),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_message_roles(case, tok, tmp_path, capsys, model_dir, no_model_loading):
    message, phrase = CHAT_CASES[case]
    rows = [_chat(i) for i in range(3)]
    rows[1]["chosen"] = [message]
    data = _write_lines(tmp_path / "chat.jsonl", [json.dumps(r) for r in rows])
    status, err = _run(_train_argv(model_dir, data, tmp_path), capsys)
    assert status == 2
    assert err.startswith(f"tisdpo: error: {data}, row 1: {phrase}")
    with pytest.raises(InputError, match=re.escape(f"train row 1: {phrase}")):
        prepare_preference_dataset(dataset_of(rows), tok)


def test_truncation_that_empties_every_pair_names_the_option(tok):
    rows = [dict(ROW, prompt=f"Name a fruit, any fruit at all, number {i}:") for i in range(4)]
    with pytest.raises(InputError, match="no train pair is left after tokenisation and truncation \\(all 4 dropped\\): "
                                         "--max_length 2 empties every pair"):
        prepare_preference_dataset(dataset_of(rows), tok, max_length=2, truncation_mode="keep_start")


def test_cli_truncation_that_empties_every_pair(tok, tmp_path, capsys):
    model = tmp_path / "model"
    tiny_llama(len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    rows = [dict(ROW, prompt=f"Name a fruit, any fruit at all, number {i}:") for i in range(4)]
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(r) for r in rows])
    status, err = _run(_train_argv(str(model), data, tmp_path, "--max_length", "2", "--truncation_mode",
                                   "keep_start"), capsys)
    assert status == 2
    assert err.startswith(f"tisdpo: error: {data}: no train pair is left") and "--max_length 2 empties" in err


def test_output_dir_that_is_a_file_or_read_only(tmp_path, capsys, model_dir, no_model_loading, monkeypatch):
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)])
    argv = _train_argv(model_dir, data, tmp_path)
    out = tmp_path / "out"
    out.write_text("not a directory")
    assert _run(argv, capsys) == (2, f"tisdpo: error: --output_dir: '{out}' is a file, not a directory")
    out.unlink()
    out.mkdir()
    out.chmod(0o555)
    real_access = os.access
    if os.geteuid() == 0:  # root writes anywhere: let os.access answer as for an ordinary user
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(out) else real_access(p, mode))
    try:
        assert _run(argv, capsys) == (2, f"tisdpo: error: --output_dir: '{out}' is not writable")
    finally:
        out.chmod(0o755)


def test_hub_model_id_while_offline(tmp_path, capsys, monkeypatch, no_model_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)])
    status, err = _run(_train_argv("someorg/no-such-model", data, tmp_path), capsys)
    assert status == 2
    assert err == ("tisdpo: error: --model_name_or_path: 'someorg/no-such-model' is not a local directory, and the hub "
                   "is unreachable (HF_HUB_OFFLINE=1, and it is not in the local hub cache)")
    status, err = _run(["estimate-weights", "--dataset", str(data), "--method", "P", "--plus-model",
                        "someorg/no-such-model", "--output", str(tmp_path / "w.jsonl")], capsys)
    assert status == 2 and err.startswith("tisdpo: error: --plus-model: 'someorg/no-such-model' is not a local")


def test_hub_model_id_without_network(tmp_path, capsys, monkeypatch, model_dir):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):  # what transformers raises when huggingface.co cannot be reached
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.\nCheck your internet connection or see how to run the library in offline mode")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreachable)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)])
    status, err = _run(_train_argv("someorg/no-such-model", data, tmp_path), capsys)
    assert status == 2
    assert err.startswith("tisdpo: error: --model_name_or_path: 'someorg/no-such-model' is not a local directory, and "
                          "the hub is unreachable (We couldn't connect to 'https://huggingface.co'")


def test_hub_dataset_id_while_offline(tmp_path, model_dir):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    argv = ["train", "--model_name_or_path", model_dir, "--dataset_name", "someorg/no-such-data", "--output_dir",
            str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]
    done = subprocess.run([sys.executable, "-m", "tisdpo", *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "tisdpo: error: --dataset_name: 'someorg/no-such-data' is not a local directory, and the hub is unreachable")


def test_model_directory_without_config_json(tok, tmp_path, capsys, no_model_loading):
    only_tokenizer = tmp_path / "tok-only"
    tok.save_pretrained(only_tokenizer)
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)])
    phrase = f"'{only_tokenizer}' is a directory without config.json (not a saved model)"
    assert _run(_train_argv(str(only_tokenizer), data, tmp_path), capsys) == (
        2, f"tisdpo: error: --model_name_or_path: {phrase}")
    status, err = _run(["estimate-weights", "--dataset", str(data), "--method", "P", "--plus-model",
                        str(only_tokenizer), "--output", str(tmp_path / "w.jsonl")], capsys)
    assert (status, err) == (2, f"tisdpo: error: --plus-model: {phrase}")


def test_reference_model_directory_is_checked_as_a_model(tok, tmp_path, capsys, model_dir, no_model_loading):
    """`--ref_model_name_or_path` is a model path: a saved model passes the check, a tokenizer-only directory is
    one line (this option once crashed the check with a KeyError)."""
    only_tokenizer = tmp_path / "tok-only"
    tok.save_pretrained(only_tokenizer)
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)])
    argv = _train_argv(model_dir, data, tmp_path) + ["--ref_model_name_or_path", str(only_tokenizer)]
    assert _run(argv, capsys) == (2, f"tisdpo: error: --ref_model_name_or_path: '{only_tokenizer}' is a directory "
                                     "without config.json (not a saved model)")


@pytest.mark.parametrize("flag, value, message", [
    ("--beta", "inf", "`beta` must be a finite number, got inf"),
    ("--learning_rate", "nan", "`learning_rate` must be a finite number, got nan"),
    ("--learning_rate", "inf", "`learning_rate` must be a finite number, got inf"),
    ("--learning_rate=-1e-5", None, "`learning_rate` must be >= 0, got -1e-05"),
])
def test_non_finite_or_negative_learning_rate_and_beta(flag, value, message, tmp_path, capsys, model_dir,
                                                       no_model_loading):
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)])
    extra = [flag] if value is None else [flag, value]
    assert _run(_train_argv(model_dir, data, tmp_path, *extra), capsys) == (2, f"tisdpo train: error: {message}")


def test_visualize_on_nan_or_missing_weights(tok, tmp_path, capsys):
    tok.save_pretrained(tmp_path / "tok")
    base = ["visualize", "--tokenizer", str(tmp_path / "tok"), "--output-dir", str(tmp_path / "vis")]
    plain = _write_lines(tmp_path / "plain.jsonl", [json.dumps(ROW)] * 2)
    status, err = _run([*base, "--dataset", str(plain)], capsys)
    assert status == 2
    assert err == (f"tisdpo: error: {plain}: no `chosen_weights` or `rejected_weights` column (columns: prompt, "
                   "chosen, rejected); estimate weights first (tisdpo estimate-weights)")
    rows = _weighted(tok, 3)
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2].replace('"rejected_weights": [0.5', '"rejected_weights": [NaN', 1)
    nan = _write_lines(tmp_path / "nan.jsonl", lines)
    status, err = _run([*base, "--dataset", str(nan)], capsys)
    assert status == 2
    assert err == f"tisdpo: error: {nan}, row 2: `rejected_weights`[0] is nan (weights must be finite)"


def test_yaml_key_given_twice(tmp_path, capsys, model_dir, no_model_loading):
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)])
    config = tmp_path / "run.yaml"
    config.write_text("beta: 0.1\nmax_length: 64\nbeta: 0.5\n")
    status, err = _run([*_train_argv(model_dir, data, tmp_path), "--config", str(config)], capsys)
    assert (status, err) == (2, f"tisdpo: error: {config}, line 3: `beta` is given twice (first on line 1)")
    config.write_text("max-length: 64\nmax_length: 32\n")
    status, err = _run([*_train_argv(model_dir, data, tmp_path), "--config", str(config)], capsys)
    assert (status, err) == (2, f"tisdpo: error: {config}, line 2: `max_length` is given twice (first on line 1)")


def test_config_given_twice(tmp_path, capsys, model_dir, no_model_loading):
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)])
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("beta: 0.1\n")
    second.write_text("beta: 0.5\n")
    expected = (2, f"tisdpo: error: --config is given 2 times ({first}, {second}); give one file (flags on the "
                   "command line override its values)")
    argv = _train_argv(model_dir, data, tmp_path)
    assert _run([*argv, "--config", str(first), "--config", str(second)], capsys) == expected
    assert _run([*argv, "--config", str(first), f"--config={second}"], capsys) == expected
    status, err = _run(["estimate-weights", "--config", str(first), "--config", str(second), "--dataset", str(data),
                        "--plus-model", model_dir, "--method", "P", "--output", str(tmp_path / "w.jsonl")], capsys)
    assert (status, err) == expected


@pytest.mark.parametrize("value", ["-1", "0"])
def test_max_train_samples_below_one_is_blamed_on_the_option(value, tmp_path, capsys, model_dir, no_model_loading):
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)] * 3)
    status, err = _run(_train_argv(model_dir, data, tmp_path, "--max_train_samples", value), capsys)
    assert (status, err) == (2, f"tisdpo: error: --max_train_samples must be >= 1 (or None: all pairs), got {value}")


def test_all_zero_weights_warn(tok, quick_args, caplog):
    rows = _weighted(tok, 3)
    for r in rows:
        r["chosen_weights"] = [0.0] * len(r["chosen_weights"])
        r["rejected_weights"] = [0.0] * len(r["rejected_weights"])
    with caplog.at_level(logging.WARNING):
        TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args, max_steps=1),
                      train_dataset=dataset_of(rows), processing_class=tok)
    assert "Every token weight of the train data is 0" in caplog.text
    assert "training changes nothing" in caplog.text
    caplog.clear()
    rows[0]["chosen_weights"][0] = 0.5  # one weight that is not 0: no warning
    with caplog.at_level(logging.WARNING):
        TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args, max_steps=1),
                      train_dataset=dataset_of(rows), processing_class=tok)
    assert "Every token weight" not in caplog.text


@pytest.mark.parametrize("value, why", [
    (2.3, "log-probs are <= 0; a negative log-likelihood (-log p) passed by mistake?"),
    (float("nan"), "log-probs must be finite"),
])
def test_positive_reference_log_probs_in_a_tokenised_file(value, why, tmp_path, capsys, model_dir,
                                                          no_model_loading):
    rows = [{"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 8, 2], "rejected_input_ids": [9, 2],
             "ref_chosen_token_logps": [-1.0, -0.5, -0.1], "ref_rejected_token_logps": [-2.0, -0.2]}
            for _ in range(3)]
    rows[2]["ref_rejected_token_logps"] = [-2.0, value]
    data = _write_lines(tmp_path / "tokenised.jsonl", [json.dumps(r) for r in rows])
    status, err = _run(_train_argv(model_dir, data, tmp_path), capsys)
    assert status == 2
    assert err == f"tisdpo: error: {data}, row 2: `ref_rejected_token_logps`[1] is {value:g} ({why})"
