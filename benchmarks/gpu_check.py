"""The prepared GPU check: ``python -m benchmarks.gpu_check OUT_DIR`` (or ``benchmarks/gpu_check.sh OUT_DIR``).

On a fresh, offline GPU machine (peers' wheels from ``benchmarks/fetch_gpu_wheels.sh``), in at most 8
minutes: every stage runs in its own subprocess under its own timeout, so a hang leaves the other stages'
results; each writes ``OUT_DIR/<stage>.json`` and its log, and ``OUT_DIR/summary.md`` + ``summary.json``
gather them.

Stages:
1. ``env``: device, library versions, ceilings measured now: bf16 GEMM TFLOP/s at the loss's three
   shapes (logits ``[N, D] x [D, V]``, ``dH`` ``[N, V] x [V, D]``, ``dW`` ``[V, N] x [N, D]``) and copy GB/s.
2. ``bench``: at the Llama-3-8B head (D=4096, V=128256, 2 x 8192 response tokens, bf16): naive, Liger
   FLCE, CCE and ours (backends ``split`` and ``triton``; no KL, ``kl="tisdpo"``, ``kl="tdpo1"``), forward
   and backward timed separately (CUDA events, median), peak extra memory, executed FLOPs (8·N·D·V,
   12·N·D·V with the reference head) and model FLOPs (6·N·D·V, 8·N·D·V) against the measured GEMM rate.
3. ``tests``: ``pytest tests/kernels -m gpu`` (the GPU-marked kernel tests; they need no ``datasets``).

``--smoke``: the same stages on CPU at a tiny shape (what CI runs: ``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# seconds per stage on the GPU (their sum, plus start-up, stays under 8 minutes)
TIMEOUTS = {"env": 60, "bench": 300, "tests": 100}
SMOKE_TIMEOUTS = {"env": 60, "bench": 240, "tests": 120}
# (provider, variant, kl) rows of the bench stage; kl None means no KL term
ROWS = (
    ("naive", "tisdpo", None), ("liger_flce", "tisdpo", None), ("cce", "tisdpo", None),
    ("tisdpo_split", "tisdpo", None), ("tisdpo_triton", "tisdpo", None),
    ("naive", "tisdpo_kl", "tisdpo"),
    ("tisdpo_split", "tisdpo_kl", "tisdpo"), ("tisdpo_triton", "tisdpo_kl", "tisdpo"),
    ("tisdpo_split", "tisdpo_kl", "tdpo1"), ("tisdpo_triton", "tisdpo_kl", "tdpo1"),
)
SMOKE_PROVIDERS = ("naive", "tisdpo_split", "tisdpo_torch")


def _case(smoke: bool):
    import torch

    from .shapes import HEADS, Case

    if smoke:
        return Case(HEADS["smoke"], 40, "random", torch.float32)
    return Case(HEADS["llama3-8b"], 8192, "random", torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# stages (each runs in its own process: python -m benchmarks.gpu_check --stage NAME OUT_DIR)
# ----------------------------------------------------------------------------------------------


def stage_env(smoke: bool) -> dict:
    import torch

    from .env import bench_device, device_name, library_versions, measured_gemm_tflops

    device = bench_device()
    case = _case(smoke)
    n, d, v = case.num_response_tokens, case.head.hidden_size, case.head.vocab_size
    gemm = {"logits [N,D]x[D,V]": measured_gemm_tflops(n, v, d, device),
            "dH [N,V]x[V,D]": measured_gemm_tflops(n, d, v, device),
            "dW [V,N]x[N,D]": measured_gemm_tflops(v, d, n, device)}
    size = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    copy_gbs = 2 * size * 10 / (time.perf_counter() - t0) / 1e9  # read + write
    return {"device": device_name(device), "versions": library_versions(), "gemm_tflops": gemm,
            "gemm_dtype": "bfloat16" if device.type == "cuda" else "float32", "copy_gb_per_s": copy_gbs,
            "shape": {"N": n, "D": d, "V": v}}


def _time_row(provider_name, variant, kl, case, device, repeats):
    import torch

    from .memory import cuda_peak_extra_bytes, is_out_of_memory
    from .providers import PROVIDERS, make_inputs

    provider = PROVIDERS[provider_name]
    reason = provider.unavailable(device)
    if reason:
        return {"status": "unavailable", "reason": reason}
    try:
        inputs = make_inputs(case, variant, device)
        if kl is not None and kl != "tisdpo":
            from tisdpo_kernels import fused_tis_dpo_loss

            backend = provider_name.removeprefix("tisdpo_")

            def loss_fn():
                return fused_tis_dpo_loss(inputs.hidden, inputs.weight, inputs.labels,
                                          token_weights=inputs.token_weights, ref_hidden=inputs.ref_hidden,
                                          ref_weight=inputs.ref_weight, kl=kl, backend=backend)[0]
        else:
            loss_fn = provider.build(inputs, variant)
        fwd, bwd = [], []
        for i in range(repeats + 1):  # the first round warms up (compilation, autotuning)
            inputs.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = loss_fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
        peak = None
        if device.type == "cuda":
            peak = cuda_peak_extra_bytes(lambda: loss_fn().backward(), inputs.zero_grad)
    except Exception as exc:  # noqa: BLE001 - out of memory is a result; anything else too, with its message
        return {"status": "OOM" if is_out_of_memory(exc) else "error", "reason": str(exc).splitlines()[0][:300]}
    return {"status": "ok", "forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
            "peak_extra_bytes": peak}


def stage_bench(smoke: bool) -> dict:
    from .env import bench_device, measured_gemm_tflops
    from .shapes import executed_flop_count, flop_count

    device = bench_device()
    case = _case(smoke)
    n, d, v = case.num_response_tokens, case.head.hidden_size, case.head.vocab_size
    gemm = measured_gemm_tflops(n, v, d, device)  # the same M, N, K as the logits GEMM, measured in this run
    rows = []
    for provider, variant, kl in ROWS if not smoke else [(p, var, k) for p in SMOKE_PROVIDERS
                                                       for var, k in (("tisdpo", None), ("tisdpo_kl", "tisdpo"))]:
        result = _time_row(provider, variant, kl, case, device, repeats=1 if smoke else 5)
        row = {"provider": provider, "kl": kl, "model_flops": flop_count(case, variant),
               "executed_flops": executed_flop_count(case, variant), **result}
        if result["status"] == "ok":
            total = result["forward_s"] + result["backward_s"]
            row["floor_s"] = row["executed_flops"] / (gemm * 1e12)
            row["vs_floor"] = total / row["floor_s"]
            row["executed_tflops"] = row["executed_flops"] / total / 1e12
            row["model_tflops"] = row["model_flops"] / total / 1e12
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"gemm_tflops_measured": gemm, "shape": {"N": n, "D": d, "V": v, "dtype": str(case.dtype)}, "rows": rows}


def stage_tests(smoke: bool) -> dict:
    # the GPU-marked kernel tests; in smoke mode (CPU) one fast kernel test file proves the stage runs
    target = ["tests/kernels/test_linear_split.py", "-k", "plan or bad_options"] if smoke else \
        ["tests/kernels", "-m", "gpu"]
    proc = subprocess.run([sys.executable, "-m", "pytest", *target, "-q", "-p", "no:cacheprovider"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {"returncode": proc.returncode, "summary": tail, "output_tail": proc.stdout[-6000:] + proc.stderr[-2000:]}


STAGES = {"env": stage_env, "bench": stage_bench, "tests": stage_tests}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def _markdown(results: dict) -> str:
    lines = ["# GPU check", ""]
    env = results.get("env", {})
    if "device" in env:
        lines += [f"Device: {env['device']}. Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
                  "", f"Ceilings measured in this run ({env['gemm_dtype']} GEMM, shape N={env['shape']['N']}, "
                  f"D={env['shape']['D']}, V={env['shape']['V']}): " +
                  ", ".join(f"{k} {t:.1f} TFLOP/s" for k, t in env["gemm_tflops"].items()) +
                  f"; copy {env['copy_gb_per_s']:.0f} GB/s.", ""]
    bench = results.get("bench", {})
    if "rows" in bench:
        lines += [f"Loss at N={bench['shape']['N']}, D={bench['shape']['D']}, V={bench['shape']['V']} "
                  f"({bench['shape']['dtype']}); floor = executed FLOPs / the logits-shaped GEMM measured in the "
                  f"same run ({bench['gemm_tflops_measured']:.1f} TFLOP/s).", "",
                  "| provider | kl | forward ms | backward ms | total ms | x floor | executed TFLOP/s | model TFLOP/s "
                  "| peak extra MiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in bench["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['provider']} | {r['kl']} | {r['status']}: {r['reason'][:80]} | | | | | | |")
                continue
            peak = "" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
            lines.append(f"| {r['provider']} | {r['kl']} | {r['forward_s'] * 1e3:.1f} | {r['backward_s'] * 1e3:.1f} | "
                         f"{(r['forward_s'] + r['backward_s']) * 1e3:.1f} | {r['vs_floor']:.2f} | "
                         f"{r['executed_tflops']:.1f} | {r['model_tflops']:.1f} | {peak} |")
        lines.append("")
    tests = results.get("tests", {})
    if "summary" in tests:
        lines += [f"GPU kernel tests: {tests['summary']} (exit {tests['returncode']}).", ""]
    for name, r in results.items():
        if "stage_error" in r:
            lines.append(f"Stage `{name}` failed: {r['stage_error']}")
    return "\n".join(lines) + "\n"


def run_all(out: Path, smoke: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                       if p)}
    if smoke:
        env["TISDPO_BENCH_DEVICE"] = "cpu"
    results = {}
    for name, limit in (SMOKE_TIMEOUTS if smoke else TIMEOUTS).items():
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--stage", name, str(out)] + (["--smoke"] if smoke else [])
        t0 = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            try:
                proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
                status = None if proc.returncode == 0 else f"exit {proc.returncode} (see {name}.log)"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit} s (see {name}.log)"
        path = out / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.exists() else {}
        if status:
            results[name]["stage_error"] = status
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(_markdown(results))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the JSON, markdown and logs")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run at a tiny shape (CI)")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        result = STAGES[args.stage](args.smoke)
        (args.out / f"{args.stage}.json").write_text(json.dumps(result, indent=1))
        return 0
    results = run_all(args.out, args.smoke)
    print(_markdown(results))
    return 1 if any("stage_error" in r for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
