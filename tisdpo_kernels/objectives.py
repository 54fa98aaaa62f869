"""The ground floor of the loss: sequence layout, per-sequence sums, the pair objective and the loss types.

Everything here is O(batch) or O(tokens), never O(tokens x vocab), so the oracle (``reference.py``) and every
backend share it: ``sequence_layout`` (padded / packed layouts -> per-token sequence ids), ``sequence_sums``
(per-token vectors -> per-sequence sums ``SequenceSums``), ``PairLossOptions`` (the loss's scalar options, validated
once), ``pair_objective`` (sums and options -> loss and metrics, docs/design.md §1.2) and the per-pair loss types
of the DPO family, named and defined as in TRL's ``DPOTrainer`` (TRL 1.x): every loss type is a function of
per-pair quantities (``PairTerms``), one formula per loss type. They are checked on their own against a float64
transcription of TRL's formulas (``tests/test_objectives.py``), so an oracle test of a backend is not a test of
these formulas against themselves.

Notation (per pair, chosen c / rejected r): ``s`` is the per-sequence score, ``s = M = sum_t w_t (lp_t - lpref_t)``
without a KL variant (TRL's ``chosen_logratios``; with unit weights the summed log-ratio), the KL-adjusted score
with one (``pair_objective``); ``h = s_c - s_r`` (TRL's ``delta_score``); ``n`` the number of response
tokens; ``beta``; ``eps`` = ``label_smoothing``; ``tau`` = ``discopop_tau``; ``ls = logsigmoid``, ``sg = sigmoid``.

- ``sigmoid`` (DPO): ``-ls(beta h)``. ``label_smoothing`` is not used (as in TRL).
- ``cdpo`` (conservative DPO, ours; TRL < 1.0 called it ``sigmoid`` with ``label_smoothing``):
  ``-(1 - eps) ls(beta h) - eps ls(-beta h)``.
- ``hinge`` (SLiC): ``relu(1 - beta h)``.
- ``ipo``: ``(s_c / n_c - s_r / n_r - 1 / (2 beta))^2``: length-normalised as in TRL.
- ``exo_pair``: ``sg(beta h) (ls(beta h) - log(1 - eps)) + sg(-beta h) (ls(-beta h) - log eps)``; needs
  ``eps > 0`` (TRL returns inf for ``eps = 0``; the EXO paper uses 1e-3).
- ``nca_pair``: ``-ls(beta s_c) - ls(-beta s_c) / 2 - ls(-beta s_r) / 2``.
- ``robust``: ``(-(1 - eps) ls(beta h) + eps ls(-beta h)) / (1 - 2 eps)``.
- ``bco_pair``: ``-ls(beta s_c) - ls(-beta s_r)``. Stateless, as in TRL 1.x; the BCO paper and TRL < 1.0
  subtract a running mean of the rewards from both ``beta s``, which this package does not keep.
- ``sppo_hard``: ``(s_c - 1 / (2 beta))^2 + (s_r + 1 / (2 beta))^2``.
- ``aot``: ``d = sort(P_c - P_r) - sort(R_c - R_r)`` over the batch (``P`` the policy's weighted log-prob sum
  ``LPW``, ``R = LPW - M`` the reference's), then ``-(1 - eps) ls(beta d) - eps ls(-beta d)``. No KL variant.
- ``aot_unpaired``: ``d = sort(s_c) - sort(s_r)``, then as ``aot``.
- ``apo_zero``: ``1 - sg(beta s_c) + sg(beta s_r)``. ``apo_down``: ``sg(beta s_c) + 1 - sg(beta h)``.
- ``discopop``: ``l = beta h``, ``m = sg(l / tau)``: ``-ls(l) (1 - m) + exp(-l) m``.
- ``sigmoid_norm``: ``-ls(beta (s_c / n_c - s_r / n_r))`` (TRL >= 1.7).
- ``sft``: the chosen responses' negative log-likelihood averaged over all their tokens in the batch,
  ``-sum_c LP_c / sum_c n_c`` (unweighted log-probs, no reference), the same for every pair.

What the length-normalised types (``ipo``, ``sigmoid_norm``) normalise: the weighted score ``s`` is divided by
the token count ``n``, not by the sum of the weights, so with TIS-DPO weights they use the per-token mean of
``w_t m_t``, and with ``ld_alpha`` (whose down-weighted tail tokens still count in ``n``) they equal TRL's.

Several types combine as ``sum_k loss_weights[k] * mean_pairs(loss_k)`` (TRL's ``loss_type`` list with
``loss_weights``; e.g. ``["sigmoid", "sft"]`` with ``[1, 1]`` is RPO, ``["sigmoid", "bco_pair", "sft"]`` with
``[0.8, 0.2, 1]`` MPO).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairTerms:
    """Per-pair inputs of the loss types, each ``[B]`` unless stated (see the module docstring's notation)."""

    chosen: torch.Tensor  # s_c
    rejected: torch.Tensor  # s_r
    chosen_count: torch.Tensor  # n_c
    rejected_count: torch.Tensor  # n_r
    chosen_policy: torch.Tensor  # P_c = LPW_c
    rejected_policy: torch.Tensor
    chosen_ref: torch.Tensor  # R_c = LPW_c - M_c
    rejected_ref: torch.Tensor
    chosen_nll: torch.Tensor  # scalar: -sum LP_c / sum n_c
    beta: float
    label_smoothing: float
    discopop_tau: float

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen - self.rejected

    @property
    def normalised_margin(self) -> torch.Tensor:
        return self.chosen / self.chosen_count - self.rejected / self.rejected_count


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _exo_pair(p: PairTerms) -> torch.Tensor:
    x, eps = p.beta * p.margin, p.label_smoothing
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (F.logsigmoid(-x) -
                                                                                           math.log(eps))


def _aot(p: PairTerms) -> torch.Tensor:
    policy = torch.sort(p.chosen_policy - p.rejected_policy).values
    ref = torch.sort(p.chosen_ref - p.rejected_ref).values
    return _smoothed_sigmoid(p.beta * (policy - ref), p.label_smoothing)


def _aot_unpaired(p: PairTerms) -> torch.Tensor:
    d = torch.sort(p.chosen).values - torch.sort(p.rejected).values
    return _smoothed_sigmoid(p.beta * d, p.label_smoothing)


def _discopop(p: PairTerms) -> torch.Tensor:
    x = p.beta * p.margin
    m = torch.sigmoid(x / p.discopop_tau)
    return -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m


LOSS_FUNCTIONS: dict[str, Callable[[PairTerms], torch.Tensor]] = {
    "sigmoid": lambda p: -F.logsigmoid(p.beta * p.margin),
    "cdpo": lambda p: _smoothed_sigmoid(p.beta * p.margin, p.label_smoothing),
    "hinge": lambda p: torch.relu(1 - p.beta * p.margin),
    "ipo": lambda p: (p.normalised_margin - 1 / (2 * p.beta)) ** 2,
    "exo_pair": _exo_pair,
    "nca_pair": lambda p: (-F.logsigmoid(p.beta * p.chosen) - 0.5 * F.logsigmoid(-p.beta * p.chosen)
                           - 0.5 * F.logsigmoid(-p.beta * p.rejected)),
    "robust": lambda p: (-(1 - p.label_smoothing) * F.logsigmoid(p.beta * p.margin)
                         + p.label_smoothing * F.logsigmoid(-p.beta * p.margin)) / (1 - 2 * p.label_smoothing),
    "bco_pair": lambda p: -F.logsigmoid(p.beta * p.chosen) - F.logsigmoid(-p.beta * p.rejected),
    "sppo_hard": lambda p: (p.chosen - 0.5 / p.beta) ** 2 + (p.rejected + 0.5 / p.beta) ** 2,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": lambda p: 1 - torch.sigmoid(p.beta * p.chosen) + torch.sigmoid(p.beta * p.rejected),
    "apo_down": lambda p: torch.sigmoid(p.beta * p.chosen) + 1 - torch.sigmoid(p.beta * p.margin),
    "discopop": _discopop,
    "sigmoid_norm": lambda p: -F.logsigmoid(p.beta * p.normalised_margin),
    "sft": lambda p: p.chosen_nll.expand(p.chosen.shape),
}
LOSS_TYPES = tuple(LOSS_FUNCTIONS)
# loss types that read `label_smoothing` (any other loss type with label_smoothing > 0 is refused)
SMOOTHED_LOSS_TYPES = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired")
# loss types that need the policy and reference sums apart, which the KL variants do not define
NO_KL_LOSS_TYPES = ("aot",)
# loss types that sort the pairs, so per-pair WPO weights would not line up (TRL refuses the same)
SORTED_LOSS_TYPES = ("aot", "aot_unpaired")


def loss_terms(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None = None, *,
               label_smoothing: float = 0.0, discopop_tau: float = 0.05, kl: str | None = None,
               use_weighting: bool = False) -> tuple[tuple[str, float], ...]:
    """Validated ``((name, weight), ...)`` of a ``loss_type`` (a name or a list of names, TRL's forms) and its
    ``loss_weights`` (None: 1 each). Raises ``ValueError`` naming the offending argument."""
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not names:
        raise ValueError("loss_type must name at least one loss type")
    unknown = [n for n in names if n not in LOSS_FUNCTIONS]
    if unknown:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (or a list of them), got {unknown}")
    if loss_weights is None:
        weights = (1.0,) * len(names)
    else:
        weights = tuple(loss_weights)
        if len(weights) != len(names):
            raise ValueError(f"loss_weights must have one weight per loss type: {len(weights)} weights for "
                             f"loss_type={list(names)}")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"loss_weights must be finite numbers, got {list(weights)}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing!r}")
    smoothed = [n for n in names if n in SMOOTHED_LOSS_TYPES]
    if label_smoothing and not smoothed:
        raise ValueError(
            f"label_smoothing={label_smoothing} is not used by loss_type={list(names)}; it is read by "
            f"{SMOOTHED_LOSS_TYPES} only (TRL ignores it for 'sigmoid'). Conservative DPO (label smoothing on the "
            "sigmoid loss) is loss_type='cdpo'"
        )
    if "exo_pair" in names and not label_smoothing > 0:
        raise ValueError("loss_type='exo_pair' needs label_smoothing > 0 (its epsilon; the EXO paper uses 1e-3): "
                         "with 0 its loss is infinite")
    if not isinstance(discopop_tau, (int, float)) or not math.isfinite(discopop_tau) or discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be a positive finite number, got {discopop_tau!r}")
    if kl is not None and any(n in NO_KL_LOSS_TYPES for n in names):
        raise ValueError(f"loss_type {NO_KL_LOSS_TYPES} compares policy and reference sums separately and has no "
                         f"KL variant; got kl={kl!r}")
    if use_weighting and any(n in SORTED_LOSS_TYPES for n in names):
        raise ValueError(f"use_weighting=True (WPO) cannot weight {SORTED_LOSS_TYPES}: they sort the pairs, so "
                         "per-pair weights would not line up (as in TRL)")
    return tuple(zip(names, (float(w) for w in weights), strict=True))


def check_ld_alpha(ld_alpha: float | None) -> None:
    """``ld_alpha`` must be None or lie in [0, 1] (TRL's range)."""
    if ld_alpha is None:
        return
    if isinstance(ld_alpha, bool) or not isinstance(ld_alpha, (int, float)) or not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be None or lie in [0, 1], got {ld_alpha!r}")


def ld_token_weights(seq_ids: torch.Tensor, num_seqs: int, ld_alpha: float) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024, arXiv 2409.06411) as token weights: ``[n]`` float64, 1 on the first
    ``min(n_c, n_r)`` response tokens of each sequence of a pair and ``ld_alpha`` on the rest (the "verbose" tail
    of the longer response). Multiplied into the token weights, it gives TRL's ``ld_alpha`` sums
    ``shared + ld_alpha * tail`` for the policy and the reference alike, and composes with TIS-DPO weights by
    product. ``seq_ids [n]`` int64 must be sorted (each sequence's tokens contiguous, in order); sequence ``s``
    pairs with ``s + num_seqs / 2``."""
    counts = torch.bincount(seq_ids, minlength=num_seqs)
    starts = counts.cumsum(0) - counts
    position = torch.arange(seq_ids.numel(), device=seq_ids.device) - starts[seq_ids]
    pairs = num_seqs // 2
    shared = torch.minimum(counts[:pairs], counts[pairs:]).repeat(2)
    one = torch.ones((), dtype=torch.float64, device=seq_ids.device)
    return torch.where(position < shared[seq_ids], one, one * ld_alpha)


# ----------------------------------------------------------------------------------------------
# the scalar options of the pair loss
# ----------------------------------------------------------------------------------------------

KL_MODES = (None, "tisdpo", "tdpo1", "tdpo2")


@dataclass(frozen=True)
class PairLossOptions:
    """The scalar options of the pair loss, validated once (``ValueError`` naming the argument).

    The fields are ``fused_tis_dpo_loss``'s keywords of the same names (see there): ``beta`` and ``alpha`` (positive
    finite), ``kl`` (one of ``KL_MODES``), ``loss_type`` (a name or a list of names, TRL's forms; a list is kept
    as a tuple) with ``loss_weights``, ``label_smoothing``, ``discopop_tau`` (checked by ``loss_terms``),
    ``ld_alpha`` (None or in [0, 1]; applied as token weights before the sums, ``ld_token_weights``) and
    ``use_weighting`` (WPO). ``pair_objective`` takes them; a caller holding options under the same names passes
    them through with ``{f.name: getattr(src, f.name) for f in dataclasses.fields(PairLossOptions)}``, and
    ``as_kwargs()`` gives them back as keywords.
    """

    beta: float = 0.1
    alpha: float = 0.5
    kl: str | None = None
    loss_type: str | Sequence[str] = "sigmoid"
    label_smoothing: float = 0.0
    loss_weights: Sequence[float] | None = None
    discopop_tau: float = 0.05
    ld_alpha: float | None = None
    use_weighting: bool = False

    def __post_init__(self):
        for name in ("loss_type", "loss_weights"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.kl not in KL_MODES:
            raise ValueError(f"kl must be one of {KL_MODES}, got {self.kl!r}")
        self.terms  # noqa: B018 (validates loss_type, loss_weights, label_smoothing, discopop_tau; cached)
        for name in ("beta", "alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        check_ld_alpha(self.ld_alpha)

    @functools.cached_property
    def terms(self) -> tuple[tuple[str, float], ...]:
        """``((loss type, weight), ...)`` of ``loss_type`` and ``loss_weights`` (``loss_terms``)."""
        return loss_terms(self.loss_type, self.loss_weights, label_smoothing=self.label_smoothing,
                          discopop_tau=self.discopop_tau, kl=self.kl, use_weighting=self.use_weighting)

    def as_kwargs(self) -> dict:
        """The options as keywords of ``fused_tis_dpo_loss`` / ``reference_tis_dpo_loss``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------------------------
# sequence layout, per-sequence sums and the pair objective (shared by the oracle and every backend)
# ----------------------------------------------------------------------------------------------



@dataclass(frozen=True)
class SequenceLayout:
    """Where each flattened token belongs.

    ``seq_ids``: ``[N]`` int64, sequence index of every token of the flattened batch (``N = 2B*T``
    padded, or the packed ``N``); sequences ``0..B-1`` are chosen, ``B..2B-1`` rejected, sequence
    ``s`` pairs with ``s + B``. ``num_seqs``: ``2B``.
    """

    seq_ids: torch.Tensor
    num_seqs: int

    @property
    def num_pairs(self) -> int:
        return self.num_seqs // 2


def sequence_layout(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> SequenceLayout:
    """Sequence ids for padded ``labels [2B, T]`` (``cu_seqlens=None``) or packed ``labels [N]``."""
    if cu_seqlens is None:
        num_seqs, seq_len = labels.shape
        seq_ids = torch.arange(num_seqs, device=labels.device).repeat_interleave(seq_len)
    else:
        num_seqs = cu_seqlens.numel() - 1
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=labels.device, dtype=torch.long)
        seq_ids = torch.arange(num_seqs, device=labels.device).repeat_interleave(lengths)
    return SequenceLayout(seq_ids=seq_ids, num_seqs=num_seqs)


@dataclass
class SequenceSums:
    """Per-sequence sums over response tokens, each ``[2B]`` (chosen first, then rejected).

    ``M = sum w*(lp - lpref)``, ``LP = sum lp``, ``LPW = sum w*lp``, ``K`` the KL sum (weighted by
    ``w`` for ``kl="tisdpo"``, unweighted for TDPO; zeros without KL), ``W = sum w``, ``count`` the
    number of response tokens; ``LPA = sum (lp - log sum_v p(v)^2)`` (detached, unweighted; WPO's
    "aligned" log-probs) when the per-token collision statistic was given, else None.
    """

    M: torch.Tensor
    LP: torch.Tensor
    LPW: torch.Tensor
    K: torch.Tensor
    W: torch.Tensor
    count: torch.Tensor
    LPA: torch.Tensor | None = None


def sequence_sums(policy_logps, ref_logps, weights, seq_ids, num_seqs, *, token_kl=None, kl=None,
                  log_collision=None) -> SequenceSums:
    """Segment sums of per-token vectors (all ``[n]``, response tokens only) into ``[num_seqs]``;
    ``log_collision`` (``[n]``, ``log sum_v p(v)^2``) adds ``LPA``."""

    def seg(values):
        return torch.zeros(num_seqs, dtype=values.dtype, device=values.device).index_add(0, seq_ids, values)

    m = policy_logps - ref_logps
    if token_kl is None:
        k = torch.zeros(num_seqs, dtype=policy_logps.dtype, device=policy_logps.device)
    else:
        k = seg(weights * token_kl if kl == "tisdpo" else token_kl)
    return SequenceSums(
        M=seg(weights * m), LP=seg(policy_logps), LPW=seg(weights * policy_logps), K=k,
        W=seg(weights.detach()), count=seg(torch.ones_like(m)),
        LPA=None if log_collision is None else seg((policy_logps - log_collision).detach()),
    )


def pair_objective(sums: SequenceSums, options: PairLossOptions):
    """Per-sequence sums -> (scalar loss, dict of detached metrics); docs/design.md §1.2. Every path calls this.

    Per-sequence scores ``s`` with ``h = s_c - s_r``: ``s = M`` (DPO / TIS-DPO); ``kl="tisdpo"``:
    ``s = M - alpha K``; ``"tdpo1"``: ``s = M + K``; ``"tdpo2"``: ``s_c = M_c + alpha stopgrad(K_c)``,
    ``s_r = M_r + alpha K_r``. ``loss_type`` (a name or TRL's list form, weighted by ``loss_weights``) picks the
    formulas of ``objectives.py`` (TRL's names and meanings), each averaged over pairs and summed with its weight.

    ``use_weighting`` (WPO, Zhou et al. 2024, arXiv 2406.11827): every pair's loss is multiplied by the constant
    ``exp(LPA_c / n_c + LPA_r / n_r)``, the product of both responses' length-normalised probabilities under the
    policy, each token's probability divided by ``sum_v p(v)^2`` (needs ``sums.LPA``). It is a sequence-level
    weight that multiplies whatever the token weights did inside ``M``; it is computed from the unweighted
    log-probs, as in TRL, so TIS-DPO and LD-DPO weights leave it unchanged. (``options.ld_alpha`` acts before,
    on the token weights inside the sums.)
    """
    beta, alpha, kl = options.beta, options.alpha, options.kl
    b = sums.M.shape[0] // 2
    mc, mr = sums.M[:b], sums.M[b:]
    kc, kr = sums.K[:b], sums.K[b:]
    if kl is None:
        (sc, sr), vc, vr = (mc, mr), mc, mr
    elif kl == "tisdpo":
        (sc, sr), vc, vr = (mc - alpha * kc, mr - alpha * kr), mc - kc, mr - kr
    elif kl == "tdpo1":
        (sc, sr), vc, vr = (mc + kc, mr + kr), mc + kc, mr + kr
    else:  # "tdpo2" (PairLossOptions checked kl)
        (sc, sr), vc, vr = (mc + alpha * kc.detach(), mr + alpha * kr), mc + kc, mr + kr
    nc, nr = sums.count[:b], sums.count[b:]
    lpw_c, lpw_r = sums.LPW[:b], sums.LPW[b:]
    pair = PairTerms(chosen=sc, rejected=sr, chosen_count=nc, rejected_count=nr, chosen_policy=lpw_c,
                     rejected_policy=lpw_r, chosen_ref=lpw_c - mc, rejected_ref=lpw_r - mr,
                     chosen_nll=-sums.LP[:b].sum() / nc.sum(), beta=beta, label_smoothing=options.label_smoothing,
                     discopop_tau=options.discopop_tau)
    pair_weight = None
    if options.use_weighting:
        if sums.LPA is None:
            raise ValueError("use_weighting=True needs sums.LPA (pass log_collision to sequence_sums)")
        pair_weight = torch.exp(sums.LPA[:b] / nc + sums.LPA[b:] / nr).detach()
    loss = None
    for name, weight in options.terms:
        losses = LOSS_FUNCTIONS[name](pair)
        if pair_weight is not None:
            losses = losses * pair_weight
        term = weight * losses.mean()
        loss = term if loss is None else loss + term
    rc, rr = beta * vc.detach(), beta * vr.detach()
    metrics = {
        "rewards/chosen": rc.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (rc - rr).mean(),
        "rewards/accuracies": (rc > rr).to(rc.dtype).mean(),
        "logps/chosen": sums.LP[:b].detach().mean(),
        "logps/rejected": sums.LP[b:].detach().mean(),
        "logps/chosen_weighted": sums.LPW[:b].detach().mean(),
        "logps/rejected_weighted": sums.LPW[b:].detach().mean(),
        "weights/chosen_mean": (sums.W[:b] / sums.count[:b]).mean(),
        "weights/rejected_mean": (sums.W[b:] / sums.count[b:]).mean(),
    }
    if kl is not None:
        metrics["kl/chosen"] = kc.detach().mean()
        metrics["kl/rejected"] = kr.detach().mean()
    if pair_weight is not None:
        metrics["weights/wpo_pair_mean"] = pair_weight.mean()
    return loss, metrics


__all__ = ["KL_MODES", "LOSS_FUNCTIONS", "LOSS_TYPES", "NO_KL_LOSS_TYPES", "PairLossOptions", "PairTerms",
           "SMOOTHED_LOSS_TYPES", "SORTED_LOSS_TYPES", "SequenceLayout", "SequenceSums", "check_ld_alpha",
           "ld_token_weights", "loss_terms", "pair_objective", "sequence_layout", "sequence_sums"]
