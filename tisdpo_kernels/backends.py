"""The backend table: each ``backend=`` of ``fused_tis_dpo_loss`` / ``fused_linear_logprobs``, what it runs and can do.

``TABLE`` maps a name to a ``Backend``: its head functions (label log-probs of the response rows; log-probs,
reference log-probs and token KL), its per-sequence-sums function and its capabilities (KL variants, gradient
filtering, determinism, WPO's log-collision statistic, float64, devices, whether it needs the ``triton`` package).
From the table come:

- ``resolve``: what ``backend="auto"`` picks (on CUDA with Triton the first of ``AUTO_BACKENDS``' choice for the
  hidden size, then the other Triton backend, then ``torch``, that supports the call; ``torch`` elsewhere) and
  every refusal, in one form: ``backend='split' does not support grad_filter_eps: <why>; supported by: triton``;
- ``markdown_table`` and ``help_text``: the backend table of the docs (README, ``--help``, docstrings).

docs/design.md §3 explains the choice. Nothing here imports Triton or a kernel module at import time: the head
functions import theirs on first call, so ``backend="torch"`` runs where Triton is absent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import chunked
from .objectives import KL_MODES, SequenceSums, sequence_sums
from .ops._common import check_precision
from .ops._config import interpreting
from .transforms import token_weights_from_contrastive

# ----------------------------------------------------------------------------------------------
# per-call options of the head functions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelOptions:
    """Per-call options of the head functions: torch's chunk size; Triton's deterministic dW and gradient filter;
    the fp32 GEMM precision of the Triton and split paths."""

    chunk_size: int | None = None
    deterministic: bool = False
    grad_filter_eps: float | None = None
    fp32_precision: str = "tf32"


def kernel_options(chunk_size=None, deterministic=False, grad_filter_eps=None, fp32_precision="tf32") -> KernelOptions:
    """Validated ``KernelOptions`` (a ``ValueError`` naming the argument); which backend honours which is the
    table's business (``resolve``)."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if grad_filter_eps is not None and not (isinstance(grad_filter_eps, (int, float)) and 0 < grad_filter_eps < 1):
        raise ValueError(f"grad_filter_eps must lie in (0, 1) or be None, got {grad_filter_eps!r}")
    return KernelOptions(chunk_size, bool(deterministic), grad_filter_eps, check_precision(fp32_precision))


# ----------------------------------------------------------------------------------------------
# head and sums functions of each backend
# ----------------------------------------------------------------------------------------------
# logprobs(hidden [n, D], weight [V, D], labels [n] int64, bias [V] | None, opts) -> logps [n] fp32 (fp64 for fp64)
# kl(hidden, weight, labels, ref_hidden [n, D_ref], ref_weight [V, D_ref], mode "tis" | "tdpo", bias, ref_bias, opts)
#     -> (logps, ref_logps, token_kl), each [n]
# Only the torch head functions take ``log_collision=True`` (WPO): they then also return log sum_v p(v)^2 per row.
# Those of a backend with ``token_stats`` take ``token_stats=True``: two more outputs follow, the policy's entropy [n]
# (logps' dtype) and is-top-1 [n] bool (the label is the argmax, first index winning ties); docs/design.md §4.
# sums(logps, lpref, weights | None, seq_ids [n], num_seqs, token_kl=, kl=, contrastive=(pos, neg) | None,
#      weight_transform=, transform_kwargs=) -> SequenceSums; the torch one also takes log_collision=.


def _torch_logprobs(hidden, weight, labels, bias, opts: KernelOptions, log_collision=False, token_stats=False):
    return chunked.chunked_linear_logprobs(hidden, weight, labels, bias=bias, chunk_size=opts.chunk_size,
                                           log_collision=log_collision, token_stats=token_stats)


def _torch_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias, ref_bias, opts: KernelOptions,
              log_collision=False, token_stats=False):
    return chunked.chunked_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias=bias,
                                     ref_bias=ref_bias, chunk_size=opts.chunk_size, log_collision=log_collision,
                                     token_stats=token_stats)


def _split_logprobs(hidden, weight, labels, bias, opts: KernelOptions, token_stats=False):
    from .ops.linear_split import split_linear_logprobs

    return split_linear_logprobs(hidden, weight, labels, bias=bias, fp32_precision=opts.fp32_precision,
                                 token_stats=token_stats)


def _split_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias, ref_bias, opts: KernelOptions,
              token_stats=False):
    from .ops.linear_split import split_linear_kl

    return split_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias=bias, ref_bias=ref_bias,
                           fp32_precision=opts.fp32_precision, token_stats=token_stats)


def _triton_logprobs(hidden, weight, labels, bias, opts: KernelOptions, token_stats=False):
    from .ops.linear_logprobs import triton_linear_logprobs

    return triton_linear_logprobs(hidden, weight, labels, bias=bias, deterministic=opts.deterministic,
                                  filter_eps=opts.grad_filter_eps, fp32_precision=opts.fp32_precision,
                                  token_stats=token_stats)


def _triton_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias, ref_bias, opts: KernelOptions,
               token_stats=False):
    from .ops.linear_kl import triton_linear_kl

    return triton_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias=bias, ref_bias=ref_bias,
                            deterministic=opts.deterministic, filter_eps=opts.grad_filter_eps,
                            fp32_precision=opts.fp32_precision, token_stats=token_stats)


def _torch_sums(logps, lpref, weights, seq_ids, num_seqs, *, token_kl, kl, contrastive, weight_transform,
                transform_kwargs, log_collision=None) -> SequenceSums:
    """``objectives.sequence_sums``, the weights of ``contrastive`` formed first (``transforms``)."""
    if contrastive is not None:
        weights = token_weights_from_contrastive(*contrastive, seq_ids < num_seqs // 2, weight_transform,
                                                 transform_kwargs)
    elif weights is None:
        weights = torch.ones_like(logps)
    return sequence_sums(logps, lpref, weights, seq_ids, num_seqs, token_kl=token_kl, kl=kl,
                         log_collision=log_collision)


def _triton_sums(logps, lpref, weights, seq_ids, num_seqs, *, token_kl, kl, contrastive, weight_transform,
                 transform_kwargs) -> SequenceSums:
    """Triton's segment-sum kernels, the weight transform evaluated in the kernel (``ops/pair_loss.py``)."""
    from .ops.pair_loss import sequence_sums_unchecked

    return sequence_sums_unchecked(logps, lpref, weights, seq_ids, num_seqs, token_kl=token_kl, kl=kl,
                                   contrastive_logps=contrastive, weight_transform=weight_transform,
                                   transform_kwargs=transform_kwargs)


def _split_sums(logps, *args, **kwargs) -> SequenceSums:
    """Triton's segment sums where the split path's elementwise passes run in Triton (CUDA, the interpreter),
    torch's on plain CPU tensors."""
    fn = _triton_sums if logps.device.type == "cuda" or interpreting() else _torch_sums
    return fn(logps, *args, **kwargs)


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------

DEVICES = {"cpu": "CPU", "cuda": "CUDA", "interpreter": "CPU under TRITON_INTERPRET=1"}


@dataclass(frozen=True)
class Backend:
    """One row of the table. ``devices``: keys of ``DEVICES`` (``"cpu"``: plain CPU, and any other device torch
    runs on). ``deterministic``: ``"always"`` (bit-reproducible by construction), ``"cpu"`` (bit-reproducible on
    CPU; on CUDA its per-sequence sums use ``index_add``, whose float atomics need
    ``torch.use_deterministic_algorithms(True)``) or ``"option"`` (``deterministic=True`` asks for an atomic-free
    backward). ``log_collision``: computes WPO's
    ``log sum_v p(v)^2`` (``use_weighting``). ``token_stats``: computes the policy's per-token entropy and
    is-top-1 in its pass over the vocabulary (``fused_tis_dpo_loss(token_stats=True)``)."""

    name: str
    summary: str
    logprobs: Callable
    kl: Callable
    sums: Callable
    devices: tuple[str, ...]
    needs_triton: bool
    kl_variants: tuple[str | None, ...] = KL_MODES
    grad_filter: bool = False
    deterministic: str = "always"
    log_collision: bool = False
    token_stats: bool = False
    float64: bool = False
    # why a capability is missing, by capability name (for the refusals)
    lacks: tuple[tuple[str, str], ...] = ()

    def why_not(self, capability: str) -> str:
        return dict(self.lacks).get(capability, "not implemented")


TABLE: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "torch", "chunked PyTorch: one chunk of [rows, V] logits at a time, forward and backward (`chunked.py`)",
            _torch_logprobs, _torch_kl, _torch_sums, devices=("cpu", "cuda"), needs_triton=False,
            deterministic="cpu", log_collision=True, token_stats=True, float64=True,
            lacks=(("grad_filter_eps", "its gradients are always exact"),),
        ),
        Backend(
            "triton", "all-Triton fused LM head + log-softmax kernels, fp32 atomics in the backward "
            "(`ops/linear_logprobs.py`, `ops/linear_kl.py`)",
            _triton_logprobs, _triton_kl, _triton_sums, devices=("cuda", "interpreter"), needs_triton=True,
            grad_filter=True, deterministic="option", token_stats=True,
            lacks=(("use_weighting", "WPO needs log sum_v p(v)^2 of every response token, which its kernels do not "
                                     "compute"),
                   ("float64", "its kernels take fp32/fp16/bf16"),
                   ("cpu", "its kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")),
        ),
        Backend(
            "split", "vocabulary splits: cuBLAS GEMMs + fused Triton elementwise passes, an atomic-free backward; "
            "on plain CPU the same algorithm with torch elementwise ops (`ops/linear_split.py`)",
            _split_logprobs, _split_kl, _split_sums, devices=("cpu", "cuda", "interpreter"), needs_triton=True,
            token_stats=True,
            lacks=(("grad_filter_eps", "its gradients are always exact"),
                   ("use_weighting", "WPO needs log sum_v p(v)^2 of every response token, which its passes do not "
                                     "compute"),
                   ("float64", "its passes take fp32/fp16/bf16")),
        ),
    )
}
BACKENDS = ("auto", *TABLE)

# backend="auto" on CUDA: the backend expected fastest, keyed by the hidden-size bucket (upper bound of D,
# inclusive). Not measured yet: from the byte count of docs/design.md §4 (benchmarks/README.md, "Why the split
# path"). The split path pays a fp32 logits round trip, about 658/D of the forward and 384/D of the backward GEMM
# time on an H200 (bf16); the all-Triton kernels pay their fp32 atomics, ~3x the backward GEMM time at any D. So
# the all-Triton kernels are expected to win only below D=512 (toy models). Replace by measured figures from
# benchmarks/gpu_check.sh once they exist.
AUTO_BACKENDS = (
    (511, "triton"),
    (None, "split"),
)
AUTO_SUMMARY = ("on CUDA with Triton: `triton` below D=512 and whenever `grad_filter_eps` is set, `split` "
                "otherwise, `torch` for what neither supports (`use_weighting`, float64); `torch` elsewhere")


def auto_backend(dim: int | None) -> str:
    """``"split"`` or ``"triton"``: the backend ``AUTO_BACKENDS`` expects fastest on CUDA for hidden size ``dim``."""
    return next(b for bound, b in AUTO_BACKENDS if bound is None or (dim is not None and dim <= bound))


def triton_available() -> bool:
    """Whether the ``triton`` package imports here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _supporters(capability_of: Callable[[Backend], bool]) -> str:
    return ", ".join(b.name for b in TABLE.values() if capability_of(b)) or "none"


def _device_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda"
    return "interpreter" if device.type == "cpu" and interpreting() else "cpu"


def _runs_on(b: Backend, kind: str) -> bool:
    return kind in b.devices or (kind == "interpreter" and "cpu" in b.devices)


def refusal(b: Backend, device: torch.device, *, dtype=None, kl=None, grad_filter_eps=None,
            use_weighting=False, token_stats=False, have_triton=None) -> Exception | None:
    """Why ``b`` cannot run this call (a ``ValueError``, a ``TypeError`` for the dtype), or None when it can."""
    kind = _device_kind(device)
    if have_triton is None:
        have_triton = triton_available()
    if b.needs_triton and not have_triton:
        return ValueError(f"backend={b.name!r} does not support running without the `triton` package: its kernels "
                          f"are Triton, which is not importable here; supported by: "
                          f"{_supporters(lambda x: not x.needs_triton)}")
    if not _runs_on(b, kind):
        what = "CPU tensors without TRITON_INTERPRET=1" if device.type == "cpu" else f"{device.type} tensors"
        return ValueError(f"backend={b.name!r} does not support {what}: {b.why_not(kind)}; supported by: "
                          f"{_supporters(lambda x: _runs_on(x, kind))}")
    if dtype == torch.float64 and not b.float64:
        return TypeError(f"backend={b.name!r} does not support float64 inputs: {b.why_not('float64')}; supported by: "
                         f"{_supporters(lambda x: x.float64)}")
    if kl not in b.kl_variants:
        return ValueError(f"backend={b.name!r} does not support kl={kl!r}: {b.why_not('kl')}; supported by: "
                          f"{_supporters(lambda x: kl in x.kl_variants)}")
    if grad_filter_eps is not None and not b.grad_filter:
        return ValueError(f"backend={b.name!r} does not support grad_filter_eps: {b.why_not('grad_filter_eps')}; "
                          f"supported by: {_supporters(lambda x: x.grad_filter)}")
    if use_weighting and not b.log_collision:
        return ValueError(f"backend={b.name!r} does not support use_weighting: {b.why_not('use_weighting')}; "
                          f"supported by: {_supporters(lambda x: x.log_collision)}")
    if token_stats and not b.token_stats:
        return ValueError(f"backend={b.name!r} does not support token_stats: {b.why_not('token_stats')}; "
                          f"supported by: {_supporters(lambda x: x.token_stats)}")
    return None


def resolve(name: str, device: torch.device, dim: int | None = None, *, dtype=None, kl=None, grad_filter_eps=None,
            use_weighting=False, token_stats=False) -> Backend:
    """The ``Backend`` that runs a call with ``backend=name`` on ``device`` tensors of hidden size ``dim``, or the
    refusal (``ValueError``; ``TypeError`` for the dtype) naming the backend and the unsupported argument.

    ``"auto"``: on CUDA with Triton, ``auto_backend(dim)``, then the other Triton backend, then ``torch``: the
    first that supports the call; ``torch`` elsewhere."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    request = dict(dtype=dtype, kl=kl, grad_filter_eps=grad_filter_eps, use_weighting=use_weighting,
                   token_stats=token_stats, have_triton=triton_available())
    if name != "auto":
        error = refusal(TABLE[name], device, **request)
        if error is not None:
            raise error
        return TABLE[name]
    if device.type == "cuda" and request["have_triton"]:
        first = auto_backend(dim)
        candidates = (first, "split" if first == "triton" else "triton", "torch")
    else:
        candidates = ("torch",)
    errors = [refusal(TABLE[c], device, **request) for c in candidates]
    for candidate, error in zip(candidates, errors, strict=True):
        if error is None:
            return TABLE[candidate]
    first_error = errors[0]
    raise type(first_error)(f"backend='auto' found no backend for these {device.type} tensors that supports the "
                            f"call ({', '.join(repr(c) for c in candidates)} tried): {first_error}")


# ----------------------------------------------------------------------------------------------
# the docs' table
# ----------------------------------------------------------------------------------------------

_COLUMNS = ("backend", "what runs", "devices", "needs `triton`", "`kl`", "`grad_filter_eps`", "`deterministic`",
            "`use_weighting` (WPO)", "float64")


_DETERMINISM = {
    "always": "always (bit-reproducible)",
    "cpu": "on CPU always; on CUDA under `torch.use_deterministic_algorithms(True)` (`index_add` sums)",
    "option": "with `deterministic=True`",
}


def _row(b: Backend) -> tuple[str, ...]:
    kls = "all" if b.kl_variants == KL_MODES else ", ".join(map(str, b.kl_variants))
    return (f"`{b.name}`", b.summary, ", ".join(DEVICES[d] for d in b.devices), "yes" if b.needs_triton else "no",
            kls, "yes" if b.grad_filter else f"refused: {b.why_not('grad_filter_eps')}",
            _DETERMINISM[b.deterministic],
            "yes" if b.log_collision else "refused", "yes" if b.float64 else "refused")


def markdown_table() -> str:
    """The backend table of the docs (Markdown): one row per backend of ``TABLE``, plus ``auto``."""
    rows = [_COLUMNS, ("---",) * len(_COLUMNS)]
    rows.append(("`auto`", AUTO_SUMMARY, *("" for _ in _COLUMNS[2:])))
    rows += [_row(b) for b in TABLE.values()]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def help_text() -> str:
    """One sentence per backend, for ``--help`` and docstrings."""
    parts = [f"'auto' ({AUTO_SUMMARY})"]
    parts += [f"'{b.name}' ({b.summary.split(' (`')[0]})" for b in TABLE.values()]
    return "; ".join(parts).replace("`", "")
