"""Compile, for an H100/H200 (sm_90a) and on a machine without a GPU, exactly what the launchers launch.

``python -m tests.kernels.compile_for_gpu [--jobs N]`` prints one JSON line per distinct kernel launch;
``--planted`` compiles instead three kernels planted to fail the check (a spill, a bf16 dot without
``wgmma``, more shared memory than sm_90 has), which ``problems`` must flag.

1. **Record.** A stand-in CUDA driver (device 0, target sm_90) is made Triton's active driver, and
   Triton's ``jit_cache_hook`` records every launch instead of compiling it. The real launchers then run
   on ``meta`` tensors (real shapes and strides, no data) at the Llama-3-8B head (D=4096, V=128256,
   2 x 8192 response tokens) and at D=2048, V=32000 with 16381 rows (not a multiple of 16, as real
   token counts): the all-Triton forward/backward of ``ops/linear_logprobs.py`` (atomic, deterministic,
   filtered), the split path of ``ops/linear_split.py`` -- every KL mode in bf16, fp16 and fp32, bf16
   with and without a bias, the KL backward with and without a KL gradient; both forwards with
   ``token_stats`` (no KL and ``tis``, bf16 and fp32) -- and the pair-loss kernels
   in the variants the loss launches (DPO, given token weights, contrastive weights under each
   transform; no KL, ``tisdpo``, ``tdpo``; the gradients a trainer asks for). The record is Triton's own
   specialization of each launch -- pointer alignment, ``stride == 1`` and divisible-by-16 integers,
   constexprs, warps, stages -- so what is compiled is what would run.
2. **Compile.** Each distinct specialization goes through Triton's compiler (``JITFunction.preload``)
   down to a cubin; Triton's ``ptxas -v`` gives registers and spill bytes, the PTX tells whether a
   ``tl.dot`` became ``wgmma``, the metadata gives the shared memory.
3. **Check.** ``problems(result)``: shared memory within the 227 KiB a block may opt into on sm_90, no
   register spill in a launch for bf16/fp16 inputs, ``wgmma`` for every bf16 ``tl.dot``.

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
import triton
import triton.language as tl

_DTYPE = re.compile(r"bfloat16|float16|float32")
SHAPES = {"llama3-8b": (16384, 4096, 128256), "d2048-v32000-n16381": (16381, 2048, 32000)}
H100_MAX_SHARED_BYTES = 227 * 1024  # opt-in dynamic shared memory per block on sm_90


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
    from tisdpo_kernels.ops._common import RefHead

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype)

    for shape, (n, d, v) in SHAPES.items():
        labels = torch.empty(n, device="meta", dtype=torch.long)
        g = meta(n)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            name = str(dtype).removeprefix("torch.")
            for kl in (0, 1, 2):
                h, w = meta(n, d, dtype=dtype), meta(v, d, dtype=dtype)
                ref = RefHead(meta(n, d, dtype=dtype), meta(v, d, dtype=dtype), None) if kl else None
                for has_bias in (True, False) if dtype == torch.bfloat16 and kl == 0 else (False,):
                    bias = meta(v, dtype=dtype) if has_bias else None
                    tag = f"kl{kl}-{name}-{shape}" + ("-bias" if has_bias else "")
                    stats_kw = dict(ref=ref, ref_lse=g, token_kl=g, grad_kl=g) if kl else {}
                    variants = [("atomic", ll.LinearParams(kl_mode=kl))]
                    if dtype == torch.bfloat16 and kl == 0:
                        variants += [("deterministic", ll.LinearParams(deterministic=True)),
                                     ("filtered", ll.LinearParams(filter_eps=2**-12))]
                    for label, params in variants:
                        record(f"triton-{label}-{tag}")
                        if label == "atomic":
                            ll.linear_forward(h, w, bias, labels, params, ref=ref)
                        ll.linear_backward(h, w, bias, labels, g, g, params, **stats_kw)
                    record(f"split-{tag}")
                    params = ls.SplitParams(kl_mode=kl, elementwise="triton")
                    ls.split_forward(h, w, bias, labels, params, ref=ref)
                    ls.split_backward(h, w, bias, labels, g, g, params, **stats_kw)
                    if kl:  # the KL's value without its gradient (a loss that only reports it)
                        ls.split_backward(h, w, bias, labels, g, g, params, **{**stats_kw, "grad_kl": None})
                    if kl in (0, 1) and dtype != torch.float16:  # the trainer's forwards: token statistics on
                        record(f"triton-stats-{tag}")
                        ll.linear_forward(h, w, bias, labels, ll.LinearParams(kl_mode=kl, token_stats=True), ref=ref)
                        record(f"split-stats-{tag}")
                        ls.split_forward(h, w, bias, labels, ls.SplitParams(kl_mode=kl, elementwise="triton",
                                                                            token_stats=True), ref=ref)
        _pair_launches(record, shape, n, meta)


def _pair_launches(record, shape, n, meta):
    """The pair-loss kernels as ``loss.fused_tis_dpo_loss`` launches them: weights none (DPO), given
    (TIS-DPO) or contrastive under each transform; no KL, a weighted KL (tisdpo) or an unweighted one (tdpo);
    gradients into the policy log-probs and the KL (the reference log-probs and weights are constants),
    plus the every-gradient backward of the kernel tests."""
    from tisdpo_kernels.ops import pair_loss as pl

    seq_ids = torch.empty(n, device="meta", dtype=torch.long)
    g = meta(n)
    sources = [("dpo", False, False, 0), ("weights", True, False, 0)]
    sources += [(f"contrastive-{t}", False, True, code) for t, code in pl.TRANSFORMS.items()]
    for source, has_weights, contrastive, transform in sources:
        for kl in (None, "tisdpo", "tdpo1"):
            record(f"pair-{source}-kl{kl}-{shape}")
            params = pl.PairSumsParams(num_seqs=2, kl=kl, has_weights=has_weights, contrastive=contrastive,
                                       transform=transform, transform_args=(-0.5, 1.5, 1.0, 1.0))
            tokens = (g, g, g if has_weights else None, *((g, g) if contrastive else (None, None)),
                      g if kl else None)
            pl.segment_sums_forward(tokens, seq_ids, params)
            pl.segment_sums_backward(tokens, seq_ids, meta(4, 2), params, (False, False, kl is not None))
            if source == "weights":
                pl.segment_sums_backward(tokens, seq_ids, meta(4, 2), params, (True, True, kl is not None))


# ----------------------------------------------------------------------------------------------
# planted faults: what the check must catch (``--planted``)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _planted_spill_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """One warp holding a [BLOCK] fp32 block and its running sum live at once: 2 x BLOCK/32 registers a thread."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, tl.cumsum(x, 0) * tl.flip(x, 0))


@triton.jit
def _planted_dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                        STEPS: tl.constexpr):
    """A bf16 ``[M, K] x [K, N]`` dot, ``STEPS`` times over K (pipelined: one shared-memory stage per step)."""
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    acc = tl.zeros((M, N), dtype=tl.float32)
    for i in tl.range(0, STEPS):
        a = tl.load(a_ptr + rm[:, None] * (K * STEPS) + i * K + rk[None, :])
        b = tl.load(b_ptr + (i * K + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


def _planted_launches(record):
    """``problems`` must flag each: spills (bf16 launch), ``mma.sync`` instead of ``wgmma`` (one warp),
    and a 4-stage 256 x 256 x 128 bf16 pipeline (4 x 128 KiB of shared memory)."""
    from tests.kernels import compile_for_gpu as this  # by its import name, also when run as __main__

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype)

    record("planted-spill-bfloat16")
    this._planted_spill_kernel[(1,)](meta(16384, dtype=torch.float32), meta(16384, dtype=torch.float32), BLOCK=16384,
                                num_warps=1)
    record("planted-no-wgmma-bfloat16")
    this._planted_dot_kernel[(1,)](meta(64 * 64), meta(64 * 64), meta(64 * 64, dtype=torch.float32), M=64, N=64, K=64,
                              STEPS=1, num_warps=1, num_stages=1)
    record("planted-shared-bfloat16")
    this._planted_dot_kernel[(1,)](meta(256 * 128 * 8), meta(128 * 8 * 256), meta(256 * 256, dtype=torch.float32),
                              M=256, N=256, K=128, STEPS=8, num_warps=8, num_stages=4)


def problems(result: dict) -> list[str]:
    """What is wrong with one compiled launch for sm_90a: shared memory, spills, a bf16 dot off ``wgmma``."""
    found = []
    if result["shared_bytes"] > H100_MAX_SHARED_BYTES:
        found.append(f"shared memory {result['shared_bytes']} B > {H100_MAX_SHARED_BYTES} B")
    if {"bfloat16", "float16"} & set(result["input_dtypes"]) and \
            (result["spill_store_bytes"] or result["spill_load_bytes"]):
        found.append(f"spills {result['spill_store_bytes']} B stored, {result['spill_load_bytes']} B loaded")
    if "bfloat16" in result["input_dtypes"] and result["has_dot"] and not result["wgmma"]:
        found.append("a bf16 tl.dot without wgmma")
    return found


def record_launches(arch: int, launches=_launches) -> list[dict]:
    """The distinct launches of ``launches`` as ``{"labels", "kernel", "spec"}`` (Triton's specialization data)."""
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
        launches(lambda label: current.__setitem__(0, label))
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
    parser.add_argument("--planted", action="store_true", help="compile the planted faults instead")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    entries = record_launches(args.arch, _planted_launches if args.planted else _launches)
    print(json.dumps({"recorded_launches": len(entries)}), flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        for result in pool.map(_compile_by_index, [(entries, i, args.arch) for i in range(len(entries))]):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
