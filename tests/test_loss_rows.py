"""The explicit-rows form of the public API (``row_index=``, prefix-shared layouts) against the reference oracle
on the gathered rows, and its input validation."""

from __future__ import annotations

import itertools

import pytest
import torch

from tisdpo_kernels import fused_linear_logprobs, fused_tis_dpo_loss
from tisdpo_kernels.reference import reference_linear_logprobs, reference_tis_dpo_loss

from .batches import IGNORE, make_batch
from .test_loss import KLS, WEIGHTS, _max_rel


def _shared_case(dtype=torch.float64):
    """A packed batch's labels and per-token tensors whose rows are named through ``row_index`` into a larger
    hidden tensor ``[4, 23, D]``: in a scrambled order, with two rows used twice (as a shared prompt's last row
    is) and unrelated rows left out. Returns (batch, hidden, ref_hidden, row_index, fields, cu_seqlens)."""
    b = make_batch(dtype=dtype)
    fields, cu = b.packed()
    n, d = fields["hidden"].shape
    g = torch.Generator().manual_seed(7)
    slots = torch.randperm(4 * 23, generator=g)[:n]
    slots[5] = slots[2]
    slots[40] = slots[9]
    hidden = torch.randn(4, 23, d, generator=g, dtype=torch.float64).to(dtype)
    ref_hidden = torch.randn(4, 23, d, generator=g, dtype=torch.float64).to(dtype)
    return b, hidden, ref_hidden, slots, fields, cu


def _kwargs(b, fields, kl, weights):
    kw = {}
    if kl is not None:
        kw.update(ref_weight=b.ref_weight, ref_bias=b.ref_bias)
    else:
        kw["ref_logps"] = fields["ref_logps"]
    if weights == "token":
        kw["token_weights"] = fields["token_weights"]
    elif weights == "contrastive":
        kw.update(contrastive_logps=(fields["pos_logps"], fields["neg_logps"]), weight_transform="exp_clamp")
    return kw


@pytest.mark.parametrize("kl,weights", list(itertools.product(KLS, WEIGHTS)))
def test_row_index_equals_reference_on_gathered_rows(kl, weights):
    """float64: ``row_index`` form == the reference on ``hidden.reshape(-1, D)[row_index]`` (packed), values and
    gradients w.r.t. the big hidden tensor (a repeated row gets the sum of both uses)."""
    b, hidden, ref_hidden, slots, fields, cu = _shared_case()
    labels = fields["labels"]
    # the row form drops ignore_index rows too: keep one hole inside a response
    assert (labels == IGNORE).any()
    kw = _kwargs(b, fields, kl, weights)
    opts = dict(kl=kl, beta=0.3, alpha=0.7)
    h1 = hidden.clone().requires_grad_()
    w1 = b.weight.clone().requires_grad_()
    extra = {"ref_hidden": ref_hidden} if kl is not None else {}
    loss, metrics = fused_tis_dpo_loss(h1, w1, labels, bias=b.bias, row_index=slots, cu_seqlens=cu, backend="torch",
                                       chunk_size=4, **kw, **extra, **opts)
    grads = torch.autograd.grad(loss, (h1, w1))

    h2 = hidden.clone().requires_grad_()
    w2 = b.weight.clone().requires_grad_()
    extra = {"ref_hidden": ref_hidden.reshape(-1, hidden.shape[-1])[slots]} if kl is not None else {}
    want, want_metrics = reference_tis_dpo_loss(h2.reshape(-1, hidden.shape[-1])[slots], w2, labels, bias=b.bias,
                                                cu_seqlens=cu, **kw, **extra, **opts)
    want_grads = torch.autograd.grad(want, (h2, w2))
    errs = {"loss": _max_rel(loss, want), "dhidden": _max_rel(grads[0], want_grads[0]),
            "dweight": _max_rel(grads[1], want_grads[1])}
    errs.update({k: _max_rel(metrics[k], want_metrics[k]) for k in want_metrics})
    print({k: f"{v:.1e}" for k, v in errs.items()})
    assert set(metrics) == set(want_metrics)
    assert max(errs.values()) <= 1e-10, errs  # float64, same rows, only the summation order differs
    assert grads[0].reshape(-1, hidden.shape[-1])[slots[5]].abs().sum() > 0  # the shared row got gradient


def test_linear_logprobs_row_index():
    b, hidden, _, slots, fields, _ = _shared_case()
    h = hidden.clone().requires_grad_()
    got = fused_linear_logprobs(h, b.weight, fields["labels"], bias=b.bias, row_index=slots.to(torch.int32),
                                backend="torch", chunk_size=3)
    assert got.shape == fields["labels"].shape
    h_ref = hidden.clone().requires_grad_()
    want = reference_linear_logprobs(h_ref.reshape(-1, hidden.shape[-1])[slots], b.weight, fields["labels"],
                                     bias=b.bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.linspace(-1, 2, got.numel(), dtype=got.dtype)  # non-uniform upstream gradient
    (dh,) = torch.autograd.grad((got * upstream).sum(), h)
    (dh_ref,) = torch.autograd.grad((want * upstream).sum(), h_ref)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-12, atol=1e-12)


@pytest.fixture
def case32():
    return _shared_case(torch.float32)


def _call_rows(case, **over):
    b, hidden, _, slots, fields, cu = case
    kw = dict(hidden=hidden, weight=b.weight, labels=fields["labels"], ref_logps=fields["ref_logps"],
              row_index=slots, cu_seqlens=cu, backend="torch")
    kw.update(over)
    return fused_tis_dpo_loss(**kw)


def test_row_index_validation(case32):
    b, hidden, _, slots, fields, cu = case32
    assert torch.isfinite(_call_rows(case32)[0])
    rows = hidden.shape[0] * hidden.shape[1]
    for bad in (-1, rows):
        index = slots.clone()
        index[3] = bad
        with pytest.raises(ValueError, match=rf"row_index must lie in \[0, {rows}\).*found {bad}"):
            _call_rows(case32, row_index=index)
        with pytest.raises(ValueError, match="row_index must lie"):
            fused_linear_logprobs(hidden, b.weight, fields["labels"], row_index=index, backend="torch")
    with pytest.raises(TypeError, match="row_index must be an int32/int64"):
        _call_rows(case32, row_index=slots.float())
    with pytest.raises(TypeError, match="row_index must be an int32/int64"):
        _call_rows(case32, row_index=slots.tolist())
    with pytest.raises(ValueError, match="row_index must be 1-D"):
        _call_rows(case32, row_index=slots[None])
    with pytest.raises(ValueError, match="one label per row"):
        _call_rows(case32, row_index=slots[:-1])
    with pytest.raises(ValueError, match="one label per row"):
        fused_linear_logprobs(hidden, b.weight, fields["labels"][None], row_index=slots, backend="torch")
    with pytest.raises(ValueError, match="row_index needs cu_seqlens"):
        _call_rows(case32, cu_seqlens=None)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0.*end at the number of tokens"):
        _call_rows(case32, cu_seqlens=cu * 2)
    labels = fields["labels"].clone()
    labels[4] = b.weight.shape[0]
    with pytest.raises(ValueError, match="labels must lie in"):
        _call_rows(case32, labels=labels)
    with pytest.raises(ValueError, match="token_weights shape"):
        _call_rows(case32, token_weights=torch.ones(hidden.shape[:-1]))
    with pytest.raises(ValueError, match="ref_hidden shape"):
        _call_rows(case32, ref_logps=None, ref_hidden=hidden.reshape(-1, hidden.shape[-1])[slots],
                   ref_weight=b.ref_weight)
