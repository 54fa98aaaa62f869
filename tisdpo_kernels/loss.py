"""Public API: ``fused_tis_dpo_loss``, ``fused_linear_logprobs`` and ``FusedTISDPOLoss``.

This module validates inputs (a clear ``ValueError``/``TypeError`` naming the argument, never a
silent wrong number or an out-of-bounds read), drops prompt/padding rows before any matmul,
dispatches the per-token work to a backend and turns per-sequence sums into the loss and its
metrics (``reference.pair_objective``).

Backends: ``"torch"`` (``chunked.py``, runs anywhere), ``"split"`` (``ops/linear_split.py``: vocabulary
splits, cuBLAS GEMMs and fused Triton elementwise passes, an atomic-free backward; runs anywhere, Triton
on CUDA and under ``TRITON_INTERPRET=1``), ``"triton"`` (the all-Triton kernels of ``ops/linear_logprobs.py``;
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"auto"`` (on CUDA the backend that
``ops._config.auto_backend`` expects fastest for the shape, torch otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import chunked
from .ops._config import auto_backend, interpreting
from .reference import (
    KL_MODES,
    LOSS_TYPES,
    pair_objective,
    sequence_layout,
    sequence_sums,
    token_weights_from_contrastive,
    transform_params,
)

BACKENDS = ("auto", "torch", "triton", "split")
FP32_PRECISIONS = ("tf32", "ieee")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# backend dispatch
# ----------------------------------------------------------------------------------------------


def _resolve_backend(backend: str, device: torch.device, dim: int | None = None, grad_filter: bool = False) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda" or not _triton_available():
            return "torch"
        return "triton" if grad_filter else auto_backend(dim)
    if backend == "split" and not _triton_available():
        raise ValueError("backend='split' needs the `triton` package, which is not importable here")
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the `triton` package, which is not importable here")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                "backend='triton' on non-CUDA tensors needs TRITON_INTERPRET=1 set before triton is imported; "
                "use backend='torch' (or 'auto') on CPU"
            )
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class _KernelOptions:
    """Per-call options of the row backends: torch's chunk size; Triton's deterministic dW and filter."""

    chunk_size: int | None = None
    deterministic: bool = False
    grad_filter_eps: float | None = None
    fp32_precision: str = "tf32"


def _linear_logprobs_rows(backend, hidden, weight, labels, bias, opts: _KernelOptions):
    if backend == "split":
        from .ops.linear_split import split_linear_logprobs

        return split_linear_logprobs(hidden, weight, labels, bias=bias, fp32_precision=opts.fp32_precision)
    if backend == "triton":
        from .ops.linear_logprobs import triton_linear_logprobs

        return triton_linear_logprobs(hidden, weight, labels, bias=bias, deterministic=opts.deterministic,
                                      filter_eps=opts.grad_filter_eps, fp32_precision=opts.fp32_precision)
    return chunked.chunked_linear_logprobs(hidden, weight, labels, bias=bias, chunk_size=opts.chunk_size)


def _linear_kl_rows(backend, hidden, weight, labels, ref_hidden, ref_weight, mode, bias, ref_bias,
                    opts: _KernelOptions):
    if backend == "split":
        from .ops.linear_split import split_linear_kl

        return split_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias=bias, ref_bias=ref_bias,
                               fp32_precision=opts.fp32_precision)
    if backend == "triton":
        from .ops.linear_kl import triton_linear_kl

        return triton_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias=bias, ref_bias=ref_bias,
                                deterministic=opts.deterministic, filter_eps=opts.grad_filter_eps,
                                fp32_precision=opts.fp32_precision)
    return chunked.chunked_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias=bias,
                                     ref_bias=ref_bias, chunk_size=opts.chunk_size)


def _kernel_options(chunk_size, deterministic, grad_filter_eps, fp32_precision="tf32",
                    backend=None) -> _KernelOptions:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if grad_filter_eps is not None and not (isinstance(grad_filter_eps, (int, float)) and 0 < grad_filter_eps < 1):
        raise ValueError(f"grad_filter_eps must lie in (0, 1) or be None, got {grad_filter_eps!r}")
    if grad_filter_eps is not None and backend == "split":
        raise ValueError("grad_filter_eps: the split backend is always exact; gradient filtering is "
                         "backend='triton' only")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    return _KernelOptions(chunk_size, bool(deterministic), grad_filter_eps, fp32_precision)


def _sequence_sums(backend, logps, lpref, weights, contrastive, weight_transform, transform_kwargs, rows: _Rows,
                   token_kl, kl):
    """Per-sequence sums of the response rows: Triton's segment-sum kernels (the weight transform
    evaluated in the kernel) or ``reference.sequence_sums`` on the torch path (and the split path on
    plain CPU tensors)."""
    if backend == "triton" or (backend == "split" and (logps.device.type == "cuda" or interpreting())):
        from .ops.pair_loss import sequence_sums_unchecked

        return sequence_sums_unchecked(logps, lpref, weights, rows.seq_ids, rows.num_seqs, token_kl=token_kl, kl=kl,
                                       contrastive_logps=contrastive, weight_transform=weight_transform,
                                       transform_kwargs=transform_kwargs)
    if contrastive is not None:
        weights = token_weights_from_contrastive(*contrastive, rows.seq_ids < rows.num_seqs // 2, weight_transform,
                                                 transform_kwargs)
    elif weights is None:
        weights = torch.ones_like(logps)
    return sequence_sums(logps, lpref, weights, rows.seq_ids, rows.num_seqs, token_kl=token_kl, kl=kl)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _check_float(name, t, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match hidden's dtype {dtype}")


def _check_linear(hidden, weight, bias, labels, ignore_index, prefix=""):
    """Shared checks of (hidden, weight, bias, labels); returns the vocabulary size."""
    _check_float(f"{prefix}hidden", hidden)
    _check_float(f"{prefix}weight", weight, hidden.dtype)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be [V, D], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}hidden size {hidden.shape[-1]} does not match {prefix}weight's hidden size {weight.shape[1]}"
        )
    if bias is not None:
        _check_float(f"{prefix}bias", bias, hidden.dtype)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must be [V]={weight.shape[0]}, got shape {tuple(bias.shape)}")
    for name, t in ((f"{prefix}weight", weight), (f"{prefix}bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if labels is None:
        return weight.shape[0]
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    vocab = weight.shape[0]
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first} "
            f"({int(bad.sum())} bad positions)"
        )
    return vocab


def _check_token_tensor(name, t, labels_shape, valid_mask):
    """A per-token float tensor shaped like labels, finite at response positions."""
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor shaped like labels, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(labels_shape):
        raise ValueError(f"{name} shape {tuple(t.shape)} must equal labels shape {tuple(labels_shape)}")
    if t.device != valid_mask.device:
        raise ValueError(f"{name} is on {t.device} but labels is on {valid_mask.device}")
    if not bool(torch.isfinite(t[valid_mask]).all()):
        raise ValueError(f"{name} has non-finite values (NaN/inf) at response positions")


def _check_cu_seqlens(cu_seqlens, n_tokens):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError("cu_seqlens must be an int32/int64 tensor [2B+1]")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 3 or (cu_seqlens.numel() - 1) % 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with 2B+1 entries (B chosen then B rejected sequences); got "
            f"{cu_seqlens.numel()} entries, i.e. {cu_seqlens.numel() - 1} sequences, which do not pair up"
        )
    cu = cu_seqlens.to(torch.long)
    if cu[0].item() != 0 or cu[-1].item() != n_tokens or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at the number of tokens {n_tokens}; "
            f"got {cu_seqlens.tolist()}"
        )


@dataclass(frozen=True)
class _Rows:
    """The response rows of a batch, flattened: index into the flattened batch and sequence ids."""

    index: torch.Tensor  # [n] int64 positions in the flattened batch
    seq_ids: torch.Tensor  # [n] int64 sequence of each row
    labels: torch.Tensor  # [n] int64
    num_seqs: int


def _response_rows(labels, cu_seqlens, ignore_index) -> _Rows:
    layout = sequence_layout(labels, cu_seqlens)
    flat = labels.reshape(-1)
    index = (flat != ignore_index).nonzero().squeeze(1)
    seq_ids = layout.seq_ids[index]
    counts = torch.bincount(seq_ids, minlength=layout.num_seqs)
    empty = (counts == 0).nonzero().squeeze(1)
    if empty.numel():
        raise ValueError(
            f"labels: sequence(s) {empty.tolist()} have no response token (every label is ignore_index="
            f"{ignore_index}); each chosen/rejected sequence needs at least one"
        )
    return _Rows(index=index, seq_ids=seq_ids, labels=flat[index].to(torch.long), num_seqs=layout.num_seqs)


def _gather_rows(t, index):
    return t.reshape(-1, t.shape[-1]).index_select(0, index)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def fused_linear_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, backend="auto", chunk_size=None,
                          deterministic=False, grad_filter_eps=None, fp32_precision="tf32"):
    """Per-token label log-probs without materialising the logits.

    Plain-torch equivalent::

        logp = torch.log_softmax((hidden @ weight.T + bias).float(), -1)
        out = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != ignore_index)

    Args:
        hidden: ``[..., D]`` fp16/bf16/fp32/fp64 (any leading shape, e.g. ``[B, T, D]`` or packed ``[N, D]``).
        weight: ``[V, D]``, same dtype. bias: ``[V]`` or None.
        labels: ``[...]`` integer, ``hidden.shape[:-1]``, already aligned with ``hidden`` (no shift inside).
        backend, chunk_size, deterministic, grad_filter_eps, fp32_precision: as in :func:`fused_tis_dpo_loss`.
    Returns:
        ``[...]`` float32 (float64 for float64 inputs), 0 at ignored positions; differentiable w.r.t.
        hidden, weight and bias.
    """
    _check_linear(hidden, weight, bias, labels, ignore_index)
    backend = _resolve_backend(backend, hidden.device, weight.shape[1], grad_filter_eps is not None)
    opts = _kernel_options(chunk_size, deterministic, grad_filter_eps, fp32_precision, backend)
    flat = labels.reshape(-1)
    index = (flat != ignore_index).nonzero().squeeze(1)
    rows = _linear_logprobs_rows(backend, _gather_rows(hidden, index), weight, flat[index].to(torch.long), bias,
                                 opts)
    out = torch.zeros(flat.shape[0], dtype=rows.dtype, device=rows.device).index_copy(0, index, rows)
    return out.view(labels.shape)


def fused_tis_dpo_loss(
    hidden, weight, labels, *, bias=None, ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
    token_weights=None, contrastive_logps=None, weight_transform="origin", transform_kwargs=None,
    beta=0.1, alpha=0.5, kl=None, loss_type="sigmoid", label_smoothing=0.0, ignore_index=-100,
    cu_seqlens=None, backend="auto", chunk_size=None, deterministic=False, grad_filter_eps=None,
    fp32_precision="tf32",
):
    """TIS-DPO / DPO / TDPO loss from last hidden states, never materialising ``[tokens, V]`` logits.

    Per response token ``t`` (labels != ignore_index): ``lp_t = log softmax(h_t W^T + b)[y_t]``,
    ``m_t = lp_t - lpref_t``; per sequence ``M = sum_t w_t m_t``; per pair
    ``loss = -log sigmoid(beta (M_c - M_r))`` averaged over pairs (TIS-DPO, Liu et al. 2024,
    arXiv 2410.04350; with ``w_t = 1`` it is DPO, Rafailov et al. 2023). See DESIGN §1 for the KL
    variants (``kl="tisdpo"|"tdpo1"|"tdpo2"``, TDPO: Zeng et al. 2024) and ``reference.pair_objective``
    for the ``loss_type`` formulas (``"sigmoid"`` with ``label_smoothing`` = cDPO, ``"ipo"``, ``"hinge"``).

    Args:
        hidden: padded ``[2B, T, D]`` (rows ``0..B-1`` chosen, ``B..2B-1`` rejected) or packed ``[N, D]``
            with ``cu_seqlens``. fp16/bf16/fp32/fp64; math in fp32 (fp64 for fp64 inputs).
        weight: ``[V, D]`` LM head, same dtype. bias: ``[V]`` or None.
        labels: ``[2B, T]`` or ``[N]`` integer, aligned with ``hidden``; ``ignore_index`` marks prompt/padding.
        ref_logps: per-token reference log-probs shaped like ``labels``; or ``ref_hidden`` (``[..., D_ref]``
            shaped like ``hidden``) + ``ref_weight`` ``[V, D_ref]`` (+ ``ref_bias``) computed inside without
            grad. The KL variants need the latter.
        token_weights: per-token weights shaped like ``labels`` (none: DPO). Or ``contrastive_logps=(pos,
            neg)``, each shaped like ``labels``, turned into weights by ``weight_transform`` applied to
            ``r = pos - neg`` on chosen and to ``-r`` on rejected tokens (``transform_kwargs`` override the
            transform's defaults, see ``reference.apply_weight_transform``).
        cu_seqlens: ``[2B+1]`` int32/int64 boundaries of packed sequences, chosen first then rejected.
        backend: ``"auto"`` | ``"torch"`` | ``"split"`` | ``"triton"`` (see the module docstring; ``"auto"``
            on CUDA picks by the hidden size from ``ops._config.AUTO_BACKENDS``, and ``"triton"`` whenever
            ``grad_filter_eps`` is set). chunk_size: rows per chunk of the torch path.
        deterministic: Triton only: an atomic-free, bit-reproducible backward (about 1.3x its FLOPs); the
            torch and split paths are always deterministic (at no cost).
        grad_filter_eps: Triton only: skip the gradient matmuls of vocabulary tiles whose probabilities all
            stay below it and that hold no label (e.g. ``2**-12``, below bf16 resolution; an approximation).
            ``None`` (default): exact. The torch and split paths are always exact.
        fp32_precision: fp32 inputs on CUDA: ``"tf32"`` (default; tensor cores, 10-bit mantissa products,
            fp32 accumulation) or ``"ieee"`` (full fp32 products, several times slower). Half-precision
            inputs and the torch path are unaffected.
    Returns:
        ``(loss, metrics)``: scalar loss (float32, float64 for float64 inputs) and a dict of detached
        scalars averaged over pairs: ``rewards/{chosen,rejected,margins,accuracies}``,
        ``logps/{chosen,rejected}`` (summed, unweighted), ``logps/{chosen,rejected}_weighted``,
        ``weights/{chosen,rejected}_mean`` and, with a KL variant, ``kl/{chosen,rejected}``.
    """
    if kl not in KL_MODES:
        raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    for name, value in (("beta", beta), ("alpha", alpha)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, got loss_type={loss_type!r}")

    vocab = _check_linear(hidden, weight, bias, labels, ignore_index)
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [2B, T, D] (or packed [N, D] with cu_seqlens), got {tuple(hidden.shape)}")
        if hidden.shape[0] % 2:
            raise ValueError(f"hidden has an odd number of rows ({hidden.shape[0]}): rows must be B chosen then "
                             "B rejected")
    else:
        if hidden.dim() != 2:
            raise ValueError(f"with cu_seqlens, hidden must be packed [N, D], got {tuple(hidden.shape)}")
        _check_cu_seqlens(cu_seqlens, hidden.shape[0])
        cu_seqlens = cu_seqlens.to(hidden.device)

    has_ref_model = ref_hidden is not None or ref_weight is not None
    if (ref_logps is None) == (not has_ref_model):
        raise ValueError("pass exactly one of ref_logps or (ref_hidden and ref_weight)")
    if has_ref_model and (ref_hidden is None or ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together")
    if kl is not None and not has_ref_model:
        raise ValueError(f"kl={kl!r} needs the full reference distribution: pass ref_hidden and ref_weight, "
                         "not ref_logps")
    valid = labels != ignore_index
    if ref_logps is not None:
        _check_token_tensor("ref_logps", ref_logps, labels.shape, valid)
    else:
        ref_vocab = _check_linear(ref_hidden, ref_weight, ref_bias, None, ignore_index, prefix="ref_")
        if ref_vocab != vocab:
            raise ValueError(f"ref_weight has vocabulary {ref_vocab} but weight has {vocab}")
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(f"ref_hidden shape {tuple(ref_hidden.shape)} must match hidden's leading shape "
                             f"{tuple(hidden.shape[:-1])}")
    if token_weights is not None and contrastive_logps is not None:
        raise ValueError("pass token_weights or contrastive_logps, not both")
    if token_weights is not None:
        _check_token_tensor("token_weights", token_weights, labels.shape, valid)
    if contrastive_logps is not None:
        if not isinstance(contrastive_logps, (tuple, list)) or len(contrastive_logps) != 2:
            raise TypeError("contrastive_logps must be a pair (pos_logps, neg_logps)")
        for name, t in zip(("contrastive_logps[0]", "contrastive_logps[1]"), contrastive_logps, strict=True):
            _check_token_tensor(name, t, labels.shape, valid)
        transform_params(weight_transform, transform_kwargs)

    backend = _resolve_backend(backend, hidden.device, weight.shape[1], grad_filter_eps is not None)
    opts = _kernel_options(chunk_size, deterministic, grad_filter_eps, fp32_precision, backend)
    rows = _response_rows(labels, cu_seqlens, ignore_index)
    h_rows = _gather_rows(hidden, rows.index)
    token_kl = None
    if kl is not None:
        mode = "tis" if kl == "tisdpo" else "tdpo"
        ref_rows = _gather_rows(ref_hidden.detach(), rows.index)
        logps, lpref, token_kl = _linear_kl_rows(
            backend, h_rows, weight, rows.labels, ref_rows, ref_weight.detach(), mode, bias,
            None if ref_bias is None else ref_bias.detach(), opts)
    else:
        logps = _linear_logprobs_rows(backend, h_rows, weight, rows.labels, bias, opts)
        if ref_logps is not None:
            lpref = ref_logps.reshape(-1)[rows.index].to(logps.dtype)
        else:
            with torch.no_grad():
                lpref = _linear_logprobs_rows(backend, _gather_rows(ref_hidden, rows.index), ref_weight,
                                              rows.labels, ref_bias, opts)
    w = None if token_weights is None else token_weights.reshape(-1)[rows.index].to(logps.dtype).detach()
    contrastive = None
    if contrastive_logps is not None:
        contrastive = tuple(t.reshape(-1)[rows.index].to(logps.dtype).detach() for t in contrastive_logps)
    sums = _sequence_sums(backend, logps, lpref.detach(), w, contrastive, weight_transform, transform_kwargs,
                          rows, token_kl, kl)
    return pair_objective(sums, beta=beta, alpha=alpha, kl=kl, loss_type=loss_type, label_smoothing=label_smoothing)


class FusedTISDPOLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`fused_tis_dpo_loss` (Liger-style): options at construction,
    tensors at call time. ``forward(hidden, weight, labels, **tensors) -> (loss, metrics)``."""

    def __init__(self, *, beta=0.1, alpha=0.5, kl=None, loss_type="sigmoid", label_smoothing=0.0,
                 weight_transform="origin", transform_kwargs=None, ignore_index=-100, backend="auto",
                 chunk_size=None, deterministic=False, grad_filter_eps=None, fp32_precision="tf32"):
        super().__init__()
        self.options = dict(beta=beta, alpha=alpha, kl=kl, loss_type=loss_type, label_smoothing=label_smoothing,
                            weight_transform=weight_transform, transform_kwargs=transform_kwargs,
                            ignore_index=ignore_index, backend=backend, chunk_size=chunk_size,
                            deterministic=deterministic, grad_filter_eps=grad_filter_eps,
                            fp32_precision=fp32_precision)

    def forward(self, hidden, weight, labels, **tensors):
        return fused_tis_dpo_loss(hidden, weight, labels, **tensors, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
