"""Compile, for an H100/H200 (sm_90a) and on a machine without a GPU, exactly what the launchers launch.

``python -m tests.kernels.compile_for_gpu [--jobs N]`` prints one JSON line per distinct kernel launch.

1. **Record.** A stand-in CUDA driver (device 0, target sm_90) is made Triton's active driver, and
   Triton's ``jit_cache_hook`` records every launch instead of compiling it. The real launchers then run
   on ``meta`` tensors (real shapes and strides, no data) at the Llama-3-8B head (D=4096, V=128256,
   2 x 8192 response tokens) and at D=2048, V=32000: the all-Triton forward/backward of
   ``ops/linear_logprobs.py`` (atomic, deterministic, filtered; every KL mode), the split path of
   ``ops/linear_split.py`` (every KL mode) and the pair-loss kernels. The record is Triton's own
   specialization of each launch -- pointer alignment, ``stride == 1`` and divisible-by-16 integers,
   constexprs, warps, stages -- so what is compiled is what would run.
2. **Compile.** Each distinct specialization goes through Triton's compiler (``JITFunction.preload``)
   down to a cubin; Triton's ``ptxas -v`` gives registers and spill bytes, the PTX tells whether a
   ``tl.dot`` became ``wgmma``, the metadata gives the shared memory.

Must run with ``TRITON_INTERPRET`` unset (``tests/kernels/test_gpu_compile.py`` runs it in a subprocess).
Triton here is 3.9; the GPU image has 3.6 (its compiler may allocate registers differently).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

_DTYPE = re.compile(r"bfloat16|float16|float32")
SHAPES = {"llama3-8b": (16384, 4096, 128256), "d2048-v32000": (16384, 2048, 32000)}


class StandInDriver:
    """Just enough of Triton's CUDA driver for specialization and compilation: device 0, sm_90, stream 0."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


def _launches(record):
    """Run every launcher the library has on meta tensors; ``record(label)`` tags what follows."""
    from tisdpo_kernels.ops import linear_logprobs as ll
    from tisdpo_kernels.ops import linear_split as ls
    from tisdpo_kernels.ops import pair_loss as pl
    from tisdpo_kernels.ops._common import RefHead

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype)

    for shape, (n, d, v) in SHAPES.items():
        labels = torch.empty(n, device="meta", dtype=torch.long)
        g = meta(n)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            name = str(dtype).removeprefix("torch.")
            kl_modes = (0, 1, 2) if dtype == torch.bfloat16 else (0,)
            for kl in kl_modes:
                h, w = meta(n, d, dtype=dtype), meta(v, d, dtype=dtype)
                ref = RefHead(meta(n, d, dtype=dtype), meta(v, d, dtype=dtype), None) if kl else None
                bias = meta(v, dtype=dtype) if dtype == torch.bfloat16 and kl == 0 else None
                stats_kw = dict(ref=ref, ref_lse=g, token_kl=g, grad_kl=g) if kl else {}
                variants = [("atomic", ll.LinearParams(kl_mode=kl))]
                if dtype == torch.bfloat16 and kl == 0:
                    variants += [("deterministic", ll.LinearParams(deterministic=True)),
                                 ("filtered", ll.LinearParams(filter_eps=2**-12))]
                for label, params in variants:
                    record(f"triton-{label}-kl{kl}-{name}-{shape}")
                    if label == "atomic":
                        ll.linear_forward(h, w, bias, labels, params, ref=ref)
                    ll.linear_backward(h, w, bias, labels, g, g, params, **stats_kw)
                record(f"split-kl{kl}-{name}-{shape}")
                params = ls.SplitParams(kl_mode=kl, elementwise="triton")
                ls.split_forward(h, w, bias, labels, params, ref=ref)
                ls.split_backward(h, w, bias, labels, g, g, params, **stats_kw)
        record(f"pair-sums-{shape}")
        seq_ids = torch.empty(n, device="meta", dtype=torch.long)
        tokens = (g, g, None, g, g, g)
        params = pl.PairSumsParams(num_seqs=2, kl="tisdpo", contrastive=True, transform=3,
                                   transform_args=(-0.5, 1.5, 1.0, 1.0))
        pl.segment_sums_forward(tokens, seq_ids, params)
        pl.segment_sums_backward(tokens, seq_ids, meta(4, 2), params, (True, False, True))


def record_launches(arch: int) -> list[dict]:
    """The distinct launches of ``_launches`` as ``{"labels", "kernel", "spec"}`` (Triton's specialization data)."""
    import triton
    from triton import knobs

    triton.runtime.driver.set_active(StandInDriver(arch))
    found: dict[str, dict] = {}
    current = [""]

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        spec = compile["specialization_data"]
        entry = found.setdefault(spec, {"labels": [], "kernel": f"{fn.module}.{fn.name}", "spec": spec,
                                        "repr": repr})
        if current[0] not in entry["labels"]:
            entry["labels"].append(current[0])
        return True  # recorded: skip compiling and launching

    knobs.runtime.jit_cache_hook = hook  # the stand-in driver stays active: this runs in its own process
    try:
        _launches(lambda label: current.__setitem__(0, label))
    finally:
        knobs.runtime.jit_cache_hook = None
    return list(found.values())


def _ptxas_stats(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia import compiler

    ptxas = compiler.get_ptxas(arch).path  # the ptxas Triton itself uses for this arch
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill_st = re.search(r"(\d+) bytes spill stores", log)
    spill_ld = re.search(r"(\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill_st.group(1)) if spill_st else 0,
            "spill_load_bytes": int(spill_ld.group(1)) if spill_ld else 0}


def compile_launch(entry: dict, arch: int) -> dict:
    """Compile one recorded launch for ``sm_{arch}a``; returns its statistics."""
    import triton

    triton.runtime.driver.set_active(StandInDriver(arch))
    module, name = entry["kernel"].rsplit(".", 1)
    kernel = getattr(importlib.import_module(module), name)
    compiled = kernel.preload(entry["spec"])
    ptx, ttir = compiled.asm["ptx"], compiled.asm["ttir"]
    spec = json.loads(entry["spec"])
    pointer_types = sorted({t for t in spec["signature"].values() if isinstance(t, str) and t.startswith("*")})
    return {"kernel": name, "labels": entry["labels"], "arch": f"sm_{arch}a",
            "input_dtypes": sorted({m.group(0) for lb in entry["labels"] if (m := _DTYPE.search(lb))}),
            "pointer_types": pointer_types, "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages, "shared_bytes": compiled.metadata.shared,
            "has_dot": "tt.dot" in ttir, "wgmma": "wgmma" in ptx, "cp_async": "cp.async" in ptx,
            "cubin_bytes": len(compiled.asm["cubin"]), **_ptxas_stats(ptx, arch), "launch": entry["repr"]}


def _compile_by_index(args):
    entries, index, arch = args
    return compile_launch(entries[index], arch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    entries = record_launches(args.arch)
    print(json.dumps({"recorded_launches": len(entries)}), flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        for result in pool.map(_compile_by_index, [(entries, i, args.arch) for i in range(len(entries))]):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
