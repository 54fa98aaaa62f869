"""Forward cost of ``token_stats`` (docs/design.md §4): the head's forward with and without the policy's
per-token entropy, mean logit and is-top-1, for the ``torch`` and ``split`` backends, on this machine's CPU.

``python -m benchmarks.token_stats [--tokens 4096 --dim 576 --vocab 49152 --rounds 5] [--json out.json]``

Each round times the forward without and with the statistics back to back (the order alternating between
rounds), fp32, no gradient recorded; reported are the medians of each and the median of the paired ratios
(with / without), which a shared, noisy machine disturbs less than the ratio of medians. The default shape is
SmolLM2-135M's head (D=576, V=49152) over 4096 response tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from tisdpo_kernels.chunked import chunked_linear_logprobs
from tisdpo_kernels.ops._common import mean_logits
from tisdpo_kernels.ops.linear_split import split_linear_logprobs


def _forwards(hidden, weight, labels):
    """Per backend: ``(without, with)`` forward callables; ``with`` includes the mean logit (``mean_logits``),
    which the loss computes beside the head function."""
    def torch_with():
        chunked_linear_logprobs(hidden, weight, labels, token_stats=True)
        mean_logits(hidden, weight, None)

    def split_with():
        split_linear_logprobs(hidden, weight, labels, elementwise="torch", token_stats=True)
        mean_logits(hidden, weight, None)

    return {
        "torch": (lambda: chunked_linear_logprobs(hidden, weight, labels), torch_with),
        "split": (lambda: split_linear_logprobs(hidden, weight, labels, elementwise="torch"), split_with),
    }


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(tokens: int, dim: int, vocab: int, rounds: int, seed: int = 0) -> dict:
    """Paired timings of every backend's forward without / with the statistics (seconds)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) / dim**0.5
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    result = {"shape": {"tokens": tokens, "dim": dim, "vocab": vocab, "dtype": "float32"}, "rounds": rounds,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()
              or platform.machine(), "backends": {}}
    with torch.no_grad():
        for name, (without, with_stats) in _forwards(hidden, weight, labels).items():
            without(), with_stats()  # warm-up
            off, on = [], []
            for r in range(rounds):
                if r % 2:
                    on.append(_time(with_stats))
                    off.append(_time(without))
                else:
                    off.append(_time(without))
                    on.append(_time(with_stats))
                print(f"{name} round {r + 1}/{rounds}: without {off[-1]:.3f} s, with {on[-1]:.3f} s", flush=True)
            result["backends"][name] = {
                "without_s": off, "with_s": on, "median_without_s": statistics.median(off),
                "median_with_s": statistics.median(on),
                "median_paired_ratio": statistics.median(b / a for a, b in zip(off, on, strict=True)),
            }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = measure(args.tokens, args.dim, args.vocab, args.rounds)
    result["command"] = "python -m benchmarks.token_stats " + " ".join(argv if argv is not None else sys.argv[1:])
    for name, r in result["backends"].items():
        print(f"{name}: median without {r['median_without_s']:.3f} s, with {r['median_with_s']:.3f} s, "
              f"median paired ratio {r['median_paired_ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
