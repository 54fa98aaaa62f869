"""Per-sequence sums of the TIS-DPO family loss, with the elementwise token-weight transform fused in.

Given per-token vectors of the response tokens (policy log-probs ``lp``, reference log-probs
``lpref``, optional per-token KL) sorted by sequence id, computes per sequence ``s`` (docs/design.md §1.2)::

    M_s = sum w (lp - lpref)   LP_s = sum lp   LPW_s = sum w lp   W_s = sum w   count_s = #tokens
    K_s = sum w KL (kl="tisdpo")  or  sum KL (kl="tdpo1"/"tdpo2")  or 0 (no KL)

where ``w`` is a given per-token weight, 1 (plain DPO), or ``T(r)`` on chosen and ``T(-r)`` on
rejected tokens with ``r = pos - neg`` (contrastive log-probs) and ``T`` one of the elementwise
transforms ``origin``, ``threshold``, ``threshold_and_scale``, ``exp_clamp``
(``transforms.apply_weight_transform``), evaluated inside the kernels. The per-pair loss on these
``[2B]`` sums stays in ``objectives.pair_objective`` (O(batch) work). The backward kernel forms the
per-token upstream gradients ``d lp = w gM + gLP + w gLPW``, ``d lpref = -w gM``,
``d w = (lp - lpref) gM + lp gLPW (+ KL gK for tisdpo)`` and ``d KL = (w or 1) gK``.

One program per sequence sums its tokens in a fixed order, so results are deterministic. Limits:
``seq_ids`` must be sorted (tokens of one sequence contiguous, as the padded and packed layouts give);
fp32 or fp64 math (the dtype of ``policy_logps``); transform parameters are passed as fp32
scalars; weights derived from contrastive log-probs are constants (no gradient into them).

Tested in ``tests/kernels/test_pair_loss.py`` against ``objectives.sequence_sums`` and
``transforms.token_weights_from_contrastive`` (values and gradients, every transform and KL mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..objectives import KL_MODES, SequenceSums
from ..transforms import transform_params
from ._common import check_triton_device

TRANSFORMS = {"origin": 0, "threshold": 1, "threshold_and_scale": 2, "exp_clamp": 3}
_BLOCK = 256


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _token_weights(w_ptr, pos_ptr, neg_ptr, offs, mask, is_chosen, p0, p1, p2, p3,
                   HAS_WEIGHTS: tl.constexpr, CONTRASTIVE: tl.constexpr, TRANSFORM: tl.constexpr):
    """Per-token weight: given, 1, or ``T(+-(pos - neg))``; ``p0, p1`` = clamp bounds, ``p2, p3`` =
    (min_weight, max_weight) for threshold_and_scale and (k, mu) for exp_clamp. 0 where ``mask`` is off."""
    if CONTRASTIVE:
        r = tl.load(pos_ptr + offs, mask=mask, other=0.0) - tl.load(neg_ptr + offs, mask=mask, other=0.0)
        x = tl.where(is_chosen, r, -r)
        if TRANSFORM == 0:
            w = x
        elif TRANSFORM == 1:
            w = tl.minimum(tl.maximum(x, p0), p1)
        elif TRANSFORM == 2:
            w = p2 + (tl.minimum(tl.maximum(x, p0), p1) - p0) / (p1 - p0) * (p3 - p2)
        else:
            w = p2 * tl.exp(p3 * tl.minimum(tl.maximum(x, p0), p1))
    elif HAS_WEIGHTS:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    else:
        w = 1.0
    return tl.where(mask, w, 0.0)


@triton.jit
def _segment_sums_kernel(
    # per-token inputs [n]: policy / reference log-probs, weights, contrastive pos / neg, token KL
    lp_ptr, ref_ptr, w_ptr, pos_ptr, neg_ptr, kl_ptr,
    # starts [num_seqs + 1] (int32) and outputs [6, num_seqs]: M, LP, LPW, K, W, count
    starts_ptr, out_ptr,
    num_seqs, num_pairs, p0, p1, p2, p3,
    HAS_WEIGHTS: tl.constexpr, CONTRASTIVE: tl.constexpr, TRANSFORM: tl.constexpr,
    HAS_KL: tl.constexpr, KL_WEIGHTED: tl.constexpr, BLOCK: tl.constexpr,
):
    seq = tl.program_id(0)
    start = tl.load(starts_ptr + seq)
    end = tl.load(starts_ptr + seq + 1)
    acc_m = tl.zeros((BLOCK,), out_ptr.dtype.element_ty)
    acc_lp = tl.zeros((BLOCK,), out_ptr.dtype.element_ty)
    acc_lpw = tl.zeros((BLOCK,), out_ptr.dtype.element_ty)
    acc_k = tl.zeros((BLOCK,), out_ptr.dtype.element_ty)
    acc_w = tl.zeros((BLOCK,), out_ptr.dtype.element_ty)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        lp = tl.load(lp_ptr + offs, mask=mask, other=0.0)
        ref = tl.load(ref_ptr + offs, mask=mask, other=0.0)
        w = _token_weights(w_ptr, pos_ptr, neg_ptr, offs, mask, seq < num_pairs, p0, p1, p2, p3,
                           HAS_WEIGHTS, CONTRASTIVE, TRANSFORM)
        acc_m += w * (lp - ref)
        acc_lp += lp
        acc_lpw += w * lp
        acc_w += w
        if HAS_KL:
            kl = tl.load(kl_ptr + offs, mask=mask, other=0.0)
            if KL_WEIGHTED:
                kl = w * kl
            acc_k += kl
    tl.store(out_ptr + seq, tl.sum(acc_m, 0))
    tl.store(out_ptr + num_seqs + seq, tl.sum(acc_lp, 0))
    tl.store(out_ptr + 2 * num_seqs + seq, tl.sum(acc_lpw, 0))
    tl.store(out_ptr + 3 * num_seqs + seq, tl.sum(acc_k, 0))
    tl.store(out_ptr + 4 * num_seqs + seq, tl.sum(acc_w, 0))
    tl.store(out_ptr + 5 * num_seqs + seq, (end - start).to(out_ptr.dtype.element_ty))


@triton.jit
def _segment_sums_bwd_kernel(
    # per-token inputs [n] as in the forward, plus sequence ids [n]
    lp_ptr, ref_ptr, w_ptr, pos_ptr, neg_ptr, kl_ptr, seq_ptr,
    # upstream gradients [4, num_seqs] (of M, LP, LPW, K); per-token gradients out [n] each
    grad_ptr, d_lp_ptr, d_ref_ptr, d_w_ptr, d_kl_ptr,
    n, num_seqs, num_pairs, p0, p1, p2, p3,
    HAS_WEIGHTS: tl.constexpr, CONTRASTIVE: tl.constexpr, TRANSFORM: tl.constexpr,
    HAS_KL: tl.constexpr, KL_WEIGHTED: tl.constexpr,
    NEED_REF: tl.constexpr, NEED_W: tl.constexpr, NEED_KL: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    seq = tl.load(seq_ptr + offs, mask=mask, other=0)
    g_m = tl.load(grad_ptr + seq, mask=mask, other=0.0)
    g_lp = tl.load(grad_ptr + num_seqs + seq, mask=mask, other=0.0)
    g_lpw = tl.load(grad_ptr + 2 * num_seqs + seq, mask=mask, other=0.0)
    w = _token_weights(w_ptr, pos_ptr, neg_ptr, offs, mask, seq < num_pairs, p0, p1, p2, p3,
                       HAS_WEIGHTS, CONTRASTIVE, TRANSFORM)
    tl.store(d_lp_ptr + offs, w * g_m + g_lp + w * g_lpw, mask=mask)
    if NEED_REF:
        tl.store(d_ref_ptr + offs, -w * g_m, mask=mask)
    if HAS_KL:
        g_k = tl.load(grad_ptr + 3 * num_seqs + seq, mask=mask, other=0.0)
    if NEED_W:
        lp = tl.load(lp_ptr + offs, mask=mask, other=0.0)
        d_w = (lp - tl.load(ref_ptr + offs, mask=mask, other=0.0)) * g_m + lp * g_lpw
        if HAS_KL:
            if KL_WEIGHTED:
                d_w += tl.load(kl_ptr + offs, mask=mask, other=0.0) * g_k
        tl.store(d_w_ptr + offs, d_w, mask=mask)
    if NEED_KL:
        if KL_WEIGHTED:
            g_k = w * g_k
        tl.store(d_kl_ptr + offs, g_k, mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSumsParams:
    """Non-tensor options: number of sequences (chosen first, then rejected), KL mode, weight source."""

    num_seqs: int
    kl: str | None = None
    has_weights: bool = False
    contrastive: bool = False
    transform: int = 0
    transform_args: tuple = (0.0, 0.0, 0.0, 0.0)

    def flags(self, has_kl: bool) -> dict:
        return dict(HAS_WEIGHTS=self.has_weights, CONTRASTIVE=self.contrastive, TRANSFORM=self.transform,
                    HAS_KL=has_kl, KL_WEIGHTED=self.kl == "tisdpo")


def _transform_args(name: str, kwargs: dict | None) -> tuple:
    """Transform parameters as the kernels' ``(p0, p1, p2, p3)``."""
    p = transform_params(name, kwargs)
    if name == "origin":
        return (0.0, 0.0, 0.0, 0.0)
    if name == "threshold":
        return (float(p["lower"]), float(p["upper"]), 0.0, 0.0)
    if name == "threshold_and_scale":
        return (float(p["lower"]), float(p["upper"]), float(p["min_weight"]), float(p["max_weight"]))
    return (float(p["lower"]), float(p["upper"]), float(p["k"]), float(p["mu"]))


def _placeholder(t, like):
    return like if t is None else t


def segment_sums_forward(tokens, seq_ids, params: PairSumsParams) -> torch.Tensor:
    """``tokens = (lp, lpref, weights, pos, neg, token_kl)`` (``[n]`` each, None where absent) -> ``[6, num_seqs]``
    rows ``M, LP, LPW, K, W, count``."""
    lp = tokens[0]
    out = torch.empty(6, params.num_seqs, dtype=lp.dtype, device=lp.device)
    # int32 starts keep the kernel's loop counter 32-bit (token counts stay far below 2**31)
    starts = torch.searchsorted(seq_ids, torch.arange(params.num_seqs + 1, device=lp.device), out_int32=True)
    _segment_sums_kernel[(params.num_seqs,)](
        *(_placeholder(t, lp) for t in tokens), starts, out,
        params.num_seqs, params.num_seqs // 2, *params.transform_args,
        **params.flags(tokens[5] is not None), BLOCK=_BLOCK,
    )
    return out


def segment_sums_backward(tokens, seq_ids, grads, params: PairSumsParams, needs):
    """Per-token gradients ``(d_lp, d_lpref, d_weights, d_token_kl)`` from the ``[4, num_seqs]`` upstream
    gradients of ``M, LP, LPW, K``; ``needs`` says which of the last three to form (None otherwise)."""
    lp = tokens[0]
    n = lp.shape[0]
    need_ref, need_w, need_kl = needs
    d_lp = torch.empty_like(lp)
    d_ref, d_w, d_kl = (torch.empty_like(lp) if need else None for need in needs)
    if n:
        _segment_sums_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            *(_placeholder(t, lp) for t in tokens), seq_ids, grads,
            d_lp, _placeholder(d_ref, d_lp), _placeholder(d_w, d_lp), _placeholder(d_kl, d_lp),
            n, params.num_seqs, params.num_seqs // 2, *params.transform_args,
            **params.flags(tokens[5] is not None), NEED_REF=need_ref, NEED_W=need_w, NEED_KL=need_kl, BLOCK=_BLOCK,
        )
    return d_lp, d_ref, d_w, d_kl


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class SequenceSumsFunction(torch.autograd.Function):
    """Segment sums ``(M, LP, LPW, K, W, count)`` with per-token gradients into ``lp``, ``lpref``,
    ``weights`` and ``token_kl`` (``W`` and ``count`` are not differentiable)."""

    @staticmethod
    def forward(ctx, policy_logps, ref_logps, weights, pos_logps, neg_logps, token_kl, seq_ids,
                params: PairSumsParams):
        tokens = (policy_logps, ref_logps, weights, pos_logps, neg_logps, token_kl)
        out = segment_sums_forward(tokens, seq_ids, params)
        ctx.save_for_backward(*tokens, seq_ids)
        ctx.params = params
        sums = out.unbind(0)
        ctx.mark_non_differentiable(sums[4], sums[5])
        return sums

    @staticmethod
    def backward(ctx, g_m, g_lp, g_lpw, g_k, _g_w, _g_count):
        *tokens, seq_ids = ctx.saved_tensors
        lp = tokens[0]
        num_seqs = ctx.params.num_seqs
        grads = torch.stack([torch.zeros(num_seqs, dtype=lp.dtype, device=lp.device) if g is None else g.to(lp.dtype)
                             for g in (g_m, g_lp, g_lpw, g_k)])
        need = ctx.needs_input_grad
        d_lp, d_ref, d_w, d_kl = segment_sums_backward(tokens, seq_ids, grads, ctx.params,
                                                       (need[1], need[2], need[5] and tokens[5] is not None))
        return d_lp, d_ref, d_w, None, None, d_kl, None, None


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------


def triton_sequence_sums(policy_logps, ref_logps, weights, seq_ids, num_seqs, *, token_kl=None, kl=None,
                         contrastive_logps=None, weight_transform="origin", transform_kwargs=None) -> SequenceSums:
    """Triton form of ``objectives.sequence_sums`` (same arguments and outputs), plus in-kernel weights.

    Plain-torch equivalent (``seg`` = ``zeros(num_seqs).index_add(0, seq_ids, .)``)::

        M, LP, LPW = seg(w * (lp - lpref)), seg(lp), seg(w * lp)
        K = seg(w * token_kl) if kl == "tisdpo" else seg(token_kl) if token_kl is not None else 0
        W, count = seg(w).detach(), seg(ones)

    Args:
        policy_logps, ref_logps: ``[n]`` fp32 (or fp64) log-probs of the response tokens.
        weights: ``[n]`` token weights, or None: unit weights (DPO), or weights from ``contrastive_logps``.
        seq_ids: ``[n]`` int64 sequence of each token, sorted, in ``[0, num_seqs)``; sequences
            ``0..num_seqs/2-1`` are chosen, the rest rejected.
        num_seqs: ``2B``. token_kl: ``[n]`` per-token KL or None; kl: ``None|"tisdpo"|"tdpo1"|"tdpo2"``.
        contrastive_logps: ``(pos, neg)``, each ``[n]``: weights ``T(pos - neg)`` on chosen and
            ``T(neg - pos)`` on rejected tokens, ``T`` = ``weight_transform`` with ``transform_kwargs``
            (see ``transforms.apply_weight_transform``); no gradient flows into them.
    Returns:
        ``objectives.SequenceSums`` of ``[num_seqs]`` tensors in ``policy_logps``' dtype; ``M``, ``LP``,
        ``LPW`` and ``K`` differentiable w.r.t. ``policy_logps``, ``ref_logps``, ``weights`` and ``token_kl``.
    """
    if kl not in KL_MODES:
        raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")
    if weights is not None and contrastive_logps is not None:
        raise ValueError("pass weights or contrastive_logps, not both")
    if not isinstance(num_seqs, int) or num_seqs < 2 or num_seqs % 2:
        raise ValueError(f"num_seqs must be an even int >= 2 (B chosen then B rejected), got {num_seqs!r}")
    if not isinstance(policy_logps, torch.Tensor) or policy_logps.dim() != 1 or \
            policy_logps.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"policy_logps must be a 1-D float32/float64 tensor, got "
                        f"{getattr(policy_logps, 'dtype', type(policy_logps).__name__)}")
    check_triton_device("policy_logps", policy_logps)
    n = policy_logps.shape[0]
    pos, neg = contrastive_logps if contrastive_logps is not None else (None, None)
    named = {"ref_logps": ref_logps, "weights": weights, "token_kl": token_kl,
             "contrastive_logps[0]": pos, "contrastive_logps[1]": neg}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != (n,) or t.device != policy_logps.device:
            raise ValueError(f"{name} must be [{n}] on {policy_logps.device} like policy_logps, got "
                             f"{tuple(t.shape)} on {t.device}")
    if ref_logps is None:
        raise ValueError("ref_logps is required")
    if not isinstance(seq_ids, torch.Tensor) or seq_ids.dtype != torch.int64 or tuple(seq_ids.shape) != (n,):
        raise ValueError(f"seq_ids must be an int64 tensor [{n}], got {getattr(seq_ids, 'dtype', None)} "
                         f"{tuple(getattr(seq_ids, 'shape', ()))}")
    if n and bool((seq_ids[0] < 0) | (seq_ids[-1] >= num_seqs) | (seq_ids[1:] < seq_ids[:-1]).any()):
        raise ValueError(f"seq_ids must be sorted and lie in [0, {num_seqs})")
    return sequence_sums_unchecked(policy_logps, ref_logps, weights, seq_ids, num_seqs, token_kl=token_kl, kl=kl,
                                   contrastive_logps=contrastive_logps, weight_transform=weight_transform,
                                   transform_kwargs=transform_kwargs)


def sequence_sums_unchecked(policy_logps, ref_logps, weights, seq_ids, num_seqs, *, token_kl=None, kl=None,
                            contrastive_logps=None, weight_transform="origin", transform_kwargs=None) -> SequenceSums:
    """``triton_sequence_sums`` without its input checks, for callers that validated the inputs and built
    ``seq_ids`` themselves (``loss.fused_tis_dpo_loss``): no extra host-device synchronisation."""
    pos, neg = contrastive_logps if contrastive_logps is not None else (None, None)
    transform = weight_transform if contrastive_logps is not None else "origin"
    transform_args = _transform_args(transform, transform_kwargs)  # validates the name and kwargs
    params = PairSumsParams(num_seqs=num_seqs, kl=kl if token_kl is not None else None,
                            has_weights=weights is not None, contrastive=contrastive_logps is not None,
                            transform=TRANSFORMS[transform], transform_args=transform_args)
    dtype = policy_logps.dtype

    def prep(t):
        return None if t is None else t.to(dtype).contiguous()

    pos, neg = (None if t is None else prep(t.detach()) for t in (pos, neg))
    sums = SequenceSumsFunction.apply(policy_logps.contiguous(), prep(ref_logps), prep(weights), pos, neg,
                                      prep(token_kl), seq_ids.contiguous(), params)
    return SequenceSums(*sums)
