"""Prefix sharing (`tisdpo.prefix`) against the usual two-sequence layout: one `TISDPOTrainer` training step.

    python -m benchmarks.prefix_sharing                      # CPU, both cases, prints a markdown table
    python -m benchmarks.prefix_sharing --json out.json      # also writes the raw results
    python -m benchmarks.prefix_sharing --device cuda --model llama-3.2-1b   # GPU: bf16, FlexAttention

A script, not a timed test. Per case (prompt P tokens, chosen and rejected R tokens each) and layout, a fresh
subprocess builds a tiny Llama decoder (policy + frozen reference copy, float32, sdpa, activation checkpointing
off) and one pair of random tokens, runs one warm-up step (`compute_loss` + backward, reference on the fly), then
`--steps` timed steps. Reported per pair: tokens the policy's decoder processes (the reference processes as many
again), the median step time (process CPU time and wall clock; `--threads`, default 1), and the peak resident
memory of a step above the memory before it (Linux `VmHWM` after resetting it through `/proc/self/clear_refs`, as
in `benchmarks/memory.py`; measured in a second subprocess whose allocator returns freed memory to the system).

On CUDA (`--device cuda`, bfloat16, default `--attn flex_attention`) memory is `max_memory_allocated` above the
memory allocated before the steps, and the CPU time column is host time only.

Layouts: `unshared` is `PreferenceCollator` (two padded sequences `[2, P+R]`; equal lengths, so no padding and
sdpa runs causal without a mask tensor); `shared` is `PrefixSharedCollator` (one row `[1, P+2R]`, a dense 4-D
boolean mask through sdpa: FlexAttention's block mask is the CUDA path and has no backward on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.memory import _status_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent
CASES = ((4096, 256), (512, 512))
LAYOUTS = ("unshared", "shared")
MODELS = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
    # the shape of meta-llama/Llama-3.2-1B (random weights; nothing is downloaded)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
}
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _trainer(prompt: int, response: int, layout: str, workdir: str, setup: dict):
    import datasets
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tisdpo import TISDPOConfig, TISDPOTrainer

    shape = MODELS[setup["model"]]
    vocab = shape["vocab_size"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3")),
        pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")
    config = LlamaConfig(**shape, max_position_embeddings=prompt + 2 * response, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    config._attn_implementation = setup["attn"]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if setup["device"] == "cuda" else torch.float32
    policy = LlamaForCausalLM(config).to(setup["device"], dtype)
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(4, vocab, (n,), generator=g).tolist()

    pair = {"prompt_input_ids": ids(prompt), "chosen_input_ids": ids(response), "rejected_input_ids": ids(response)}
    args = TISDPOConfig(output_dir=workdir, use_cpu=setup["device"] == "cpu", report_to="none", disable_tqdm=True,
                        save_strategy="no", liger_model_patches=False,
                        activation_checkpointing=False, max_length=None, max_prompt_length=None,
                        prefix_sharing=layout == "shared", padding_free=False, per_device_train_batch_size=1)
    trainer = TISDPOTrainer(policy, args=args, train_dataset=datasets.Dataset.from_list([pair]),
                            processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    return trainer, {k: v.to(setup["device"]) for k, v in batch.items()}


def measure(prompt: int, response: int, layout: str, steps: int, workdir: str, setup: dict) -> dict:
    """One case and layout, in this process (see the module docstring): `steps` timed steps after a warm-up, the
    peak memory over them (CUDA: `max_memory_allocated` above the memory allocated before the steps)."""
    trainer, batch = _trainer(prompt, response, layout, workdir, setup)
    model = trainer.model
    cuda = setup["device"] == "cuda"

    def step():
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.item()  # a host sync: the step has finished

    loss = step()
    model.zero_grad(set_to_none=False)
    gc.collect()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    wall, cpu = [], []
    for _ in range(steps):
        model.zero_grad(set_to_none=False)
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"prompt": prompt, "response": response, "layout": layout, "loss": loss,
            "tokens": int(batch["input_ids"].numel()), "step_s": statistics.median(wall),
            "step_cpu_s": statistics.median(cpu), "steps": steps, "threads": torch.get_num_threads(),
            "peak_extra_mib": ((torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")) - base) / 2**20}


def _in_subprocess(prompt: int, response: int, layout: str, steps: int, workdir: str, for_memory: bool,
                   threads: int, setup: dict) -> dict:
    # memory: glibc returns every allocation above 128 KiB when freed, so the warm-up's freed memory cannot hide a
    # step's peak; that costs page faults, so time is measured in a separate process with the default allocator
    env = {**os.environ, **(_MALLOC_ENV if for_memory else {}), "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "benchmarks.prefix_sharing", "--one", f"{prompt},{response},{layout}",
           "--steps", str(steps), "--workdir", workdir, "--device", setup["device"], "--model", setup["model"],
           "--attn", setup["attn"]]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{prompt}/{response}/{layout} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """Markdown: one line per case, unshared vs shared and their ratio."""
    lines = ["| prompt / responses | layout | tokens per pair | step CPU time per pair, s | step wall time per pair, s "
             "| peak extra memory per pair, MiB |", "|---|---|---|---|---|---|"]
    by_case: dict[tuple[int, int], dict[str, dict]] = {}
    for r in results:
        by_case.setdefault((r["prompt"], r["response"]), {})[r["layout"]] = r
    for (prompt, response), rows in by_case.items():
        for layout in LAYOUTS:
            r = rows[layout]
            lines.append(f"| {prompt} / 2 x {response} | {layout} | {r['tokens']} | {r['step_cpu_s']:.2f} | "
                         f"{r['step_s']:.2f} | {r['peak_extra_mib']:.0f} |")
        a, b = rows["unshared"], rows["shared"]
        lines.append(f"| {prompt} / 2 x {response} | shared / unshared | {b['tokens'] / a['tokens']:.2f}x | "
                     f"{b['step_cpu_s'] / a['step_cpu_s']:.2f}x | {b['step_s'] / a['step_s']:.2f}x | "
                     f"{b['peak_extra_mib'] / a['peak_extra_mib']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefix_sharing", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case and layout (median reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a step's CPU time is then its work, little disturbed by other jobs)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--workdir", default="/tmp/tisdpo-prefix-bench")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: bfloat16 models")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--attn", default=None,
                        help="attention implementation of both layouts (default: sdpa on CPU, flex_attention on CUDA)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # PROMPT,RESPONSE,LAYOUT: the subprocess
    args = parser.parse_args(argv)
    setup = {"device": args.device, "model": args.model,
             "attn": args.attn or ("flex_attention" if args.device == "cuda" else "sdpa")}
    if args.one is not None:
        prompt, response, layout = args.one.split(",")
        print(json.dumps(measure(int(prompt), int(response), layout, args.steps, args.workdir, setup)))
        return 0
    results = []
    for prompt, response in CASES:
        for layout in LAYOUTS:
            timed = _in_subprocess(prompt, response, layout, args.steps, args.workdir, False, args.threads, setup)
            if setup["device"] == "cpu":  # CUDA's allocator statistics need no second process
                memory = _in_subprocess(prompt, response, layout, 1, args.workdir, True, args.threads, setup)
                timed["peak_extra_mib"] = memory["peak_extra_mib"]
            results.append(timed)
            print(json.dumps(results[-1]), file=sys.stderr)
    losses = {(r["prompt"], r["response"]): [] for r in results}
    for r in results:
        losses[(r["prompt"], r["response"])].append(r["loss"])
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    header = (f"torch {torch.__version__}, {where}, "
              f"{args.threads} thread(s); {setup}, {MODELS[args.model]}; losses per case (unshared, shared): "
              f"{ {k: [round(x, 6) for x in v] for k, v in losses.items()} }")
    print(header)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": header, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
