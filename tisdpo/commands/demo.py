"""`tisdpo demo`: the whole TIS-DPO pipeline on CPU: on a synthetic task (`tisdpo.run_demo`, the default) or on the
real SmolLM2-135M-Instruct and the shipped dialogues (`--model smollm2`, `tisdpo.demo_smollm2`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict

from ..demo import QUICK, DemoConfig, run_demo
from ..response_weights import WEIGHT_TRANSFORMS
from .arguments import positive_int


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whole TIS-DPO pipeline on CPU: a synthetic task (about a minute) or SmolLM2-135M-Instruct (--model smollm2)."""
    parser = argparse.ArgumentParser(prog="tisdpo demo", description=main.__doc__)
    parser.add_argument("--model", choices=("synthetic", "smollm2"), default="synthetic",
                        help="synthetic: a tiny word-level Llama on a synthetic task (about a minute, nothing "
                             "downloaded); smollm2: the real SmolLM2-135M-Instruct on the shipped dialogues, "
                             "method P weights (a few minutes on a 2-core CPU; converts the model once)")
    parser.add_argument("--output-dir", default=None,
                        help=f"where the runs, weights and figures go (default {DemoConfig.output_dir!r}, with "
                             "--model smollm2 'tisdpo-demo-smollm2')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run (synthetic: about 20 seconds; smollm2: 2 training and 4 held-out pairs, "
                             "2 steps of 1 pair)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="optimiser steps of DPO and of TIS-DPO each (default: synthetic 40, --quick 20; "
                             "smollm2 4, --quick 2)")
    parser.add_argument("--weight-transform", default=DemoConfig.weight_transform, choices=WEIGHT_TRANSFORMS,
                        help="transform of TIS-DPO's token weights")
    parser.add_argument("--progress", action="store_true", help="show progress bars and training logs")
    args = parser.parse_args(argv)
    if args.model == "smollm2":
        return _smollm2(args)
    cfg = DemoConfig(output_dir=args.output_dir or DemoConfig.output_dir, seed=args.seed,
                     weight_transform=args.weight_transform)
    if args.quick:
        cfg = DemoConfig(**{**asdict(cfg), **QUICK})
    if args.steps is not None:
        cfg.policy_steps = args.steps
    run_demo(cfg, progress=args.progress)
    return 0


def _smollm2(args) -> int:
    from ..demo_smollm2 import QUICK as SMOLLM2_QUICK
    from ..demo_smollm2 import SmolLM2DemoConfig, run_smollm2_demo

    cfg = SmolLM2DemoConfig(seed=args.seed, weight_transform=args.weight_transform,
                            **SMOLLM2_QUICK if args.quick else {})
    cfg.output_dir = args.output_dir or cfg.output_dir
    if args.steps is not None:
        cfg.steps = args.steps
    try:
        run_smollm2_demo(cfg, progress=args.progress)
    except KeyboardInterrupt as stop:
        print(f"tisdpo demo: interrupted{f' ({stop})' if str(stop) else ''}; nothing half-written is left in "
              f"{cfg.output_dir}: a rerun reuses the converted model and the finished weight shards",
              file=sys.stderr)
        return 130
    return 0
