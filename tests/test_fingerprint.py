"""`tisdpo.modeling.model_fingerprint` sees every value of every parameter (the weight and reference-log-prob caches
are keyed by it): an edit anywhere changes it, an identical copy keeps it, and the PEFT/config switches still work."""

import copy

import torch

from tests.trainer.tiny import tiny_llama
from tisdpo.modeling import model_fingerprint


def test_an_edit_of_any_single_value_changes_the_fingerprint():
    model = tiny_llama(320)
    before = model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model)) == before
    params = dict(model.named_parameters())
    # the embedding has 10240 values: the old fingerprint looked at every 2nd of them only; edit one it skipped,
    # the last value of the last matrix, and the smallest possible change (one ulp) in the middle of another
    edits = [("model.embed_tokens.weight", 1), ("lm_head.weight", -1), ("model.layers.1.mlp.down_proj.weight", 777)]
    for name, index in edits:
        flat = params[name].data.view(-1)
        old = flat[index].clone()
        flat[index] = torch.nextafter(old, old + 1)
        assert model_fingerprint(model) != before, name
        flat[index] = old
        assert model_fingerprint(model) == before


def test_swapping_two_values_changes_the_fingerprint():
    model = tiny_llama(320)
    before = model_fingerprint(model)
    flat = model.lm_head.weight.data.view(-1)
    flat[[3, 5]] = flat[[5, 3]].clone()
    assert model_fingerprint(model) != before


def test_a_bfloat16_model_and_its_float32_original_differ():
    model = tiny_llama(320)
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != model_fingerprint(model)
