"""`tisdpo.modeling.model_fingerprint` sees every value of every parameter (the weight and reference-log-prob caches
are keyed by it): an edit anywhere changes it, an identical copy keeps it, and the PEFT/config switches still work."""

import copy

import torch

from tests.trainer.tiny import tiny_llama
from tisdpo import modeling
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


def _checksum_by_definition(tensor: torch.Tensor) -> tuple[int, int]:
    """`_bytes_checksum`'s definition, chunk by chunk with every byte widened to int64 (its former implementation)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    chunk, mod = modeling._CHECKSUM_CHUNK, modeling._CHECKSUM_MOD
    weights = torch.arange(min(chunk, data.numel()), dtype=torch.int64) % mod + 1
    plain = weighted = 0
    for k, start in enumerate(range(0, data.numel(), chunk)):
        part = data[start:start + chunk].to(torch.int64)
        plain += int(part.sum())
        weighted = (weighted + (k + 1) * int((part * weights[: part.numel()]).sum())) % (2**61 - 1)
    return plain, weighted


def test_the_one_pass_checksum_equals_its_definition(monkeypatch):
    """Exact integers: equal, at sizes around the 65521-byte period, the 4 MiB chunk and a group of chunks (made 2
    chunks here so that a few MiB cross it), in several dtypes; so fingerprints (and the caches keyed by them) keep
    their values."""
    monkeypatch.setattr(modeling, "_CHECKSUM_GROUP", 2)
    g = torch.Generator().manual_seed(0)
    chunk_floats = modeling._CHECKSUM_CHUNK // 4
    for n in (1, 7, 16380, 16381, 65521, chunk_floats - 1, chunk_floats, 2 * chunk_floats + 3, 5 * chunk_floats + 9):
        values = torch.randn(n, generator=g)
        assert modeling._bytes_checksum(values) == _checksum_by_definition(values), n
    for dtype in (torch.bfloat16, torch.float64, torch.int8):
        values = (torch.randn(70001, generator=g) * 50).to(dtype)
        assert modeling._bytes_checksum(values) == _checksum_by_definition(values), dtype
    ones = torch.full((3 * modeling._CHECKSUM_CHUNK,), 255, dtype=torch.uint8)  # the largest column sums
    assert modeling._bytes_checksum(ones) == _checksum_by_definition(ones)
