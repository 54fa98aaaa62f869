"""Plain-PyTorch oracle for every loss in the package (DESIGN §1).

Everything here materialises the full ``[tokens, vocab]`` logits, in float64 when the inputs are
float64 and in float32 otherwise. It is slow and memory hungry on purpose: it is the readable
statement of the maths that every fast path (the chunked PyTorch path, the Triton kernels) is
tested against, forward values and gradients.

Shared by the fast paths as well (they are O(batch) or O(tokens), never O(tokens x vocab)):
``apply_weight_transform`` (the elementwise token-weight transforms), ``sequence_layout``
(padded / packed layouts -> per-token sequence ids) and ``pair_objective`` (per-sequence sums ->
the per-pair DPO-family loss and its metrics; the loss types' formulas live in ``objectives.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .objectives import LOSS_FUNCTIONS, LOSS_TYPES, PairTerms, ld_token_weights, loss_terms

KL_MODES = (None, "tisdpo", "tdpo1", "tdpo2")
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
            f"'rank_based' and 'binary' belong to tisdpo.weights), got {name!r}"
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


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _full_log_softmax(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    cd = _compute_dtype(hidden)
    logits = hidden.to(cd) @ weight.to(cd).T
    if bias is not None:
        logits = logits + bias.to(cd)
    return torch.log_softmax(logits, dim=-1)


def reference_linear_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100):
    """``log_softmax(hidden @ weight.T + bias)[..., labels]`` with full logits.

    hidden ``[..., D]``, weight ``[V, D]``, labels ``[...]`` int. Returns ``[...]`` in float32
    (float64 for float64 inputs), 0 at ``ignore_index`` positions. Differentiable.
    """
    logp = _full_log_softmax(hidden, weight, bias)
    mask = labels != ignore_index
    gathered = logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return gathered * mask


def reference_log_collision(hidden, weight, *, bias=None):
    """``log sum_v p(v)^2`` per token over the full vocabulary (``logsumexp(2 log_softmax(z))``, i.e.
    ``logsumexp(2z) - 2 logsumexp(z)``): the per-token statistic of WPO's weights. ``[..., D]`` -> ``[...]``."""
    return torch.logsumexp(2 * _full_log_softmax(hidden, weight, bias), dim=-1)


def reference_token_kl(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, mode="tis"):
    """Per-token KL over the full vocabulary: ``mode="tis"`` is KL(pi_theta || pi_ref), ``"tdpo"``
    is KL(pi_ref || pi_theta). Shapes ``[..., D]`` -> ``[...]``; the reference side is not detached
    here (callers pass detached reference tensors)."""
    logp = _full_log_softmax(hidden, weight, bias)
    logq = _full_log_softmax(ref_hidden, ref_weight, ref_bias)
    if mode == "tis":
        return (logp.exp() * (logp - logq)).sum(-1)
    if mode == "tdpo":
        return (logq.exp() * (logq - logp)).sum(-1)
    raise ValueError(f"mode must be 'tis' or 'tdpo', got {mode!r}")


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


def pair_objective(sums: SequenceSums, *, beta=0.1, alpha=0.5, kl=None, loss_type="sigmoid", label_smoothing=0.0,
                   loss_weights=None, discopop_tau=0.05, use_weighting=False):
    """Per-sequence sums -> (scalar loss, dict of detached metrics). DESIGN §1; every path calls this.

    Per-sequence scores ``s`` with ``h = s_c - s_r``: ``s = M`` (DPO / TIS-DPO); ``kl="tisdpo"``:
    ``s = M - alpha K``; ``"tdpo1"``: ``s = M + K``; ``"tdpo2"``: ``s_c = M_c + alpha stopgrad(K_c)``,
    ``s_r = M_r + alpha K_r``. ``loss_type`` (a name or TRL's list form, weighted by ``loss_weights``) picks the
    formulas of ``objectives.py`` (TRL's names and meanings), each averaged over pairs and summed with its weight.

    ``use_weighting`` (WPO, Zhou et al. 2024, arXiv 2406.11827): every pair's loss is multiplied by the constant
    ``exp(LPA_c / n_c + LPA_r / n_r)``, the product of both responses' length-normalised probabilities under the
    policy, each token's probability divided by ``sum_v p(v)^2`` (needs ``sums.LPA``). It is a sequence-level
    weight that multiplies whatever the token weights did inside ``M``; it is computed from the unweighted
    log-probs, as in TRL, so TIS-DPO and LD-DPO weights leave it unchanged.
    """
    terms = loss_terms(loss_type, loss_weights, label_smoothing=label_smoothing, discopop_tau=discopop_tau, kl=kl,
                       use_weighting=use_weighting)
    b = sums.M.shape[0] // 2
    mc, mr = sums.M[:b], sums.M[b:]
    kc, kr = sums.K[:b], sums.K[b:]
    if kl is None:
        (sc, sr), vc, vr = (mc, mr), mc, mr
    elif kl == "tisdpo":
        (sc, sr), vc, vr = (mc - alpha * kc, mr - alpha * kr), mc - kc, mr - kr
    elif kl == "tdpo1":
        (sc, sr), vc, vr = (mc + kc, mr + kr), mc + kc, mr + kr
    elif kl == "tdpo2":
        (sc, sr), vc, vr = (mc + alpha * kc.detach(), mr + alpha * kr), mc + kc, mr + kr
    else:
        raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")
    nc, nr = sums.count[:b], sums.count[b:]
    lpw_c, lpw_r = sums.LPW[:b], sums.LPW[b:]
    pair = PairTerms(chosen=sc, rejected=sr, chosen_count=nc, rejected_count=nr, chosen_policy=lpw_c,
                     rejected_policy=lpw_r, chosen_ref=lpw_c - mc, rejected_ref=lpw_r - mr,
                     chosen_nll=-sums.LP[:b].sum() / nc.sum(), beta=beta, label_smoothing=label_smoothing,
                     discopop_tau=discopop_tau)
    pair_weight = None
    if use_weighting:
        if sums.LPA is None:
            raise ValueError("use_weighting=True needs sums.LPA (pass log_collision to sequence_sums)")
        pair_weight = torch.exp(sums.LPA[:b] / nc + sums.LPA[b:] / nr).detach()
    loss = None
    for name, weight in terms:
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


def token_weights_from_contrastive(pos_logps, neg_logps, is_chosen, name="origin", kwargs=None):
    """Weights from contrastive log-probs: ``T(r)`` on chosen tokens, ``T(-r)`` on rejected,
    ``r = pos - neg``. All tensors share one shape; ``is_chosen`` is boolean."""
    r = pos_logps - neg_logps
    return apply_weight_transform(torch.where(is_chosen, r, -r), name, **(kwargs or {}))


def reference_tis_dpo_loss(
    hidden, weight, labels, *, bias=None, ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
    token_weights=None, contrastive_logps=None, weight_transform="origin", transform_kwargs=None,
    beta=0.1, alpha=0.5, kl=None, loss_type="sigmoid", label_smoothing=0.0, loss_weights=None, discopop_tau=0.05,
    ld_alpha=None, use_weighting=False, ignore_index=-100, cu_seqlens=None,
):
    """The TIS-DPO family loss on materialised logits; same arguments and outputs as
    ``tisdpo_kernels.fused_tis_dpo_loss`` (no input validation: pass valid inputs)."""
    layout = sequence_layout(labels, cu_seqlens)
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    y = labels.reshape(-1)
    mask = y != ignore_index
    lp_all = reference_linear_logprobs(h, weight, y, bias=bias, ignore_index=ignore_index)
    cd = lp_all.dtype
    if ref_logps is not None:
        lpref_all = ref_logps.reshape(-1).to(cd)
    else:
        with torch.no_grad():
            rh = ref_hidden.reshape(-1, ref_hidden.shape[-1])
            lpref_all = reference_linear_logprobs(rh, ref_weight, y, bias=ref_bias, ignore_index=ignore_index)
    is_chosen = layout.seq_ids < layout.num_pairs
    if token_weights is not None:
        w_all = token_weights.reshape(-1).to(cd)
    elif contrastive_logps is not None:
        pos, neg = (t.reshape(-1).to(cd) for t in contrastive_logps)
        w_all = token_weights_from_contrastive(pos, neg, is_chosen, weight_transform, transform_kwargs)
    else:
        w_all = torch.ones_like(lp_all)
    token_kl = None
    if kl is not None:
        rh = ref_hidden.reshape(-1, ref_hidden.shape[-1]).detach()
        mode = "tis" if kl == "tisdpo" else "tdpo"
        token_kl = reference_token_kl(h[mask], weight, rh[mask], ref_weight.detach(), bias=bias,
                                      ref_bias=None if ref_bias is None else ref_bias.detach(), mode=mode)
    seq_ids, w = layout.seq_ids[mask], w_all[mask]
    if ld_alpha is not None:
        w = w * ld_token_weights(seq_ids, layout.num_seqs, ld_alpha).to(cd)
    collision = reference_log_collision(h[mask], weight, bias=bias) if use_weighting else None
    sums = sequence_sums(lp_all[mask], lpref_all[mask], w, seq_ids, layout.num_seqs, token_kl=token_kl, kl=kl,
                         log_collision=collision)
    return pair_objective(sums, beta=beta, alpha=alpha, kl=kl, loss_type=loss_type, label_smoothing=label_smoothing,
                          loss_weights=loss_weights, discopop_tau=discopop_tau, use_weighting=use_weighting)


__all__ = [
    "ELEMENTWISE_TRANSFORMS", "KL_MODES", "LOSS_TYPES", "SequenceLayout", "SequenceSums",
    "apply_weight_transform", "pair_objective", "reference_linear_logprobs", "reference_log_collision",
    "reference_tis_dpo_loss",
    "reference_token_kl", "sequence_layout", "sequence_sums", "token_weights_from_contrastive",
    "transform_params",
]
