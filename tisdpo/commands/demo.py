"""`tisdpo demo`: the whole TIS-DPO pipeline on a synthetic task, on CPU (`tisdpo.run_demo`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict

from .. import demo
from ..demo import QUICK, DemoConfig, run_demo
from ..response_weights import WEIGHT_TRANSFORMS


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whole TIS-DPO pipeline on a synthetic task, on CPU, in about a minute (nothing downloaded)."""
    parser = argparse.ArgumentParser(prog="tisdpo demo", description=demo.__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=DemoConfig.output_dir, help="where the runs, weights and figures go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smaller run (about 20 seconds)")
    parser.add_argument("--weight-transform", default=DemoConfig.weight_transform, choices=WEIGHT_TRANSFORMS,
                        help="transform of TIS-DPO's token weights")
    parser.add_argument("--progress", action="store_true", help="show progress bars and training logs")
    args = parser.parse_args(argv)
    cfg = DemoConfig(output_dir=args.output_dir, seed=args.seed, weight_transform=args.weight_transform)
    if args.quick:
        cfg = DemoConfig(**{**asdict(cfg), **QUICK})
    run_demo(cfg, progress=args.progress)
    return 0
