"""GEMM routes of the split path (``ops/linear_split.py``): precision flags, ``out_dtype`` fallbacks, dW precision
and the split plan's shapes, all on CPU.

- Flags: the route of a CUDA call is a pure function of the device, the dtype and the process's flags, so it
  is checked here with a ``torch.device("cuda")`` object and no GPU. Once the new precision API was used
  (``torch.backends.fp32_precision = "tf32"``: what transformers does for ``tf32=True`` on torch >= 2.9),
  reading the legacy ``torch.backends.cuda.matmul.allow_tf32`` raises "mix of the legacy and new APIs"; the
  route must read no flag for half-precision operands and write none ever.
- Fallbacks: the ``torch.mm`` and ``torch.addmm`` ``out_dtype`` probes are monkeypatched to refuse one or
  both; the CPU then stands in for a CUDA torch with those GEMMs by a wrapper that computes
  ``mm/addmm(out_dtype=float32)`` on CPU tensors in fp32, so every route's pieces and sums are checked
  against the oracle.
- dW precision: a dispatch mode records every GEMM of one forward+backward on ``meta`` tensors (the CUDA
  branch of the probes) with the reduced-precision-reduction flags at call time.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tisdpo_kernels.ops import linear_split
from tisdpo_kernels.ops._config import SPLIT_COLUMN_MULTIPLE, SPLIT_MAX_COLUMNS
from tisdpo_kernels.ops.linear_split import (
    GEMM_ROUTES,
    SplitPlan,
    gemm_route,
    scratch_bytes_per_element,
    split_backend,
    split_linear_kl,
    split_linear_logprobs,
    split_plan,
)
from tisdpo_kernels.reference import reference_linear_logprobs, reference_token_kl

from .helpers import assert_close_to_truth, make_head, upstream_grad

CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it here
NEW_API = hasattr(torch.backends, "fp32_precision")


@pytest.fixture
def new_api_tf32():
    """The process after ``torch.backends.fp32_precision = "tf32"`` (restored afterwards)."""
    if not NEW_API:
        pytest.skip(f"torch {torch.__version__} has no torch.backends.fp32_precision (new in 2.9)")
    before = torch.backends.fp32_precision
    torch.backends.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.fp32_precision = before


@pytest.fixture
def fresh_probe(monkeypatch):
    """A cleared probe cache around the test (routes are cached per device)."""
    linear_split._out_dtype_supported.cache_clear()
    yield
    linear_split._out_dtype_supported.cache_clear()


def _refuse(monkeypatch, *ops):
    """Make the probes refuse ``torch.<op>(out_dtype=float32)`` for each of ``ops`` and accept the others, on
    every device (a stand-in for a CUDA torch that has just those)."""
    def probe(device, op):
        return f"refused in this test ({op})" if op in ops else None

    monkeypatch.setattr(linear_split, "_probe_out_dtype", probe)


# ----------------------------------------------------------------------------------------------
# item: precision flags
# ----------------------------------------------------------------------------------------------


def test_cuda_routes_after_the_new_precision_api(new_api_tf32, monkeypatch, fresh_probe):
    with pytest.raises(RuntimeError, match="mix of the legacy and new"):
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018 - the read that used to crash every CUDA call
    # fp32 operands: the flag is read with the new API; "ieee" under a TF32 process goes through fp64
    assert linear_split._fp32_matmul(CUDA, "tf32") == "fp32-tf32"
    assert linear_split._fp32_matmul(CUDA, "ieee") == "fp64"
    # half-precision operands read no precision flag at all
    monkeypatch.setattr(linear_split, "_probe_out_dtype", lambda device, op: None)

    def no_flag_read():
        raise AssertionError("a precision flag was read for half-precision operands")

    monkeypatch.setattr(linear_split, "_process_fp32_precision", no_flag_read)
    for dtype in (torch.bfloat16, torch.float16):
        for precision in ("tf32", "ieee"):
            assert gemm_route(CUDA, dtype, precision) == "out_dtype"
    assert torch.backends.fp32_precision == "tf32"  # and nothing was changed
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_routes_never_write_a_flag(monkeypatch):
    def refuse_write(*args):
        raise AssertionError(f"a process-wide precision flag was written: {args}")

    monkeypatch.setattr(torch._C, "_set_cublas_allow_tf32", refuse_write)
    if hasattr(torch._C, "_set_fp32_precision_setter"):
        monkeypatch.setattr(torch._C, "_set_fp32_precision_setter", refuse_write)
    for precision in ("tf32", "ieee"):
        route = linear_split._fp32_matmul(CUDA, precision)
        assert route in GEMM_ROUTES and route.startswith("fp")
        assert route in split_backend(CUDA, torch.float32, precision)


def test_default_process_runs_ieee_and_off_cuda_nothing_is_read(monkeypatch):
    assert linear_split._process_fp32_precision() == "ieee"  # torch's default: no TF32 for matmuls
    assert linear_split._fp32_matmul(CUDA, "tf32") == "fp32-ieee"
    assert linear_split._fp32_matmul(CUDA, "ieee") == "fp32-ieee"
    monkeypatch.setattr(linear_split, "_process_fp32_precision", lambda: pytest.fail("flag read off CUDA"))
    assert gemm_route(torch.device("cpu"), torch.float32, "ieee") == "fp32"


def test_legacy_flag_where_torch_has_no_new_api(monkeypatch):
    """torch < 2.9: ``torch.backends.cuda.matmul`` has only ``allow_tf32``."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=True))
    assert linear_split._fp32_matmul(CUDA, "tf32") == "fp32-tf32"
    assert linear_split._fp32_matmul(CUDA, "ieee") == "fp64"
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=False))
    assert linear_split._fp32_matmul(CUDA, "ieee") == "fp32-ieee"


def _against_truth(ours, grads, fn, leaves, upstream, reduction, factor):
    """``ours`` (a tuple of outputs) and their ``grads`` w.r.t. ``leaves`` against ``fn`` at the input dtype and in
    float64 (``assert_close_to_truth``)."""
    same = fn(*leaves)
    same_grads = torch.autograd.grad(same, leaves, upstream)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    truth = fn(*l64)
    truth_grads = torch.autograd.grad(truth, l64, [u.double() for u in upstream])
    for name, o, sm, t in zip(("out0", "out1"), ours, same, truth, strict=False):
        assert_close_to_truth(name, o, sm, t, reduction=reduction, factor=factor)
    for name, o, sm, t in zip(("d_hidden", "d_weight", "d_bias"), grads, same_grads, truth_grads, strict=True):
        assert_close_to_truth(name, o, sm, t, reduction=reduction, factor=factor)


def test_fp64_route_gives_ieee_products(monkeypatch, device):
    """The route of ``fp32_precision="ieee"`` under a TF32 process, end to end (forced here: no CUDA)."""
    monkeypatch.setattr(linear_split, "_fp32_matmul", lambda dev, precision: "fp64")
    n, vocab, dim = 29, 300, 24
    hidden, weight, b, labels = make_head(n, vocab, dim, torch.float32, device, seed=21)
    g = upstream_grad(n, device)
    ours = split_linear_logprobs(hidden, weight, labels, b, scratch_bytes=n * 256 * 5, fp32_precision="ieee")
    grads = torch.autograd.grad(ours, (hidden, weight, b), g)
    _against_truth((ours,), grads, lambda h, w, bb: (reference_linear_logprobs(h, w, labels, bias=bb),),
                   (hidden, weight, b), (g,), reduction=n + vocab + dim, factor=2.0)


# ----------------------------------------------------------------------------------------------
# item: out_dtype probes and fallbacks
# ----------------------------------------------------------------------------------------------


def test_probes_are_separate_and_name_the_route(monkeypatch, fresh_probe):
    meta = torch.device("meta")
    assert linear_split._out_dtype_supported(meta) == "out_dtype"
    linear_split._out_dtype_supported.cache_clear()
    _refuse(monkeypatch, "addmm")
    assert linear_split._out_dtype_supported(meta) == "mm_out_dtype+add"
    assert split_backend(meta, torch.bfloat16).startswith("mm_out_dtype+add: ")
    linear_split._out_dtype_supported.cache_clear()
    _refuse(monkeypatch, "mm", "addmm")
    assert linear_split._out_dtype_supported(meta) == "upcast"


def test_cuda_fallback_warnings_name_what_they_cost(monkeypatch, fresh_probe):
    _refuse(monkeypatch, "addmm")
    with pytest.warns(UserWarning, match=r"refuses torch.addmm\(out_dtype=float32\).*no extra memory"):
        assert linear_split._out_dtype_supported(CUDA) == "mm_out_dtype+add"
    linear_split._out_dtype_supported.cache_clear()
    _refuse(monkeypatch, "mm")
    with pytest.warns(UserWarning, match=r"hidden rows \(4\*n\*D bytes: 256 MiB at n=16384, D=4096\)"):
        assert linear_split._out_dtype_supported(CUDA) == "upcast"


class _GemmLog(TorchDispatchMode):
    """Records every GEMM (operand dtypes, result dtype, the reduced-precision flags at call time) and every
    2-D conversion to fp32 of a half-precision tensor (an fp32 copy of a hidden block or a weight split)."""

    GEMMS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self):
        super().__init__()
        self.gemms, self.upcasts = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in self.GEMMS:
            result = out if isinstance(out, torch.Tensor) else out[0]
            operand = [a for a in args if isinstance(a, torch.Tensor)][-1]  # mat2 (addmm's first is the sum)
            self.gemms.append({"op": str(func), "operands": operand.dtype, "result": result.dtype,
                               "bf16_reduced": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
                               "fp16_reduced": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction})
        elif name in ("_to_copy", "to", "copy_") and isinstance(out, torch.Tensor) and out.dim() == 2:
            src = args[1] if name == "copy_" else args[0]
            if out.dtype == torch.float32 and src.dtype in (torch.bfloat16, torch.float16):
                self.upcasts.append(tuple(src.shape))
        return out


def _meta_forward_backward(dtype, kl=None, n=4096, vocab=5000, dim=512, cap=16 * 2**20):
    """One split forward+backward on meta tensors (the torch elementwise twin; GEMMs as on CUDA)."""
    def leaf(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_()

    hidden, weight = leaf(n, dim), leaf(vocab, dim)
    labels = torch.zeros(n, dtype=torch.long, device="meta")
    g = torch.empty(n, device="meta")
    if kl is None:
        out = split_linear_logprobs(hidden, weight, labels, scratch_bytes=cap, elementwise="torch")
        return torch.autograd.grad(out, (hidden, weight), g)
    lp, _, tk = split_linear_kl(hidden, weight, labels, leaf(n, dim).detach(), leaf(vocab, dim).detach(), kl,
                                scratch_bytes=cap, elementwise="torch")
    return torch.autograd.grad((lp, tk), (hidden, weight), (g, g))


@pytest.mark.parametrize("refused", [(), ("addmm",)])
@pytest.mark.parametrize("cap", [16 * 2**20, 3 * 2**20])  # all rows / row chunks
def test_half_precision_gemms_never_upcast_the_hidden_block(refused, cap, monkeypatch, fresh_probe):
    _refuse(monkeypatch, *refused)
    log = _GemmLog()
    with log:
        _meta_forward_backward(torch.bfloat16, cap=cap)
        _meta_forward_backward(torch.bfloat16, kl="tis", cap=cap)
    assert log.gemms and not log.upcasts, log.upcasts
    assert all(g["operands"] == torch.bfloat16 and g["result"] == torch.float32 for g in log.gemms), log.gemms
    if refused:
        assert not any("addmm" in g["op"] for g in log.gemms)


def _emulate_out_dtype_on_cpu(monkeypatch, addmm: bool):
    """``torch.mm`` (and with ``addmm``, ``torch.addmm``) accept ``out_dtype=torch.float32`` for half-precision
    CPU tensors, computed in fp32: the CUDA routes' logic then runs on CPU."""
    mm, addmm_ = torch.mm, torch.addmm

    def fake_mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return mm(a, b) if out is None else mm(a, b, out=out)
        assert out_dtype == torch.float32 and out is not None and out.dtype == torch.float32
        return mm(a.float(), b.float(), out=out)

    def fake_addmm(acc, a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return addmm_(acc, a, b) if out is None else addmm_(acc, a, b, out=out)
        if not addmm:
            raise RuntimeError("addmm(out_dtype) refused in this test")
        assert out is acc
        return acc.addmm_(a.float(), b.float())

    monkeypatch.setattr(torch, "mm", fake_mm)
    monkeypatch.setattr(torch, "addmm", fake_addmm)
    route = "out_dtype" if addmm else "mm_out_dtype+add"
    monkeypatch.setattr(linear_split, "_out_dtype_supported", lambda device: route)
    return route


@pytest.mark.parametrize("layout", ["whole", "chunked", "tiny"])
@pytest.mark.parametrize("addmm", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_out_dtype_routes_match_the_reference(dtype, addmm, layout, monkeypatch):
    """Every piece of the out_dtype routes (dW rounded once from fp32, dH/dW sums through the logits scratch),
    against float64; "tiny": fewer scratch elements than D, so the pieces split columns too."""
    n, vocab, dim = {"whole": (37, 301, 24), "chunked": (37, 301, 24), "tiny": (3, 40, 1000)}[layout]
    per = scratch_bytes_per_element(dtype, True, True)
    cap = {"whole": n * 256 * per, "chunked": 256 * dim * 4 + 10 * 256 * per, "tiny": n * 256 * per}[layout]
    plan = split_plan(n, vocab, dim, dtype, True, cap, True)
    assert plan.chunked == (layout == "chunked") and (layout != "tiny" or plan.rows * plan.cols < dim)
    _emulate_out_dtype_on_cpu(monkeypatch, addmm)
    cpu = torch.device("cpu")
    hidden, weight, b, labels = make_head(n, vocab, dim, dtype, cpu, seed=22)
    ref_hidden, ref_weight, rb, _ = make_head(n, vocab, dim, dtype, cpu, seed=23)
    ref_hidden, ref_weight, rb = ref_hidden.detach(), ref_weight.detach(), rb.detach()
    g, gk = upstream_grad(n, cpu), upstream_grad(n, cpu, torch.Generator().manual_seed(5))
    lp, _, kl = split_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, "tis", b, rb, scratch_bytes=cap,
                                elementwise="torch")
    grads = torch.autograd.grad((lp, kl), (hidden, weight, b), (g, gk))

    def reference(h, w, bb):
        rh, rw, rbb = (t.to(h.dtype) for t in (ref_hidden, ref_weight, rb))
        return (reference_linear_logprobs(h, w, labels, bias=bb),
                reference_token_kl(h, w, rh, rw, bias=bb, ref_bias=rbb, mode="tis"))

    # the factor of tests/kernels/test_linear_split.py for half-precision dz (rounded before the GEMMs)
    _against_truth((lp, kl), grads, reference, (hidden, weight, b), (g, gk), reduction=n + vocab + 2 * dim,
                   factor=3.0)


def test_pieces_cover_the_product():
    a, b = torch.randn(5, 7, dtype=torch.float64).float(), torch.randn(7, 9, dtype=torch.float64).float()
    for room in (4, 9, 20, 45, 100):  # fewer than a row, one row, rows, exactly the product, more
        out = torch.full((5, 9), float("nan"))
        for rows, cols, piece in linear_split._mm_pieces(a, b, torch.empty(room), "fp32"):
            assert piece.numel() <= room
            out[rows, cols] = piece
        torch.testing.assert_close(out, a @ b)


# ----------------------------------------------------------------------------------------------
# item: dW precision
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl", [None, "tis"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cap", [16 * 2**20, 3 * 2**20])
def test_no_gemm_reduces_in_half_precision(dtype, kl, cap, fresh_probe):
    """cuBLAS may split a long K (dW: K = rows) with partial sums in the output dtype while
    ``allow_{bf16,fp16}_reduced_precision_reduction`` is on (torch's default): every GEMM with half-precision
    operands must give an fp32 result, or run with that flag off."""
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction  # torch's default, left alone
    log = _GemmLog()
    with log:
        _meta_forward_backward(dtype, kl=kl, cap=cap)
    key = "bf16_reduced" if dtype == torch.bfloat16 else "fp16_reduced"
    half = [g for g in log.gemms if g["operands"] == dtype]
    assert half and all(g["result"] == torch.float32 or not g[key] for g in half), half


# ----------------------------------------------------------------------------------------------
# item: the split plan's shapes
# ----------------------------------------------------------------------------------------------

LLAMA = (16384, 128256, 4096)


def test_plan_at_the_llama_head_prefers_2048_column_splits():
    n, vocab, dim = LLAMA
    cap = 192 * 2**20
    assert split_plan(n, vocab, dim, torch.bfloat16, False, cap) == SplitPlan(rows=16384, cols=2048, chunked=False)
    # a KL mode or a bias: 2048-column splits over two 8192-row chunks, not 1152 (or 1536) columns of all rows
    assert split_plan(n, vocab, dim, torch.bfloat16, True, cap) == SplitPlan(rows=8192, cols=2048, chunked=True)
    assert split_plan(n, vocab, dim, torch.bfloat16, False, cap, bias=True) == \
        SplitPlan(rows=8192, cols=2048, chunked=True)
    # few rows: narrower splits of all rows rather than thin chunks
    assert split_plan(3000, vocab, dim, torch.bfloat16, True, 32 * 2**20) == \
        SplitPlan(rows=3000, cols=1024, chunked=False)


@pytest.mark.parametrize("seed", range(4))
def test_plan_fits_the_cap_in_256_column_multiples(seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        n, vocab, dim = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in
                         ((1, 70000), (1, 260000), (16, 8193)))
        dtype = (torch.float32, torch.float16, torch.bfloat16)[int(torch.randint(3, (1,), generator=gen))]
        kl, bias = bool(torch.randint(2, (1,), generator=gen)), bool(torch.randint(2, (1,), generator=gen))
        cap = int(2 ** float(torch.empty(1).uniform_(20, 29, generator=gen)))
        per = scratch_bytes_per_element(dtype, kl, bias)
        try:
            plan = split_plan(n, vocab, dim, dtype, kl, cap, bias)
        except ValueError:
            assert cap < SPLIT_COLUMN_MULTIPLE * (dim * 4 + per)
            continue
        case = (n, vocab, dim, dtype, kl, bias, cap, plan)
        assert plan.cols % SPLIT_COLUMN_MULTIPLE == 0 and SPLIT_COLUMN_MULTIPLE <= plan.cols <= SPLIT_MAX_COLUMNS, case
        assert 1 <= plan.rows <= n and plan.chunked == (plan.rows < n), case
        assert plan.rows * plan.cols * per + (plan.cols * dim * 4 if plan.chunked else 0) <= cap, case
        if plan.chunked:  # balanced chunks: the last one is at most one row short
            chunks = -(-n // plan.rows)
            assert n - (chunks - 1) * plan.rows >= plan.rows - chunks, case
