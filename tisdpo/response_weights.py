"""Per-response token-weight transforms of TIS-DPO (``docs/design.md §1.4``): what turns a response's token rewards
into its training weights.

Token reward: ``r_t = log pi_plus(y_t) - log pi_minus(y_t)`` for every response token, from a "good" model
``pi_plus`` and a "bad" model ``pi_minus`` (estimated by ``tisdpo.weights``). A token the good model prefers should
weigh more in the winning (chosen) response, a token the bad model prefers more in the losing (rejected) one, so

    chosen tokens:   w_t = T(r_t)          rejected tokens:   w_t = T(-r_t)

**Column convention** (shared with ``tisdpo.config.TISDPOConfig`` and ``tisdpo.weights``): a dataset's
``chosen_weights`` column holds, per chosen-response token, ``x_t = r_t``; its ``rejected_weights`` column holds,
per rejected-response token, ``x_t = -r_t`` (the sign is flipped once, when the columns are written). The trainer
applies the same elementwise transform to both columns, ``w_t = T(x_t)``, so the transform can be changed without
re-estimating. ``transform_token_weights`` turns such columns into final weights (any transform, per-response ones
included), to train with ``weight_transform="origin"``.

Transforms:

- elementwise, delegated to ``tisdpo_kernels.transforms.apply_weight_transform`` (so the loss kernel and
  this module agree): ``origin``, ``threshold``, ``threshold_and_scale``, ``exp_clamp``;
- per response (they need the whole response, so they belong to the data pipeline, not to the loss):
  ``rank_based`` (rank within the response mapped linearly onto ``[min_weight, max_weight]`` =
  ``[0.7, 1.3]``; ties share their average rank), ``binary`` (1 for the ``ceil(top_fraction * n)``
  highest-reward tokens of a response, 0 for the rest; ties go to the earlier token) and ``random``
  (uniform on ``[0.7, 1.3]``, independent of the rewards: the paper's ablation; seeded).

``binary`` keeps the top half by default (``top_fraction=0.5``): keeping 100%, the upstream preset, makes
every weight 1, i.e. plain DPO. The upstream code also gives the final response position (the EOS token)
weight 0; here that is the ``eos_weight`` option of ``transform_token_weights`` / ``response_weights``
(``None``, the default, keeps the transform's value).
"""

from __future__ import annotations

import hashlib
import logging
import math

import torch

from tisdpo_kernels.transforms import ELEMENTWISE_TRANSFORMS, apply_weight_transform
from tisdpo_kernels.transforms import transform_params as _elementwise_params

from .formats import WEIGHT_COLUMNS

logger = logging.getLogger(__name__)

# need a whole response: the trainer applies them to the tokenised weight columns, not in the loss
PER_RESPONSE_TRANSFORMS = ("rank_based", "binary", "random")
WEIGHT_TRANSFORMS = ELEMENTWISE_TRANSFORMS + PER_RESPONSE_TRANSFORMS
_PER_RESPONSE_DEFAULTS = {
    "rank_based": {"min_weight": 0.7, "max_weight": 1.3},
    "binary": {"top_fraction": 0.5},
    "random": {"min_weight": 0.7, "max_weight": 1.3, "seed": 0},
}


def response_transform_params(name: str, kwargs: dict | None = None) -> dict:
    """Full, validated parameter dict of transform ``name`` (any of ``WEIGHT_TRANSFORMS``; elementwise ones are
    ``tisdpo_kernels.transforms.transform_params``'s): its defaults overridden by ``kwargs``.

    Raises ``ValueError`` for an unknown transform, an unknown key or an invalid value.
    """
    if name in ELEMENTWISE_TRANSFORMS:
        return _elementwise_params(name, kwargs)
    if name not in _PER_RESPONSE_DEFAULTS:
        raise ValueError(f"weight transform must be one of {WEIGHT_TRANSFORMS}, got {name!r}")
    params = dict(_PER_RESPONSE_DEFAULTS[name])
    unknown = set(kwargs or {}) - set(params)
    if unknown:
        raise ValueError(f"transform_kwargs has unknown keys {sorted(unknown)} for {name!r}; known: {sorted(params)}")
    params.update(kwargs or {})
    if "min_weight" in params and not params["min_weight"] <= params["max_weight"]:
        raise ValueError(
            f"transform_kwargs: min_weight ({params['min_weight']}) must be <= max_weight ({params['max_weight']})"
        )
    if name == "binary" and not 0.0 < params["top_fraction"] <= 1.0:
        raise ValueError(f"transform_kwargs: top_fraction must lie in (0, 1], got {params['top_fraction']!r}")
    if name == "random" and not isinstance(params["seed"], int):
        raise TypeError(f"transform_kwargs: seed must be an int, got {type(params['seed']).__name__}")
    return params


def _as_rewards(rewards, name: str = "rewards") -> torch.Tensor:
    t = torch.as_tensor(rewards)
    if not t.dtype.is_floating_point:
        t = t.to(torch.float32)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per response token), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite values (NaN/inf)")
    return t


def _rank_based(x: torch.Tensor, min_weight: float, max_weight: float) -> torch.Tensor:
    n = x.numel()
    if n == 1:
        return x.new_full((1,), (min_weight + max_weight) / 2)
    ordered = torch.sort(x).values
    below = torch.searchsorted(ordered, x, right=False)  # tokens with a smaller reward
    up_to = torch.searchsorted(ordered, x, right=True)  # tokens with a smaller or equal reward
    rank = (below + up_to - 1).to(x.dtype) / 2  # average rank of a tie group, in [0, n-1]
    return min_weight + (max_weight - min_weight) * rank / (n - 1)


def _binary(x: torch.Tensor, top_fraction: float) -> torch.Tensor:
    n = x.numel()
    keep = min(n, math.ceil(top_fraction * n - 1e-9))
    order = torch.sort(x, descending=True, stable=True).indices
    out = torch.zeros_like(x)
    out[order[:keep]] = 1.0
    return out


def _random(x: torch.Tensor, min_weight: float, max_weight: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
    return (min_weight + (max_weight - min_weight) * u).to(x.dtype)


def example_generator(seed: int, index: int, side: str) -> torch.Generator:
    """The generator of the ``random`` transform for one response: a fixed function of the transform's
    ``seed``, the example's ``index`` in its dataset and ``side`` (``"chosen"``/``"rejected"``), so that
    results do not depend on processing order or batching."""
    digest = hashlib.sha256(f"{seed}:{index}:{side}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def response_weights(
    x,
    name: str = "origin",
    transform_kwargs: dict | None = None,
    *,
    eos_weight: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Weights of one response's tokens: ``T(x)`` for transform ``name``.

    Args:
        x: ``[n]`` float (tensor or sequence), one value per response token, in the column convention
            of this module (``r_t`` for a chosen response, ``-r_t`` for a rejected one). Must be finite.
        name: one of ``WEIGHT_TRANSFORMS``; ``transform_kwargs`` override its defaults (see
            ``response_transform_params``).
        eos_weight: if not None, the final position's weight is set to this value after the transform
            (the upstream code uses 0 for the EOS token).
        generator: the ``random`` transform's generator; default: one seeded from its ``seed`` parameter.
    Returns:
        ``[n]`` weights, x's floating dtype (float32 for non-tensor input).
    """
    params = response_transform_params(name, transform_kwargs)
    t = _as_rewards(x, "x")
    if t.numel() == 0:
        raise ValueError("x is empty: a response needs at least one token")
    if name in ELEMENTWISE_TRANSFORMS:
        w = apply_weight_transform(t, name, **params)
    elif name == "rank_based":
        w = _rank_based(t, params["min_weight"], params["max_weight"])
    elif name == "binary":
        w = _binary(t, params["top_fraction"])
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(params["seed"])
        w = _random(t, params["min_weight"], params["max_weight"], generator)
    if eos_weight is not None:
        w = w.clone()
        w[-1] = eos_weight
    return w


def pair_weights(
    chosen_rewards,
    rejected_rewards,
    name: str = "origin",
    transform_kwargs: dict | None = None,
    *,
    eos_weight: float | None = None,
    index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of one pair (``docs/design.md §1.4``) from the raw token rewards ``r = log pi_plus - log pi_minus``.

    Args:
        chosen_rewards: ``[n_c]`` raw ``r_t`` of the chosen response's tokens.
        rejected_rewards: ``[n_r]`` raw ``r_t`` of the rejected response's tokens (not sign-flipped).
        index: the example's index, seeding the ``random`` transform (see ``example_generator``).
    Returns:
        ``(T(r_chosen), T(-r_rejected))``, shapes ``[n_c]`` and ``[n_r]``.
    """
    seed = response_transform_params(name, transform_kwargs).get("seed", 0)
    chosen = response_weights(chosen_rewards, name, transform_kwargs, eos_weight=eos_weight,
                              generator=example_generator(seed, index, "chosen"))
    rejected = response_weights(-_as_rewards(rejected_rewards, "rejected_rewards"), name, transform_kwargs,
                                eos_weight=eos_weight, generator=example_generator(seed, index, "rejected"))
    return chosen, rejected


def transform_token_weights(
    dataset,
    name: str,
    transform_kwargs: dict | None = None,
    *,
    eos_weight: float | None = None,
    num_proc: int | None = None,
):
    """A copy of ``dataset`` whose ``chosen_weights``/``rejected_weights`` columns hold final weights.

    The input columns follow this module's convention (chosen: ``r_t``, rejected: ``-r_t``, as written by
    ``tisdpo.weights.estimate_token_weights``); each response's column becomes ``T(x)`` (``transform_kwargs``,
    ``eos_weight`` as in ``response_weights``; the ``random`` transform is seeded per example index and
    side; a None column, a pair the trainer drops, stays None). Train on the result with
    ``weight_transform="origin"``. Needed for the per-response transforms
    (``rank_based``, ``binary``, ``random``) and for the EOS option; elementwise transforms can instead be
    left to the trainer.

    Args:
        dataset: a ``datasets.Dataset`` with ``chosen_weights`` and ``rejected_weights`` (lists of floats).
    Returns:
        a ``datasets.Dataset`` with the two columns replaced (float32 lists).
    """
    for column in WEIGHT_COLUMNS:
        if column not in dataset.column_names:
            raise ValueError(f"dataset has no {column!r} column (columns: {dataset.column_names})")
    params = response_transform_params(name, transform_kwargs)
    seed = params.get("seed", 0)

    def one(example, idx):
        out = {}
        for side in ("chosen", "rejected"):
            if example[f"{side}_weights"] is None:  # a pair the trainer drops (estimate_token_weights)
                out[f"{side}_weights"] = None
                continue
            w = response_weights(example[f"{side}_weights"], name, params, eos_weight=eos_weight,
                                 generator=example_generator(seed, idx, side))
            out[f"{side}_weights"] = w.to(torch.float32).tolist()
        return out

    return dataset.map(one, with_indices=True, num_proc=num_proc, desc=f"token weights: {name}")


def warn_if_weightless(dataset, name: str, transform: str, transform_kwargs: dict | None = None) -> bool:
    """Warn (and return True) when every token weight the loss will use is 0: ``dataset``'s (a tokenised
    ``datasets.Dataset``) weight columns hold only zeros and ``transform`` keeps 0 at 0 (``origin``,
    ``threshold``; a per-response transform's output is the column itself). The weighted log-ratios are then 0
    for every pair, the preference term is constant and training on it changes nothing."""
    if not hasattr(dataset, "data") or any(c not in dataset.column_names for c in WEIGHT_COLUMNS) or not len(dataset):
        return False
    table = dataset.select_columns(list(WEIGHT_COLUMNS)).flatten_indices().data.table
    for column in WEIGHT_COLUMNS:
        values = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if len(values) == 0 or (values != 0).any():
            return False
    if transform in ELEMENTWISE_TRANSFORMS:
        zero = apply_weight_transform(torch.zeros(1, dtype=torch.float64), transform,
                                      **_elementwise_params(transform, transform_kwargs or {}))
        if float(zero) != 0.0:
            return False
    logger.warning(
        "Every token weight of the %s data is 0 (`chosen_weights` and `rejected_weights` hold only zeros, "
        "weight_transform=%r): the weighted log-ratios are 0 for every pair, so the preference loss is constant "
        "and training changes nothing. Check the weight estimation (tisdpo estimate-weights).", name, transform)
    return True
