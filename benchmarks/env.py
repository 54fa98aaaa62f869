"""Where the benchmarks run: the device, its bf16 matmul peak, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; matched in order
# against torch.cuda.get_device_name(). TISDPO_BENCH_PEAK_TFLOPS overrides (e.g. for a clocked-down part).
# For context only: no recompute design can show a high fraction of a data-sheet peak (an H200 measured
# 790 of 989 TFLOP/s on the loss's GEMM shapes); benchmarks/gpu_check.py divides by measured_gemm_tflops.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
)

_PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "datasets", "pyarrow", "fsspec",
             "tisdpo", "pytest-benchmark")


def bench_device() -> torch.device:
    """CUDA when available, unless ``TISDPO_BENCH_DEVICE=cpu``."""
    if os.environ.get("TISDPO_BENCH_DEVICE", "").lower() == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    """File-name stem of the results: ``cpu`` or the GPU name (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def measured_gemm_tflops(m: int, n: int, k: int, device: torch.device, dtype=torch.bfloat16,
                         repeats: int = 10) -> float:
    """TFLOP/s of ``[m, k] @ [k, n]`` measured now on ``device`` (CUDA events; wall clock on CPU, fp32 there):
    the ceiling to compare a loss against, from the same run and shape, instead of a data-sheet peak."""
    if device.type != "cuda":
        dtype = torch.float32
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    torch.mm(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch.mm(a, b)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / repeats
    else:
        import time

        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        seconds = (time.perf_counter() - t0) / repeats
    return 2 * m * n * k / seconds / 1e12


def bf16_peak_tflops(name: str) -> float | None:
    """The device's dense bf16 matmul peak in TFLOP/s, or ``None`` when unknown (CPUs)."""
    override = os.environ.get("TISDPO_BENCH_PEAK_TFLOPS")
    if override:
        return float(override)
    if name.startswith("CPU"):
        return None
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    if versions["tisdpo"] == "not installed":
        import tisdpo_kernels

        versions["tisdpo"] = f"{tisdpo_kernels.__version__} (source tree)"
    repo = Path(__file__).resolve().parent.parent
    try:  # a copied tree (a GPU machine) may have neither git nor .git
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tisdpo_kernels", "benchmarks"], cwd=repo,
                               capture_output=True, text=True)
    except OSError as exc:
        versions["git_commit"] = f"unknown (git: {exc.strerror or exc})"
    else:
        versions["git_commit"] = (commit.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")
                                  if commit.returncode == 0 else "none")
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    return versions
