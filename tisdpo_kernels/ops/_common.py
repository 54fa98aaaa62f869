"""What the head backends share: input checks, the launchers' argument and result types, their autograd Functions.

- ``TOKEN_KL_CODES``: a head's token-KL mode as the kernels' integer code (``None`` 0, ``"tis"`` 1 for
  ``KL(p_theta || p_ref)``, ``"tdpo"`` 2 for ``KL(p_ref || p_theta)``; docs/design.md §1.3). Not to be confused
  with ``objectives.KL_MODES``, the loss's ``kl`` names (``"tisdpo"`` uses ``"tis"``, ``"tdpo1"`` and ``"tdpo2"``
  use ``"tdpo"``).
- ``check_head`` (one head's tensors for the kernels), ``check_ref_head`` (the reference head against the policy's:
  the one check of ``linear_kl.py``, ``linear_split.py`` and ``loss.py``), ``check_triton_device``,
  ``check_precision``.
- ``RefHead`` and ``ForwardStats``: what a backend's forward launcher takes and returns.
- ``top1_from_maxima`` and ``mean_logits``: the per-token statistics of ``token_stats`` (docs/design.md §4) that
  need no streaming state of their own.
- ``head_functions``: the two autograd Functions (log-probs; log-probs, reference log-probs and token KL) around a
  backend's forward and backward launchers, shared by ``linear_logprobs.py`` / ``linear_kl.py`` and
  ``linear_split.py``.

Plain torch, no Triton import: ``loss.py`` and ``backends.py`` import it on every backend, also where Triton is
absent, and the split path's torch twin runs on CPU without the interpreter. The Triton device functions the kernel
families share are in ``_jit.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._config import interpreting

TOKEN_KL_CODES = {None: 0, "tis": 1, "tdpo": 2}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_PRECISIONS = ("tf32", "ieee")


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def check_triton_device(name: str, t: torch.Tensor) -> None:
    """``t`` must be a CUDA tensor, or a CPU tensor with the Triton interpreter on (raises ``ValueError``)."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors, or "
                         "TRITON_INTERPRET=1 set before triton is imported for CPU tensors")


def check_head(hidden, weight, bias, labels=None, prefix="", triton_device=True):
    """Validate one head's tensors for the kernels (raises TypeError / ValueError naming the argument).

    ``hidden [n, D]`` and ``weight [V, D]`` fp32/fp16/bf16 of one dtype and device, ``bias [V]`` or None, ``labels``
    ``[n]`` int64 or None. ``triton_device=False`` skips the CUDA-or-interpreter check (for paths that also run on
    plain CPU)."""
    for name, t in ((f"{prefix}hidden", hidden), (f"{prefix}weight", weight), (f"{prefix}bias", bias)):
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: the Triton kernels take fp32/fp16/bf16, got {t.dtype} "
                            "(use backend='torch' for float64)")
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {prefix}hidden has {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but {prefix}hidden is on {hidden.device}")
    if triton_device:
        check_triton_device(f"{prefix}hidden", hidden)
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{prefix}hidden must be [n, D] and {prefix}weight [V, D], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{prefix}hidden has D={hidden.shape[1]} but {prefix}weight has D={weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{prefix}bias must be [V]=[{weight.shape[0]}], got {tuple(bias.shape)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            raise TypeError(f"labels must be an int64 tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
        if tuple(labels.shape) != (hidden.shape[0],):
            raise ValueError(f"labels must be [n]=[{hidden.shape[0]}], got {tuple(labels.shape)}")
        if labels.device != hidden.device:
            raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")


def check_ref_head(hidden, weight, ref_hidden, ref_weight, *, same_dtype=True):
    """The reference head against the policy's (each head checked on its own before): ``ref_hidden`` on
    ``hidden``'s device with its leading shape (``[n, D_ref]`` against ``[n, D]``, or ``[2B, T, D_ref]`` against
    ``[2B, T, D]``), ``ref_weight [V, D_ref]`` with ``weight``'s vocabulary, and with ``same_dtype`` (the kernels,
    which read both heads in one pass) ``hidden``'s dtype. Raises TypeError / ValueError naming the argument."""
    if same_dtype and ref_hidden.dtype != hidden.dtype:
        raise TypeError(f"ref_hidden has dtype {ref_hidden.dtype} but hidden has {hidden.dtype}")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden shape {tuple(ref_hidden.shape)} must match hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has vocabulary {ref_weight.shape[0]} but weight has {weight.shape[0]}")


def check_precision(fp32_precision: str) -> str:
    """``fp32_precision`` must be ``"tf32"`` or ``"ieee"``; returns it."""
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    return fp32_precision


def unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` contiguous (the kernels index labels and biases with unit stride); None stays None."""
    return None if t is None else t.contiguous()


# ----------------------------------------------------------------------------------------------
# launcher types
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefHead:
    """The reference model's side of a KL call: ``hidden [n, D_ref]``, ``weight [V, D_ref]``, ``bias [V]``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class ForwardStats:
    """Per-row outputs of the forward, each ``[n]`` fp32; the ``ref_*`` and ``kl`` fields only with a KL mode;
    ``entropy`` (of the policy's next-token distribution) and ``is_top1`` (``[n]`` bool: the label is the
    policy's argmax, the first index winning ties) only when the launcher's params ask for ``token_stats``."""

    logps: torch.Tensor
    lse: torch.Tensor
    ref_logps: torch.Tensor | None = None
    ref_lse: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None

    @classmethod
    def empty(cls, device: torch.device, with_ref: bool, token_stats: bool = False) -> ForwardStats:
        """The stats of zero rows: a distinct ``[0]`` tensor per field (the KL Function marks ``ref_logps``
        non-differentiable; were it the same tensor as ``logps`` and ``kl``, it would mark all three)."""
        fields = 5 if with_ref else 2
        stats = [torch.empty(0, dtype=torch.float32, device=device) for _ in range(fields)]
        stats += [None] * (5 - fields)
        if token_stats:
            stats += [torch.empty(0, dtype=torch.float32, device=device),
                      torch.empty(0, dtype=torch.bool, device=device)]
        return cls(*stats)


def top1_from_maxima(label_logit: torch.Tensor, row_max: torch.Tensor, max_before_label: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: the label is ``argmax`` of its row (first index winning ties), from the label's logit, the
    row's maximum and the maximum over the columns before the label (each ``[n]`` fp32, ``-inf`` for none)."""
    return (label_logit >= row_max) & (label_logit > max_before_label)


def mean_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(hidden @ weight.T + bias).mean(-1)`` without the logits: ``hidden @ mean_v(weight) + mean(bias)``, one
    ``[n, D] x [D]`` product. ``hidden [n, D]``, ``weight [V, D]``, ``bias [V]`` or None -> ``[n]`` fp32 (fp64
    for fp64 inputs); no gradient."""
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        out = hidden.to(cd) @ weight.sum(0, dtype=cd).div_(weight.shape[0])
        if bias is not None:
            out += bias.sum(dtype=cd) / bias.shape[0]
    return out


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


def head_functions(prefix: str, launch_forward: Callable[..., ForwardStats], launch_backward: Callable[..., tuple]):
    """The autograd Functions of one backend's launchers: ``({prefix}LogprobsFunction, {prefix}KLFunction)``.

    ``launch_forward(hidden, weight, bias, labels, params, ref=None) -> ForwardStats``, with ``entropy`` and
    ``is_top1`` when ``params.token_stats`` (the Functions then also return them, without gradient);
    ``launch_backward(hidden, weight, bias, labels, lse, grad_logps, params, needs, ref=None, ref_lse=None,
    token_kl=None, grad_kl=None) -> (d_hidden, d_weight, d_bias)`` (None where ``needs`` says no).
    """

    class LogprobsFunction(torch.autograd.Function):
        """``log_softmax(hidden @ weight.T + bias)[arange(n), labels]``."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, labels, params):
            stats = launch_forward(hidden, weight, bias, labels, params)
            ctx.save_for_backward(hidden, weight, bias, labels, stats.lse)
            ctx.params = params
            if not params.token_stats:
                return stats.logps
            ctx.mark_non_differentiable(stats.entropy, stats.is_top1)
            return stats.logps, stats.entropy, stats.is_top1

        @staticmethod
        def backward(ctx, grad_logps, *_grad_token_stats):
            hidden, weight, bias, labels, lse = ctx.saved_tensors
            grads = launch_backward(hidden, weight, bias, labels, lse, grad_logps, ctx.params,
                                    ctx.needs_input_grad[:3])
            return (*grads, None, None)

    class KLFunction(torch.autograd.Function):
        """``(logps, ref_logps, token_kl)`` of the policy and reference heads; gradients into the policy only."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, params):
            ref = RefHead(ref_hidden, ref_weight, ref_bias)
            stats = launch_forward(hidden, weight, bias, labels, params, ref=ref)
            ctx.save_for_backward(hidden, weight, bias, labels, stats.lse, ref_hidden, ref_weight, ref_bias,
                                  stats.ref_lse, stats.kl)
            ctx.params = params
            if not params.token_stats:
                ctx.mark_non_differentiable(stats.ref_logps)
                return stats.logps, stats.ref_logps, stats.kl
            ctx.mark_non_differentiable(stats.ref_logps, stats.entropy, stats.is_top1)
            return stats.logps, stats.ref_logps, stats.kl, stats.entropy, stats.is_top1

        @staticmethod
        def backward(ctx, grad_logps, _grad_ref_logps, grad_kl, *_grad_token_stats):
            hidden, weight, bias, labels, lse, ref_hidden, ref_weight, ref_bias, ref_lse, token_kl = ctx.saved_tensors
            grads = launch_backward(hidden, weight, bias, labels, lse, grad_logps, ctx.params,
                                    ctx.needs_input_grad[:3], ref=RefHead(ref_hidden, ref_weight, ref_bias),
                                    ref_lse=ref_lse, token_kl=token_kl, grad_kl=grad_kl)
            return (*grads, None, None, None, None, None)

    for cls, suffix in ((LogprobsFunction, "LogprobsFunction"), (KLFunction, "KLFunction")):
        cls.__name__ = cls.__qualname__ = prefix + suffix
        cls.__module__ = launch_forward.__module__
    return LogprobsFunction, KLFunction
