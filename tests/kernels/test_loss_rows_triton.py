"""``fused_tis_dpo_loss(..., row_index=..., backend="triton")``: the explicit-rows form (prefix-shared layouts)
through the Triton kernels (the interpreter on CPU) against ``reference.py`` on the gathered rows; float32 inputs,
a float64 truth, our error within 2x torch's float32 error plus the dtype floor (``tests/tolerance.py``)."""

from __future__ import annotations

import pytest
import torch

from tisdpo_kernels import fused_tis_dpo_loss
from tisdpo_kernels.reference import reference_tis_dpo_loss

from ..test_loss_rows import _kwargs, _shared_case
from .helpers import assert_close_to_truth


@pytest.mark.parametrize("kl,weights", [(None, "token"), ("tdpo2", "contrastive")])
def test_row_index_triton_matches_reference(device, kl, weights):
    b, hidden, ref_hidden, slots, fields, cu = _shared_case(torch.float32)
    d = hidden.shape[-1]
    kw = {k: (tuple(x.to(device) for x in v) if isinstance(v, tuple) else v.to(device) if isinstance(v, torch.Tensor)
              else v) for k, v in _kwargs(b, fields, kl, weights).items()}
    labels, cu, slots = fields["labels"].to(device), cu.to(device), slots.to(device)
    opts = dict(kl=kl, beta=0.3, alpha=0.7)

    def run(fn, dtype, rows_form):
        h = hidden.to(device, dtype).requires_grad_()
        w = b.weight.to(device, dtype).requires_grad_()
        tensors = {k: (tuple(x.to(dtype) for x in v) if isinstance(v, tuple) else v.to(dtype))
                   for k, v in kw.items() if k != "weight_transform"}
        if "weight_transform" in kw:
            tensors["weight_transform"] = kw["weight_transform"]
        if kl is not None:
            tensors["ref_hidden"] = ref_hidden.to(device, dtype)
        if rows_form:
            loss, metrics = fn(h, w, labels, row_index=slots, cu_seqlens=cu, backend="triton", **tensors, **opts)
        else:
            if kl is not None:
                tensors["ref_hidden"] = tensors["ref_hidden"].reshape(-1, d)[slots]
            loss, metrics = fn(h.reshape(-1, d)[slots], w, labels, cu_seqlens=cu, **tensors, **opts)
        return loss, metrics, torch.autograd.grad(loss, (h, w))

    ours = run(fused_tis_dpo_loss, torch.float32, True)
    same = run(reference_tis_dpo_loss, torch.float32, False)
    truth = run(reference_tis_dpo_loss, torch.float64, False)
    named = [("loss", ours[0], same[0], truth[0])]
    named += [(k, ours[1][k], same[1][k], truth[1][k]) for k in truth[1]]
    named += [(f"grad{i}", o, s, t) for i, (o, s, t) in enumerate(zip(ours[2], same[2], truth[2], strict=True))]
    reduction = labels.numel() + sum(b.weight.shape)  # every row + vocab + dim feed the sums
    for name, o, s, t in named:
        assert_close_to_truth(name, o, s, t, reduction=reduction, factor=2.0)
