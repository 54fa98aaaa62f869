"""Shared inputs of the kernel tests; the tolerance checks live in ``tests/tolerance.py``."""

from __future__ import annotations

import torch

from tisdpo_kernels.ops._config import LinearConfig, TileConfig

from ..tolerance import assert_close_to_truth

__all__ = ["SMALL_TILES", "assert_close_to_truth", "make_head", "upstream_grad"]


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
