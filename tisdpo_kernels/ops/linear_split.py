"""Vocabulary-split LM head (``backend="split"``): label log-probs, optional two-model KL, fwd + bwd.

Computes what ``linear_logprobs.py`` / ``linear_kl.py`` compute (per-row ``logps``, ``lse`` and, with a
reference head, ``ref_logps`` and the token KL of docs/design.md §1.3) one vocabulary split of ``S``
columns at a time, with the large products on the vendor GEMM and the elementwise work in one Triton pass:

- forward, per split ``s`` (and per row chunk when ``n x S`` alone passes the scratch cap):
  ``z = H W_s^T`` (fp32 accumulate, fp32 result), then ``_split_stats_kernel`` merges the split into
  per-row statistics (online max / sum of exp, label logit, KL accumulator; with ``token_stats`` the
  entropy's ``sum exp(z - m) z`` and the max before the label, docs/design.md §4). Only ``[n]`` vectors
  survive between splits.
- backward, per split: recompute ``z`` (and the reference's ``z_ref`` with a KL mode), one
  ``_split_dz_kernel`` pass forms ``dz = g (onehot - p)`` plus the KL term (TIS ``g_kl p (log p - log q -
  KL)``, TDPO ``g_kl (p - q)``) in the input dtype, then ``dH += dz W_s`` into one fp32 ``[n, D]``
  buffer and ``dW[s] = dz^T H`` accumulated in fp32 and rounded once to the output dtype (``dbias[s]``
  likewise). No fp32 ``[V, D]`` buffer, no atomics: every output element is written by one GEMM or one
  program in a fixed order, so the gradients are bit-reproducible by construction (``deterministic`` is
  free).

GEMMs (``GEMM_ROUTES``, one route per call, ``split_backend`` names it): ``torch.mm`` / ``torch.addmm``
(cuBLAS on CUDA) with ``out_dtype=torch.float32`` for fp16/bf16 operands where the installed torch
supports it on the device (``torch.mm`` and ``torch.addmm`` probed apart, once per device; torch >= 2.8 on
CUDA): the logits come out of the tensor cores in fp32 without a bf16 rounding, ``dH`` accumulates in
fp32 in place, and ``dW[s]`` is formed in fp32 (in the split's logits scratch, free by then) and rounded
once, so no GEMM reduces in bf16 whatever ``allow_bf16_reduced_precision_reduction`` says. Where only
``addmm(out_dtype)`` is refused, the accumulations run as ``mm(out_dtype)`` into that scratch plus
``add_`` (same memory, one more fp32 pass over each block). Only where ``mm(out_dtype)`` itself is missing
(CPU, torch < 2.8 on CUDA) are the operands upcast to fp32 per GEMM -- correct, slower, and beyond the
scratch cap (a warning says by how much on CUDA). Why cuBLAS and not a Triton GEMM with the elementwise
work in its epilogue: cuBLAS reaches the measured GEMM ceiling at these shapes on Hopper without any
tuning of ours, the fp32 logits round trip it costs is bounded (see ``benchmarks/README.md``, "byte
count"), and it keeps this file free of a second GEMM to maintain; the epilogue variant stays an option
once GPU figures exist.

fp32 inputs on CUDA: this path never sets a torch flag (a process-wide flag flipped inside the loss
would change other threads' matmuls and be baked into a CUDA-graph capture; torch has no per-call or
thread-local TF32 switch). It reads the process's cuBLAS setting with the API the installed torch has
(``torch.backends.cuda.matmul.fp32_precision`` from torch 2.9, ``allow_tf32`` before) and only for fp32
operands: ``fp32_precision="tf32"`` runs the fp32 GEMMs as the process says (TF32 if it allows it,
which torch does not by default); ``"ieee"`` guarantees full-precision products: where the process
allows TF32 they are computed in fp64 and rounded to fp32 (fp64 tensor cores run at the fp32 FFMA rate
on H100/H200; the fp64 operand copies pass the scratch cap).

Scratch: per call at most ``scratch_bytes`` (default ``_config.SPLIT_SCRATCH_BYTES``) for the split's
logits, ``dz`` and, when rows are chunked, one fp32 ``[S, D]`` weight-gradient accumulator; plus the fp32
``[n, D]`` ``dH`` accumulator and ``[n]`` statistics; the scratch is freed before ``dH`` is cast to the
input dtype. ``split_plan`` picks ``S`` (a multiple of ``SPLIT_COLUMN_MULTIPLE``, preferably at least
``SPLIT_PREFERRED_COLUMNS``) and the row chunk from the cap. Offsets in the kernels are 64-bit.
Elementwise work runs in Triton on CUDA and under ``TRITON_INTERPRET=1``; on plain CPU tensors the same
algorithm runs with torch elementwise ops (``elementwise="torch"``), so this backend runs anywhere.

The autograd Functions are ``_common.head_functions`` around ``split_forward`` / ``split_backward`` (the same
two classes as the all-Triton kernels'), the input checks ``_common.py``'s.

Tested in ``tests/kernels/test_linear_split.py`` (interpreter, fp32/fp16/bf16 against ``reference.py``,
determinism, the scratch cap at 2 x 4096 tokens), ``tests/kernels/test_split_precision.py`` (GEMM routes,
flags, dW precision), ``tests/kernels/test_linear_split_memory.py`` (bytes at the Llama-3-8B head) and
through the full loss in ``tests/kernels/test_loss_triton.py``; compiled for sm_90a in
``tests/kernels/test_gpu_compile.py``. Not yet run on a GPU.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    TOKEN_KL_CODES,
    ForwardStats,
    RefHead,
    check_head,
    check_precision,
    check_ref_head,
    head_functions,
    top1_from_maxima,
    unit_stride,
)
from ._config import (
    SPLIT_COLUMN_MULTIPLE,
    SPLIT_MAX_COLUMNS,
    SPLIT_MIN_CHUNK_ROWS,
    SPLIT_PREFERRED_COLUMNS,
    SPLIT_SCRATCH_BYTES,
    interpreting,
    split_tiles,
)
from ._jit import offsets64

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _split_stats_kernel(
    # this split's fp32 logits [rows, cols] (contiguous); the reference's with a KL mode; biases [V]
    z_ptr, zr_ptr, b_ptr, rb_ptr, labels_ptr,
    # per-row running statistics [n] fp32, read and updated in place; with TOKEN_STATS also
    # sum_v exp(z - m) z (rescaled with s) and the max logit over the columns before the label
    m_ptr, s_ptr, label_ptr, rm_ptr, rs_ptr, ref_label_ptr, acc_ptr, xs_ptr, mb_ptr,
    # where the block sits: rows [row0, row0 + rows) of n, columns [v0, v0 + cols) of V
    rows, cols, row0, v0,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, KL_MODE: tl.constexpr, TOKEN_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program = BLOCK_R rows: fold this split's columns into the rows' online log-sum-exp statistics."""
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = local < rows
    rows_g = row0 + local
    labels = tl.load(labels_ptr + rows_g, mask=row_mask, other=-1).to(tl.int32)  # < V < 2**31
    m = tl.load(m_ptr + rows_g, mask=row_mask, other=float("-inf"))
    s = tl.load(s_ptr + rows_g, mask=row_mask, other=0.0)
    label_logit = tl.load(label_ptr + rows_g, mask=row_mask, other=0.0)
    if KL_MODE != 0:
        rm = tl.load(rm_ptr + rows_g, mask=row_mask, other=float("-inf"))
        rs = tl.load(rs_ptr + rows_g, mask=row_mask, other=0.0)
        ref_label_logit = tl.load(ref_label_ptr + rows_g, mask=row_mask, other=0.0)
        acc = tl.load(acc_ptr + rows_g, mask=row_mask, other=0.0)
    if TOKEN_STATS:
        xs = tl.load(xs_ptr + rows_g, mask=row_mask, other=0.0)
        mb = tl.load(mb_ptr + rows_g, mask=row_mask, other=float("-inf"))
    base = offsets64(local, cols)[:, None]  # rows x cols passes 2**31 at large caps
    for c0 in range(0, cols, BLOCK_S):
        c = c0 + tl.arange(0, BLOCK_S)
        col_mask = c < cols
        mask = row_mask[:, None] & col_mask[None, :]
        z = tl.load(z_ptr + base + c[None, :], mask=mask, other=0.0)
        if HAS_BIAS:
            z += tl.load(b_ptr + v0 + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        hit = (v0 + c)[None, :] == labels[:, None]
        label_logit += tl.sum(tl.where(hit & mask, z, 0.0), 1)
        z_lse = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_lse, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # masked rows: keep exp() finite
        scale = tl.exp(m - m_safe)
        e = tl.exp(z_lse - m_safe[:, None])  # 0 where masked
        s = s * scale + tl.sum(e, 1)
        m = m_new
        if TOKEN_STATS:  # entropy = lse - xs / s; the label is the argmax iff label >= m and label > mb
            xs = xs * scale + tl.sum(e * tl.where(mask, z, 0.0), 1)
            before = mask & ((v0 + c)[None, :] < labels[:, None])
            mb = tl.maximum(mb, tl.max(tl.where(before, z, float("-inf")), 1))
        if KL_MODE != 0:
            zr = tl.load(zr_ptr + base + c[None, :], mask=mask, other=0.0)
            if HAS_REF_BIAS:
                zr += tl.load(rb_ptr + v0 + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            ref_label_logit += tl.sum(tl.where(hit & mask, zr, 0.0), 1)
            zr_lse = tl.where(mask, zr, float("-inf"))
            rm_new = tl.maximum(rm, tl.max(zr_lse, 1))
            rm_safe = tl.where(rm_new == float("-inf"), 0.0, rm_new)
            ref_scale = tl.exp(rm - rm_safe)
            er = tl.exp(zr_lse - rm_safe[:, None])
            rs = rs * ref_scale + tl.sum(er, 1)
            rm = rm_new
            diff = z - zr  # finite; e and er are 0 where masked
            if KL_MODE == 1:  # A = sum_v exp(z - m) (z - z_ref); KL = A/S - lse + lse_ref
                acc = acc * scale + tl.sum(e * diff, 1)
            else:  # A = sum_v exp(z_ref - m_ref) (z_ref - z); KL = A/S_ref - lse_ref + lse
                acc = acc * ref_scale - tl.sum(er * diff, 1)
    tl.store(m_ptr + rows_g, m, mask=row_mask)
    tl.store(s_ptr + rows_g, s, mask=row_mask)
    tl.store(label_ptr + rows_g, label_logit, mask=row_mask)
    if KL_MODE != 0:
        tl.store(rm_ptr + rows_g, rm, mask=row_mask)
        tl.store(rs_ptr + rows_g, rs, mask=row_mask)
        tl.store(ref_label_ptr + rows_g, ref_label_logit, mask=row_mask)
        tl.store(acc_ptr + rows_g, acc, mask=row_mask)
    if TOKEN_STATS:
        tl.store(xs_ptr + rows_g, xs, mask=row_mask)
        tl.store(mb_ptr + rows_g, mb, mask=row_mask)


@triton.jit
def _split_dz_kernel(
    # this split's fp32 logits [rows, cols] (and the reference's); biases [V]; labels [n]
    z_ptr, zr_ptr, b_ptr, rb_ptr, labels_ptr,
    # saved per-row statistics and upstream gradients, each [n] fp32
    lse_ptr, g_ptr, ref_lse_ptr, kl_ptr, gk_ptr,
    # outputs: dz [rows, cols] in the input dtype (may alias z_ptr for fp32 inputs: same element, same
    # program); with HAS_DB the fp32 column sums of this tile's dz, [row tiles, cols]
    dz_ptr, db_ptr,
    rows, cols, row0, v0,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, KL_MODE: tl.constexpr, HAS_GRAD_KL: tl.constexpr,
    HAS_DB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program = one [BLOCK_R, BLOCK_S] tile: ``dz = g (onehot - p)`` (+ the KL term), written once; the
    bias gradient's partial sums come from the fp32 ``dz`` (before its rounding to the input dtype)."""
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = local < rows
    col_mask = c < cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows_g = row0 + local
    offs = offsets64(local, cols)[:, None] + c[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        z += tl.load(b_ptr + v0 + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    labels = tl.load(labels_ptr + rows_g, mask=row_mask, other=-1).to(tl.int32)
    g = tl.load(g_ptr + rows_g, mask=row_mask, other=0.0)
    logp = z - tl.load(lse_ptr + rows_g, mask=row_mask, other=0.0)[:, None]
    p = tl.where(mask, tl.exp(logp), 0.0)
    hit = (v0 + c)[None, :] == labels[:, None]
    dz = tl.where(hit, g[:, None], 0.0) - g[:, None] * p
    if HAS_GRAD_KL:
        gk = tl.load(gk_ptr + rows_g, mask=row_mask, other=0.0)[:, None]
        zr = tl.load(zr_ptr + offs, mask=mask, other=0.0)
        if HAS_REF_BIAS:
            zr += tl.load(rb_ptr + v0 + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        logq = zr - tl.load(ref_lse_ptr + rows_g, mask=row_mask, other=0.0)[:, None]
        if KL_MODE == 1:  # d KL(p||q) / dz = p (log p - log q - KL)
            token_kl = tl.load(kl_ptr + rows_g, mask=row_mask, other=0.0)[:, None]
            dz += gk * p * (logp - logq - token_kl)
        else:  # d KL(q||p) / dz = p - q
            dz += gk * (p - tl.where(mask, tl.exp(logq), 0.0))
    dz = tl.where(mask, dz, 0.0)  # a column past this split may hold a label of the next one
    # explicit round-to-nearest-even: the GPU default, but the interpreter truncates fp32 -> bf16 without it
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    if HAS_DB:
        tl.store(db_ptr + offsets64(tl.program_id(0), cols) + c, tl.sum(dz, 0), mask=col_mask)


# ----------------------------------------------------------------------------------------------
# plan, GEMMs and the torch elementwise twin (plain CPU)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitParams:
    """Non-tensor options of one call, passed through ``Function.apply``.

    ``kl_mode``: 0, 1 (tis) or 2 (tdpo). ``scratch_bytes``: cap of the split buffers (None: the default).
    ``fp32_precision``: ``"tf32"`` or ``"ieee"`` GEMMs for fp32 inputs on CUDA. ``elementwise``:
    ``"triton"`` or ``"torch"`` for the fused elementwise pass (None: Triton on CUDA and under the
    interpreter, torch on plain CPU tensors). ``token_stats``: also the policy's entropy and is-top-1 per row.
    """

    kl_mode: int = 0
    scratch_bytes: int | None = None
    fp32_precision: str = "tf32"
    elementwise: str | None = None
    token_stats: bool = False


@dataclass(frozen=True)
class SplitPlan:
    """``rows`` per chunk and ``cols`` (S) per vocabulary split; ``chunked``: rows do not fit in one chunk."""

    rows: int
    cols: int
    chunked: bool


def scratch_bytes_per_element(dtype: torch.dtype, kl: bool, bias: bool = False) -> int:
    """Scratch bytes per (row, column) of a split: fp32 logits (x2 with the reference head), ``dz`` in the
    input dtype (none for fp32 inputs: ``dz`` overwrites the logits in place) and, with a bias, 1 byte
    for the fp32 per-tile column sums of ``dz`` (one row per ``dz`` tile of at least 16 rows: <= 4/16)."""
    return 4 * (2 if kl else 1) + (0 if dtype == torch.float32 else torch.finfo(dtype).bits // 8) + int(bias)


def split_plan(n: int, vocab: int, dim: int, dtype: torch.dtype, kl: bool, cap: int,
               bias: bool = False) -> SplitPlan:
    """Split width ``S`` (a multiple of ``SPLIT_COLUMN_MULTIPLE``, at most ``SPLIT_MAX_COLUMNS``) and rows per
    chunk such that the split buffers, plus the fp32 ``[S, D]`` weight-gradient accumulator once rows are
    chunked, fit ``cap``. First choice that fits: all rows at the widest ``S >= SPLIT_PREFERRED_COLUMNS``;
    ``S = SPLIT_PREFERRED_COLUMNS`` with balanced row chunks of at least ``SPLIT_MIN_CHUNK_ROWS``; all rows
    at a narrower ``S``; one ``SPLIT_COLUMN_MULTIPLE`` split with row chunks."""
    per = scratch_bytes_per_element(dtype, kl, bias)
    unit = SPLIT_COLUMN_MULTIPLE
    n = max(n, 1)
    widest = min(SPLIT_MAX_COLUMNS, triton.cdiv(max(vocab, 1), unit) * unit)
    whole = min(widest, cap // (n * per) // unit * unit)
    preferred = min(SPLIT_PREFERRED_COLUMNS, widest)
    if whole >= preferred:
        return SplitPlan(rows=n, cols=whole, chunked=False)
    rows = _chunk_rows(n, preferred, dim, per, cap)
    if rows >= SPLIT_MIN_CHUNK_ROWS:
        return SplitPlan(rows=rows, cols=preferred, chunked=True)
    if whole >= unit:
        return SplitPlan(rows=n, cols=whole, chunked=False)
    rows = _chunk_rows(n, unit, dim, per, cap)
    if rows < 1:
        raise ValueError(f"scratch_bytes={cap} is too small for one {unit}-column split at D={dim} "
                         f"(needs at least {unit * (dim * 4 + per)} bytes)")
    return SplitPlan(rows=rows, cols=unit, chunked=rows < n)


def _chunk_rows(n: int, cols: int, dim: int, per: int, cap: int) -> int:
    """Rows per chunk of ``cols``-column splits under ``cap`` (beside the fp32 ``[cols, D]`` accumulator),
    balanced over the chunks that ``n`` rows then need; < 1 when not even one row fits."""
    most = (cap - cols * dim * 4) // (cols * per)
    return most if most < 1 else triton.cdiv(n, triton.cdiv(n, most))


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every scratch buffer of this path comes from here (the tests count what it hands out)."""
    return torch.empty(shape, dtype=dtype, device=device)


# How a call's GEMMs run, by route name (``gemm_route``; printed by ``split_backend`` and the benchmarks).
GEMM_ROUTES = {
    "out_dtype": "torch.mm/addmm(out_dtype=float32) on the half-precision operands (cuBLAS on CUDA)",
    "mm_out_dtype+add": "torch.mm(out_dtype=float32) on the half-precision operands; this torch refuses "
                        "torch.addmm(out_dtype=float32), so dH/dW accumulate through the split's fp32 logits "
                        "scratch plus add_ (no extra memory, one more fp32 pass per block)",
    "upcast": "half-precision operands upcast to fp32 per GEMM (no torch.mm(out_dtype=float32) here: CPU, or "
              "torch < 2.8 on CUDA); correct, slower, beyond the scratch cap",
    "fp32": "fp32 torch.mm (CPU)",
    "fp32-tf32": "fp32 torch.mm on TF32 tensor cores, as the process's cuBLAS setting allows (no flag set here)",
    "fp32-ieee": "fp32 torch.mm in full precision, as the process's cuBLAS setting says (no flag set here; "
                 "fp32_precision='tf32' cannot turn TF32 on without a process-wide flag)",
    "fp64": "fp32 operands multiplied in fp64 and rounded to fp32: fp32_precision='ieee' while the process "
            "allows TF32 (no flag set here; fp64 operand copies beyond the scratch cap)",
}


def _probe_out_dtype(device: torch.device, op: str) -> str | None:
    """Why ``torch.mm`` (``op="mm"``) or ``torch.addmm`` (``op="addmm"``) with ``out_dtype=torch.float32`` fails
    for bf16 operands on ``device``; None when it works (right values, meta: right shape)."""
    if device.type not in ("cuda", "meta"):
        return f"no out_dtype GEMMs on {device.type}"
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
        out = torch.ones(16, 16, dtype=torch.float32, device=device)
        if op == "mm":
            torch.mm(a, a, out_dtype=torch.float32, out=out)
        else:
            torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if device.type == "cuda" and not bool((out == (16 if op == "mm" else 17)).all()):
        return f"torch.{op}(out_dtype=float32) gave wrong values"
    return None


@functools.cache
def _out_dtype_supported(device: torch.device) -> str:
    """The half-precision GEMM route on ``device``: ``"out_dtype"``, ``"mm_out_dtype+add"`` (only
    ``addmm(out_dtype)`` refused) or ``"upcast"``; probed once per device, a CUDA fallback says what it costs."""
    mm_refused = _probe_out_dtype(device, "mm")
    addmm_refused = None if mm_refused else _probe_out_dtype(device, "addmm")
    if mm_refused:
        route, why = "upcast", (f"torch {torch.__version__} has no torch.mm(out_dtype=float32) for bf16 on {device} "
                                f"({mm_refused}): each half-precision GEMM copies its operands to fp32, per split "
                                "the hidden rows (4*n*D bytes: 256 MiB at n=16384, D=4096), the split's weights "
                                "(4*S*D) and dz (4*n*S), beyond the scratch cap, and runs in fp32/TF32 (slower)")
    elif addmm_refused:
        route, why = "mm_out_dtype+add", (f"torch {torch.__version__} refuses torch.addmm(out_dtype=float32) on "
                                          f"{device} ({addmm_refused}): dH and dW accumulate as torch.mm(out_dtype="
                                          "float32) into the split's fp32 logits scratch plus add_ (no extra "
                                          "memory; one more fp32 read and write of each [n, D] block per split)")
    else:
        return "out_dtype"
    if device.type == "cuda":
        warnings.warn(f"backend='split': {why}", stacklevel=3)
    return route


def _process_fp32_precision() -> str:
    """``"tf32"`` or ``"ieee"``: what the process's cuBLAS setting makes of an fp32 ``torch.mm`` on CUDA, read
    with the API the installed torch has (reading the legacy ``allow_tf32`` raises on torch >= 2.9 once the
    new API was used, e.g. ``torch.backends.fp32_precision = "tf32"``); never set."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision  # torch >= 2.9; "none" inherits the generic setting
    except AttributeError:
        return "tf32" if matmul.allow_tf32 else "ieee"
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if precision == "tf32" else "ieee"


def _fp32_matmul(device: torch.device, precision: str) -> str:
    """The route of fp32-operand GEMMs on ``device`` for ``fp32_precision=precision``: ``"fp32"`` off CUDA,
    else ``"fp32-tf32"`` / ``"fp32-ieee"`` (``torch.mm`` as the process's flag says) or ``"fp64"`` (``"ieee"``
    asked while the process allows TF32). Reads the flag, sets none (see the module docstring)."""
    if device.type != "cuda":
        return "fp32"
    process = _process_fp32_precision()
    if precision == "ieee" and process == "tf32":
        return "fp64"
    return f"fp32-{process}"


def gemm_route(device: torch.device, dtype: torch.dtype, fp32_precision: str = "tf32") -> str:
    """The ``GEMM_ROUTES`` name of a call's GEMMs for ``dtype`` operands on ``device``; precision flags are
    read for fp32 operands on CUDA only."""
    if dtype == torch.float32:
        return _fp32_matmul(device, fp32_precision)
    return _out_dtype_supported(device)


def split_backend(device: torch.device, dtype: torch.dtype, fp32_precision: str = "tf32") -> str:
    """How the GEMMs run for ``dtype`` operands on ``device``: ``"<route>: <what it means>"`` (logs, benchmarks)."""
    route = gemm_route(device, dtype, fp32_precision)
    return f"{route}: {GEMM_ROUTES[route]}"


def _mm_f32(a, b, out, route):
    """``out = a @ b`` in fp32 (``out`` fp32, contiguous) along ``route``."""
    if route == "fp64":
        return out.copy_(torch.mm(a.double(), b.double()))
    if route == "upcast":
        return torch.mm(a.float(), b.float(), out=out)
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def _mm_pieces(a, b, scratch, route):
    """``a @ b`` in fp32 through the flat fp32 ``scratch``, one piece at a time: yields ``(rows, cols, piece)``
    (slices of the ``[m, k]`` product and the piece, a view of ``scratch`` valid until the next one)."""
    m, k, room = a.shape[0], b.shape[1], scratch.numel()
    step_r, step_c = max(1, min(m, room // k)), min(k, room)
    for r0 in range(0, m, step_r):
        r1 = min(r0 + step_r, m)
        for c0 in range(0, k, step_c):
            c1 = min(c0 + step_c, k)
            piece = _mm_f32(a[r0:r1], b[:, c0:c1], scratch[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0), route)
            yield slice(r0, r1), slice(c0, c1), piece


def _addmm_f32(acc, a, b, route, scratch):
    """``acc += a @ b`` with ``acc`` fp32; ``scratch``: flat fp32 room of the ``"mm_out_dtype+add"`` route."""
    if route == "out_dtype":
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    if route == "mm_out_dtype+add":
        for rows, cols, piece in _mm_pieces(a, b, scratch, route):
            acc[rows, cols].add_(piece)
        return acc
    if route == "fp64":
        return acc.add_(torch.mm(a.double(), b.double()))
    if route == "upcast":
        return acc.addmm_(a.float(), b.float())
    return acc.addmm_(a, b)


def _mm_rounded(out, a, b, route, scratch):
    """``out = a @ b`` for a half-precision ``out``: formed in fp32 through ``scratch`` and rounded once, so
    the GEMM never reduces in bf16/fp16 (``allow_bf16_reduced_precision_reduction`` is on by default)."""
    for rows, cols, piece in _mm_pieces(a, b, scratch, route):
        out[rows, cols] = piece


def _use_triton(params: SplitParams, device: torch.device) -> bool:
    if params.elementwise is not None:
        return params.elementwise == "triton"
    return device.type == "cuda" or interpreting()


def _online_lse_step(z, st, m_key, s_key, label_key, lab, inside, rows, split_max=None):
    """One split of the online log-sum-exp and label gather for the logits ``z`` (policy or reference), in
    place on ``st[m_key] / st[s_key] / st[label_key]`` at ``rows``; returns ``(exp(z - new max), rescale)``.
    ``split_max``: ``z.max(1).values`` when the caller has it."""
    st[label_key][rows] += torch.where(inside, z.gather(1, lab.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)
    m_new = torch.maximum(st[m_key][rows], z.max(1).values if split_max is None else split_max)
    scale = torch.exp(st[m_key][rows] - m_new)
    e = torch.exp(z - m_new[:, None])
    st[s_key][rows] = st[s_key][rows] * scale + e.sum(1)
    st[m_key][rows] = m_new
    return e, scale


def _stats_torch(z, zr, b, rb, labels, st, r0, v0, kl_mode):
    """The torch twin of ``_split_stats_kernel`` (plain CPU tensors); the token statistics when ``st`` holds
    ``"xs"`` and ``"arg"``. Its top-1 state is the running first argmax (a column index) rather than the
    kernel's max before the label: ``torch.max`` gives the split's first maximum and its index in the pass the
    log-sum-exp makes anyway, and a later split takes over only with a strictly larger maximum."""
    r1, cols = r0 + z.shape[0], z.shape[1]
    rows = slice(r0, r1)
    if b is not None:
        z = z + b[v0:v0 + cols].float()
    lab = labels[rows] - v0
    inside = (lab >= 0) & (lab < cols)
    if "xs" not in st:
        e, scale = _online_lse_step(z, st, "m", "s", "label", lab, inside, rows)
    else:  # entropy = lse - xs / s; the label is the argmax iff it is the running first argmax
        split_max, split_arg = z.max(1)
        st["arg"][rows] = torch.where(split_max > st["m"][rows], split_arg + v0, st["arg"][rows])
        e, scale = _online_lse_step(z, st, "m", "s", "label", lab, inside, rows, split_max)
        st["xs"][rows] = st["xs"][rows] * scale + (e * z).sum(1)  # not a batched GEMV: see chunked._token_stats
    if kl_mode:
        if rb is not None:
            zr = zr + rb[v0:v0 + cols].float()
        er, ref_scale = _online_lse_step(zr, st, "rm", "rs", "ref_label", lab, inside, rows)
        if kl_mode == 1:
            st["acc"][rows] = st["acc"][rows] * scale + (e * (z - zr)).sum(1)
        else:
            st["acc"][rows] = st["acc"][rows] * ref_scale - (er * (z - zr)).sum(1)


def _dz_torch(z, zr, b, rb, labels, lse, g, ref_lse, token_kl, gk, dz, r0, v0, kl_mode, db=None):
    """The torch twin of ``_split_dz_kernel`` (plain CPU tensors)."""
    r1, cols = r0 + z.shape[0], z.shape[1]
    if b is not None:
        z = z + b[v0:v0 + cols].float()
    logp = z - lse[r0:r1, None]
    p = torch.exp(logp)
    out = -g[r0:r1, None] * p
    lab = labels[r0:r1] - v0
    inside = (lab >= 0) & (lab < cols)
    out.scatter_add_(1, lab.clamp(0, cols - 1)[:, None], torch.where(inside, g[r0:r1], 0.0)[:, None])
    if gk is not None:
        if rb is not None:
            zr = zr + rb[v0:v0 + cols].float()
        logq = zr - ref_lse[r0:r1, None]
        if kl_mode == 1:
            out += gk[r0:r1, None] * p * (logp - logq - token_kl[r0:r1, None])
        else:
            out += gk[r0:r1, None] * (p - torch.exp(logq))
    dz.copy_(out)
    if db is not None:
        torch.sum(out, 0, out=db)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _plan(params: SplitParams, hidden, weight, bias) -> SplitPlan:
    cap = SPLIT_SCRATCH_BYTES if params.scratch_bytes is None else params.scratch_bytes
    return split_plan(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype, params.kl_mode != 0, cap,
                      bias is not None)


def _blocks(n_rows, vocab, plan):
    """``(r0, r1, v0, v1)`` of every (row chunk, split), splits outer: a split's weights are read once."""
    for v0 in range(0, vocab, plan.cols):
        for r0 in range(0, n_rows, plan.rows):
            yield r0, min(r0 + plan.rows, n_rows), v0, min(v0 + plan.cols, vocab)


def split_forward(hidden, weight, bias, labels, params: SplitParams, ref: RefHead | None = None) -> ForwardStats:
    """Forward launcher: per-row ``logps`` and ``lse`` (plus ``ref_logps``, ``ref_lse`` and the token KL with
    ``ref``; the entropy and is-top-1 with ``params.token_stats``), each ``[n]`` fp32 (bool), one vocabulary
    split at a time."""
    n, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
    kl = params.kl_mode != 0
    if n == 0:
        return ForwardStats.empty(dev, kl, params.token_stats)
    names = ("m", "s", "label", "rm", "rs", "ref_label", "acc") if kl else ("m", "s", "label")
    plan = _plan(params, hidden, weight, bias)
    use_triton = _use_triton(params, dev)
    if params.token_stats:  # top-1 state: the max before the label (kernel) or the first argmax (torch twin)
        names += ("xs", "mb" if use_triton else "arg")
    st = {k: _alloc((n,), torch.int64 if k == "arg" else torch.float32, dev) for k in names}
    for k in names:
        st[k].fill_(float("-inf") if k in ("m", "rm", "mb") else 0.0)
    zbuf = _alloc((plan.rows * plan.cols,), torch.float32, dev)
    zrbuf = _alloc((plan.rows * plan.cols,), torch.float32, dev) if kl else None
    tiles = split_tiles(plan.cols)
    route = gemm_route(dev, hidden.dtype, params.fp32_precision)
    for r0, r1, v0, v1 in _blocks(n, vocab, plan):
        z = _mm_f32(hidden[r0:r1], weight[v0:v1].T, zbuf[:(r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0), route)
        zr = None
        if kl:
            zr = _mm_f32(ref.hidden[r0:r1], ref.weight[v0:v1].T,
                         zrbuf[:(r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0), route)
        if use_triton:
            _split_stats_kernel[(triton.cdiv(r1 - r0, tiles.stats_rows),)](
                z, z if zr is None else zr, _or(bias, z), _or(ref.bias if kl else None, z), labels,
                st["m"], st["s"], st["label"], *((st["rm"], st["rs"], st["ref_label"], st["acc"]) if kl
                                                 else (st["m"],) * 4),
                *((st["xs"], st["mb"]) if params.token_stats else (st["m"],) * 2),
                r1 - r0, v1 - v0, r0, v0,
                HAS_BIAS=bias is not None, HAS_REF_BIAS=kl and ref.bias is not None, KL_MODE=params.kl_mode,
                TOKEN_STATS=params.token_stats,
                BLOCK_R=tiles.stats_rows, BLOCK_S=tiles.stats_cols, num_warps=tiles.stats_warps,
            )
        else:
            _stats_torch(z, zr, bias, ref.bias if kl else None, labels, st, r0, v0, params.kl_mode)
    lse = st["m"] + torch.log(st["s"])
    token_stats = {}
    if params.token_stats:
        top1 = top1_from_maxima(st["label"], st["m"], st["mb"]) if use_triton else st["arg"] == labels
        token_stats = dict(entropy=lse - st["xs"] / st["s"], is_top1=top1)
    if not kl:
        return ForwardStats(st["label"] - lse, lse, **token_stats)
    ref_lse = st["rm"] + torch.log(st["rs"])
    if params.kl_mode == 1:  # KL(p||q) = A/S - lse + lse_ref
        token_kl = st["acc"] / st["s"] - lse + ref_lse
    else:  # KL(q||p) = A/S_ref - lse_ref + lse
        token_kl = st["acc"] / st["rs"] - ref_lse + lse
    return ForwardStats(st["label"] - lse, lse, st["ref_label"] - ref_lse, ref_lse, token_kl, **token_stats)


def _or(t, placeholder):
    return placeholder if t is None else t


def split_backward(hidden, weight, bias, labels, lse, grad_logps, params: SplitParams, needs=(True, True, True),
                   ref: RefHead | None = None, ref_lse=None, token_kl=None, grad_kl=None):
    """Backward launcher: ``(d_hidden, d_weight, d_bias)`` in the input dtype (None where not needed).

    ``grad_logps`` / ``grad_kl``: upstream ``[n]`` gradients (None = zero); with a KL mode ``ref``,
    ``ref_lse`` and ``token_kl`` come from the forward. Atomic-free, bit-reproducible.
    """
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    n, d = hidden.shape
    vocab, dev = weight.shape[0], hidden.device
    has_grad_kl = params.kl_mode != 0 and grad_kl is not None
    active = n > 0 and (grad_logps is not None or has_grad_kl)
    d_hidden = _alloc((n, d), torch.float32, dev).zero_() if need_h else None
    # outputs, contiguous whatever the inputs' strides: every row of dW is written once below
    d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if need_w else None
    d_bias = torch.empty_like(bias) if need_b else None
    if not active:
        if d_weight is not None:
            d_weight.zero_()
        if d_bias is not None:
            d_bias.zero_()
        return (None if d_hidden is None else d_hidden.to(hidden.dtype), d_weight, d_bias)
    zeros = _alloc((n,), torch.float32, dev).zero_()  # placeholder of absent upstream gradients
    g = zeros if grad_logps is None else grad_logps.to(torch.float32).contiguous()
    gk = grad_kl.to(torch.float32).contiguous() if has_grad_kl else None
    _backward_splits(hidden, weight, bias, labels, lse, g, gk, zeros, params, ref, ref_lse, token_kl,
                     d_hidden, d_weight, d_bias)
    # the split scratch is gone by now: the cast's [n, D] result does not stack on it
    return (None if d_hidden is None else d_hidden.to(hidden.dtype), d_weight, d_bias)


def _backward_splits(hidden, weight, bias, labels, lse, g, gk, zeros, params, ref, ref_lse, token_kl,
                     d_hidden, d_weight, d_bias):
    """The backward's split loop: fills the fp32 ``d_hidden`` accumulator, ``d_weight`` and ``d_bias`` (each
    None where not needed); its scratch lives only here. ``gk``: the KL's upstream gradient or None."""
    n, d = hidden.shape
    vocab, dev = weight.shape[0], hidden.device
    has_grad_kl, kl = gk is not None, params.kl_mode != 0
    plan = _plan(params, hidden, weight, bias)
    zbuf = _alloc((plan.rows * plan.cols,), torch.float32, dev)
    zrbuf = _alloc((plan.rows * plan.cols,), torch.float32, dev) if has_grad_kl else None
    same = hidden.dtype == torch.float32
    dzbuf = zbuf if same else _alloc((plan.rows * plan.cols,), hidden.dtype, dev)
    w_acc = _alloc((plan.cols, d), torch.float32, dev) if (d_weight is not None and plan.chunked) else None
    b_acc = _alloc((plan.cols,), torch.float32, dev) if d_bias is not None else None
    use_triton = _use_triton(params, dev)
    tiles = split_tiles(plan.cols)
    db_rows = triton.cdiv(plan.rows, tiles.dz_rows) if use_triton else 1
    db_part = _alloc((db_rows * plan.cols,), torch.float32, dev) if d_bias is not None else None
    route = gemm_route(dev, hidden.dtype, params.fp32_precision)
    # half-precision inputs: dz has its own buffer, so the logits' (zbuf) is free once dz is formed and
    # serves the fp32 pieces of the dW GEMM and of the "mm_out_dtype+add" accumulations
    for r0, r1, v0, v1 in _blocks(n, vocab, plan):
        rows, cols = r1 - r0, v1 - v0
        first, last = r0 == 0, r1 == n
        z = _mm_f32(hidden[r0:r1], weight[v0:v1].T, zbuf[:rows * cols].view(rows, cols), route)
        zr = None
        if has_grad_kl:
            zr = _mm_f32(ref.hidden[r0:r1], ref.weight[v0:v1].T, zrbuf[:rows * cols].view(rows, cols), route)
        dz = dzbuf[:rows * cols].view(rows, cols)
        if use_triton:
            grid = (triton.cdiv(rows, tiles.dz_rows), triton.cdiv(cols, tiles.dz_cols))
            _split_dz_kernel[grid](
                z, _or(zr, z), _or(bias, z), _or(ref.bias if kl else None, z), labels,
                lse, g, _or(ref_lse, zeros), _or(token_kl, zeros), _or(gk, zeros), dz, _or(db_part, zeros),
                rows, cols, r0, v0,
                HAS_BIAS=bias is not None, HAS_REF_BIAS=kl and ref.bias is not None, KL_MODE=params.kl_mode,
                HAS_GRAD_KL=has_grad_kl, HAS_DB=d_bias is not None, BLOCK_R=tiles.dz_rows, BLOCK_S=tiles.dz_cols,
                num_warps=tiles.dz_warps,
            )
        else:
            _dz_torch(z, zr, bias, ref.bias if kl else None, labels, lse, g, ref_lse, token_kl, gk, dz, r0, v0,
                      params.kl_mode, None if db_part is None else db_part[:cols])
        if d_hidden is not None:
            _addmm_f32(d_hidden[r0:r1], dz, weight[v0:v1], route, zbuf)
        if d_weight is not None:
            if not plan.chunked:  # all rows in this block: dW[s] written once, in the output dtype
                if same:
                    _mm_f32(dz.T, hidden, d_weight[v0:v1], route)
                else:
                    _mm_rounded(d_weight[v0:v1], dz.T, hidden, route, zbuf)
            else:
                acc = w_acc[:cols]
                if first:
                    acc.zero_()
                _addmm_f32(acc, dz.T, hidden[r0:r1], route, zbuf)
                if last:
                    d_weight[v0:v1].copy_(acc)
        if d_bias is not None:
            part = db_part[:grid[0] * cols].view(grid[0], cols).sum(0) if use_triton else db_part[:cols]
            if first:
                b_acc[:cols].copy_(part)
            else:
                b_acc[:cols] += part
            if last:
                d_bias[v0:v1].copy_(b_acc[:cols])


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


SplitLinearLogprobsFunction, SplitLinearKLFunction = head_functions("SplitLinear", split_forward, split_backward)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def _params(kl_mode, scratch_bytes, fp32_precision, elementwise, token_stats=False) -> SplitParams:
    check_precision(fp32_precision)
    if not isinstance(token_stats, bool):
        raise TypeError(f"token_stats must be a bool, got {type(token_stats).__name__}")
    if scratch_bytes is not None and (not isinstance(scratch_bytes, int) or scratch_bytes < 1):
        raise ValueError(f"scratch_bytes must be a positive int or None, got {scratch_bytes!r}")
    if elementwise not in (None, "triton", "torch"):
        raise ValueError(f"elementwise must be None, 'triton' or 'torch', got {elementwise!r}")
    return SplitParams(kl_mode, scratch_bytes, fp32_precision, elementwise, token_stats)


def split_linear_logprobs(hidden, weight, labels, bias=None, *, scratch_bytes=None, fp32_precision="tf32",
                          elementwise=None, token_stats=False):
    """Label log-probs of response rows, one vocabulary split at a time (no ``[n, V]`` logits).

    Plain-torch equivalent::

        torch.log_softmax((hidden @ weight.T + bias).float(), -1).gather(1, labels[:, None])[:, 0]

    Args:
        hidden: ``[n, D]`` fp32/fp16/bf16; weight ``[V, D]`` same dtype and device; bias ``[V]`` or None.
        labels: ``[n]`` int64 in ``[0, V)`` (not checked here: the caller validates).
        scratch_bytes: cap of the split buffers (None: ``_config.SPLIT_SCRATCH_BYTES``).
        fp32_precision: ``"tf32"`` (default) or ``"ieee"`` GEMMs for fp32 inputs on CUDA.
        elementwise: ``"triton"`` / ``"torch"`` for the fused elementwise pass (None: automatic).
        token_stats: also return, without gradient, each row's entropy (``[n]`` float32) and whether its label is
            the argmax (``[n]`` bool, the first index winning ties), computed in the same splits.
    Returns:
        ``[n]`` float32, differentiable w.r.t. hidden, weight and bias (gradients in their dtype); with
        ``token_stats`` ``(logps, entropy, is_top1)``.
    """
    check_head(hidden, weight, bias, labels, triton_device=False)  # plain CPU tensors run the torch twin
    params = _params(0, scratch_bytes, fp32_precision, elementwise, token_stats)
    return SplitLinearLogprobsFunction.apply(hidden, weight, unit_stride(bias), labels.contiguous(), params)


def split_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, bias=None, ref_bias=None, *,
                    scratch_bytes=None, fp32_precision="tf32", elementwise=None, token_stats=False):
    """``(logps, ref_logps, token_kl)``, each ``[n]`` float32, one vocabulary split at a time.

    The maths and arguments of ``linear_kl.triton_linear_kl`` (``mode`` ``"tis"``: ``KL(pi_theta || pi_ref)``,
    ``"tdpo"``: ``KL(pi_ref || pi_theta)``; the reference head is a constant) plus ``scratch_bytes``,
    ``fp32_precision``, ``elementwise`` and ``token_stats`` (the policy's, appended) as in
    :func:`split_linear_logprobs`.
    """
    if mode not in ("tis", "tdpo"):
        raise ValueError(f"mode must be 'tis' or 'tdpo', got {mode!r}")
    check_head(hidden, weight, bias, labels, triton_device=False)  # plain CPU tensors run the torch twin
    check_head(ref_hidden, ref_weight, ref_bias, prefix="ref_", triton_device=False)
    check_ref_head(hidden, weight, ref_hidden, ref_weight)
    params = _params(TOKEN_KL_CODES[mode], scratch_bytes, fp32_precision, elementwise, token_stats)
    ref_bias = unit_stride(None if ref_bias is None else ref_bias.detach())
    return SplitLinearKLFunction.apply(hidden, weight, unit_stride(bias), labels.contiguous(), ref_hidden.detach(),
                                       ref_weight.detach(), ref_bias, params)
