"""Token-reward estimation on long HH-style dialogues: the trainer's truncation with a
position-limited model, self-describing shards, two runs sharing a cache, cache logs, the shared YAML, and the
trainer's error naming the row."""

import logging
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import tisdpo.weights as W
from tests.trainer.tiny import build_tokenizer, dataset_of, hh_records
from tests.weights.test_estimate import _reference_response_logps
from tisdpo.config import TISDPOConfig
from tisdpo.data import prepare_preference_dataset, tokenize_row
from tisdpo.formats import extract_prompt

N_POSITIONS = 64  # the model cannot see more tokens: an untruncated long dialogue is an IndexError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _gpt2(tokenizer, seed, n_positions=N_POSITIONS):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    return _gpt2(tokenizer, 1), _gpt2(tokenizer, 2)


def long_dialogues(n=6):
    """Implicit-prompt multi-turn pairs of 100-600 tokens: earlier HH dialogues as the shared history, then a
    record's final answers; every third chosen answer is repeated until it alone is longer than N_POSITIONS."""
    records = hh_records()
    rows = []
    for i in range(n):
        history = "".join(records[(i + j) % len(records)]["chosen"] for j in range(1 + i % 4))
        last = records[i % len(records)]
        prompt, chosen, rejected = extract_prompt(last["chosen"], last["rejected"])
        if i % 3 == 2:
            chosen = chosen * 4
        rows.append({"chosen": history + prompt + chosen, "rejected": history + prompt + rejected})
    return dataset_of(rows)


def _run(data, models, tokenizer, cache, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("shard_size", 3)
    return W.estimate_token_weights(data, *models, tokenizer, method="D", cache_dir=str(cache), progress=False, **kw)


def test_truncation_defaults_are_the_trainers():
    fields = TISDPOConfig.__dataclass_fields__
    assert {k: fields[k].default for k in W.TRUNCATION_OPTIONS} == W.TRUNCATION_DEFAULTS
    import inspect

    signature = inspect.signature(W.estimate_token_weights).parameters
    assert {k: signature[k].default for k in W.TRUNCATION_OPTIONS} == W.TRUNCATION_DEFAULTS


@pytest.mark.parametrize(
    "truncation",
    [
        {"max_length": N_POSITIONS, "max_prompt_length": 40, "truncation_mode": "keep_end"},
        {"max_length": N_POSITIONS, "max_prompt_length": 50, "max_completion_length": 20,
         "truncation_mode": "keep_start"},
    ],
)
def test_long_dialogues_line_up_with_the_trainers_tokens(models, tokenizer, tmp_path, truncation):
    """A 64-position GPT-2 on 100-600-token dialogues: no crash; each weight column has exactly the length of
    the trainer's tokenised (truncated) response, the trainer accepts the columns as they are, and the values
    are reference.py's log-prob differences on the trainer's (truncated) prompt and response tokens."""
    data = long_dialogues()
    lengths = [len(tokenize_row(ex, tokenizer)["prompt_input_ids"]) for ex in data]
    assert min(lengths) > N_POSITIONS and max(lengths) > 4 * N_POSITIONS
    out = _run(data, models, tokenizer, tmp_path, **truncation)
    trainer_rows = prepare_preference_dataset(out, tokenizer, **truncation)
    assert len(trainer_rows) == len(data)
    plus, minus = models
    for example, row in zip(out, trainer_rows, strict=True):
        assert len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) <= N_POSITIONS
        for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
            ids = row[f"{side}_input_ids"]
            assert len(example[f"{side}_weights"]) == len(ids)
            assert row[f"{side}_weights"] == example[f"{side}_weights"]
            r = (_reference_response_logps(plus, row["prompt_input_ids"], ids)
                 - _reference_response_logps(minus, row["prompt_input_ids"], ids))
            torch.testing.assert_close(torch.tensor(example[f"{side}_weights"], dtype=torch.float64), sign * r,
                                       rtol=0, atol=2e-5)  # float32 path vs float64 truth, 64 tokens of D=32


def test_pairs_the_trainer_drops_get_none_and_a_log_line(models, tokenizer, tmp_path, caplog):
    """keep_start with a prompt longer than max_length leaves no response token: the trainer drops the pair,
    the estimator writes None for it (and counts it in the log) instead of crashing."""
    data = long_dialogues(3)
    short = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}
    data = dataset_of([short, *data.to_list()])
    with caplog.at_level(logging.INFO, logger="tisdpo.weights"):
        out = _run(data, models, tokenizer, tmp_path, max_length=N_POSITIONS, truncation_mode="keep_start")
    assert out["chosen_weights"][0] is not None and out["chosen_weights"][1:] == [None] * 3
    assert "3 of 4 pairs have no weights" in caplog.text
    assert len(prepare_preference_dataset(out, tokenizer, max_length=N_POSITIONS, truncation_mode="keep_start")) == 1
    final = W.transform_token_weights(out, "rank_based")
    assert final["rejected_weights"][1:] == [None] * 3


def test_method_p_keeps_the_system_prompt_under_truncation(tokenizer, tmp_path):
    """Method P on a truncated dialogue scores the trainer's response tokens after the system prompt followed by
    the prompt tokens the trainer keeps: the system prompt is not cut off (so the two scores differ)."""
    model = _gpt2(tokenizer, 3, n_positions=N_POSITIONS + 24)
    prompts = ("Be kind.", "Be rude.")
    data = long_dialogues(4)
    truncation = {"max_length": N_POSITIONS, "max_prompt_length": 40, "truncation_mode": "keep_end"}
    out = W.estimate_token_weights(data, model, None, tokenizer, method="P", system_prompts=prompts, batch_size=2,
                                   cache_dir=str(tmp_path), progress=False, **truncation)
    estimator = W._Estimator(model, None, tokenizer, "P", prompts, "auto", "cpu", False,
                             {**W.TRUNCATION_DEFAULTS, **truncation})
    for example in out:
        base = {k: example[k] for k in ("chosen", "rejected")}
        row = tokenize_row(base, tokenizer, **truncation)
        good, bad = (estimator._system_prompt_row(base, p, row) for p in prompts)
        lead = len(tokenizer("")["input_ids"])  # the special tokens (BOS) the tokenizer itself puts first
        for scored, system_prompt in ((good, prompts[0]), (bad, prompts[1])):
            head = tokenizer(system_prompt, add_special_tokens=False)["input_ids"]
            assert scored["prompt_input_ids"][lead:lead + len(head)] == head  # the system prompt, whole
            kept = row["prompt_input_ids"]  # the tail of the prompt (keep_end)
            assert scored["prompt_input_ids"][-len(kept):] == kept
            assert len(scored["prompt_input_ids"]) <= len(kept) + lead + len(head) + 2  # and the "\n\n" join
            assert scored["chosen_input_ids"] == row["chosen_input_ids"]
        ids = row["chosen_input_ids"]
        r = (_reference_response_logps(model, good["prompt_input_ids"], ids)
             - _reference_response_logps(model, bad["prompt_input_ids"], ids))
        torch.testing.assert_close(torch.tensor(example["chosen_weights"], dtype=torch.float64), r, rtol=0,
                                   atol=2e-5)
        assert len(example["chosen_weights"]) == len(ids) and r.abs().max() > 1e-4


def _shards(cache):
    (run_dir,) = [p for p in cache.iterdir()]
    return run_dir, sorted(run_dir.glob("shard-*.parquet"))


@pytest.mark.parametrize("damage", ["copy_of_another_shard", "truncated", "garbage"])
def test_a_damaged_or_foreign_shard_is_recomputed_with_a_log_line(models, tokenizer, tmp_path, caplog, damage):
    """A shard replaced by a valid copy of another shard (other rows), cut short, or overwritten with garbage is
    detected from its own metadata, recomputed (logged) and the result equals a fresh run's."""
    data = long_dialogues(7)
    kw = {"max_length": N_POSITIONS}
    fresh = _run(data, models, tokenizer, tmp_path / "fresh", **kw)
    _run(data, models, tokenizer, tmp_path / "damaged", **kw)
    run_dir, shards = _shards(tmp_path / "damaged")
    assert len(shards) == 3
    victim = shards[1]
    if damage == "copy_of_another_shard":
        victim.write_bytes(shards[0].read_bytes())
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.write_bytes(b"not a parquet file at all" * 10)
    with caplog.at_level(logging.INFO, logger="tisdpo.weights"):
        again = _run(data, models, tokenizer, tmp_path / "damaged", **kw)
    assert f"recomputing {victim}" in caplog.text
    assert "computing 1 of 3 shards" in caplog.text
    assert again["chosen_weights"] == fresh["chosen_weights"]
    assert again["rejected_weights"] == fresh["rejected_weights"]
    assert victim.read_bytes() == (_shards(tmp_path / "fresh")[1][1]).read_bytes()


def test_a_shard_of_other_rows_with_the_same_range_is_recomputed(models, tokenizer, tmp_path, caplog):
    """Same run key and row range, other row contents: the content fingerprint catches it."""
    data = long_dialogues(6)
    _run(data, models, tokenizer, tmp_path, max_length=N_POSITIONS)
    run_dir, shards = _shards(tmp_path)
    identity = W._shard_identity(run_dir.name, 3, 6, W._rows_fingerprint(data, 3, 6))
    other = W._shard_identity(run_dir.name, 3, 6, W._rows_fingerprint(data, 0, 3))
    assert W._shard_mismatch(str(shards[1]), identity) is None
    assert "rows_fingerprint" in W._shard_mismatch(str(shards[1]), other)


def test_two_runs_sharing_a_cache_directory(models, tokenizer, tmp_path, monkeypatch):
    """A second run starts (and finishes) while the first is writing its first shard into the same cache: both
    succeed, agree, and leave no temporary file behind."""
    data = long_dialogues(5)
    original = W._Estimator.columns
    state = {"nested": None, "calls": 0}

    def columns(self, examples):
        state["calls"] += 1
        if state["calls"] == 1:  # the first run is inside its first shard's writer now
            state["nested"] = _run(data, models, tokenizer, tmp_path, max_length=N_POSITIONS)
        return original(self, examples)

    monkeypatch.setattr(W._Estimator, "columns", columns)
    first = _run(data, models, tokenizer, tmp_path, max_length=N_POSITIONS)
    assert first["chosen_weights"] == state["nested"]["chosen_weights"]
    run_dir, shards = _shards(tmp_path)
    assert len(shards) == 2 and not list(run_dir.glob("*.tmp"))


def test_temporary_names_are_unique_per_process_and_call(tmp_path, monkeypatch):
    names = []
    real_writer = W.pq.ParquetWriter

    def writer(path, schema):
        names.append(os.path.basename(path))
        return real_writer(path, schema)

    monkeypatch.setattr(W.pq, "ParquetWriter", writer)
    identity = W._shard_identity("k", 0, 1, "f")
    for _ in range(2):
        W._write_shard(str(tmp_path / "shard-00000.parquet"), [([[1.0]], [[2.0]])], identity)
    assert names[0] != names[1] and all(f".{os.getpid()}-" in n and n.endswith(".tmp") for n in names)
    assert W._shard_mismatch(str(tmp_path / "shard-00000.parquet"), identity) is None


def test_a_cached_rerun_says_so_and_where(models, tokenizer, tmp_path, caplog):
    data = long_dialogues(4)
    _run(data, models, tokenizer, tmp_path, max_length=N_POSITIONS)
    run_dir, _ = _shards(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tisdpo.weights"):
        _run(data, models, tokenizer, tmp_path, max_length=N_POSITIONS)
    assert f"reused the cache {run_dir} (all 2 shards, 4 pairs); no model call" in caplog.text


def test_the_trainers_weight_length_error_names_the_row(tokenizer):
    rows = [{"prompt": "Hi", "chosen": " yes", "rejected": " no"} for _ in range(4)]
    for row in rows:
        tokens = tokenize_row(row, tokenizer)
        row["chosen_weights"] = [0.0] * len(tokens["chosen_input_ids"])
        row["rejected_weights"] = [0.0] * len(tokens["rejected_input_ids"])
    rows[2]["chosen_weights"] = rows[2]["chosen_weights"] + [0.5] * 7
    with pytest.raises(ValueError, match=r"train row 2: `chosen_weights` has \d+ values but the chosen response"):
        prepare_preference_dataset(dataset_of(rows), tokenizer)
    # a column shorter than the response that is not the truncated length is an error too
    long = dict(rows[0], chosen=" yes yes yes yes yes", chosen_weights=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"after truncation"):
        tokenize_row(long, tokenizer, max_completion_length=3)


def test_command_line_reads_the_trainers_yaml(models, tokenizer, tmp_path):
    """`tisdpo estimate-weights --config run.yaml` on the YAML `tisdpo train` reads: trainer-only keys are
    ignored, the shared truncation keys apply, and `--max-prompt-length None` means no limit."""
    from tisdpo.cli import main as cli_main
    from tisdpo.data import load_preference_dataset

    for name, model in zip(("plus", "minus"), models, strict=True):
        model.save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / "plus")
    data = long_dialogues(4)
    data.to_json(str(tmp_path / "pairs.jsonl"), lines=True)
    yaml_text = open(os.path.join(os.path.dirname(__file__), "..", "assets", "tiny_run.yaml")).read()
    assert "\nmax_length: 128\n" in yaml_text  # the trainer's run file; estimate-weights reads it as it is
    yaml_text = yaml_text.replace("\nmax_length: 128\n", f"\nmax_length: {N_POSITIONS}\n")
    yaml_text += f"padding_free: false\ncache_dir: {tmp_path / 'cache'}\n"
    (tmp_path / "run.yaml").write_text(yaml_text)
    assert cli_main(["estimate-weights", "--config", str(tmp_path / "run.yaml"), "--dataset",
                     str(tmp_path / "pairs.jsonl"), "--plus-model", str(tmp_path / "plus"), "--minus-model",
                     str(tmp_path / "minus"), "--no-progress", "--max-prompt-length", "None",
                     "--output", str(tmp_path / "out")]) == 0
    got = load_preference_dataset(str(tmp_path / "out"))
    direct = _run(data, models, tokenizer, tmp_path / "direct", batch_size=8, shard_size=1024,
                  max_length=N_POSITIONS, max_prompt_length=None)
    assert got["chosen_weights"] == direct["chosen_weights"]
    (tmp_path / "bad.yaml").write_text("max_lenght: 3\n")
    with pytest.raises(SystemExit):
        cli_main(["estimate-weights", "--config", str(tmp_path / "bad.yaml"), "--dataset", "x", "--plus-model", "y",
                  "--output", "z"])
