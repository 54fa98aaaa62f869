"""Shared inputs and checks of the kernel tests; the tolerance checks live in ``tests/tolerance.py``."""

from __future__ import annotations

import torch

from tisdpo_kernels import fused_tis_dpo_loss
from tisdpo_kernels.ops._config import LinearConfig, TileConfig
from tisdpo_kernels.reference import reference_tis_dpo_loss

from ..batches import make_batch
from ..test_loss import _run
from ..tolerance import assert_close_to_truth

__all__ = ["LOSS_SHAPE", "SMALL_TILES", "as64", "assert_close_to_truth", "check_loss_against_oracle", "loss_batch",
           "make_head", "upstream_grad"]


def upstream_grad(n: int, device, generator=None) -> torch.Tensor:
    """Non-uniform upstream gradient ``[n]``: random signs and sizes, a few exact zeros (a backward that
    scales every row by the first row's gradient, Liger PR #1298, fails against it)."""
    g = torch.randn(n, generator=generator, dtype=torch.float64) * 2
    g[::5] = 0.0
    return g.to(device=device, dtype=torch.float32)


SMALL_TILES = LinearConfig(fwd=TileConfig(16, 32, 16), bwd=TileConfig(16, 32, 16), fwd_splits=3, bwd_splits=2)


def make_head(n, vocab, dim, dtype, device, bias=True, seed=0, scale=3.0):
    """Leaf tensors ``hidden [n, D]``, ``weight [V, D]``, ``bias [V]`` (or None), labels ``[n]``; logits
    have a spread of about ``scale``."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(device=device, dtype=dtype) \
            .requires_grad_()

    hidden = leaf(n, dim)
    weight = leaf(vocab, dim, s=scale / dim**0.5)
    b = leaf(vocab, s=0.5) if bias else None
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    return hidden, weight, b, labels


# a loss batch of awkward sizes: 3 pairs x 23 positions (ragged prompts, padding, a hole), D=40, V=211
LOSS_SHAPE = dict(pairs=3, seq_len=23, dim=40, vocab=211, scale=0.5)


def loss_batch(dtype, device, **overrides):
    """``tests.batches.make_batch`` at ``LOSS_SHAPE`` (or ``overrides``), on ``device``."""
    b = make_batch(dtype=dtype, **{**LOSS_SHAPE, **overrides})
    for name, value in vars(b).items():
        if isinstance(value, torch.Tensor):
            setattr(b, name, value.to(device))
    return b


def as64(kw):
    """The keyword arguments of one loss call with every floating tensor in float64 (leaves stay leaves)."""
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                and v.is_floating_point() else tuple(t.double() for t in v) if isinstance(v, tuple) else v)
            for k, v in kw.items()}


def check_loss_against_oracle(kw, opts, backend, **call):
    """``fused_tis_dpo_loss(**kw, backend=backend, **call, **opts)``: loss, every metric and the gradients of
    hidden / weight / bias within 2x the float32 oracle's error of the float64 oracle, plus the dtype floor."""
    ours = _run(fused_tis_dpo_loss, kw, backend=backend, **call, **opts)
    same = _run(reference_tis_dpo_loss, kw, **opts)
    truth = _run(reference_tis_dpo_loss, as64(kw), **opts)
    assert set(ours[1]) == set(truth[1])
    named = [("loss", ours[0], same[0], truth[0])]
    named += [(k, ours[1][k], same[1][k], truth[1][k]) for k in truth[1]]
    named += [(f"grad{i}", o, s, t) for i, (o, s, t) in enumerate(zip(ours[2], same[2], truth[2], strict=True))]
    # every token of the batch + vocab + both dims: the sums behind the loss and its gradients
    ref_dim = kw["ref_hidden"].shape[-1] if "ref_hidden" in kw else 0
    reduction = kw["labels"].numel() + sum(kw["weight"].shape) + ref_dim
    for name, o, s, t in named:
        assert_close_to_truth(name, o, s, t, reduction=reduction, factor=2.0)
