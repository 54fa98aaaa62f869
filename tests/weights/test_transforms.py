"""Property tests of the token-weight transforms (tisdpo/response_weights.py, `docs/design.md §1.4`)."""

import math

import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from tisdpo.response_weights import (
    PER_RESPONSE_TRANSFORMS,
    WEIGHT_TRANSFORMS,
    example_generator,
    pair_weights,
    response_transform_params,
    response_weights,
    transform_token_weights,
)
from tisdpo_kernels.transforms import ELEMENTWISE_TRANSFORMS, apply_weight_transform

finite = st.floats(min_value=-20, max_value=20, allow_nan=False, allow_infinity=False, width=32)
# Coarse values make ties likely, which the per-response transforms must handle.
coarse = st.integers(min_value=-4, max_value=4).map(lambda v: v / 2)
responses = st.lists(st.one_of(finite, coarse), min_size=1, max_size=37)
SETTINGS = settings(max_examples=60, deadline=None)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("name", WEIGHT_TRANSFORMS)
@SETTINGS
@given(x=responses)
def test_shape_dtype_and_finite(name, x):
    w = response_weights(_t(x), name)
    assert w.shape == (len(x),) and w.dtype == torch.float64
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("name", ELEMENTWISE_TRANSFORMS)
@SETTINGS
@given(x=responses)
def test_elementwise_delegate_to_reference_and_are_monotone(name, x):
    t = _t(x)
    w = response_weights(t, name)
    torch.testing.assert_close(w, apply_weight_transform(t, name), rtol=0, atol=0)
    order = torch.argsort(t)
    assert (w[order].diff() >= 0).all()


@SETTINGS
@given(x=responses)
def test_elementwise_ranges(x):
    t = _t(x)
    assert response_weights(t, "threshold").abs().max() <= 1
    ts = response_weights(t, "threshold_and_scale")
    assert ((ts >= 0.7 - 1e-12) & (ts <= 1.3 + 1e-12)).all()
    kw = {"k": 2.0, "mu": 0.5, "lower": -1.0, "upper": 2.0}
    e = response_weights(t, "exp_clamp", kw)
    assert ((e >= 2 * math.exp(-0.5) - 1e-12) & (e <= 2 * math.exp(1.0) + 1e-12)).all()


@SETTINGS
@given(x=responses)
def test_rank_based_range_order_ties_and_mean(x):
    t = _t(x)
    w = response_weights(t, "rank_based")
    assert ((w >= 0.7 - 1e-12) & (w <= 1.3 + 1e-12)).all()
    # the mean rank is (n-1)/2, so the mean weight is the middle of the range
    assert abs(w.mean().item() - 1.0) < 1e-9
    less = t[:, None] < t[None, :]
    assert (w[:, None] < w[None, :])[less].all()
    assert (w[:, None] == w[None, :])[t[:, None] == t[None, :]].all()
    if len(set(x)) == len(x) and len(x) > 1:
        assert w[t.argmin()].item() == pytest.approx(0.7) and w[t.argmax()].item() == pytest.approx(1.3)


@SETTINGS
@given(x=responses)
def test_rank_based_only_sees_order(x):
    t = _t(x)
    # (scaling by a power of two keeps every order and tie exactly)
    torch.testing.assert_close(response_weights(t, "rank_based"), response_weights(4 * t, "rank_based"))
    # negating the rewards mirrors the ranks: w(-r) = 0.7 + 1.3 - w(r)
    torch.testing.assert_close(response_weights(-t, "rank_based"), 2.0 - response_weights(t, "rank_based"))


@SETTINGS
@given(x=responses, frac=st.floats(min_value=0.01, max_value=1.0))
def test_binary_keeps_the_top_fraction(x, frac):
    t = _t(x)
    w = response_weights(t, "binary", {"top_fraction": frac})
    assert set(w.tolist()) <= {0.0, 1.0}
    assert int(w.sum()) == min(len(x), math.ceil(frac * len(x) - 1e-9))
    assert (w[:, None] >= w[None, :])[t[:, None] > t[None, :]].all()


def test_binary_hand_case():
    """Rewards [0.1, 2, -1, 2, 0.5], top 40% -> 2 tokens: the two 2s (the earlier one wins no tie here)."""
    w = response_weights([0.1, 2.0, -1.0, 2.0, 0.5], "binary", {"top_fraction": 0.4})
    assert w.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    w = response_weights([1.0, 1.0, 1.0], "binary", {"top_fraction": 0.5})  # ceil(1.5) = 2, ties -> earlier
    assert w.tolist() == [1.0, 1.0, 0.0]


@SETTINGS
@given(x=responses, seed=st.integers(0, 2**31))
def test_random_is_seeded_in_range_and_ignores_rewards(x, seed):
    t = _t(x)
    a = response_weights(t, "random", {"seed": seed})
    b = response_weights(t * 7 + 1, "random", {"seed": seed})
    assert torch.equal(a, b)
    assert ((a >= 0.7) & (a <= 1.3)).all()


def test_random_differs_across_examples_and_sides():
    x = torch.zeros(50)
    a, b = pair_weights(x, x, "random", index=3)
    c, _ = pair_weights(x, x, "random", index=4)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    again, _ = pair_weights(x, x, "random", index=3)
    assert torch.equal(a, again)
    g1, g2 = example_generator(0, 3, "chosen"), example_generator(0, 3, "chosen")
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


@pytest.mark.parametrize("name", WEIGHT_TRANSFORMS)
@SETTINGS
@given(c=responses, r=responses)
def test_pair_sign_convention(name, c, r):
    """Chosen tokens take T(r), rejected tokens T(-r) (`docs/design.md §1.4`)."""
    wc, wr = pair_weights(_t(c), _t(r), name, index=5)
    seed = response_transform_params(name).get("seed", 0)
    torch.testing.assert_close(wc, response_weights(_t(c), name, generator=example_generator(seed, 5, "chosen")))
    torch.testing.assert_close(wr, response_weights(-_t(r), name, generator=example_generator(seed, 5, "rejected")))


@pytest.mark.parametrize("name", ELEMENTWISE_TRANSFORMS)
def test_pair_symmetry_elementwise(name):
    """The same reward vector on both sides: chosen weights are T(r), rejected weights T(-r); for the
    odd transforms (origin, threshold) that is an exact sign flip."""
    r = torch.linspace(-3, 3, 13, dtype=torch.float64)
    wc, wr = pair_weights(r, r, name)
    torch.testing.assert_close(wr, apply_weight_transform(-r, name))
    if name in ("origin", "threshold"):
        torch.testing.assert_close(wr, -wc)
    # a token the good model prefers (r > 0) weighs at least as much in the chosen response
    assert (wc[r > 0] >= wr[r > 0]).all()


@pytest.mark.parametrize("name", WEIGHT_TRANSFORMS)
def test_eos_weight_option(name):
    x = torch.tensor([0.3, -1.2, 2.0, 0.7])
    plain = response_weights(x, name)
    w = response_weights(x, name, eos_weight=0.0)
    assert w[-1].item() == 0.0
    torch.testing.assert_close(w[:-1], plain[:-1])
    assert plain[-1].item() != 0.0 or name == "binary"


def test_single_token_response():
    assert response_weights([4.0], "rank_based").tolist() == [1.0]
    assert response_weights([4.0], "binary", {"top_fraction": 0.01}).tolist() == [1.0]


def test_transform_token_weights_on_a_dataset():
    ds = Dataset.from_dict({
        "prompt": ["a", "b"],
        "chosen_weights": [[0.5, -2.0, 1.0], [3.0]],
        "rejected_weights": [[-0.5, 0.25], [1.0, 2.0, -1.0, 0.0]],
    })
    out = transform_token_weights(ds, "rank_based", eos_weight=0.0)
    assert out["prompt"] == ["a", "b"]
    assert out["chosen_weights"][0] == pytest.approx([1.0, 0.7, 0.0])
    assert out["rejected_weights"][0] == pytest.approx([0.7, 0.0])
    assert out["rejected_weights"][1] == pytest.approx([1.1, 1.3, 0.7, 0.0])
    rnd1 = transform_token_weights(ds, "random", {"seed": 3})
    # the random transform is seeded by (seed, example index, side): the result is reproducible
    expected = response_weights([3.0], "random", generator=example_generator(3, 1, "chosen"))
    assert rnd1["chosen_weights"][1] == pytest.approx(expected.tolist())
    assert transform_token_weights(ds, "random", {"seed": 3})["chosen_weights"] == rnd1["chosen_weights"]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: response_weights([1.0], "nope"), "weight transform must be one of"),
        (lambda: response_weights([1.0], "rank_based", {"k": 1.0}), "unknown keys"),
        (lambda: response_weights([1.0], "binary", {"top_fraction": 0.0}), "top_fraction"),
        (lambda: response_weights([1.0], "rank_based", {"min_weight": 2.0}), "min_weight"),
        (lambda: response_weights([float("nan")], "origin"), "non-finite"),
        (lambda: response_weights([], "origin"), "empty"),
        (lambda: response_weights([[1.0]], "origin"), "1-D"),
        (lambda: transform_token_weights(Dataset.from_dict({"chosen_weights": [[1.0]]}), "origin"),
         "rejected_weights"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_per_response_names_are_not_elementwise():
    assert set(PER_RESPONSE_TRANSFORMS).isdisjoint(ELEMENTWISE_TRANSFORMS)
    with pytest.raises(TypeError, match="seed"):
        response_transform_params("random", {"seed": 1.5})
