"""The prepared GPU check: ``benchmarks/gpu_check.sh OUT_DIR`` (or ``python -m benchmarks.gpu_check OUT_DIR``).

On a fresh, offline GPU machine (peers' wheels from ``benchmarks/fetch_gpu_wheels.sh``), in at most 8
minutes, and ending in one verdict. Every step runs in its own process under its own timeout, so a hang or
a sticky CUDA error (an illegal address poisons its process's CUDA context) costs only that step; after
every step ``OUT_DIR/summary.{json,md}`` are rewritten, and ``bench.json`` after every row, so a timeout
keeps what was measured.

1. ``preflight`` (<= 60 s): device, library versions and a digest of the sources (no git needed); the
   TFLOP/s of the split path's three GEMMs as it runs them at the Llama-3-8B head (logits
   ``[N, D] x [D, S]`` into fp32, ``dH += [N, S] x [S, D]`` into fp32, ``dW_s = [S, N] x [N, D]`` formed in
   fp32) against a square 8192^3 bf16 GEMM, the copy GB/s, the GEMM route (which ``out_dtype`` fallback,
   if any: ``ops/linear_split.GEMM_ROUTES``) and the precision-flag check: a split forward+backward
   after ``torch.backends.fp32_precision = "tf32"`` (what transformers sets for ``tf32=True``), bf16 and fp32.
2. ``bench``: one process per row (``ROWS``): the split rows first, then the peers, then the all-Triton
   rows. Head D=4096, V=128256, 2 x 8192 response tokens, bf16; forward and backward timed apart (median
   of 5 after one warm-up), peak extra memory and the gradients' bytes, the GEMM rate of the logits-shaped
   ``[N, D] x [D, V]`` bf16 GEMM measured in the same process (the floor's rate), the GEMM route.
   Same work for every provider: the same inputs (padded ``[2, T, D]``, ragged prompts), the reference
   either precomputed (per-token log-probs given: ours, Liger's fused linear cross entropy, CCE, and
   Liger's fused linear DPO without a reference model, whose reference term is then a constant) or run
   inside (the reference head's forward in the loss: ours and Liger's DPO with its reference model).
3. ``tests``: ``pytest tests/kernels -m gpu``.

The verdict (``VERDICT_FIELDS``): forward, backward and total ms of ``backend="split"``; x the 8·N·D·V
floor at the in-run GEMM rate; speedups against Liger's fused linear cross entropy and DPO and CCE (exact,
``filter_eps=None``, and its default ``"high"``) on the same work, both times given; ``kl="tisdpo"`` over
the plain loss; extra memory net of gradients; the GEMM route; PASS/MISS per target (``TARGETS``).

``--smoke``: the same steps on CPU at a tiny shape (``benchmarks/test_gpu_check.py``, CI): the peers,
the GPU memory and the targets then read ``n/a (no CUDA)``, every field still there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = "n/a (no CUDA)"

# Seconds: the preflight, each bench row, the bench rows together, the tests. With the parent's start-up and
# the wheel install they stay under the 480 s of gpu_check.sh; the tests' 130 s cover the ~70 cold Triton
# compiles of the gpu-marked kernel tests (they were given 100 s).
LIMITS = {"preflight": 60, "row": 75, "bench": 250, "tests": 130}
SMOKE_LIMITS = {"preflight": 150, "row": 150, "bench": 600, "tests": 150}

# Targets (H200, the Llama-3-8B head, 2 x 8192 tokens, bf16).
TARGETS = {"floor": 1.15, "vs_liger": 1.2, "extra_gib": 0.5, "kl_ratio": 1.5}


@dataclass(frozen=True)
class Row:
    """One bench row: ``provider`` (ours: ``tisdpo_<backend>``; peers by name), the ``reference``
    (``"precomputed"`` or ``"inside"``), the KL mode (None: no KL term), and its place (``group``)."""

    name: str
    provider: str
    reference: str = "precomputed"
    kl: str | None = None
    group: str = "split"


ROWS = (
    Row("split", "tisdpo_split"),
    Row("split-ref-inside", "tisdpo_split", "inside"),
    Row("split-kl-tisdpo", "tisdpo_split", "inside", "tisdpo"),
    Row("split-kl-tdpo1", "tisdpo_split", "inside", "tdpo1"),
    Row("liger-flce", "liger_flce", group="peers"),
    Row("cce-exact", "cce_exact", group="peers"),
    Row("cce-default", "cce_default", group="peers"),
    Row("liger-dpo", "liger_dpo", group="peers"),
    Row("liger-dpo-ref-inside", "liger_dpo", "inside", group="peers"),
    Row("naive", "naive", group="peers"),
    Row("naive-kl-tisdpo", "naive", "inside", "tisdpo", group="peers"),
    Row("triton", "tisdpo_triton", group="triton"),
    Row("triton-kl-tisdpo", "tisdpo_triton", "inside", "tisdpo", group="triton"),
    Row("triton-kl-tdpo1", "tisdpo_triton", "inside", "tdpo1", group="triton"),
)
SMOKE_ROWS = tuple(r for r in ROWS if r.provider in ("tisdpo_split", "naive")) + (
    Row("torch", "tisdpo_torch", group="torch"),
    Row("torch-kl-tisdpo", "tisdpo_torch", "inside", "tisdpo", group="torch"),
)

# The verdict block, one line each, in this order (benchmarks/test_gpu_check.py checks they all print).
VERDICT_FIELDS = (
    "device", "shape", "forward ms", "backward ms", "total ms", "x floor",
    "vs Liger fused linear cross entropy", "vs CCE exact", "vs CCE default", "vs Liger fused linear DPO",
    "vs Liger fused linear DPO, reference inside", "kl=tisdpo / plain", "extra memory net of gradients",
    "GEMM route", "target fwd+bwd <= 1.15x floor", "target >= 1.2x faster than Liger",
    "target extra memory <= 0.5 GiB", "target kl=tisdpo <= 1.5x plain",
)
PREFLIGHT_FIELDS = (
    "device", "versions", "sources", "square GEMM", "logits GEMM", "dH GEMM", "dW GEMM", "copy",
    "GEMM route", "precision flags",
)


def _case(smoke: bool):
    import torch

    from .shapes import HEADS, Case

    if smoke:
        return Case(HEADS["smoke"], 40, "random", torch.float32)
    return Case(HEADS["llama3-8b"], 8192, "random", torch.bfloat16)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up (synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def source_digest() -> str:
    """sha256 (16 hex digits) over the library, benchmark and kernel-test sources: which code ran, without git."""
    digest = hashlib.sha256()
    for folder in ("tisdpo_kernels", "benchmarks", "tests/kernels"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# steps (each in its own process: python -m benchmarks.gpu_check --step NAME OUT_DIR)
# ----------------------------------------------------------------------------------------------


def _split_gemms(case, device) -> dict:
    """TFLOP/s of the split path's three GEMMs at one split of the default plan, run by its own helpers."""
    import torch

    from tisdpo_kernels.ops import linear_split as ls
    from tisdpo_kernels.ops._config import SPLIT_SCRATCH_BYTES

    n, d, v = case.num_response_tokens, case.head.hidden_size, case.head.vocab_size
    dtype = case.dtype
    plan = ls.split_plan(n, v, d, dtype, False, SPLIT_SCRATCH_BYTES)
    rows, cols = plan.rows, min(plan.cols, v)
    route = ls.gemm_route(device, dtype)
    h = torch.randn(rows, d, device=device, dtype=dtype)
    w = torch.randn(cols, d, device=device, dtype=dtype)
    dz = torch.randn(rows, cols, device=device, dtype=dtype)
    z = torch.empty(rows, cols, device=device, dtype=torch.float32)
    acc = torch.zeros(rows, d, device=device, dtype=torch.float32)
    dw = torch.empty(cols, d, device=device, dtype=dtype)
    half = dtype != torch.float32

    def dw_gemm():
        if half:
            ls._mm_rounded(dw, dz.T, h, route, z.view(-1))
        else:
            ls._mm_f32(dz.T, h, dw, route)

    gemms = {"logits GEMM": (lambda: ls._mm_f32(h, w.T, z, route), rows, cols, d),
             "dH GEMM": (lambda: ls._addmm_f32(acc, dz, w, route, z.view(-1)), rows, d, cols),
             "dW GEMM": (dw_gemm, cols, d, rows)}
    out = {}
    for name, (fn, m, nn, k) in gemms.items():
        seconds = _seconds(fn, device, repeats=10)
        out[name] = {"shape": f"[{m}, {k}] x [{k}, {nn}]", "tflops": 2 * m * nn * k / seconds / 1e12}
    return out


def _precision_flag_check(device) -> dict:
    """One split forward+backward after the new precision API was used (bf16; fp32 under "tf32" and "ieee"),
    and the routes the flags give; the flag is restored afterwards (this process ends anyway)."""
    import torch

    from tisdpo_kernels.ops import linear_split as ls

    result = {"api": "torch.backends.fp32_precision" if hasattr(torch.backends, "fp32_precision") else
              "legacy torch.backends.cuda.matmul.allow_tf32 only"}
    before = getattr(torch.backends, "fp32_precision", None)
    if before is not None:
        torch.backends.fp32_precision = "tf32"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee")):
            key = f"{str(dtype).removeprefix('torch.')} {precision}"
            try:
                h = torch.randn(300, 64, device=device, generator=gen).to(dtype).requires_grad_()
                w = torch.randn(1000, 64, device=device, generator=gen).to(dtype).requires_grad_()
                y = torch.randint(0, 1000, (300,), device=device, generator=gen)
                out = ls.split_linear_logprobs(h, w, y, fp32_precision=precision)
                out.sum().backward()
                _sync(device)
                result[key] = f"ok, route {ls.gemm_route(device, dtype, precision)}"
            except Exception as exc:  # noqa: BLE001 - the point is to report it
                result[key] = f"error: {str(exc).splitlines()[0][:200]}"
        result["fp32 routes on CUDA"] = {p: ls._fp32_matmul(torch.device("cuda"), p) for p in ("tf32", "ieee")}
    finally:
        if before is not None:
            torch.backends.fp32_precision = before
    return result


def step_preflight(smoke: bool) -> dict:
    import torch

    from tisdpo_kernels.ops import linear_split as ls

    from .env import bench_device, device_name, library_versions, measured_gemm_tflops

    device = bench_device()
    case = _case(smoke)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        route = ls.split_backend(device, case.dtype)
    square = 8192 if device.type == "cuda" else 256
    result = {"device": device_name(device), "versions": library_versions(), "sources": source_digest(),
              "shape": {"N": case.num_response_tokens, "D": case.head.hidden_size, "V": case.head.vocab_size,
                        "dtype": str(case.dtype).removeprefix("torch.")},
              "gemm_dtype": "bfloat16" if device.type == "cuda" else "float32",
              "square GEMM": {"shape": f"[{square}]^3", "tflops": measured_gemm_tflops(square, square, square, device)},
              **_split_gemms(case, device), "GEMM route": route, "route warnings": [str(w.message) for w in caught]}
    size = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    result["copy_gb_per_s"] = 2 * size / _seconds(lambda: dst.copy_(src), device, repeats=10) / 1e9
    result["precision flags"] = _precision_flag_check(device)
    return result


def _executed_flops(row: Row, n: int, d: int, v: int) -> int:
    """FLOPs a recompute design executes for the row's work: 8·N·D·V (logits, recomputed logits, dH, dW), the
    reference head's forward 2·N·D·V more when it runs inside, and 12·N·D·V with a KL (formed twice)."""
    return (12 if row.kl else 10 if row.reference == "inside" else 8) * n * d * v


def _model_flops(row: Row, n: int, d: int, v: int) -> int:
    """Model FLOPs: 6·N·D·V for the policy head, +2·N·D·V when the reference head runs inside."""
    return (8 if row.kl or row.reference == "inside" else 6) * n * d * v


def _loss_fn(row: Row, inputs):
    """The closure computing the row's scalar loss on ``inputs``."""
    from .providers import BETA, IGNORE_INDEX, PROVIDERS, weighted_pair_loss

    if row.provider.startswith("tisdpo_"):
        from tisdpo_kernels import fused_tis_dpo_loss

        ref = (dict(ref_hidden=inputs.ref_hidden, ref_weight=inputs.ref_weight, kl=row.kl)
               if row.reference == "inside" else dict(ref_logps=inputs.ref_logps))
        return lambda: fused_tis_dpo_loss(inputs.hidden, inputs.weight, inputs.labels,
                                          token_weights=inputs.token_weights, beta=BETA,
                                          backend=row.provider.removeprefix("tisdpo_"), **ref)[0]
    if row.provider.startswith("cce_"):
        from cut_cross_entropy import linear_cross_entropy

        kwargs = {"filter_eps": None} if row.provider == "cce_exact" else {}

        def cce():
            nll = linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels, ignore_index=IGNORE_INDEX,
                                       reduction="none", **kwargs)
            return weighted_pair_loss(inputs, -nll.reshape(-1)[inputs.row_index])

        return cce
    if row.provider == "liger_dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        inside = row.reference == "inside"
        fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, use_ref_model=inside)
        ref = dict(ref_input=inputs.ref_hidden, ref_weight=inputs.ref_weight) if inside else {}
        return lambda: fn(inputs.weight, inputs.hidden, inputs.labels, **ref)[0]
    return PROVIDERS[row.provider].build(inputs, "tisdpo_kl" if row.kl else "tisdpo")


def _unavailable(row: Row, device) -> str | None:
    from .providers import PROVIDERS, _missing

    if row.provider in PROVIDERS:
        return PROVIDERS[row.provider].unavailable(device)
    if device.type != "cuda":
        return NO_CUDA
    return _missing("cut_cross_entropy" if row.provider.startswith("cce_") else "liger_kernel")


def step_row(row: Row, smoke: bool) -> dict:
    """Time one row in this process: forward and backward apart, peak extra memory, the in-run GEMM rate."""
    import torch

    from .env import bench_device, measured_gemm_tflops
    from .memory import cuda_peak_extra_bytes, is_out_of_memory
    from .providers import make_inputs

    device = bench_device()
    case = _case(smoke)
    n, d, v = case.num_response_tokens, case.head.hidden_size, case.head.vocab_size
    result = {**asdict(row), "model_flops": _model_flops(row, n, d, v),
              "executed_flops": _executed_flops(row, n, d, v)}
    reason = _unavailable(row, device)
    if reason:
        return {**result, "status": "unavailable", "reason": reason}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if row.provider.startswith("tisdpo_split"):
                from tisdpo_kernels.ops.linear_split import split_backend

                result["gemm_route"] = split_backend(device, case.dtype)
            inputs = make_inputs(case, "tisdpo_kl" if row.reference == "inside" else "tisdpo", device)
            loss_fn = _loss_fn(row, inputs)
            fwd, bwd = [], []
            for i in range(2 if smoke else 6):  # the first round warms up (compilation, autotuning)
                inputs.zero_grad()
                _sync(device)
                t0 = time.perf_counter()
                loss = loss_fn()
                _sync(device)
                t1 = time.perf_counter()
                loss.backward()
                _sync(device)
                if i:
                    fwd.append(t1 - t0)
                    bwd.append(time.perf_counter() - t1)
            result["grad_bytes"] = sum(t.numel() * t.element_size() for t in (inputs.hidden, inputs.weight))
            result["peak_extra_bytes"] = (cuda_peak_extra_bytes(lambda: loss_fn().backward(), inputs.zero_grad)
                                          if device.type == "cuda" else None)
            result["gemm_tflops"] = measured_gemm_tflops(n, v, d, device)  # this process's rate, after the row
        result["warnings"] = sorted({str(w.message).splitlines()[0][:300] for w in caught})
    except Exception as exc:  # noqa: BLE001 - out of memory is a result; anything else too, with its message
        return {**result, "status": "OOM" if is_out_of_memory(exc) else "error",
                "reason": str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}
    total = statistics.median(fwd) + statistics.median(bwd)
    floor = result["executed_flops"] / (result["gemm_tflops"] * 1e12)
    return {**result, "status": "ok", "forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
            "total_s": total, "floor_s": floor, "vs_floor": total / floor,
            "executed_tflops": result["executed_flops"] / total / 1e12,
            "model_tflops": result["model_flops"] / total / 1e12}


def step_tests(smoke: bool) -> dict:
    # the GPU-marked kernel tests; in smoke mode (CPU) one fast kernel test file proves the step runs
    target = ["tests/kernels/test_linear_split.py", "-k", "plan or bad_options"] if smoke else \
        ["tests/kernels", "-m", "gpu"]
    proc = subprocess.run([sys.executable, "-m", "pytest", *target, "-q", "-p", "no:cacheprovider"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {"returncode": proc.returncode, "summary": tail, "output_tail": proc.stdout[-6000:] + proc.stderr[-2000:]}


STEPS = {"preflight": step_preflight, "tests": step_tests}


# ----------------------------------------------------------------------------------------------
# the verdict (pure: from the rows' JSON)
# ----------------------------------------------------------------------------------------------


def _ok(rows: dict, name: str) -> dict | None:
    row = rows.get(name)
    return row if row and row.get("status") == "ok" else None


def _why(rows: dict, name: str, smoke: bool) -> str:
    row = rows.get(name)
    if smoke and (row is None or row.get("status") == "unavailable"):
        return NO_CUDA
    if row is None:
        return "n/a (not run: no time left or not in this run)"
    return f"n/a ({row['status']}: {row.get('reason', '')[:120]})"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _tflops(value: float) -> str:
    return f"{value:.1f} TFLOP/s" if value >= 10 else f"{value:.3g} TFLOP/s"


def _speedup(rows: dict, ours: str, peer: str, smoke: bool) -> tuple[str, float | None]:
    a, b = _ok(rows, ours), _ok(rows, peer)
    if a is None:
        return _why(rows, ours, smoke), None
    if b is None:
        return _why(rows, peer, smoke), None
    ratio = b["total_s"] / a["total_s"]
    return (f"{ratio:.2f}x (ours {_ms(a['total_s'])}, {b['provider']} {_ms(b['total_s'])}; reference "
            f"{a['reference']})"), ratio


def _pass(value: float | None, ok: bool, detail: str, smoke: bool, missing: str) -> str:
    if smoke:
        return NO_CUDA
    if value is None:
        return f"n/a ({missing})"
    return f"{'PASS' if ok else 'MISS'} ({detail})"


def verdict(rows: dict, preflight: dict, smoke: bool) -> dict:
    """``VERDICT_FIELDS`` -> text, from the rows by name (``bench.json``) and the preflight."""
    out = dict.fromkeys(VERDICT_FIELDS, "n/a")
    out["device"] = preflight.get("device", "n/a (preflight did not finish)")
    shape = preflight.get("shape")
    out["shape"] = (f"N={shape['N']} response tokens, D={shape['D']}, V={shape['V']}, {shape['dtype']}" if shape
                    else "n/a (preflight did not finish)")
    head = _ok(rows, "split")
    if head is None:
        for key in ("forward ms", "backward ms", "total ms", "x floor"):
            out[key] = _why(rows, "split", False)
    else:
        out["forward ms"], out["backward ms"] = _ms(head["forward_s"]), _ms(head["backward_s"])
        out["total ms"] = f"{_ms(head['total_s'])} (backend='split', reference precomputed, no KL)"
        out["x floor"] = (f"{head['vs_floor']:.2f}x the 8·N·D·V floor ({_ms(head['floor_s'])} at "
                          f"{_tflops(head['gemm_tflops'])}, the [N, D] x [D, V] GEMM measured in the same run)")
    liger = []
    for key, peer, ours in (("vs Liger fused linear cross entropy", "liger-flce", "split"),
                            ("vs CCE exact", "cce-exact", "split"), ("vs CCE default", "cce-default", "split"),
                            ("vs Liger fused linear DPO", "liger-dpo", "split"),
                            ("vs Liger fused linear DPO, reference inside", "liger-dpo-ref-inside",
                             "split-ref-inside")):
        text, ratio = _speedup(rows, ours, peer, smoke)
        note = {"vs CCE exact": "filter_eps=None", "vs CCE default": "filter_eps='high'",
                "vs Liger fused linear DPO": "no reference model: its reference term is a constant"}.get(key)
        out[key] = text + (f"; {note}" if note else "")
        if peer.startswith("liger") and ratio is not None:
            liger.append(ratio)
    kl, plain = _ok(rows, "split-kl-tisdpo"), head
    kl_ratio = kl["total_s"] / plain["total_s"] if kl and plain else None
    out["kl=tisdpo / plain"] = (f"{kl_ratio:.2f}x ({_ms(kl['total_s'])} with the reference head inside, over "
                                f"{_ms(plain['total_s'])})" if kl_ratio else _why(rows, "split-kl-tisdpo", False))
    extra = None
    if head is not None and head.get("peak_extra_bytes") is not None:
        extra = (head["peak_extra_bytes"] - head["grad_bytes"]) / 2**30
        out["extra memory net of gradients"] = (f"{extra:.3f} GiB (peak {head['peak_extra_bytes'] / 2**30:.3f} "
                                                f"GiB minus the gradients' {head['grad_bytes'] / 2**30:.3f} GiB)")
    else:
        out["extra memory net of gradients"] = NO_CUDA if smoke or head is not None else _why(rows, "split", False)
    route = (head or {}).get("gemm_route") or preflight.get("GEMM route")
    out["GEMM route"] = route or "n/a (neither the split row nor the preflight finished)"
    out["target fwd+bwd <= 1.15x floor"] = _pass(
        head and head["vs_floor"], bool(head) and head["vs_floor"] <= TARGETS["floor"],
        f"{head['vs_floor']:.2f}x" if head else "", smoke, "no split row")
    worst = min(liger) if liger else None
    out["target >= 1.2x faster than Liger"] = _pass(
        worst, worst is not None and worst >= TARGETS["vs_liger"],
        f"slowest margin {worst:.2f}x over {len(liger)} Liger comparison(s)" if worst else "", smoke,
        "no Liger comparison finished")
    out["target extra memory <= 0.5 GiB"] = _pass(extra, extra is not None and extra <= TARGETS["extra_gib"],
                                                  f"{extra:.3f} GiB" if extra is not None else "", smoke,
                                                  "no memory figure")
    out["target kl=tisdpo <= 1.5x plain"] = _pass(kl_ratio, kl_ratio is not None and kl_ratio <= TARGETS["kl_ratio"],
                                                  f"{kl_ratio:.2f}x" if kl_ratio else "", smoke, "no KL row")
    return out


def _block(title: str, fields: dict) -> str:
    width = max(len(k) for k in fields)
    return "\n".join([f"== {title} ==", *(f"{k:<{width}} : {v}" for k, v in fields.items()), ""])


def preflight_fields(pre: dict) -> dict:
    """``PREFLIGHT_FIELDS`` -> text."""
    if "precision flags" not in pre:  # written last: the step did not finish
        return dict.fromkeys(PREFLIGHT_FIELDS, f"n/a ({pre.get('step_error', 'did not finish')})")
    square = pre["square GEMM"]["tflops"]
    out = {"device": pre["device"], "versions": ", ".join(f"{k} {v}" for k, v in pre["versions"].items()),
           "sources": f"sha256 {pre['sources']} (tisdpo_kernels, benchmarks, tests/kernels)",
           "square GEMM": f"{_tflops(square)} {pre['gemm_dtype']} {pre['square GEMM']['shape']}"}
    for key in ("logits GEMM", "dH GEMM", "dW GEMM"):
        g = pre[key]
        out[key] = f"{_tflops(g['tflops'])} {g['shape']} ({g['tflops'] / square:.2f}x the square GEMM)"
    out["copy"] = f"{pre['copy_gb_per_s']:.0f} GB/s (read + write)"
    out["GEMM route"] = pre["GEMM route"] + "".join(f"; warning: {w}" for w in pre["route warnings"])
    out["precision flags"] = "; ".join(f"{k}: {v}" for k, v in pre["precision flags"].items())
    return out


def _markdown(results: dict) -> str:
    lines = ["# GPU check", "", "```", _block("preflight", preflight_fields(results.get("preflight", {}))), "```", ""]
    rows = results.get("bench", {}).get("rows", [])
    if rows:
        lines += ["| row | provider | reference | kl | forward ms | backward ms | total ms | x floor | peak extra MiB "
                  "| net of grads MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['name']} | {r['provider']} | {r['reference']} | {r['kl']} | {r['status']}: "
                             f"{r.get('reason', '')[:80]} | | | | | |")
                continue
            peak = r["peak_extra_bytes"]
            mib = ("", "") if peak is None else (f"{peak / 2**20:.0f}", f"{(peak - r['grad_bytes']) / 2**20:.0f}")
            lines.append(f"| {r['name']} | {r['provider']} | {r['reference']} | {r['kl']} | "
                         f"{r['forward_s'] * 1e3:.1f} | {r['backward_s'] * 1e3:.1f} | {r['total_s'] * 1e3:.1f} | "
                         f"{r['vs_floor']:.2f} | {mib[0]} | {mib[1]} |")
        lines.append("")
    tests = results.get("tests", {})
    if "summary" in tests:
        lines += [f"GPU kernel tests: {tests['summary']} (exit {tests['returncode']}).", ""]
    for name, r in results.items():
        if isinstance(r, dict) and "step_error" in r:
            lines.append(f"Step `{name}` failed: {r['step_error']}")
    if "verdict" in results:
        lines += ["", "```", _block("verdict", results["verdict"]), "```"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def _spawn(args: list[str], out: Path, log_name: str, limit: float, smoke: bool) -> str | None:
    """Run ``python -m benchmarks.gpu_check ARGS OUT`` under ``limit`` seconds; None or what went wrong."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                       if p)}
    if smoke:
        env["TISDPO_BENCH_DEVICE"] = "cpu"
    if limit <= 1:
        return "skipped: no time left"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", *args, str(out)] + (["--smoke"] if smoke else [])
    with open(out / log_name, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
        except subprocess.TimeoutExpired:
            return f"timed out after {limit:.0f} s (see {log_name})"
    return None if proc.returncode == 0 else f"exit {proc.returncode} (see {log_name})"


def _write(out: Path, name: str, data) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))
    tmp.replace(out / name)  # never a half-written file, whenever this process is killed


def run_all(out: Path, smoke: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    limits = SMOKE_LIMITS if smoke else LIMITS
    results: dict = {}

    def save():
        results["verdict"] = verdict({r["name"]: r for r in results.get("bench", {}).get("rows", [])},
                                     results.get("preflight", {}), smoke)
        _write(out, "summary.json", results)
        _write(out, "summary.md", _markdown(results))

    def step(name: str) -> None:
        t0 = time.perf_counter()
        error = _spawn(["--step", name], out, f"{name}.log", limits[name], smoke)
        path = out / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.exists() else {}
        if error:
            results[name]["step_error"] = error
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        save()

    step("preflight")
    print(_block("preflight", preflight_fields(results["preflight"])), flush=True)
    bench = results["bench"] = {"rows": []}
    deadline = time.perf_counter() + limits["bench"]
    for row in SMOKE_ROWS if smoke else ROWS:
        t0 = time.perf_counter()
        error = _spawn(["--row", row.name], out, f"row-{row.name}.log", min(limits["row"], deadline - t0), smoke)
        path = out / f"row-{row.name}.json"
        data = json.loads(path.read_text()) if path.exists() and not error else {**asdict(row), "status": "error"}
        if error:
            data["reason"] = error
        data["wall_s"] = round(time.perf_counter() - t0, 1)
        bench["rows"].append(data)
        _write(out, "bench.json", bench)
        save()
        print(json.dumps({k: data.get(k) for k in ("name", "status", "total_s", "vs_floor", "reason", "wall_s")}),
              flush=True)
    step("tests")
    print(_block("verdict", results["verdict"]), flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the JSON, markdown and logs")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run at a tiny shape (CI)")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--row", choices=sorted({r.name for r in ROWS + SMOKE_ROWS}), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        _write(args.out, f"{args.step}.json", STEPS[args.step](args.smoke))
        return 0
    if args.row:
        row = next(r for r in ROWS + SMOKE_ROWS if r.name == args.row)
        _write(args.out, f"row-{row.name}.json", step_row(row, args.smoke))
        return 0
    results = run_all(args.out, args.smoke)
    failed = [name for name, r in results.items() if isinstance(r, dict) and "step_error" in r]
    failed += [r["name"] for r in results["bench"]["rows"] if r["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
