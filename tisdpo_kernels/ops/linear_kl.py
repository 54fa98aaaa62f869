"""Two-model streaming pass: policy and reference label log-probs plus the per-token full-vocabulary KL.

For response rows ``hidden [n, D]`` (policy head ``weight [V, D]``) and ``ref_hidden [n, D_ref]``
(reference head ``ref_weight [V, D_ref]``) computes, per row, ``logps``, ``ref_logps`` and
``mode="tis"``: ``KL(pi_theta || pi_ref) = sum_v p (log p - log q)`` or ``mode="tdpo"``:
``KL(pi_ref || pi_theta) = sum_v q (log q - log p)`` (DESIGN §1). Policy and reference logit tiles
are formed side by side in one pass over the vocabulary with online rescaling; per row only the two
log-sum-exps and one KL accumulator are kept. The backward recomputes both tiles and adds the KL
term to the policy's logit gradient: TIS ``g_kl * p (log p - log q - KL)``, TDPO ``g_kl * (p - q)``.

The kernels are those of ``linear_logprobs.py`` with ``KL_MODE`` 1 (tis) or 2 (tdpo); this file holds
the KL call's autograd.Function and public function. Limits as there: fp32/fp16/bf16, fp32 math,
policy gradients only (the reference is a constant), optional deterministic backward.

Tested in ``tests/kernels/test_linear_kl.py`` (CPU interpreter against ``reference.reference_token_kl``
and ``reference.reference_linear_logprobs``; bf16 and large shapes in its ``gpu``-marked tests).
"""

from __future__ import annotations

import torch

from .linear_logprobs import (
    KL_MODES,
    LinearParams,
    RefHead,
    _check_precision,
    _unit_stride,
    check_head,
    linear_backward,
    linear_forward,
)

# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class LinearKLFunction(torch.autograd.Function):
    """``(logps, ref_logps, token_kl)`` of the policy and reference heads; gradients into the policy only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, params: LinearParams):
        ref = RefHead(ref_hidden, ref_weight, ref_bias)
        stats = linear_forward(hidden, weight, bias, labels, params, ref=ref)
        ctx.save_for_backward(hidden, weight, bias, labels, stats.lse, ref_hidden, ref_weight, ref_bias,
                              stats.ref_lse, stats.kl)
        ctx.params = params
        ctx.mark_non_differentiable(stats.ref_logps)
        return stats.logps, stats.ref_logps, stats.kl

    @staticmethod
    def backward(ctx, grad_logps, _grad_ref_logps, grad_kl):
        hidden, weight, bias, labels, lse, ref_hidden, ref_weight, ref_bias, ref_lse, token_kl = ctx.saved_tensors
        grads = linear_backward(hidden, weight, bias, labels, lse, grad_logps, ctx.params, ctx.needs_input_grad[:3],
                                ref=RefHead(ref_hidden, ref_weight, ref_bias), ref_lse=ref_lse, token_kl=token_kl,
                                grad_kl=grad_kl)
        return (*grads, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------


def triton_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias=None, ref_bias=None, *,
                     deterministic=False, filter_eps=None, config=None, fp32_precision="tf32"):
    """``(logps, ref_logps, token_kl)``, each ``[n]`` float32, with fused Triton kernels (no ``[n, V]`` logits).

    Plain-torch equivalent::

        logp = torch.log_softmax((hidden @ weight.T + bias).float(), -1)
        logq = torch.log_softmax((ref_hidden @ ref_weight.T + ref_bias).float(), -1)
        logps, ref_logps = logp.gather(1, labels[:, None])[:, 0], logq.gather(1, labels[:, None])[:, 0]
        token_kl = (logp.exp() * (logp - logq)).sum(-1)   # mode="tis":  KL(pi_theta || pi_ref)
        token_kl = (logq.exp() * (logq - logp)).sum(-1)   # mode="tdpo": KL(pi_ref || pi_theta)

    Args:
        hidden: ``[n, D]`` fp32/fp16/bf16; weight ``[V, D]``; bias ``[V]`` or None (the policy).
        labels: ``[n]`` int64 in ``[0, V)`` (not checked here: the caller validates).
        ref_hidden: ``[n, D_ref]``; ref_weight ``[V, D_ref]``; ref_bias ``[V]`` or None, same dtype as
            ``hidden``. Treated as constants (no gradient flows into them).
        mode: ``"tis"`` or ``"tdpo"``.
        deterministic, filter_eps, config, fp32_precision: as in ``triton_linear_logprobs``.
    Returns:
        ``(logps, ref_logps, token_kl)``: ``logps`` and ``token_kl`` differentiable w.r.t. the policy's
        hidden, weight and bias; ``ref_logps`` non-differentiable.
    """
    if mode not in ("tis", "tdpo"):
        raise ValueError(f"mode must be 'tis' or 'tdpo', got {mode!r}")
    check_head(hidden, weight, bias, labels)
    check_head(ref_hidden, ref_weight, ref_bias, prefix="ref_")
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(f"ref_hidden has dtype {ref_hidden.dtype} but hidden has {hidden.dtype}")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    if ref_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"ref_hidden has {ref_hidden.shape[0]} rows but hidden has {hidden.shape[0]}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has vocabulary {ref_weight.shape[0]} but weight has {weight.shape[0]}")
    params = LinearParams(kl_mode=KL_MODES[mode], config=config, deterministic=deterministic, filter_eps=filter_eps,
                          fp32_precision=_check_precision(fp32_precision))
    # hidden and weight may be strided views; the kernels index labels and biases with unit stride
    return LinearKLFunction.apply(hidden, weight, _unit_stride(bias), labels.contiguous(), ref_hidden.detach(),
                                  ref_weight.detach(), _unit_stride(None if ref_bias is None else ref_bias.detach()),
                                  params)
