"""Plain-PyTorch oracle for every loss in the package (docs/design.md §1).

Everything here materialises the full ``[tokens, vocab]`` logits, in float64 when the inputs are
float64 and in float32 otherwise. It is slow and memory hungry on purpose: it is the readable
statement of the maths that every fast path (the chunked PyTorch path, the split and Triton kernels)
is tested against, forward values and gradients. No production module imports it.

What the oracle and the fast paths share is the O(batch) ground floor, tested on its own:
``objectives.py`` (sequence layout, per-sequence sums, the pair objective and the loss types' formulas,
checked against a float64 transcription of TRL's formulas in ``tests/test_objectives.py``) and
``transforms.py`` (the elementwise token-weight transforms).
"""

from __future__ import annotations

import torch

from .objectives import PairLossOptions, ld_token_weights, pair_objective, sequence_layout, sequence_sums
from .transforms import token_weights_from_contrastive


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


def reference_token_stats(hidden, weight, labels, *, bias=None):
    """The policy's per-token statistics behind TRL's ``DPOTrainer`` metrics, on materialised logits:
    ``(entropy, mean_logit, is_top1)``, each ``[...]`` for hidden ``[..., D]`` and labels ``[...]`` (valid
    labels): ``sum_v entr(softmax(z))``, ``z.mean(-1)`` and ``argmax(z) == labels`` (bool; ``argmax`` returns the
    first maximum). float32 (float64 for float64 inputs), no gradient."""
    with torch.no_grad():
        cd = _compute_dtype(hidden)
        logits = hidden.to(cd) @ weight.to(cd).T
        if bias is not None:
            logits = logits + bias.to(cd)
        entropy = torch.special.entr(torch.softmax(logits, dim=-1)).sum(-1)
        return entropy, logits.mean(-1), logits.argmax(-1) == labels


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


def reference_tis_dpo_loss(
    hidden, weight, labels, *, bias=None, ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
    token_weights=None, contrastive_logps=None, weight_transform="origin", transform_kwargs=None,
    beta=0.1, alpha=0.5, kl=None, loss_type="sigmoid", label_smoothing=0.0, loss_weights=None, discopop_tau=0.05,
    ld_alpha=None, use_weighting=False, ignore_index=-100, cu_seqlens=None, token_stats=False,
):
    """The TIS-DPO family loss on materialised logits; same arguments and outputs as
    ``tisdpo_kernels.fused_tis_dpo_loss`` (no input validation but the scalar options': pass valid inputs)."""
    options = PairLossOptions(beta=beta, alpha=alpha, kl=kl, loss_type=loss_type, label_smoothing=label_smoothing,
                              loss_weights=loss_weights, discopop_tau=discopop_tau, ld_alpha=ld_alpha,
                              use_weighting=use_weighting)
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
    loss, metrics = pair_objective(sums, options)
    if token_stats:
        entropy, mean_logit, is_top1 = reference_token_stats(h[mask], weight, y[mask], bias=bias)
        chosen = is_chosen[mask]
        n_chosen, n_rejected = chosen.sum().to(cd), (~chosen).sum().to(cd)
        metrics.update({
            "entropy": entropy.mean(),
            "logits/chosen": mean_logit[chosen].mean() if n_chosen else torch.zeros((), dtype=cd),
            "logits/rejected": mean_logit[~chosen].mean() if n_rejected else torch.zeros((), dtype=cd),
            "mean_token_accuracy": is_top1[chosen].to(cd).mean() if n_chosen else torch.zeros((), dtype=cd),
            "tokens/chosen": n_chosen, "tokens/rejected": n_rejected,
        })
    return loss, metrics


__all__ = ["reference_linear_logprobs", "reference_log_collision", "reference_tis_dpo_loss", "reference_token_kl",
           "reference_token_stats"]
