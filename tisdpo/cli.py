"""The `tisdpo` console command: `tisdpo <command> [args]`.

`tisdpo train --config run.yaml [--field value ...]` trains with `TISDPOTrainer`. The YAML file holds any field of
`TrainArguments` (model, data) and of `TISDPOConfig` (all `TrainingArguments` included); flags given on the
command line override it (`--beta 0.2`, `--kl tisdpo`, `--model_init_kwargs '{"dtype": "bfloat16"}'`).

Other commands come from the modules in `PLUGIN_MODULES`: each may define
`CLI_COMMANDS: dict[str, Callable[[list[str]], int | None]]`, mapping a command name to a function that parses
its own arguments (the list after the command name) and returns an exit status (None means 0). A module that
does not exist is skipped; the help lists what was found.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import yaml
from transformers import HfArgumentParser

from .config import TISDPOConfig

PLUGIN_MODULES = ("tisdpo.weights", "tisdpo.contrastive", "tisdpo.visualize", "tisdpo.demo")

logger = logging.getLogger(__name__)


@dataclass
class TrainArguments:
    """What to train on: the model, the reference model and the data."""

    model_name_or_path: str = field(metadata={"help": "Policy model: hub name or local directory."})
    dataset_name: str = field(
        metadata={"help": "Preference data: hub name, local JSON/JSONL/CSV/Parquet file, or save_to_disk directory."}
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model (default: a frozen copy of the initial policy)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the policy's)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (hub datasets)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (None: no evaluation set)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training pairs (quick runs)."}
    )


def apply_yaml_defaults(parser: argparse.ArgumentParser, config_path: str, known: set[str]) -> None:
    """Make the ``config_path`` YAML mapping (keys in ``known``; ``batch-size`` reads as ``batch_size``) the
    defaults of ``parser``, so that flags on the command line override it; options the file gives are no
    longer required on the command line. Unknown keys or a non-mapping file are a parser error."""
    with open(config_path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        parser.error(f"{config_path} must hold a mapping of option names to values")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"{config_path}: unknown fields {unknown}")
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False


def parse_train_args(argv: list[str]) -> tuple[TrainArguments, TISDPOConfig]:
    parser = HfArgumentParser((TrainArguments, TISDPOConfig), prog="tisdpo train")
    parser.add_argument("--config", default=None, help="YAML file with TrainArguments / TISDPOConfig fields.")
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a file name")
        config_path, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    if config_path is not None:
        known = {f.name for dc in (TrainArguments, TISDPOConfig) for f in fields(dc) if f.init}
        apply_yaml_defaults(parser, config_path, known)
    # the trailing namespace holds only --config, already consumed above
    train_args, config, _ = parser.parse_args_into_dataclasses(args=argv)
    return train_args, config


def train(argv: list[str]) -> int:
    """Train with TISDPOTrainer (`tisdpo train --config run.yaml [--field value ...]`)."""
    from .data import load_preference_dataset
    from .trainer import TISDPOTrainer

    train_args, config = parse_train_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_kwargs = {"name": train_args.dataset_config} if train_args.dataset_config else {}
    train_set = load_preference_dataset(train_args.dataset_name, split=train_args.dataset_train_split, **load_kwargs)
    if train_args.max_train_samples is not None:
        train_set = train_set.select(range(min(train_args.max_train_samples, len(train_set))))
    eval_set = None
    if train_args.dataset_test_split:
        eval_set = load_preference_dataset(train_args.dataset_name, split=train_args.dataset_test_split, **load_kwargs)
    tokenizer = None
    if train_args.tokenizer_name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(train_args.tokenizer_name_or_path)
    trainer = TISDPOTrainer(
        model=train_args.model_name_or_path,
        ref_model=train_args.ref_model_name_or_path,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.save_state()
    if eval_set is not None:
        trainer.evaluate()
    return 0


def commands() -> dict[str, Callable[[list[str]], int | None]]:
    """All commands: `train` plus the `CLI_COMMANDS` of every installed plugin module."""
    found: dict[str, Callable[[list[str]], int | None]] = {"train": train}
    for module_name in PLUGIN_MODULES:
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        for name, func in getattr(module, "CLI_COMMANDS", {}).items():
            if name in found:
                raise RuntimeError(f"command {name!r} is defined twice ({module_name} and another module)")
            found[name] = func
    return found


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
    status = available[name](rest)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
