"""Contrastive models too large for one GPU: loaded with a `device_map` (accelerate's dispatch hooks move each
module's inputs to its device and load offloaded weights in its forward). On CPU the spread over GPUs cannot run;
what runs is the same hook path with layer 1 and the LM head offloaded to disk (their weights are `meta` until
their hook loads them): the columns equal those of the plainly loaded models exactly (the same float32 ops)."""

import json

import pytest
import torch

import tisdpo.weights as W
from tisdpo.cli import main as cli_main
from tisdpo.data import load_preference_dataset
from tisdpo.demo import make_preference_dataset

from .pairs import save_contrastive_pair

OFFLOADED = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-map")
    return root, save_contrastive_pair(root, num_layers=2)


def test_offloaded_models_give_the_plain_columns(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    root, tok = saved
    data = make_preference_dataset(5, seed=3)
    plain = [AutoModelForCausalLM.from_pretrained(root / n, dtype=torch.float32) for n in ("plus", "minus")]
    dispatched = [AutoModelForCausalLM.from_pretrained(root / n, dtype=torch.float32, device_map=OFFLOADED,
                                                       offload_folder=str(tmp_path / f"offload-{n}"))
                  for n in ("plus", "minus")]
    assert dispatched[0].lm_head.weight.device.type == "meta"  # offloaded: only its hook loads it
    want = W.estimate_token_weights(data, *plain, tok, cache_dir=str(tmp_path / "plain"), progress=False)
    # offloaded weights cannot be sampled for the cache key: name the models instead
    got = W.estimate_token_weights(data, *dispatched, tok, cache_dir=str(tmp_path / "dispatched"), progress=False,
                                   device="cpu", model_ids=("plus", "minus"))
    assert got["chosen_weights"] == want["chosen_weights"]
    assert got["rejected_weights"] == want["rejected_weights"]


def test_command_line_device_map(saved, tmp_path, monkeypatch):
    """`--device-map` (a strategy or a JSON object) loads both models with it; refused under several processes."""
    root, _ = saved
    make_preference_dataset(4, seed=4).to_json(str(tmp_path / "pairs.jsonl"), lines=True)
    common = ["estimate-weights", "--dataset", str(tmp_path / "pairs.jsonl"), "--plus-model", str(root / "plus"),
              "--minus-model", str(root / "minus"), "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert cli_main([*common, "--device", "cpu", "--output", str(tmp_path / "plain")]) == 0
    assert cli_main([*common, "--device-map", json.dumps({"": "cpu"}), "--output", str(tmp_path / "map")]) == 0
    assert cli_main([*common, "--device-map", "auto", "--output", str(tmp_path / "auto")]) == 0
    plain = load_preference_dataset(str(tmp_path / "plain"))["chosen_weights"]
    assert load_preference_dataset(str(tmp_path / "map"))["chosen_weights"] == plain
    assert load_preference_dataset(str(tmp_path / "auto"))["chosen_weights"] == plain
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        cli_main([*common, "--device-map", "auto", "--output", str(tmp_path / "refused")])
