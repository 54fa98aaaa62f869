"""Token-reward estimation (tisdpo.weights.estimate_token_weights): values against reference.py,
resumable shards, the cache, bounded memory, the command line."""

import os
import tracemalloc

import pytest
import torch

import tisdpo.weights as W
from tisdpo.data import tokenize_row
from tisdpo.demo import build_model, build_tokenizer, make_preference_dataset
from tisdpo_kernels.reference import reference_linear_logprobs


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    plus = build_model(tokenizer, hidden_size=32, num_layers=1, seed=1).eval()
    minus = build_model(tokenizer, hidden_size=32, num_layers=1, seed=2).eval()
    return plus, minus


def _reference_response_logps(model, prompt_ids, response_ids):
    """reference.py log-probs of the response tokens, one unpadded sequence at a time."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]
    labels = torch.full((ids.shape[1],), -100)
    labels[len(prompt_ids) - 1:-1] = torch.tensor(response_ids)
    lp = reference_linear_logprobs(hidden.double(), model.lm_head.weight.double(), labels)
    return lp[labels != -100]


def _run(dataset, models, tokenizer, tmp_path, name="cache", **kw):
    plus, minus = models
    kw.setdefault("batch_size", 3)
    kw.setdefault("shard_size", 4)
    return W.estimate_token_weights(dataset, plus, minus, tokenizer, method="D", cache_dir=str(tmp_path / name),
                                    progress=False, **kw)


def test_columns_equal_reference_logprobs(models, tokenizer, tmp_path):
    """chosen_weights = lp_plus - lp_minus on chosen tokens, rejected_weights = -(lp_plus - lp_minus) on
    rejected tokens; batched, padded and sharded (10 pairs, batches of 3, shards of 4) vs unpadded float64."""
    data = make_preference_dataset(10, seed=3)
    out = _run(data, models, tokenizer, tmp_path)
    assert out.column_names == ["prompt", "chosen", "rejected", "chosen_weights", "rejected_weights"]
    plus, minus = models
    for example in out:
        row = tokenize_row({k: example[k] for k in ("prompt", "chosen", "rejected")}, tokenizer)
        for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
            ids = row[f"{side}_input_ids"]
            r = (_reference_response_logps(plus, row["prompt_input_ids"], ids)
                 - _reference_response_logps(minus, row["prompt_input_ids"], ids))
            got = torch.tensor(example[f"{side}_weights"], dtype=torch.float64)
            assert got.shape == r.shape
            torch.testing.assert_close(got, sign * r, rtol=0, atol=2e-5)
    # the columns line up with the trainer's tokenisation: tokenize_row accepts them
    assert tokenize_row(out[0], tokenizer)["chosen_weights"] == pytest.approx(out[0]["chosen_weights"])


def test_packed_batches_equal_padded_batches(models, tokenizer, tmp_path):
    """padding_free=True (one packed row per batch, position_ids restarting per sequence) gives the padded
    layout's values; the two layouts are cached apart."""
    data = make_preference_dataset(7, seed=12)
    padded = _run(data, models, tokenizer, tmp_path, padding_free=False)
    packed = _run(data, models, tokenizer, tmp_path, padding_free=True)
    for column in ("chosen_weights", "rejected_weights"):
        for a, b in zip(padded[column], packed[column], strict=True):
            torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=2e-5)
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_method_p_uses_two_system_prompts(models, tokenizer, tmp_path):
    plus, _ = models
    data = make_preference_dataset(5, seed=4)
    prompts = ("be good", "be bad")
    extra = {"be", "good", "bad"} - set(tokenizer.get_vocab())
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(sorted(extra))
    model = build_model(tokenizer, hidden_size=32, num_layers=1, seed=5).eval()
    out = W.estimate_token_weights(data, model, None, tokenizer, method="P", system_prompts=prompts, batch_size=2,
                                   cache_dir=str(tmp_path), progress=False)
    for example in out:
        good = tokenize_row(W.with_system_prompt(example, prompts[0]), tokenizer)
        bad = tokenize_row(W.with_system_prompt(example, prompts[1]), tokenizer)
        ids = good["chosen_input_ids"]
        r = (_reference_response_logps(model, good["prompt_input_ids"], ids)
             - _reference_response_logps(model, bad["prompt_input_ids"], ids))
        torch.testing.assert_close(torch.tensor(example["chosen_weights"], dtype=torch.float64), r, rtol=0, atol=2e-5)
        assert r.abs().max() > 1e-4  # the prompts do change the scores


def test_with_system_prompt_formats():
    plain = W.with_system_prompt({"prompt": "Q?", "chosen": " a", "rejected": " b"}, "SYS")
    assert plain["prompt"] == "SYS\n\nQ?" and plain["chosen"] == " a"
    implicit = W.with_system_prompt({"chosen": "Human: hi Assistant: yes", "rejected": "Human: hi Assistant: no"},
                                    "SYS")
    assert implicit["prompt"] == "SYS\n\nHuman: hi Assistant:" and implicit["chosen"] == " yes"
    user = [{"role": "user", "content": "hi"}]
    conv = W.with_system_prompt({"prompt": user, "chosen": [{"role": "assistant", "content": "a"}],
                                 "rejected": [{"role": "assistant", "content": "b"}]}, "SYS")
    assert conv["prompt"] == [{"role": "system", "content": "SYS"}, *user]
    merged = W.with_system_prompt({"prompt": [{"role": "system", "content": "old"}, *user],
                                   "chosen": [{"role": "assistant", "content": "a"}],
                                   "rejected": [{"role": "assistant", "content": "b"}]}, "SYS")
    assert merged["prompt"][0] == {"role": "system", "content": "SYS\n\nold"} and len(merged["prompt"]) == 2


def test_kill_and_resume_is_identical_and_skips_finished_shards(models, tokenizer, tmp_path, monkeypatch):
    """An exception in the middle of shard 2 of 3; the rerun computes only shards 2 and 3 (4 batches, not 6)
    and its output (values and shard files) equals an uninterrupted run's."""
    data = make_preference_dataset(12, seed=6)
    kw = {"batch_size": 2, "shard_size": 4}
    calls = {"n": 0}
    original = W._Estimator.columns

    def failing(self, examples):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, examples)

    monkeypatch.setattr(W._Estimator, "columns", failing)
    with pytest.raises(KeyboardInterrupt):
        _run(data, models, tokenizer, tmp_path, "resumed", **kw)
    (run_dir,) = [p for p in (tmp_path / "resumed").iterdir()]
    assert sorted(p.name for p in run_dir.glob("*.parquet")) == ["shard-00000.parquet"]

    def counting(self, examples):
        calls["n"] += 1
        return original(self, examples)

    calls["n"] = 0
    monkeypatch.setattr(W._Estimator, "columns", counting)
    resumed = _run(data, models, tokenizer, tmp_path, "resumed", **kw)
    assert calls["n"] == 4
    calls["n"] = 0
    fresh = _run(data, models, tokenizer, tmp_path, "fresh", **kw)
    assert calls["n"] == 6
    assert resumed["chosen_weights"] == fresh["chosen_weights"]
    assert resumed["rejected_weights"] == fresh["rejected_weights"]
    (fresh_dir,) = [p for p in (tmp_path / "fresh").iterdir()]
    for i in range(3):
        name = f"shard-{i:05d}.parquet"
        assert (run_dir / name).read_bytes() == (fresh_dir / name).read_bytes()

    # a finished run is a cache hit: no model call at all
    calls["n"] = 0
    again = _run(data, models, tokenizer, tmp_path, "fresh", **kw)
    assert calls["n"] == 0 and again["chosen_weights"] == fresh["chosen_weights"]


def test_cache_key_follows_models_and_data(models, tokenizer, tmp_path):
    data = make_preference_dataset(4, seed=7)
    _run(data, models, tokenizer, tmp_path)
    _run(data.select([0, 1, 2]), models, tokenizer, tmp_path)
    plus, minus = models
    changed = build_model(tokenizer, hidden_size=32, num_layers=1, seed=1).eval()
    with torch.no_grad():
        changed.lm_head.weight.add_(1e-3)
    W.estimate_token_weights(data, changed, minus, tokenizer, cache_dir=str(tmp_path / "cache"), progress=False,
                             batch_size=3, shard_size=4)
    assert len(os.listdir(tmp_path / "cache")) == 3


def test_memory_does_not_grow_with_the_number_of_pairs(models, tokenizer, tmp_path):
    """1,000 pairs in one shard hold no more Python memory at peak than 100 pairs (batches of 50) beyond a
    small slack: per-token results live one batch at a time and stream into the shard file. (Collecting a
    shard's batches before writing it raises the difference to about the size of all results.)"""
    peaks = {}
    for n in (10, 100, 1000):  # the first run pays one-off costs (imports, caches) and is not compared
        data = make_preference_dataset(n, seed=8)
        tracemalloc.start()
        out = _run(data, models, tokenizer, tmp_path, f"m{n}", batch_size=50, shard_size=1000)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    tracemalloc.start()
    everything = [out.data.column(c).to_pylist() for c in ("chosen_weights", "rejected_weights")]
    full_size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert sum(len(x) for x in everything[0]) > 4000
    assert peaks[1000] - peaks[100] < 0.25 * full_size, (peaks, full_size)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "X"}, "method must be one of"),
        ({"method": "P"}, "pass pi_minus=None"),
        ({"batch_size": 0}, "batch_size"),
        ({"system_prompts": ("only one",)}, "system_prompts"),
    ],
)
def test_bad_arguments(models, tokenizer, tmp_path, kwargs, match):
    plus, minus = models
    with pytest.raises(ValueError, match=match):
        W.estimate_token_weights(make_preference_dataset(2), plus, minus, tokenizer, cache_dir=str(tmp_path),
                                 progress=False, **kwargs)


def test_two_model_methods_need_pi_minus(models, tokenizer):
    for method in ("S", "D"):
        with pytest.raises(ValueError, match="needs two models"):
            W.estimate_token_weights(make_preference_dataset(2), models[0], None, tokenizer, method=method)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        W.estimate_token_weights([{"prompt": "a"}], *models, tokenizer)


def test_command_line(models, tokenizer, tmp_path):
    """`tisdpo estimate-weights` end to end: saved models, a JSONL dataset, a YAML config, a transformed output."""
    from tisdpo.cli import main as cli_main
    from tisdpo.data import load_preference_dataset

    plus, minus = models
    for name, model in (("plus", plus), ("minus", minus)):
        model.save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / "plus")
    data = make_preference_dataset(5, seed=9)
    data.to_json(str(tmp_path / "pairs.jsonl"), lines=True)
    (tmp_path / "run.yaml").write_text(f"method: S\nbatch_size: 2\ncache_dir: {tmp_path / 'cache'}\n")
    common = ["--config", str(tmp_path / "run.yaml"), "--dataset", str(tmp_path / "pairs.jsonl"),
              "--plus-model", str(tmp_path / "plus"), "--minus-model", str(tmp_path / "minus"), "--no-progress"]
    assert cli_main(["estimate-weights", *common, "--output", str(tmp_path / "raw")]) == 0
    raw = load_preference_dataset(str(tmp_path / "raw"))
    direct = _run(data, models, tokenizer, tmp_path, "direct", batch_size=2)
    assert raw["chosen_weights"] == direct["chosen_weights"]
    assert cli_main(["estimate-weights", *common, "--transform", "rank_based", "--eos-weight", "0",
                     "--output", str(tmp_path / "final.jsonl")]) == 0
    final = load_preference_dataset(str(tmp_path / "final.jsonl"))
    assert all(w[-1] == 0.0 and all(0.7 - 1e-6 <= v <= 1.3 + 1e-6 for v in w[:-1]) for w in final["chosen_weights"])
