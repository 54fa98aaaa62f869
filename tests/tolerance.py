"""Tolerances of the oracle tests: errors measured against a float64 truth, with a floor the dtype allows.

A bound of the form ``factor x torch's error`` alone is not robust: on a CPU whose BLAS happens to be more
exact than usual, torch's error shrinks and a correct result fails (seen on an Intel Xeon: ours 2.4e-6,
torch 6.6e-7, both correct float32 results). So every bound also has a floor, derived from the dtypes:

    floor = eps(result dtype) + 8 * eps(float32) * sqrt(reduction)

- ``eps(result dtype)``: one rounding of the result itself (relative errors are scaled by ``max |truth|``).
- ``eps(float32) * sqrt(K)``: the typical rounding error of a float32 sum of ``K`` terms, relative to the
  terms' scale (the random-walk model of Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2).
  The math inside every path is float32; ``reduction`` is the total length of the sums feeding the value
  (e.g. ``rows + vocab + dim`` for a gradient of the fused head: the logits sum over ``dim``, the softmax
  over ``vocab``, the weight gradient over ``rows``). The factor 8 covers the chain of such reductions
  (logits, log-sum-exp, gradient products) and the different summation orders of tiles and BLAS blocks.
"""

from __future__ import annotations

import math

import torch

_F32_EPS = torch.finfo(torch.float32).eps


def rel_err(value: torch.Tensor, truth: torch.Tensor) -> float:
    """``max |value - truth| / max |truth|`` in float64 (0 for an all-zero truth matched exactly)."""
    value, truth = value.detach().double(), truth.detach().double()
    scale = truth.abs().max().clamp(min=1e-30)
    return ((value - truth).abs().max() / scale).item()


def eps_floor(dtype: torch.dtype, reduction: int) -> float:
    """The smallest relative error bound a correct result of ``dtype`` can be held to (see the module doc)."""
    if reduction < 1:
        raise ValueError(f"reduction must be a positive length, got {reduction}")
    return torch.finfo(dtype).eps + 8 * _F32_EPS * math.sqrt(reduction)


def assert_close_to_truth(name: str, ours: torch.Tensor, torch_same_dtype: torch.Tensor, truth: torch.Tensor,
                          *, reduction: int, factor: float = 2.0):
    """Our relative error against the float64 ``truth`` must stay within ``factor`` times torch's error at
    the same input dtype (``torch_same_dtype``) plus ``eps_floor(ours.dtype, reduction)``."""
    assert ours.shape == truth.shape, (name, ours.shape, truth.shape)
    ours_err, torch_err = rel_err(ours, truth), rel_err(torch_same_dtype, truth)
    floor = eps_floor(ours.dtype, reduction)
    print(f"{name}: ours {ours_err:.2e}  torch {torch_err:.2e}  floor {floor:.2e}")
    limit = factor * torch_err + floor
    assert ours_err <= limit, f"{name}: ours {ours_err:.3e} > {factor} x torch {torch_err:.3e} + floor {floor:.2e}"
