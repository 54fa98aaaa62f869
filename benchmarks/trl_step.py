"""One training step of a real model: `TISDPOTrainer` against TRL's `DPOTrainer`, per-step time, loss and memory.

    python -m benchmarks.trl_step --impl {tisdpo,trl} --response-tokens 1024 --steps 2 --json out.json
        [--model smollm2 | DIR] [--device auto|cpu|cuda] [--dtype fp32|bf16] [--prompt-tokens 16] [--lr 1e-6]

One preference pair (a short prompt, a chosen and a rejected response of exactly `--response-tokens` tokens each,
the EOS token included) of real text: the shipped dialogues (`tisdpo/assets/dialogues.jsonl`, every message in
order) tokenised by the model's tokenizer and repeated to the length, the chosen response from its start, the rejected one from its middle. The text goes in as strings and each
trainer tokenises it its own way (ours with `tokenization="joint"`, TRL 1.16's), so both see the same ids: the
response lengths each trainer produced are checked and recorded. The same hyper-parameters for both: the policy's
reference is each trainer's default (a frozen copy of the initial policy: ours deep-copies it when `train()`
starts, TRL loads the checkpoint again), `beta=0.1`, sigmoid loss, AdamW (`adamw_torch`) at `--lr` with a linear
schedule, no warm-up, gradient clipping at 1.0, batch 1, gradient checkpointing on, dropout off, SDPA attention,
float32 weights (`--dtype bf16`: bfloat16 mixed precision). `--device auto` takes CUDA when there is one.

`trainer.train()` runs `--steps` steps; a callback records each step's wall time (`on_step_begin` to
`on_step_end`: forward, backward, clipping and the optimizer step; the batch is fetched before it) and the time
from `train()` to the first step, and `compute_loss` its loss (equal between the two implementations at every
step: step 1 is log 2 for both, as the policy equals its reference; later steps compare the updated weights).

Memory, CPU: glibc is told to return every allocation above 128 KiB to the system when freed (the script re-runs
itself with `MALLOC_MMAP_THRESHOLD_` set, as `benchmarks.memory` does), so resident memory follows what is live.
`fixed_rss_bytes` is the resident set at `on_train_begin` (both models and the optimizer built, no step run yet);
each step's `peak_rss_bytes` is the kernel's high-water mark during that step (reset through
`/proc/self/clear_refs` at its start), and `peak_above_fixed_bytes` that peak minus the fixed figure: the step's
activations, logits or their chunks, the gradients and, from step 1 on, AdamW's two moment buffers.
`step_extra_bytes` is the peak minus the resident set at that step's start: from step 2 on, what the step itself
adds: the gradients (freed by `zero_grad` between steps: 4 bytes a parameter in float32, as in both trainers), the
saved activations, the loss's working memory and AdamW's temporaries; the difference between the two trainers at
equal gradients is the design's (logits or their chunks).
`process_peak_rss_bytes` is the whole process' peak, loading included: `resource.getrusage`'s figure, or a
high-water mark read before one of the resets where larger (the kernel's `ru_maxrss` follows the reset). CUDA:
the same fields from `torch.cuda.memory_allocated` / `max_memory_allocated` (process peak: the largest of them).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT_PATH = REPO_ROOT / "tisdpo" / "assets" / "dialogues.jsonl"  # shipped, fixed: the figures stay reproducible
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}  # as benchmarks.memory
PROMPT = "Explain how the library computes the loss of a preference pair without the logits.\n\nAnswer:"
BETA = 0.1
IMPLS = ("tisdpo", "trl")
RESULT_FIELDS = ("impl", "model", "device", "dtype", "response_tokens", "prompt_tokens", "steps", "step_seconds",
                 "to_first_step_seconds", "train_seconds", "setup_seconds", "losses", "fixed_rss_bytes",
                 "step_start_rss_bytes", "peak_rss_bytes", "peak_above_fixed_bytes", "step_extra_bytes",
                 "process_peak_rss_bytes", "versions", "command", "machine")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _dialogue_text() -> str:
    """Every message of the shipped dialogues, in file order, one paragraph each."""
    rows = [json.loads(line) for line in TEXT_PATH.read_text().splitlines() if line.strip()]
    return "\n\n".join(m["content"] for r in rows for key in ("prompt", "chosen", "rejected") for m in r[key])


def pair_texts(tokenizer, response_tokens: int, prompt_tokens: int) -> dict:
    """`{"prompt", "chosen", "rejected"}` strings whose joint tokenisation (prompt + response + EOS, TRL 1.16's) has
    `prompt_tokens` prompt tokens (the prompt cut or padded with its own text) and `response_tokens` response tokens
    each, EOS included: the responses are the shipped dialogues' text, repeated, decoded from a token prefix of the right size
    (re-tokenising a decoded prefix can merge or split tokens at the cut: the prefix nearest in size that fits)."""
    if response_tokens < 2:
        raise ValueError(f"--response-tokens must be >= 2 (one text token and EOS), got {response_tokens}")
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    prompt_ids = (prompt_ids * (prompt_tokens // len(prompt_ids) + 1))[-prompt_tokens:]
    prompt = tokenizer.decode(prompt_ids)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    text_ids = tokenizer(_dialogue_text(), add_special_tokens=False)["input_ids"]
    out = {"prompt": prompt}
    for name, start in (("chosen", 0), ("rejected", len(text_ids) // 2)):
        ids = text_ids[start:] + text_ids[:start]
        ids = ids * (response_tokens // len(ids) + 2)
        for keep in sorted(range(max(1, response_tokens - 40), response_tokens + 40),
                           key=lambda k: abs(k - response_tokens + 1)):
            text = " " + tokenizer.decode(ids[:keep]).lstrip()
            got = len(tokenizer(prompt + text + tokenizer.eos_token)["input_ids"]) - n_prompt
            if got == response_tokens:
                break
        else:
            raise RuntimeError(f"could not cut the {name} text to {response_tokens} tokens")
        out[name] = text
    return out


def _versions() -> dict:
    import torch
    import transformers
    import trl

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "tisdpo", "tisdpo_kernels"],
                                    cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "tisdpo_commit": commit, "tisdpo_dirty": dirty}


def _machine(device) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(impl: str, model: str, response_tokens: int, steps: int, device: str = "auto", dtype: str = "fp32",
        prompt_tokens: int = 16, lr: float = 1e-6) -> dict:
    """One benchmark run in this process (see the module docstring); returns the record written by `--json`."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    if impl not in IMPLS:
        raise ValueError(f"--impl must be one of {IMPLS}, got {impl!r}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    if model == "smollm2":
        from tisdpo.pretrained import fetch_model

        model_path = fetch_model("smollm2")
    else:
        model_path = model
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = pair_texts(tokenizer, response_tokens, prompt_tokens)
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    common = dict(use_cpu=not cuda, report_to="none", bf16=dtype == "bf16", learning_rate=lr, beta=BETA,
                  loss_type=["sigmoid"], optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                  max_steps=steps, logging_steps=1, save_strategy="no", disable_tqdm=True, max_length=None,
                  disable_dropout=True, seed=0, dataloader_num_workers=0)
    timing: dict = {"begin": [], "end": [], "start_rss": [], "peak_rss": [], "start_alloc": [], "peak_alloc": [],
                    "hwm_before_resets": 0}

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                timing["fixed"] = torch.cuda.memory_allocated()
            else:
                timing["fixed"] = _status_bytes("VmRSS")
            timing["train_begin"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                timing["start_alloc"].append(torch.cuda.memory_allocated())
                timing["hwm_before_resets"] = max(timing["hwm_before_resets"], torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            else:
                timing["start_rss"].append(_status_bytes("VmRSS"))
                timing["hwm_before_resets"] = max(timing["hwm_before_resets"], _status_bytes("VmHWM"))
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            timing["begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            timing["end"].append(time.perf_counter())
            if cuda:
                timing["peak_alloc"].append(torch.cuda.max_memory_allocated())
            else:
                timing["peak_rss"].append(_status_bytes("VmHWM"))

    losses: list[float] = []
    out_dir = tempfile.mkdtemp(prefix="trl_step-")
    dataset = datasets.Dataset.from_list([texts])
    if impl == "tisdpo":
        from tisdpo import TISDPOConfig, TISDPOTrainer

        class Trainer(TISDPOTrainer):
            def compute_loss(self, model, inputs, *a, **k):
                loss = super().compute_loss(model, inputs, *a, **k)
                losses.append(float(loss.detach()))
                return loss

        args = TISDPOConfig(output_dir=out_dir, activation_checkpointing=True, tokenization="joint", **common)
        trainer = Trainer(policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[StepClock()])
        row = trainer.train_dataset[0]
        lengths = (len(row["prompt_input_ids"]), len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
    else:
        import trl

        class Trainer(trl.DPOTrainer):
            def compute_loss(self, model, inputs, *a, **k):
                loss = super().compute_loss(model, inputs, *a, **k)
                losses.append(float(loss.detach()))
                return loss

        args = trl.DPOConfig(output_dir=out_dir, gradient_checkpointing=True, **common)
        trainer = Trainer(policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[StepClock()])
        row = trainer.train_dataset[0]
        lengths = (len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"]))
    if lengths[1:] != (response_tokens, response_tokens):
        raise RuntimeError(f"{impl} tokenised the responses to {lengths[1:]} tokens, not {response_tokens}")
    setup = time.perf_counter() - t0
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    step_seconds = [e - b for b, e in zip(timing["begin"], timing["end"])]
    starts, peaks = (timing["start_alloc"], timing["peak_alloc"]) if cuda else (timing["start_rss"], timing["peak_rss"])
    # getrusage cannot see a peak from before a VmHWM reset: the largest of it and each mark read before a reset
    process_peak = max(0 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       timing["hwm_before_resets"], *peaks)
    return {
        "impl": impl, "model": model, "device": str(dev), "dtype": dtype, "response_tokens": response_tokens,
        "prompt_tokens": lengths[0], "steps": steps, "step_seconds": step_seconds,
        "to_first_step_seconds": timing["begin"][0] - timing["train_begin"], "train_seconds": train_seconds,
        "setup_seconds": setup, "losses": losses, "fixed_rss_bytes": timing["fixed"],
        "step_start_rss_bytes": starts, "peak_rss_bytes": peaks,
        "peak_above_fixed_bytes": [p - timing["fixed"] for p in peaks],
        "step_extra_bytes": [p - s for p, s in zip(peaks, starts)],
        "process_peak_rss_bytes": process_peak,
        "versions": _versions(), "command": None, "machine": _machine(dev),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trl_step", description=__doc__.splitlines()[0])
    parser.add_argument("--impl", required=True, choices=IMPLS)
    parser.add_argument("--response-tokens", type=int, default=1024, help="tokens per response, EOS included")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (tisdpo.pretrained.fetch_model) or a model dir")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                        help="fp32, or bf16 mixed precision (float32 weights)")
    parser.add_argument("--lr", type=float, default=1e-6, help="TRL's and our default")
    parser.add_argument("--json", default=None, help="write the record here")
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in _MALLOC_ENV.items()):  # glibc reads these at start-up only
        env = {**os.environ, **_MALLOC_ENV}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.trl_step", *argv], env)
    result = run(args.impl, args.model, args.response_tokens, args.steps, args.device, args.dtype,
                 args.prompt_tokens, args.lr)
    result["command"] = " ".join(["python -m benchmarks.trl_step", *argv])
    for i, (sec, loss) in enumerate(zip(result["step_seconds"], result["losses"]), 1):
        print(f"{args.impl} step {i}: {sec:.2f} s, loss {loss:.8f}, peak above fixed "
              f"{_mib(result['peak_above_fixed_bytes'][i - 1])}, step extra {_mib(result['step_extra_bytes'][i - 1])}")
    print(f"{args.impl}: fixed {_mib(result['fixed_rss_bytes'])}, process peak "
          f"{_mib(result['process_peak_rss_bytes'])}, set-up {result['setup_seconds']:.1f} s, train() to step 1 "
          f"{result['to_first_step_seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
