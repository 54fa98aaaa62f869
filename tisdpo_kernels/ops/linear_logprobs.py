"""Fused LM head + log-softmax + label gather: per-row label log-probs without ``[rows, V]`` logits.

Computes ``logps[i] = log_softmax(hidden[i] @ weight.T + bias)[labels[i]]`` for response rows
``hidden [n, D]``. The forward tiles rows x vocabulary, forms each logit tile with ``tl.dot`` over
``D`` chunks, keeps an online log-sum-exp per row and picks the label logit out of the same tiles;
it saves only the per-row log-sum-exp (with ``token_stats`` it also forms the policy's entropy and is-top-1
from two more running values per row, docs/design.md §4). The backward recomputes each logit tile from it, forms
``dz = g * (onehot(label) - p)`` and accumulates ``dH = dz @ W`` and ``dW = dz^T @ H`` (and
``dbias = sum_rows dz``) tile by tile, so no buffer larger than ``[n, D]`` / ``[V, D]`` ever exists.

The kernels here also serve ``linear_kl.py``: ``KL_MODE`` (``_common.TOKEN_KL_CODES``: 0 none, 1
``KL(p_theta || p_ref)``, 2 ``KL(p_ref || p_theta)``) adds the reference model's tiles and the KL accumulator /
gradient. Both autograd Functions (``LinearLogprobsFunction``, ``LinearKLFunction``) are ``_common.head_functions``
around the launchers here; the input checks and the launchers' types are ``_common.py``'s.

These all-Triton kernels are ``backend="triton"``: ``backend="auto"`` picks them on CUDA only below D=512
(``backends.AUTO_BACKENDS``; by the byte count of docs/design.md §4 their fp32 atomics cost ~3x the backward GEMM
time at any D) and whenever gradient filtering is asked for; ``linear_split.py`` is the default elsewhere
(docs/design.md §3). fp32 inputs use tf32 ``tl.dot`` unless ``fp32_precision="ieee"``.

Limits: fp32, fp16 and bf16 inputs (float64 raises ``TypeError``: use the torch path); accumulation
in fp32; gradients returned in the input dtype, accumulated in fp32 buffers ``[n, D]`` and ``[V, D]``
(for bf16 inputs these are extra memory: 2 GiB for a Llama-3-8B head). Offsets are formed in 64-bit
so ``n*D`` and ``V*D`` may pass 2**31. The default backward accumulates ``dW`` (and ``dH`` when the vocabulary is split)
with fp32 atomics; ``deterministic=True`` uses two atomic-free passes instead (one per row block for
``dH``, one per vocabulary block for ``dW``/``dbias``), bit-reproducible, about 1.3x the backward
FLOPs. ``filter_eps`` skips the gradient matmuls of tiles whose probabilities all stay below it and
that hold no label (Cut Cross-Entropy's gradient filtering; an approximation, off by default).

Tested in ``tests/kernels/test_linear_logprobs.py`` (CPU, ``TRITON_INTERPRET=1``, fp32/fp16/bf16
against ``reference.reference_linear_logprobs``; bf16 math and large shapes in its ``gpu``-marked tests,
not yet run on a GPU). Every kernel variant compiles for sm_90 without a GPU (``tests/kernels/test_gpu_compile.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    ForwardStats,
    RefHead,
    check_head,
    check_precision,
    head_functions,
    top1_from_maxima,
    unit_stride,
)
from ._config import FWD_SPLITS, TARGET_WAVES, LinearConfig, interpreting, linear_config
from ._jit import offsets64


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """fp32 ``h[rows] @ w[cols].T (+ b[cols])`` of one ``[BLOCK_N, BLOCK_V]`` tile; 0 where ``cols >= V``
    or ``rows >= n`` (callers set -inf where a log-sum-exp needs it)."""
    h_rows = offsets64(rows, stride_hn)[:, None]
    w_rows = offsets64(cols, stride_wv)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d[None, :] < D
        h = tl.load(h_ptr + h_rows + offsets64(d, stride_hd)[None, :], mask=row_mask[:, None] & d_mask, other=0.0)
        w = tl.load(w_ptr + w_rows + offsets64(d, stride_wd)[None, :], mask=col_mask[:, None] & d_mask, other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong; fp32 operands are exact there
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _linear_fwd_kernel(
    # policy head: hidden [n, D], weight [V, D], bias [V], labels [n]
    h_ptr, w_ptr, b_ptr, labels_ptr,
    # reference head (KL_MODE > 0): ref hidden [n, D_ref], ref weight [V, D_ref], ref bias [V]
    rh_ptr, rw_ptr, rb_ptr,
    # outputs: per-split partial max / sum-of-exp / KL accumulator [splits, n]; label logits [n]; with TOKEN_STATS
    # per-split sum_v exp(z - max) z and max logit over the columns before the label [splits, n]
    max_ptr, sum_ptr, label_ptr, ref_max_ptr, ref_sum_ptr, ref_label_ptr, kl_acc_ptr, xs_ptr, mb_ptr,
    # sizes
    n, V, D, D_ref, tiles_per_split,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    # flags and tiles
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, KL_MODE: tl.constexpr, TOKEN_STATS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (vocabulary split, row block): online log-sum-exp over the split's tiles.

    The split is the fast grid axis, so the programs that run at the same time share a few row blocks
    (their ``hidden`` panels stay in L2) and stream different parts of the weight."""
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int32)  # < V < 2**31
    v_lo = split * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, V)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    label_logit = tl.zeros((BLOCK_N,), tl.float32)
    if KL_MODE != 0:
        rm = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        rs = tl.zeros((BLOCK_N,), tl.float32)
        ref_label_logit = tl.zeros((BLOCK_N,), tl.float32)
        kl_acc = tl.zeros((BLOCK_N,), tl.float32)
    if TOKEN_STATS:
        xs = tl.zeros((BLOCK_N,), tl.float32)
        mb = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D,
                        stride_hn, stride_hd, stride_wv, stride_wd,
                        HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        hit = cols[None, :] == labels[:, None]
        label_logit += tl.sum(tl.where(hit, z, 0.0), 1)
        z_lse = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_lse, 1))
        scale = tl.exp(m - m_new)
        e = tl.exp(z_lse - m_new[:, None])  # 0 where cols >= V
        s = s * scale + tl.sum(e, 1)
        m = m_new
        if TOKEN_STATS:  # entropy = lse - xs / s; the label is the argmax iff label >= m and label > mb
            xs = xs * scale + tl.sum(e * tl.where(col_mask[None, :], z, 0.0), 1)
            before = col_mask[None, :] & (cols[None, :] < labels[:, None])
            mb = tl.maximum(mb, tl.max(tl.where(before, z, float("-inf")), 1))
        if KL_MODE != 0:
            zr = _logit_tile(rh_ptr, rw_ptr, rb_ptr, rows, cols, row_mask, col_mask, D_ref,
                             stride_rhn, stride_rhd, stride_rwv, stride_rwd,
                             HAS_REF_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
            ref_label_logit += tl.sum(tl.where(hit, zr, 0.0), 1)
            zr_lse = tl.where(col_mask[None, :], zr, float("-inf"))
            rm_new = tl.maximum(rm, tl.max(zr_lse, 1))
            ref_scale = tl.exp(rm - rm_new)
            er = tl.exp(zr_lse - rm_new[:, None])
            rs = rs * ref_scale + tl.sum(er, 1)
            rm = rm_new
            diff = z - zr  # finite everywhere; e and er are 0 where cols >= V
            if KL_MODE == 1:  # A = sum_v exp(z - m) (z - z_ref); KL = A/S - lse + lse_ref
                kl_acc = kl_acc * scale + tl.sum(e * diff, 1)
            else:  # A = sum_v exp(z_ref - m_ref) (z_ref - z); KL = A/S_ref - lse_ref + lse
                kl_acc = kl_acc * ref_scale - tl.sum(er * diff, 1)

    out = offsets64(split, n) + rows
    tl.store(max_ptr + out, m, mask=row_mask)
    tl.store(sum_ptr + out, s, mask=row_mask)
    # exactly one split holds each row's label: only that one writes the label logit
    has_label = row_mask & (labels >= v_lo) & (labels < v_hi)
    tl.store(label_ptr + rows, label_logit, mask=has_label)
    if TOKEN_STATS:
        tl.store(xs_ptr + out, xs, mask=row_mask)
        tl.store(mb_ptr + out, mb, mask=row_mask)
    if KL_MODE != 0:
        tl.store(ref_max_ptr + out, rm, mask=row_mask)
        tl.store(ref_sum_ptr + out, rs, mask=row_mask)
        tl.store(kl_acc_ptr + out, kl_acc, mask=row_mask)
        tl.store(ref_label_ptr + rows, ref_label_logit, mask=has_label)


@triton.jit
def _accumulate(ptrs, value, mask, ATOMIC: tl.constexpr):
    """``*ptrs += value``: fp32 atomics when several programs share the target, else read-modify-write
    (the program owns these elements, so the result does not depend on scheduling)."""
    if ATOMIC:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _linear_bwd_kernel(
    # policy head and saved statistics: lse [n], upstream gradient of the log-probs [n]
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, grad_ptr,
    # reference head (KL_MODE > 0): ref_lse [n], token KL [n], upstream gradient of the KL [n]
    rh_ptr, rw_ptr, rb_ptr, ref_lse_ptr, kl_ptr, grad_kl_ptr,
    # fp32 accumulators: dH [n, D], dW [V, D], dbias [V] (contiguous)
    dh_ptr, dw_ptr, db_ptr,
    # sizes; inner_per_split = inner tiles per program (vocab tiles if ROWS_OUTER, else row tiles)
    n, V, D, D_ref, inner_per_split, filter_eps,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    # flags and tiles
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, KL_MODE: tl.constexpr, HAS_GRAD_KL: tl.constexpr,
    ROWS_OUTER: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ATOMIC_DH: tl.constexpr, ATOMIC_DW: tl.constexpr, FILTER: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (outer block, split): for each inner tile, recompute logits, form dz, accumulate grads.

    ``ROWS_OUTER``: the outer block is a row block and the inner loop walks vocabulary tiles (so the
    program owns its dH rows); otherwise the outer block is a vocabulary block walking row tiles
    (owning its dW rows and dbias entries).
    """
    outer = tl.program_id(0)
    if ROWS_OUTER:
        n_inner = tl.cdiv(V, BLOCK_V)
    else:
        n_inner = tl.cdiv(n, BLOCK_N)
    t_lo = tl.program_id(1) * inner_per_split
    t_hi = tl.minimum(t_lo + inner_per_split, n_inner)
    for t in range(t_lo, t_hi):
        if ROWS_OUTER:
            rows = outer * BLOCK_N + tl.arange(0, BLOCK_N)
            cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
        else:
            rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
            cols = outer * BLOCK_V + tl.arange(0, BLOCK_V)
        row_mask = rows < n
        col_mask = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D,
                        stride_hn, stride_hd, stride_wv, stride_wd,
                        HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int32)  # < V < 2**31
        g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
        logp = z - tl.load(lse_ptr + rows, mask=row_mask, other=0.0)[:, None]  # finite; p is masked below
        p = tl.where(col_mask[None, :], tl.exp(logp), 0.0)
        hit = cols[None, :] == labels[:, None]
        dz = tl.where(hit, g[:, None], 0.0) - g[:, None] * p  # d logp[label] / dz
        mass = p
        if KL_MODE != 0:
            if HAS_GRAD_KL:
                zr = _logit_tile(rh_ptr, rw_ptr, rb_ptr, rows, cols, row_mask, col_mask, D_ref,
                                 stride_rhn, stride_rhd, stride_rwv, stride_rwd,
                                 HAS_REF_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
                logq = zr - tl.load(ref_lse_ptr + rows, mask=row_mask, other=0.0)[:, None]
                gk = tl.load(grad_kl_ptr + rows, mask=row_mask, other=0.0)[:, None]
                if KL_MODE == 1:  # d KL(p||q) / dz = p (log p - log q - KL)
                    kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)[:, None]
                    dz += gk * p * (logp - logq - kl)
                else:  # d KL(q||p) / dz = p - q
                    q = tl.where(col_mask[None, :], tl.exp(logq), 0.0)
                    dz += gk * (p - q)
                    mass = tl.maximum(p, q)
        # rows past n may carry huge p (their lse is a placeholder): zero them before any matmul
        dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
        if FILTER:
            mass = tl.where(row_mask[:, None], mass, 0.0)
            keep = (tl.max(tl.max(mass, 1), 0) >= filter_eps) | (tl.sum(tl.sum(hit.to(tl.int32), 1), 0) > 0)
        else:
            keep = True
        if keep:
            if UPCAST:
                dz_op = dz
            else:
                dz_op = dz.to(h_ptr.dtype.element_ty)
            if COMPUTE_DB:
                _accumulate(db_ptr + cols, tl.sum(dz, 0), col_mask, ATOMIC_DW)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_mask = d[None, :] < D
                if COMPUTE_DH:
                    w = tl.load(w_ptr + offsets64(cols, stride_wv)[:, None] + offsets64(d, stride_wd)[None, :],
                                mask=col_mask[:, None] & d_mask, other=0.0)
                    if UPCAST:
                        w = w.to(tl.float32)
                    dh = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
                    _accumulate(dh_ptr + offsets64(rows, D)[:, None] + d[None, :], dh,
                                row_mask[:, None] & d_mask, ATOMIC_DH)
                if COMPUTE_DW:
                    h = tl.load(h_ptr + offsets64(rows, stride_hn)[:, None] + offsets64(d, stride_hd)[None, :],
                                mask=row_mask[:, None] & d_mask, other=0.0)
                    if UPCAST:
                        h = h.to(tl.float32)
                    dw = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)
                    _accumulate(dw_ptr + offsets64(cols, D)[:, None] + d[None, :], dw,
                                col_mask[:, None] & d_mask, ATOMIC_DW)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearParams:
    """Non-tensor options of one call, passed through ``Function.apply``.

    ``kl_mode``: 0 (log-probs only), 1 (``KL(p_theta || p_ref)``), 2 (``KL(p_ref || p_theta)``).
    ``config``: tile shapes (``None``: ``_config.linear_config(V, D)``). ``deterministic``: atomic-free
    backward. ``filter_eps``: skip gradient tiles whose probabilities are all below it (``None``: off).
    ``fp32_precision``: ``tl.dot`` precision for fp32 inputs, ``"tf32"`` (tensor cores) or ``"ieee"``.
    ``token_stats``: the forward also forms the policy's entropy and is-top-1 per row.
    """

    kl_mode: int = 0
    config: LinearConfig | None = None
    deterministic: bool = False
    filter_eps: float | None = None
    fp32_precision: str = "tf32"
    token_stats: bool = False


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Meta tensors stand in for CUDA ones in the compile check (tests/kernels/compile_for_gpu.py): an H100/H200.
_META_SMS = 132


def _target_programs(device: torch.device) -> int:
    if device.type == "meta":
        return TARGET_WAVES * _META_SMS
    if device.type != "cuda":
        return 1
    return TARGET_WAVES * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _kernel_flags(dtype: torch.dtype, fp32_precision: str = "tf32") -> dict:
    """``UPCAST`` / ``DOT_PRECISION`` of a launch. fp32 inputs use tf32 tensor cores unless ``fp32_precision``
    says ``"ieee"`` (compiled, ``ieee`` is an FFMA loop several times slower, so never the silent default);
    the interpreter is always exact."""
    upcast = interpreting() and dtype == torch.bfloat16
    ieee = interpreting() or (dtype == torch.float32 and fp32_precision == "ieee")
    return dict(UPCAST=upcast, DOT_PRECISION="ieee" if ieee else "tf32")


def _resolve_config(params: LinearParams, weight: torch.Tensor) -> LinearConfig:
    return params.config if params.config is not None else linear_config(weight.shape[0], weight.shape[1])


def _ref_args(ref: RefHead | None, hidden, weight, bias):
    """Pointers, D and strides of the reference head (the policy's as harmless placeholders without one)."""
    if ref is None:
        return (hidden, weight, bias), hidden.shape[1], (*hidden.stride(), *weight.stride()), False
    return (ref.hidden, ref.weight, ref.bias), ref.hidden.shape[1], (*ref.hidden.stride(), *ref.weight.stride()), \
        ref.bias is not None


def linear_forward(hidden, weight, bias, labels, params: LinearParams, ref: RefHead | None = None) -> ForwardStats:
    """Launch the forward: label log-probs and per-row log-sum-exps (plus the KL stats with ``ref``)."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    if n == 0:
        return ForwardStats.empty(dev, ref is not None, params.token_stats)
    cfg = _resolve_config(params, weight)
    tile = cfg.forward_tile(params.kl_mode)
    row_blocks = triton.cdiv(n, tile.block_n)
    v_tiles = triton.cdiv(vocab, tile.block_v)
    if cfg.fwd_splits:
        splits = cfg.fwd_splits
    elif dev.type == "cpu":  # the interpreter: one program per row block
        splits = 1
    else:  # at least FWD_SPLITS (side by side on one row block), more if few row blocks leave SMs idle
        splits = max(FWD_SPLITS, _target_programs(dev) // row_blocks)
    tiles_per_split = triton.cdiv(v_tiles, min(splits, v_tiles))
    splits = triton.cdiv(v_tiles, tiles_per_split)  # every split covers at least one tile
    kl = params.kl_mode != 0
    m, s, label_logit = _f32(dev, splits, n), _f32(dev, splits, n), _f32(dev, n)
    if kl:
        rm, rs, ref_label_logit, kl_acc = _f32(dev, splits, n), _f32(dev, splits, n), _f32(dev, n), _f32(dev, splits, n)
    else:  # never touched by the kernel (KL_MODE=0): any fp32 buffers do
        rm, rs, ref_label_logit, kl_acc = m, s, label_logit, m
    xs, mb = (_f32(dev, splits, n), _f32(dev, splits, n)) if params.token_stats else (m, m)
    (rh, rw, rb), d_ref, ref_strides, has_ref_bias = _ref_args(ref, hidden, weight, bias)
    _linear_fwd_kernel[(splits, row_blocks)](
        hidden, weight, bias, labels, rh, rw, rb,
        m, s, label_logit, rm, rs, ref_label_logit, kl_acc, xs, mb,
        n, vocab, d, d_ref, tiles_per_split,
        *hidden.stride(), *weight.stride(), *ref_strides,
        HAS_BIAS=bias is not None, HAS_REF_BIAS=has_ref_bias, KL_MODE=params.kl_mode, TOKEN_STATS=params.token_stats,
        **_kernel_flags(hidden.dtype, params.fp32_precision),
        BLOCK_N=tile.block_n, BLOCK_V=tile.block_v, BLOCK_D=tile.block_d,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    lse, top = _combine_lse(m, s)
    token_stats = {}
    if params.token_stats:  # the splits' xs rescaled to the row max like their sums of exp (_combine_lse)
        rescale = torch.exp(m - top)
        entropy = lse - (xs * rescale).sum(0) / (s * rescale).sum(0)
        token_stats = dict(entropy=entropy, is_top1=top1_from_maxima(label_logit, top, mb.max(0).values))
    if not kl:
        return ForwardStats(label_logit - lse, lse, **token_stats)
    ref_lse, ref_top = _combine_lse(rm, rs)
    if params.kl_mode == 1:  # KL(p||q) = sum p (z - z_ref) - lse + lse_ref
        token_kl = (kl_acc * torch.exp(m - top)).sum(0) / torch.exp(lse - top) - lse + ref_lse
    else:  # KL(q||p) = sum q (z_ref - z) - lse_ref + lse
        token_kl = (kl_acc * torch.exp(rm - ref_top)).sum(0) / torch.exp(ref_lse - ref_top) - ref_lse + lse
    return ForwardStats(label_logit - lse, lse, ref_label_logit - ref_lse, ref_lse, token_kl, **token_stats)


def _f32(device, *shape):
    return torch.empty(*shape, dtype=torch.float32, device=device)


def _combine_lse(m, s):
    """Merge per-split ``(max, sum exp(z - max))`` ``[splits, n]`` into ``lse [n]``; also returns the row max."""
    top = m.max(0).values
    return top + torch.log((s * torch.exp(m - top)).sum(0)), top


def linear_backward(hidden, weight, bias, labels, lse, grad_logps, params: LinearParams, needs=(True, True, True),
                    ref: RefHead | None = None, ref_lse=None, token_kl=None, grad_kl=None):
    """Launch the backward; returns ``(d_hidden, d_weight, d_bias)`` in the input dtype (None where not needed).

    ``needs``: which of the three gradients to form. ``grad_logps`` / ``grad_kl``: upstream ``[n]``
    gradients (None = zero). With a KL mode, ``ref``, ``ref_lse`` and ``token_kl`` come from the forward.
    """
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    d_hidden = torch.zeros(n, d, dtype=torch.float32, device=dev) if need_h else None
    d_weight = torch.zeros(vocab, d, dtype=torch.float32, device=dev) if need_w else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_b else None
    has_grad_kl = params.kl_mode != 0 and grad_kl is not None
    if n and (grad_logps is not None or has_grad_kl) and (need_h or need_w or need_b):
        zeros = torch.zeros(n, dtype=torch.float32, device=dev)  # also the placeholder of absent tensors
        g = zeros if grad_logps is None else grad_logps.to(torch.float32).contiguous()
        gk = grad_kl.to(torch.float32).contiguous() if has_grad_kl else zeros
        cfg = _resolve_config(params, weight)
        tile = cfg.backward_tile(params.filter_eps is not None)
        row_blocks = triton.cdiv(n, tile.block_n)
        v_tiles = triton.cdiv(vocab, tile.block_v)
        (rh, rw, rb), d_ref, ref_strides, has_ref_bias = _ref_args(ref, hidden, weight, bias)

        def launch(outer, splits, inner_per_split, **mode):
            _linear_bwd_kernel[(outer, splits)](
                hidden, weight, bias, labels, lse, g,
                rh, rw, rb, zeros if ref_lse is None else ref_lse, zeros if token_kl is None else token_kl, gk,
                zeros if d_hidden is None else d_hidden, zeros if d_weight is None else d_weight,
                zeros if d_bias is None else d_bias,
                n, vocab, d, d_ref, inner_per_split, params.filter_eps or 0.0,
                *hidden.stride(), *weight.stride(), *ref_strides,
                HAS_BIAS=bias is not None, HAS_REF_BIAS=has_ref_bias, KL_MODE=params.kl_mode,
                HAS_GRAD_KL=has_grad_kl, FILTER=params.filter_eps is not None,
                **_kernel_flags(hidden.dtype, params.fp32_precision), **mode,
                BLOCK_N=tile.block_n, BLOCK_V=tile.block_v, BLOCK_D=tile.block_d,
                num_warps=tile.num_warps, num_stages=tile.num_stages,
            )

        if params.deterministic:
            if need_h:  # each program owns a row block and walks the whole vocabulary
                launch(row_blocks, 1, v_tiles, ROWS_OUTER=True, COMPUTE_DH=True, COMPUTE_DW=False, COMPUTE_DB=False,
                       ATOMIC_DH=False, ATOMIC_DW=False)
            if need_w or need_b:  # each program owns a vocabulary block and walks all rows
                launch(v_tiles, 1, row_blocks, ROWS_OUTER=False, COMPUTE_DH=False, COMPUTE_DW=need_w,
                       COMPUTE_DB=need_b, ATOMIC_DH=False, ATOMIC_DW=False)
        else:  # programs (row block, vocabulary split); dW always shared, dH shared once V is split
            tiles_per_split = triton.cdiv(v_tiles, min(cfg.bwd_splits or v_tiles, v_tiles))
            splits = triton.cdiv(v_tiles, tiles_per_split)
            launch(row_blocks, splits, tiles_per_split, ROWS_OUTER=True, COMPUTE_DH=need_h, COMPUTE_DW=need_w,
                   COMPUTE_DB=need_b, ATOMIC_DH=splits > 1, ATOMIC_DW=True)
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


LinearLogprobsFunction, LinearKLFunction = head_functions("Linear", linear_forward, linear_backward)


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------


def triton_linear_logprobs(hidden, weight, labels, bias=None, *, deterministic=False, filter_eps=None, config=None,
                           fp32_precision="tf32", token_stats=False):
    """Label log-probs of response rows with fused Triton kernels (no ``[n, V]`` logits).

    Plain-torch equivalent::

        torch.log_softmax((hidden @ weight.T + bias).float(), -1).gather(1, labels[:, None])[:, 0]

    Args:
        hidden: ``[n, D]`` fp32/fp16/bf16 response rows (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        weight: ``[V, D]``, same dtype and device. bias: ``[V]`` or None.
        labels: ``[n]`` int64, every entry in ``[0, V)`` (not checked here: the caller validates).
        deterministic: atomic-free, bit-reproducible backward (about 1.3x the backward FLOPs).
        filter_eps: skip gradient tiles whose probabilities all stay below this (e.g. ``2**-12``); None = exact.
        config: a ``_config.LinearConfig`` overriding the checked-in tile shapes.
        fp32_precision: fp32 inputs: ``"tf32"`` tensor-core dots (default) or ``"ieee"`` (FFMA, exact products).
        token_stats: also return, without gradient, each row's entropy (``[n]`` float32) and whether its label is
            the argmax (``[n]`` bool, the first index winning ties), formed in the forward's tiles.
    Returns:
        ``[n]`` float32, differentiable w.r.t. hidden, weight and bias (gradients in their dtype); with
        ``token_stats`` ``(logps, entropy, is_top1)``.
    """
    check_head(hidden, weight, bias, labels)
    params = LinearParams(kl_mode=0, config=config, deterministic=deterministic, filter_eps=filter_eps,
                          fp32_precision=check_precision(fp32_precision), token_stats=bool(token_stats))
    # hidden and weight may be strided views; the kernels index labels and bias with unit stride
    return LinearLogprobsFunction.apply(hidden, weight, unit_stride(bias), labels.contiguous(), params)

