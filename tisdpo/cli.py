"""The `tisdpo` console command: `tisdpo <command> [args]` (also `python -m tisdpo <command> [args]`).

`COMMANDS` is the command table: name -> (`"module:function"`, one-line summary). Each entry point lives in
`tisdpo.commands`, takes the arguments after the command name and returns an exit status (None means 0); its
module is imported only when the command runs, so `tisdpo --help` imports no heavy module. `tisdpo train --config
run.yaml [--field value ...]` trains with `TISDPOTrainer`: the YAML file holds any field of `TrainArguments`
(model, data) and of `TISDPOConfig` (all `TrainingArguments` included); flags given on the command line override
it (`--beta 0.2`, `--kl tisdpo`, `--model_init_kwargs '{"dtype": "bfloat16"}'`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from .validation import InputError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("tisdpo.commands.train:main",
              "Train with TISDPOTrainer (`tisdpo train --config run.yaml [--field value ...]`)."),
    "estimate-weights": ("tisdpo.commands.estimate_weights:main",
                         "Estimate per-token rewards log pi_plus - log pi_minus of a preference dataset (methods P, S, "
                         "D)."),
    "contrastive": ("tisdpo.commands.contrastive:main",
                    "Train the contrastive pair pi_plus / pi_minus for token weights (method S or D)."),
    "visualize": ("tisdpo.commands.visualize:main",
                  "Draw token weights of preference pairs as an HTML page and a PNG figure."),
    "demo": ("tisdpo.commands.demo:main",
             "Run the whole TIS-DPO pipeline on CPU: a synthetic task (about a minute) or SmolLM2-135M-Instruct "
             "(--model smollm2)."),
    "fetch-model": ("tisdpo.commands.fetch_model:main",
                    "Convert a known pretrained model (smollm2) to a cached bfloat16 directory once; print its path."),
}


class _LazyCommand:
    """A command whose module is imported only when the command runs (`tisdpo --help` imports none)."""

    def __init__(self, target: str, summary: str):
        self.target, self.__doc__ = target, summary

    def __call__(self, argv: list[str]) -> int | None:
        module_name, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module_name), function)(argv)


def commands() -> dict[str, Callable[[list[str]], int | None]]:
    """Every command of `COMMANDS`: name -> a function of the arguments after the command name."""
    return {name: _LazyCommand(target, summary) for name, (target, summary) in COMMANDS.items()}


def _usage(available: dict[str, Callable]) -> str:
    lines = ["usage: tisdpo <command> [args]", "", "commands:"]
    for name, func in available.items():
        summary = (func.__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<18}{summary[0] if summary else ''}")
    lines.append("")
    lines.append("`tisdpo <command> --help` describes a command's arguments.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tisdpo` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    available = commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(available))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in available:
        print(f"tisdpo: unknown command {name!r}\n\n{_usage(available)}", file=sys.stderr)
        return 2
    try:
        status = available[name](rest)
    except InputError as err:  # bad input the message already locates; real bugs keep their traceback
        print(f"tisdpo: error: {err}", file=sys.stderr)
        return 2
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
