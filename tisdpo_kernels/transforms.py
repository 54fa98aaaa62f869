"""Elementwise token-weight transforms: token rewards ``r = log pi_plus - log pi_minus`` -> token weights.

One statement of each transform serves every path: the oracle (``reference.py``), the chunked PyTorch path and
the trainer call ``apply_weight_transform``; the Triton segment-sum kernel (``ops/pair_loss.py``) evaluates the
same formulas in-kernel with the parameters of ``transform_params``. The per-response transforms
(``rank_based``, ``binary``, ``random``) need a whole response and live in ``tisdpo.response_weights``.
"""

from __future__ import annotations

import torch

ELEMENTWISE_TRANSFORMS = ("origin", "threshold", "threshold_and_scale", "exp_clamp")
_TRANSFORM_DEFAULTS = {
    "origin": {},
    "threshold": {"lower": -1.0, "upper": 1.0},
    "threshold_and_scale": {"lower": -1.5, "upper": 1.5, "min_weight": 0.7, "max_weight": 1.3},
    "exp_clamp": {"k": 1.0, "mu": 1.0, "lower": -0.5, "upper": 1.5},
}


def transform_params(name: str, kwargs: dict | None = None) -> dict:
    """Full parameter dict of the elementwise transform ``name`` (defaults overridden by ``kwargs``)."""
    if name not in _TRANSFORM_DEFAULTS:
        raise ValueError(
            f"weight_transform must be one of {ELEMENTWISE_TRANSFORMS} (per-response transforms such as "
            f"'rank_based' and 'binary' belong to tisdpo.response_weights), got {name!r}"
        )
    params = dict(_TRANSFORM_DEFAULTS[name])
    unknown = set(kwargs or {}) - set(params)
    if unknown:
        raise ValueError(f"transform_kwargs has unknown keys {sorted(unknown)} for {name!r}; known: {sorted(params)}")
    params.update(kwargs or {})
    if "lower" in params and not params["lower"] < params["upper"]:
        raise ValueError(f"transform_kwargs: lower ({params['lower']}) must be < upper ({params['upper']})")
    return params


def apply_weight_transform(x: torch.Tensor, name: str = "origin", **kwargs) -> torch.Tensor:
    """Map token rewards ``x`` (any shape, float) to token weights, elementwise.

    - ``origin``: ``x`` itself.
    - ``threshold``: ``clamp(x, lower=-1, upper=1)``.
    - ``threshold_and_scale``: ``clamp(x, -1.5, 1.5)`` mapped linearly onto ``[0.7, 1.3]``.
    - ``exp_clamp``: ``k * exp(mu * clamp(x, lower=-0.5, upper=1.5))`` (TIS-DPO paper, Eq. 19).

    Chosen tokens take ``T(r)`` and rejected tokens ``T(-r)`` for ``r = log pi_plus - log pi_minus``;
    that sign flip is the caller's business, not this function's.
    """
    p = transform_params(name, kwargs)
    if name == "origin":
        return x
    if name == "threshold":
        return x.clamp(p["lower"], p["upper"])
    if name == "threshold_and_scale":
        t = (x.clamp(p["lower"], p["upper"]) - p["lower"]) / (p["upper"] - p["lower"])
        return p["min_weight"] + t * (p["max_weight"] - p["min_weight"])
    return p["k"] * torch.exp(p["mu"] * x.clamp(p["lower"], p["upper"]))


def token_weights_from_contrastive(pos_logps, neg_logps, is_chosen, name="origin", kwargs=None):
    """Weights from contrastive log-probs: ``T(r)`` on chosen tokens, ``T(-r)`` on rejected,
    ``r = pos - neg``. All tensors share one shape; ``is_chosen`` is boolean."""
    r = pos_logps - neg_logps
    return apply_weight_transform(torch.where(is_chosen, r, -r), name, **(kwargs or {}))


__all__ = ["ELEMENTWISE_TRANSFORMS", "apply_weight_transform", "token_weights_from_contrastive", "transform_params"]
