"""Shared checks of the kernel tests: errors measured against a float64 truth, relative to torch's own."""

from __future__ import annotations

import torch

from tisdpo_kernels.ops._config import LinearConfig, TileConfig


def rel_err(value: torch.Tensor, truth: torch.Tensor) -> float:
    """``max |value - truth| / max |truth|`` in float64 (0 for an all-zero truth matched exactly)."""
    value, truth = value.detach().double(), truth.detach().double()
    scale = truth.abs().max().clamp(min=1e-30)
    return ((value - truth).abs().max() / scale).item()


def assert_close_to_truth(name: str, ours: torch.Tensor, torch_same_dtype: torch.Tensor, truth: torch.Tensor,
                          factor: float = 2.0, floor: float = 1e-6):
    """Our error against the float64 ``truth`` must stay within ``factor`` times torch's error at the
    same input dtype (``torch_same_dtype``) plus ``floor`` (for cases where torch happens to be exact)."""
    assert ours.shape == truth.shape, (name, ours.shape, truth.shape)
    ours_err, torch_err = rel_err(ours, truth), rel_err(torch_same_dtype, truth)
    print(f"{name}: ours {ours_err:.2e}  torch {torch_err:.2e}")
    limit = factor * torch_err + floor
    assert ours_err <= limit, f"{name}: ours {ours_err:.3e} > {factor} x torch {torch_err:.3e} + {floor}"


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
