"""Compile the Triton kernels ahead of time for an NVIDIA GPU, on a machine without one.

``python -m tests.kernels.compile_for_gpu [--arch 90]`` builds every kernel variant the launchers use
(forward and backward, each KL mode, atomic and deterministic backward, gradient filtering, the
pair-loss kernels) with the checked-in GPU tile configs, through Triton's full compiler down to a
cubin (Triton ships its own ``ptxas``), and prints one JSON line per variant with its shared memory.
The Triton interpreter, which runs the kernels in the CPU tests, accepts programs the GPU compiler
rejects (dtype mixes in ``tl.dot``, shared-memory overflows); this catches those without a GPU.

Must run with ``TRITON_INTERPRET`` unset (``tests/kernels/test_gpu_compile.py`` runs it in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# dtype of each pointer argument: "in" = the input dtype, others fixed
_POINTERS = {
    "h_ptr": "in", "w_ptr": "in", "b_ptr": "in", "rh_ptr": "in", "rw_ptr": "in", "rb_ptr": "in",
    "labels_ptr": "i64", "seq_ptr": "i64", "starts_ptr": "i32",
}
_FLOAT_SCALARS = {"filter_eps", "p0", "p1", "p2", "p3"}


def _variants():
    """``(name, kernel, input dtype, constexprs, num_warps, num_stages)`` of every launch the library makes."""
    from tisdpo_kernels.ops import linear_logprobs as ll
    from tisdpo_kernels.ops import pair_loss as pl
    from tisdpo_kernels.ops._config import linear_config

    out = []
    for (vocab, dim) in ((128256, 4096), (2000, 512)):
        cfg = linear_config(vocab, dim)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            precision = ll._kernel_flags(dtype)  # the launchers' UPCAST / DOT_PRECISION for this dtype
            kl_modes = (0, 1, 2) if dtype == torch.bfloat16 and vocab > 4096 else (0,)
            for kl in kl_modes:
                tile = cfg.fwd
                out.append((f"fwd-kl{kl}-{_TRITON_DTYPES[dtype]}-V{vocab}-D{dim}", ll._linear_fwd_kernel, dtype,
                            dict(HAS_BIAS=True, HAS_REF_BIAS=kl != 0, KL_MODE=kl, **precision,
                                 BLOCK_N=tile.block_n, BLOCK_V=tile.block_v, BLOCK_D=tile.block_d),
                            tile.num_warps, tile.num_stages))
                tile = cfg.bwd
                common = dict(HAS_BIAS=True, HAS_REF_BIAS=kl != 0, KL_MODE=kl, HAS_GRAD_KL=kl != 0, **precision,
                              BLOCK_N=tile.block_n, BLOCK_V=tile.block_v, BLOCK_D=tile.block_d)
                modes = {"atomic": dict(ROWS_OUTER=True, COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True,
                                        ATOMIC_DH=True, ATOMIC_DW=True, FILTER=False)}
                if dtype == torch.bfloat16 and vocab > 4096 and kl == 0:
                    modes.update(
                        det_dh=dict(ROWS_OUTER=True, COMPUTE_DH=True, COMPUTE_DW=False, COMPUTE_DB=False,
                                    ATOMIC_DH=False, ATOMIC_DW=False, FILTER=False),
                        det_dw=dict(ROWS_OUTER=False, COMPUTE_DH=False, COMPUTE_DW=True, COMPUTE_DB=True,
                                    ATOMIC_DH=False, ATOMIC_DW=False, FILTER=False),
                        filtered=dict(ROWS_OUTER=True, COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True,
                                      ATOMIC_DH=True, ATOMIC_DW=True, FILTER=True),
                    )
                for mode, flags in modes.items():
                    out.append((f"bwd-{mode}-kl{kl}-{_TRITON_DTYPES[dtype]}-V{vocab}-D{dim}", ll._linear_bwd_kernel,
                                dtype, {**common, **flags}, tile.num_warps, tile.num_stages))
    sums = dict(HAS_WEIGHTS=False, CONTRASTIVE=True, TRANSFORM=3, HAS_KL=True, KL_WEIGHTED=True, BLOCK=pl._BLOCK)
    out.append(("pair-sums-fwd", pl._segment_sums_kernel, torch.float32, sums, 4, 2))
    out.append(("pair-sums-bwd", pl._segment_sums_bwd_kernel, torch.float32,
                {**sums, "NEED_REF": True, "NEED_W": True, "NEED_KL": True}, 4, 2))
    return out


def _signature(kernel, dtype, constexprs) -> dict:
    sig = {}
    for p in kernel.params:
        if p.name in constexprs:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            kind = _POINTERS.get(p.name, "fp32")
            sig[p.name] = "*" + (_TRITON_DTYPES[dtype] if kind == "in" else kind)
        else:
            sig[p.name] = "fp32" if p.name in _FLOAT_SCALARS else "i32"
    return sig


def _compile(index: int, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, kernel, dtype, constexprs, num_warps, num_stages = _variants()[index]
    src = ASTSource(fn=kernel, signature=_signature(kernel, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return {"variant": name, "arch": arch, "shared_bytes": compiled.metadata.shared,
            "num_warps": compiled.metadata.num_warps, "cubin_bytes": len(compiled.asm["cubin"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    count = len(_variants())
    with ProcessPoolExecutor(args.jobs) as pool:
        for result in pool.map(_compile, range(count), [args.arch] * count):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
