"""Activation offloading (`TISDPOConfig.activation_offloading`): peak memory and time of one long-sequence CPU step.

    python -m benchmarks.offload [--tokens 2048] [--hidden 512] [--layers 4] [--steps 2] [--json out.json]

One `TISDPOTrainer` training step (`compute_loss` + backward, no optimiser) of a Llama decoder (`--layers` layers,
`--hidden` wide, V=8192, float32, sdpa attention, activation checkpointing off: the setting where saved
activations make the peak) on one preference pair of `--tokens` tokens per response, with and without
`activation_offloading`. Each configuration runs in a fresh subprocess (as `benchmarks.memory` does: glibc returns
freed memory, the kernel's peak-RSS counter is reset after a warm-up step): the figure is the peak resident memory
above the resident memory before the step, and the time the median of `--steps` steps. On CPU the offloaded
activations go to spill files (`tisdpo.offload`), so they leave the process' resident memory for the page cache;
the step pays for writing and reading them back.

Measured on the shared 2-core development machine (2026-12-01, torch 2.13 CPU, defaults above, two runs;
benchmarks/results/cpu-offload.json holds the first):

    offloading off: peak extra RSS 796 MiB, 22.2 s/step (second run: 796 MiB, 83.3 s/step)
    offloading on:  peak extra RSS 172 MiB, 16.6 s/step (second run: 172 MiB, 50.5 s/step)

The memory figures repeat exactly (-78%); the times swing with the other jobs on the machine (load 2 to 7) and
say only that offloading did not make this step slower here. The spilled bytes sit in the kernel's page cache
(reclaimable, but charged to a memory cgroup until written back).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from .memory import _MALLOC_ENV, REPO_ROOT, _status_bytes


def _measure(spec: dict) -> dict:
    import datasets
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tisdpo import TISDPOConfig, TISDPOTrainer

    vocab = 8192
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=spec["hidden"], intermediate_size=spec["hidden"] * 8 // 3,
                         num_hidden_layers=spec["layers"], num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=2 * spec["tokens"] + 64, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).float()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1},
                                                                                    unk_token="<pad>")),
                                        pad_token="<pad>", eos_token="<eos>")
    g = torch.Generator().manual_seed(1)
    pair = {name: torch.randint(2, vocab, (n,), generator=g).tolist()
            for name, n in (("prompt_input_ids", 32), ("chosen_input_ids", spec["tokens"]),
                            ("rejected_input_ids", spec["tokens"]))}
    with tempfile.TemporaryDirectory() as out:
        args = TISDPOConfig(output_dir=out, use_cpu=True, report_to="none", activation_checkpointing=False,
                            activation_offloading=spec["offload"], max_length=None, disable_tqdm=True)
        trainer = TISDPOTrainer(model, ref_model=LlamaForCausalLM(config).float(), args=args,
                                train_dataset=datasets.Dataset.from_list([pair]), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    model.train()

    def step():
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: lazy set-up, allocator growth
    gc.collect()
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"offload": spec["offload"], "peak_extra_bytes": _status_bytes("VmHWM") - base,
            "step_seconds": statistics.median(times)}


def run(offload: bool, tokens: int, hidden: int, layers: int, steps: int) -> dict:
    """One configuration, measured in a fresh subprocess."""
    spec = {"offload": offload, "tokens": tokens, "hidden": hidden, "layers": layers, "steps": steps}
    env = {**os.environ, **_MALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.offload", "--measure", json.dumps(spec)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"offload benchmark subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offload", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per response")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the subprocess' entry
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(_measure(json.loads(args.measure))))
        return
    results = [run(offload, args.tokens, args.hidden, args.layers, args.steps) for offload in (False, True)]
    for r in results:
        print(f"offloading {'on: ' if r['offload'] else 'off:'} peak extra RSS {r['peak_extra_bytes'] / 2**20:.0f} "
              f"MiB, {r['step_seconds']:.2f} s/step")
    off, on = results
    print(f"memory {on['peak_extra_bytes'] / off['peak_extra_bytes'] - 1:+.0%}, "
          f"time {on['step_seconds'] / off['step_seconds'] - 1:+.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
