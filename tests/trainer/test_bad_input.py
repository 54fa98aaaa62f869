"""Bad input through the `tisdpo` command line (tisdpo/cli.py, tisdpo/commands/, tisdpo/validation.py): one line
naming the file (or option), the line or row and the field, exit status 2, before any model is loaded; and the user's
path through the README (resume, `--weight_transform rank_based`, progress of the reference precompute, a fast help)."""

import json
import logging
import os
import subprocess
import sys

import pytest
import transformers

from tests.trainer.tiny import dataset_of, no_checkpointing, tiny_llama
from tisdpo import TISDPOConfig, TISDPOTrainer, cli
from tisdpo.commands.arguments import parse_train_args
from tisdpo.data import prepare_preference_dataset
from tisdpo.response_weights import transform_token_weights
from tisdpo.run_safety import resolve_resume_from_checkpoint, write_completion_marker
from tisdpo.validation import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROW = {"prompt": "Name a fruit:", "chosen": " apple", "rejected": " rock"}


def _run(argv, capsys):
    """`tisdpo.cli.main(argv)` -> (exit status, last line of stderr), checking that stderr holds no traceback;
    argparse's usage errors exit through SystemExit."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err.strip().splitlines()[-1]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading any model fails the test: the errors below must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def model_dir(tmp_path):
    """A directory that looks like a saved model (config.json); never loaded by the tests that use it."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return str(path)


def _train_argv(model, data, tmp_path, *extra):
    return ["train", "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none", *extra]


def _weighted(tok, n=4):
    rows = []
    for _ in range(n):
        c = len(tok(ROW["chosen"], add_special_tokens=False)["input_ids"]) + 1
        r = len(tok(ROW["rejected"], add_special_tokens=False)["input_ids"]) + 1
        rows.append(dict(ROW, chosen_weights=[0.5] * c, rejected_weights=[0.5] * r))
    return rows


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# each case: how row 2 of a weighted JSONL file is spoiled, and the message
WEIGHT_CASES = {
    "nan": ('"chosen_weights": [NaN', "row 2: `chosen_weights`[0] is nan (weights must be finite)"),
    "inf": ('"chosen_weights": [Infinity', "row 2: `chosen_weights`[0] is inf (weights must be finite)"),
    "overflows-fp32": ('"chosen_weights": [1e39', "row 2: `chosen_weights`[0] is 1e+39, beyond float32's range"),
    "null-value": ('"chosen_weights": [null', "row 2: `chosen_weights`[0] must be a number, got None"),
    "null-column": (None, "row 2: `chosen_weights` is null; give a list of numbers"),
    "abc": ("abc", "row 2: `chosen_weights` must be a list of numbers (one per response token), got the string 'abc'"),
    "one-string": ("0.5 0.6", "row 2: `chosen_weights` must be a list of numbers (one per response token), got the "
                              "string '0.5 0.6'"),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_bad_weight_values(case, tok, tmp_path, capsys, model_dir, no_model_loading):
    spoil, message = WEIGHT_CASES[case]
    rows = _weighted(tok)
    lines = [json.dumps(r) for r in rows]
    if spoil is None or not spoil.startswith('"'):
        lines[2] = json.dumps(dict(rows[2], chosen_weights=spoil))
    else:
        lines[2] = lines[2].replace('"chosen_weights": [0.5', spoil, 1)
    data = _write_lines(tmp_path / "data.jsonl", lines)
    status, err = _run(_train_argv(model_dir, data, tmp_path), capsys)
    assert status == 2
    assert err.startswith(f"tisdpo: error: {data}, {message}")


FILE_CASES = {
    "broken-line": (lambda rows: [json.dumps(r) for r in rows[:2]] + [json.dumps(rows[2])[:-5]],
                    "line 3, column 61: invalid JSON: Unterminated string"),
    "not-utf8": (None, "line 3, column 16: byte b'\\xe9' is not UTF-8 (save the file as UTF-8)"),
    "empty": (lambda rows: [], None),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_unreadable_data_files(case, tmp_path, capsys, model_dir, no_model_loading):
    make, message = FILE_CASES[case]
    data = tmp_path / "data.jsonl"
    if make is None:
        data.write_bytes(b"".join(json.dumps(ROW).encode() + b"\n" for _ in range(2))
                         + b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n')
    else:
        _write_lines(data, make([ROW] * 3))
    status, err = _run(_train_argv(model_dir, data, tmp_path), capsys)
    assert status == 2
    if message is None:  # today: a bare StopIteration
        assert err == f"tisdpo: error: --dataset_name: {data} is empty (no preference pairs)"
    else:
        assert err.startswith(f"tisdpo: error: {data}, {message}")


CONFIG_CASES = {
    "syntax": ("beta: 0.1\nmax_steps: [1\n", "line 3, column 1: YAML syntax error: expected ',' or ']'"),
    "beta-list": ("beta: [0.1]\n", "line 1: `beta` must be a number, got [0.1] (list)"),
    "steps-float": ("beta: 0.2\nmax_steps: 2.7\n", "line 2: `max_steps` must be an integer, got 2.7 (float)"),
    "bad-string": ("learning_rate: fast\n", "line 1: `learning_rate`: invalid value 'fast'"),
    "bad-choice": ("loss_type: kto\n", "line 1: `loss_type` must be one of 'sigmoid'"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_yaml_configs(case, tok, tmp_path, capsys, model_dir, no_model_loading):
    text, message = CONFIG_CASES[case]
    config = tmp_path / "run.yaml"
    config.write_text(text)
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)])
    status, err = _run(_train_argv(model_dir, data, tmp_path, "--config", str(config)), capsys)
    assert status == 2
    assert err.startswith(f"tisdpo: error: {config}, {message}")


def test_missing_files_and_paths(tmp_path, capsys, model_dir, no_model_loading):
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)])
    missing = str(tmp_path / "nothing")
    cases = [
        (["--config", str(tmp_path / "run.yaml")], f"--config: no such file: '{tmp_path / 'run.yaml'}'"),
        (["--ref_model_name_or_path", missing], f"--ref_model_name_or_path: no such directory: '{missing}'"),
        (["--resume_from_checkpoint", "true"],
         f"--resume_from_checkpoint true: no checkpoint-* directory in output_dir '{tmp_path / 'out'}'"),
    ]
    for extra, message in cases:
        assert _run(_train_argv(model_dir, data, tmp_path, *extra), capsys) == (2, f"tisdpo: error: {message}")
    # today: "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" from the hub client
    assert _run(_train_argv(missing, data, tmp_path), capsys) == (
        2, f"tisdpo: error: --model_name_or_path: no such directory: '{missing}'")
    assert _run(_train_argv(model_dir, tmp_path / "pairs.jsonl", tmp_path), capsys) == (
        2, f"tisdpo: error: --dataset_name: no such file or directory: '{tmp_path / 'pairs.jsonl'}'")


def test_misspelt_flag_is_a_usage_error(tmp_path, capsys, model_dir, no_model_loading):
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(ROW)])
    status, err = _run(_train_argv(model_dir, data, tmp_path, "--betaa", "0.2"), capsys)
    assert status == 2
    assert err == ("tisdpo train: error: unrecognized arguments: --betaa 0.2 "
                                    "(--betaa: did you mean --beta?)")
    status, err = _run(_train_argv(model_dir, data, tmp_path, "--beta", "0"), capsys)  # the config's own check
    assert status == 2 and err == "tisdpo train: error: `beta` must be > 0, got 0.0"


def test_none_means_none(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_prompt_length: None\nkl: null\n")
    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path), "--use_cpu", "true"]
    _, parsed = parse_train_args([*base, "--kl", "None", "--max_length", "None", "--config", str(config)])
    assert (parsed.kl, parsed.max_length, parsed.max_prompt_length) == (None, None, None)
    _, parsed = parse_train_args([*base, "--report_to", "none"])  # "none" stays a value where it is one
    assert parsed.report_to in ("none", ["none"], [])


def test_weight_count_mismatch_names_file_and_row(tok, tmp_path, capsys):
    """Token counts need the tokenizer: checked while the trainer tokenises, the message names file and row."""
    model = tmp_path / "model"
    tiny_llama(len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    rows = _weighted(tok)
    rows[3]["chosen_weights"] = rows[3]["chosen_weights"][:-1]
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(r) for r in rows])
    status, err = _run(_train_argv(str(model), data, tmp_path, "--max_steps", "1"), capsys)
    assert status == 2
    n = len(rows[3]["chosen_weights"])
    assert err.startswith(f"tisdpo: error: {data}: train row 3: `chosen_weights` has {n} values but the chosen "
                          f"response has {n + 1} tokens")


def test_real_bugs_keep_their_traceback(monkeypatch):
    def broken(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "commands", lambda: {"train": broken})
    with pytest.raises(KeyError):
        cli.main(["train"])


def test_empty_and_identical_pairs_are_dropped_with_a_count(tok, caplog):
    user = {"role": "user", "content": "hi"}
    records = [
        ROW,
        dict(ROW, chosen=""),
        dict(ROW, rejected="   "),
        dict(ROW, rejected=" apple"),
        {"prompt": None, "chosen": "Q: hi A: same", "rejected": "Q: hi A: same"},
    ]
    with caplog.at_level(logging.WARNING, logger="tisdpo.validation"):
        out = prepare_preference_dataset(dataset_of(records), tok)
    assert len(out) == 1
    assert ("Dropped 4 of 5 train pairs: 1 with an empty chosen response, 1 with an empty rejected response, 2 with "
            "identical chosen and rejected responses.") in caplog.text
    chat = [{"prompt": [user], "chosen": [{"role": "assistant", "content": "x"}],
             "rejected": [{"role": "assistant", "content": ""}]}] * 2
    with pytest.raises(ValueError, match="no train pair is left"):
        prepare_preference_dataset(dataset_of(chat), tok)


# ----------------------------------------------------------------------------------------------------------------
# the README path
# ----------------------------------------------------------------------------------------------------------------


def test_help_imports_no_heavy_module():
    """`tisdpo --help` lists every command without importing torch, transformers or datasets (8 s -> 0.15 s)."""
    code = ("import sys; from tisdpo.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines()[-1] == "[]"
    for name in ("train", "estimate-weights", "contrastive", "visualize", "demo"):
        assert f"  {name} " in out


def test_resume_true_means_last_checkpoint(tmp_path):
    for step in (2, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
        write_completion_marker(str(tmp_path / f"checkpoint-{step}"))
    assert resolve_resume_from_checkpoint("true", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume_from_checkpoint("false", str(tmp_path)) is None
    with pytest.raises(InputError, match="no such checkpoint directory"):
        resolve_resume_from_checkpoint(str(tmp_path / "checkpoint-3"), str(tmp_path))


def test_cli_resumes_from_the_last_checkpoint(tok, tmp_path):
    model = tmp_path / "model"
    tiny_llama(len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    data = _write_lines(tmp_path / "data.jsonl", [json.dumps(r) for r in _weighted(tok, 8)])
    checkpointing = next(iter(no_checkpointing()))
    common = _train_argv(str(model), data, tmp_path, "--per_device_train_batch_size", "2", "--save_strategy",
                         "steps", "--save_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true",
                         f"--{checkpointing}", "false")
    assert cli.main([*common, "--max_steps", "2"]) == 0
    assert cli.main([*common, "--max_steps", "3", "--resume_from_checkpoint", "true"]) == 0
    with open(tmp_path / "out" / "trainer_state.json") as f:
        state = json.load(f)
    assert state["global_step"] == 3
    # the resumed run started at step 2: its log history holds steps 1-2 from the checkpoint and step 3
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]


@pytest.mark.parametrize("transform", ["rank_based", "binary", "random"])
def test_per_response_weight_transform_in_the_trainer(transform, tok, quick_args, caplog):
    rows = _weighted(tok, 3)
    for i, r in enumerate(rows):
        r["chosen_weights"] = [0.1 * (i + k) for k in range(len(r["chosen_weights"]))]
        r["rejected_weights"] = [-0.2 * k for k in range(len(r["rejected_weights"]))]
    args = TISDPOConfig(**quick_args, weight_transform=transform, max_steps=1)
    with caplog.at_level(logging.INFO, logger="tisdpo.trainer"):
        trainer = TISDPOTrainer(tiny_llama(len(tok)), args=args, train_dataset=dataset_of(rows),
                                processing_class=tok)
        trainer.train()
    expected = transform_token_weights(prepare_preference_dataset(dataset_of(rows), tok), transform)
    for column in ("chosen_weights", "rejected_weights"):
        assert trainer.train_dataset[column] == expected[column]


def test_precompute_announces_itself_with_a_progress_bar(tok, quick_args, caplog, capsys):
    args = TISDPOConfig(**{**quick_args, "disable_tqdm": False}, precompute_ref_log_probs=True,
                        precompute_ref_batch_size=2)
    with caplog.at_level(logging.INFO, logger="tisdpo.trainer"):
        TISDPOTrainer(tiny_llama(len(tok)), args=args, train_dataset=dataset_of([ROW] * 3), processing_class=tok)
    assert "Precomputing reference log-probs for 3 train pairs (2 per batch) on cpu." in caplog.text
    assert "Reference log-probs (train): 100%" in capsys.readouterr().err
