"""Peak extra memory of one forward+backward.

"Extra" means above what is allocated once the inputs exist: logits, activations saved for backward,
workspaces and the gradients of ``hidden`` and ``weight`` themselves (the same for every provider).

- CUDA: in the benchmark process, ``torch.cuda.max_memory_allocated()`` during one step minus
  ``torch.cuda.memory_allocated()`` before it.
- CPU: in a fresh subprocess (``python -m benchmarks.memory SPEC``), so that nothing the benchmark
  process allocated before can hide or inflate the figure: build the inputs, run one warm-up step
  (torch.compile and other lazy set-up), drop the gradients, read the resident set size, reset the
  kernel's peak-RSS counter (``/proc/self/clear_refs``), run one step, read the peak (``VmHWM``).
  glibc is told to return every allocation above 128 KiB to the system when freed
  (``MALLOC_MMAP_THRESHOLD_``), so memory freed by the warm-up step cannot be silently reused.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .providers import PROVIDERS, make_inputs
from .shapes import HEADS, Case

REPO_ROOT = Path(__file__).resolve().parent.parent
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


class OutOfMemory(Exception):
    """A provider ran out of memory at a case: a result to record, not a failure."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or a CPU allocation failure."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))


def cuda_peak_extra_bytes(step, zero_grad) -> int:
    """Peak CUDA memory allocated by one ``step()`` above what was allocated before it (after ``zero_grad()``)."""
    zero_grad()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_peak_in_this_process(provider: str, variant: str, case: Case, seed: int) -> dict:
    inputs = make_inputs(case, variant, "cpu", seed)
    step = PROVIDERS[provider].step(inputs, variant)
    step()
    inputs.zero_grad()
    gc.collect()
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    peak = _status_bytes("VmHWM")
    return {"peak_extra_bytes": peak - base, "baseline_rss_bytes": base}


def case_spec(provider: str, variant: str, case: Case, seed: int = 0) -> str:
    """JSON description of one measurement (the subprocess' argument)."""
    return json.dumps({"provider": provider, "variant": variant, "head": case.head.name, "tokens": case.tokens,
                       "logits": case.logits, "dtype": str(case.dtype).removeprefix("torch."),
                       "pairs": case.pairs, "seed": seed})


def cpu_peak_extra_bytes(provider: str, variant: str, case: Case, seed: int = 0, timeout: float = 900) -> int:
    """Peak extra RSS of one CPU forward+backward, measured in a fresh subprocess.

    Raises :class:`OutOfMemory` when the subprocess dies of an allocation failure or is killed (the
    kernel's OOM killer), ``RuntimeError`` on any other failure.
    """
    env = {**os.environ, **_MALLOC_ENV, "TISDPO_BENCH_DEVICE": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", case_spec(provider, variant, case, seed)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
    if proc.returncode in (-9, 137) or "can't allocate memory" in proc.stderr or "MemoryError" in proc.stderr:
        raise OutOfMemory(f"{provider} at {case.id}: subprocess exited with {proc.returncode}")
    raise RuntimeError(f"memory subprocess for {provider}/{variant}/{case.id} failed ({proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.memory SPEC_JSON (see benchmarks.memory.case_spec)")
    spec = json.loads(argv[0])
    case = Case(HEADS[spec["head"]], spec["tokens"], spec["logits"], getattr(torch, spec["dtype"]), spec["pairs"])
    result = _cpu_peak_in_this_process(spec["provider"], spec["variant"], case, spec["seed"])
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
