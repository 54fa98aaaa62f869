"""Two-model streaming pass: policy and reference label log-probs plus the per-token full-vocabulary KL.

For response rows ``hidden [n, D]`` (policy head ``weight [V, D]``) and ``ref_hidden [n, D_ref]``
(reference head ``ref_weight [V, D_ref]``) computes, per row, ``logps``, ``ref_logps`` and
``mode="tis"``: ``KL(pi_theta || pi_ref) = sum_v p (log p - log q)`` or ``mode="tdpo"``:
``KL(pi_ref || pi_theta) = sum_v q (log q - log p)`` (docs/design.md §1.3). Policy and reference logit tiles
are formed side by side in one pass over the vocabulary with online rescaling; per row only the two
log-sum-exps and one KL accumulator are kept. The backward recomputes both tiles and adds the KL
term to the policy's logit gradient: TIS ``g_kl * p (log p - log q - KL)``, TDPO ``g_kl * (p - q)``.

The kernels are those of ``linear_logprobs.py`` with ``KL_MODE`` 1 (tis) or 2 (tdpo), and so is the autograd
Function (``LinearKLFunction``, ``_common.head_functions`` around its launchers); this file holds the KL call's
public function. Limits as there: fp32/fp16/bf16, fp32 math,
policy gradients only (the reference is a constant), optional deterministic backward.

Tested in ``tests/kernels/test_linear_kl.py`` (CPU interpreter against ``reference.reference_token_kl``
and ``reference.reference_linear_logprobs``; bf16 and large shapes in its ``gpu``-marked tests).
"""

from __future__ import annotations

from ._common import TOKEN_KL_CODES, check_head, check_precision, check_ref_head, unit_stride
from .linear_logprobs import LinearKLFunction, LinearParams


def triton_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias=None, ref_bias=None, *,
                     deterministic=False, filter_eps=None, config=None, fp32_precision="tf32", token_stats=False):
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
        deterministic, filter_eps, config, fp32_precision, token_stats: as in ``triton_linear_logprobs`` (the
            policy's entropy and is-top-1 appended with ``token_stats``).
    Returns:
        ``(logps, ref_logps, token_kl)``: ``logps`` and ``token_kl`` differentiable w.r.t. the policy's
        hidden, weight and bias; ``ref_logps`` non-differentiable.
    """
    if mode not in ("tis", "tdpo"):
        raise ValueError(f"mode must be 'tis' or 'tdpo', got {mode!r}")
    check_head(hidden, weight, bias, labels)
    check_head(ref_hidden, ref_weight, ref_bias, prefix="ref_")
    check_ref_head(hidden, weight, ref_hidden, ref_weight)
    params = LinearParams(kl_mode=TOKEN_KL_CODES[mode], config=config, deterministic=deterministic,
                          filter_eps=filter_eps, fp32_precision=check_precision(fp32_precision),
                          token_stats=bool(token_stats))
    # hidden and weight may be strided views; the kernels index labels and biases with unit stride
    return LinearKLFunction.apply(hidden, weight, unit_stride(bias), labels.contiguous(), ref_hidden.detach(),
                                  ref_weight.detach(), unit_stride(None if ref_bias is None else ref_bias.detach()),
                                  params)
