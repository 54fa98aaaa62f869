"""Pure-PyTorch token-chunked path (``backend="torch"``): runs anywhere, CPU included.

Computes per-token label log-probs (and, for the KL variants, the per-token KL between policy and
reference; for WPO the per-token ``log sum_v p(v)^2``) of the response rows without ever holding
more than one chunk of ``[rows, V]`` logits, forward or backward: the forward keeps only per-row
log-sum-exps, the backward recomputes each chunk's logits from them. Math in float32 (float64 for
float64 inputs); gradients are accumulated in that precision and returned in the input dtype.
Half-precision weights are upcast once per call (a ``[V, D]`` float32 copy), so the per-chunk
matmuls run in float32 on CPU.

Tested against ``reference.py`` in ``tests/test_chunked.py`` and through ``tests/test_loss.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# One chunk of logits holds about this many elements (16 MiB in float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one ``[rows, V]`` float32 logits chunk stays near 16 MiB."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab_size, 1))


@dataclass(frozen=True)
class _ChunkParams:
    chunk_size: int
    kl_mode: str | None = None  # None (log-probs only), "tis" or "tdpo"
    log_collision: bool = False  # also return log sum_v p(v)^2 per row (no gradient)
    token_stats: bool = False  # also return the policy's entropy and is-top-1 per row (no gradient)


def _token_stats(z, lse, labels):
    """``(entropy, is_top1)`` of one chunk's logits ``z [rows, V]`` with their log-sum-exps ``lse [rows]``:
    ``lse - sum_v p z`` (an elementwise product and a row sum in one ``[rows, V]`` temporary: a batched GEMV
    here was seen to lose ~2e-4 of ``max|z|`` on CPU BLAS, 6e-3 nats at SmolLM2's head) and
    ``argmax(z) == labels`` (``argmax`` returns the first maximum)."""
    p = torch.sub(z, lse[:, None]).exp_()
    return lse - p.mul_(z).sum(-1), z.argmax(-1) == labels


def _stats_buffers(n, cd, device, params):
    """The ``[n]`` entropy (``cd``) and is-top-1 (bool) outputs, or ``(None, None)`` without ``token_stats``."""
    if not params.token_stats:
        return None, None
    return torch.empty(n, dtype=cd, device=device), torch.empty(n, dtype=torch.bool, device=device)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_logits(h, w, b, cd):
    z = h.to(cd) @ w.T
    if b is not None:
        z += b
    return z


class ChunkedLinearLogprobsFunction(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[arange(n), labels]`` chunked over rows (and, with
    ``params.log_collision``, a non-differentiable output ``logsumexp(2 log_softmax(z))``; then, with
    ``params.token_stats``, the non-differentiable entropy and is-top-1 of each row)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params: _ChunkParams):
        cd = _compute_dtype(hidden)
        w, b = weight.to(cd), None if bias is None else bias.to(cd)
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=cd, device=hidden.device)
        logps = torch.empty(n, dtype=cd, device=hidden.device)
        collision = torch.empty(n, dtype=cd, device=hidden.device) if params.log_collision else None
        entropy, top1 = _stats_buffers(n, cd, hidden.device, params)
        for s in range(0, n, params.chunk_size):
            e = min(s + params.chunk_size, n)
            z = _chunk_logits(hidden[s:e], w, b, cd)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            logps[s:e] = z.gather(1, labels[s:e, None]).squeeze(1) - lse[s:e]
            if entropy is not None:
                entropy[s:e], top1[s:e] = _token_stats(z, lse[s:e], labels[s:e])
            if collision is not None:
                collision[s:e] = torch.logsumexp(z.sub_(lse[s:e, None]).mul_(2), dim=-1)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.params = params
        extra = tuple(t for t in (collision, entropy, top1) if t is not None)
        if not extra:
            return logps
        ctx.mark_non_differentiable(*extra)
        return logps, *extra

    @staticmethod
    def backward(ctx, grad_logps, *_grad_extra):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grads = _chunked_backward(ctx, hidden, weight, bias, labels, lse, grad_logps)
        return grads[0], grads[1], grads[2], None, None


def _chunked_backward(ctx, hidden, weight, bias, labels, lse, grad_logps, kl_terms=None):
    """Shared backward: ``dz = g (onehot - p)`` plus the KL term of ``kl_terms`` for each chunk.

    ``kl_terms`` is ``(ref_hidden, ref_weight, ref_bias, ref_lse, token_kl, grad_kl)`` or None.
    Returns ``(d_hidden, d_weight, d_bias)``, each None where not needed.
    """
    params: _ChunkParams = ctx.params
    cd = _compute_dtype(hidden)
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    w, b = weight.to(cd), None if bias is None else bias.to(cd)
    n = hidden.shape[0]
    d_hidden = torch.empty_like(hidden) if need_h else None
    d_weight = torch.zeros_like(w) if need_w else None
    d_bias = torch.zeros_like(b) if need_b else None
    g = grad_logps.to(cd) if grad_logps is not None else torch.zeros(n, dtype=cd, device=hidden.device)
    if kl_terms is not None:
        ref_hidden, ref_weight, ref_bias, ref_lse, token_kl, grad_kl = kl_terms
        rw, rb = ref_weight.to(cd), None if ref_bias is None else ref_bias.to(cd)
    for s in range(0, n, params.chunk_size):
        e = min(s + params.chunk_size, n)
        rows = torch.arange(e - s, device=hidden.device)
        dz = _chunk_logits(hidden[s:e], w, b, cd)
        dz -= lse[s:e, None]  # log p
        if kl_terms is not None and grad_kl is not None:
            logq = _chunk_logits(ref_hidden[s:e], rw, rb, cd)
            logq -= ref_lse[s:e, None]
            gk = grad_kl[s:e, None].to(cd)
            if params.kl_mode == "tis":
                # d KL(p||q) / dz = p * (log p - log q - KL)
                logq.neg_().add_(dz).sub_(token_kl[s:e, None])  # log p - log q - KL
                dz.exp_()  # p
                logq.mul_(dz).mul_(gk)
                dz.mul_(-g[s:e, None]).add_(logq)
            else:
                # d KL(q||p) / dz = p - q
                logq.exp_().mul_(gk)
                dz.exp_()
                dz.mul_(gk - g[s:e, None]).sub_(logq)
        else:
            dz.exp_().mul_(-g[s:e, None])
        dz[rows, labels[s:e]] += g[s:e]
        if need_h:
            d_hidden[s:e] = (dz @ w).to(hidden.dtype)
        if need_w:
            d_weight.addmm_(dz.T, hidden[s:e].to(cd))
        if need_b:
            d_bias += dz.sum(0)
    return (
        d_hidden,
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )


class ChunkedLinearKLFunction(torch.autograd.Function):
    """Policy and reference log-probs of the labels plus the per-token KL, chunked over rows (plus the policy's
    ``log sum_v p(v)^2`` with ``params.log_collision``, then its entropy and is-top-1 with ``params.token_stats``,
    without gradient).

    Gradients flow into the policy (hidden, weight, bias) only; the reference is a constant.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, params: _ChunkParams):
        cd = _compute_dtype(hidden)
        w, b = weight.to(cd), None if bias is None else bias.to(cd)
        rw, rb = ref_weight.to(cd), None if ref_bias is None else ref_bias.to(cd)
        n = hidden.shape[0]
        lse, ref_lse, logps, ref_logps, token_kl = (
            torch.empty(n, dtype=cd, device=hidden.device) for _ in range(5)
        )
        collision = torch.empty(n, dtype=cd, device=hidden.device) if params.log_collision else None
        entropy, top1 = _stats_buffers(n, cd, hidden.device, params)
        for s in range(0, n, params.chunk_size):
            e = min(s + params.chunk_size, n)
            z = _chunk_logits(hidden[s:e], w, b, cd)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            if entropy is not None:
                entropy[s:e], top1[s:e] = _token_stats(z, lse[s:e], labels[s:e])
            logp = z.sub_(lse[s:e, None])
            z_ref = _chunk_logits(ref_hidden[s:e], rw, rb, cd)
            ref_lse[s:e] = torch.logsumexp(z_ref, dim=-1)
            logq = z_ref.sub_(ref_lse[s:e, None])
            lbl = labels[s:e, None]
            logps[s:e] = logp.gather(1, lbl).squeeze(1)
            ref_logps[s:e] = logq.gather(1, lbl).squeeze(1)
            if params.kl_mode == "tis":
                token_kl[s:e] = (logp.exp() * (logp - logq)).sum(-1)
            else:
                token_kl[s:e] = (logq.exp() * (logq - logp)).sum(-1)
            if collision is not None:
                collision[s:e] = torch.logsumexp(logp.mul_(2), dim=-1)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ref_hidden, ref_weight, ref_bias, ref_lse, token_kl)
        ctx.params = params
        extra = tuple(t for t in (collision, entropy, top1) if t is not None)
        ctx.mark_non_differentiable(ref_logps, *extra)
        return logps, ref_logps, token_kl, *extra

    @staticmethod
    def backward(ctx, grad_logps, _grad_ref_logps, grad_kl, *_grad_extra):
        hidden, weight, bias, labels, lse, ref_hidden, ref_weight, ref_bias, ref_lse, token_kl = ctx.saved_tensors
        kl_terms = (ref_hidden, ref_weight, ref_bias, ref_lse, token_kl, grad_kl)
        d_h, d_w, d_b = _chunked_backward(ctx, hidden, weight, bias, labels, lse, grad_logps, kl_terms)
        return d_h, d_w, d_b, None, None, None, None, None


def chunked_linear_logprobs(hidden, weight, labels, bias=None, chunk_size=None, log_collision=False,
                            token_stats=False):
    """Label log-probs of response rows, chunked: ``hidden [n, D]``, ``weight [V, D]``,
    ``labels [n]`` int64 in ``[0, V)``, ``bias [V]`` or None -> ``[n]`` float32 (float64 for
    float64 inputs). Differentiable w.r.t. hidden, weight and bias. With ``log_collision=True`` returns
    ``(logps, log_collision)``, the second ``[n]`` being ``log sum_v p(v)^2`` per row (no gradient); with
    ``token_stats=True`` two more ``[n]`` outputs follow, without gradient: the entropy of each row's distribution
    (logps' dtype) and whether its label is the argmax (bool, the first index winning ties)."""
    params = _ChunkParams(chunk_size or default_chunk_size(weight.shape[0]), log_collision=log_collision,
                          token_stats=token_stats)
    return ChunkedLinearLogprobsFunction.apply(hidden, weight, bias, labels, params)


def chunked_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias=None, ref_bias=None,
                      chunk_size=None, log_collision=False, token_stats=False):
    """``(logps, ref_logps, token_kl)``, each ``[n]`` float32, for response rows (a fourth, the policy's
    ``log sum_v p(v)^2``, with ``log_collision=True``; then the policy's entropy and is-top-1 with
    ``token_stats=True``, as in :func:`chunked_linear_logprobs`).

    ``mode="tis"``: ``KL(pi_theta || pi_ref)``; ``mode="tdpo"``: ``KL(pi_ref || pi_theta)``, summed
    over the full vocabulary per row. ``ref_hidden [n, D_ref]``, ``ref_weight [V, D_ref]``.
    Differentiable w.r.t. the policy's hidden, weight and bias only.
    """
    if mode not in ("tis", "tdpo"):
        raise ValueError(f"mode must be 'tis' or 'tdpo', got {mode!r}")
    params = _ChunkParams(chunk_size or default_chunk_size(weight.shape[0]), kl_mode=mode,
                          log_collision=log_collision, token_stats=token_stats)
    return ChunkedLinearKLFunction.apply(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, params)
