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
import ast
import importlib
import importlib.util
import logging
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields

if typing.TYPE_CHECKING:
    from .config import TISDPOConfig

from .validation import (
    InputError,
    accept_none_strings,
    check_data_source,
    check_model_path,
    check_option_values,
    check_preference_data,
    load_yaml_mapping,
    resolve_resume_from_checkpoint,
    unknown_option_message,
)

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


def apply_yaml_defaults(parser: argparse.ArgumentParser, config_path: str, known: set[str],
                        hints: dict[str, typing.Any] | None = None) -> None:
    """Make the ``config_path`` YAML mapping (keys in ``known``; ``batch-size`` reads as ``batch_size``) the
    defaults of ``parser``, so that flags on the command line override it; options the file gives are no
    longer required on the command line. Unknown keys or a non-mapping file are a parser error; a missing file,
    a YAML syntax error or a value of the wrong type (``hints``: field name -> type, else the option's type) an
    ``InputError`` naming the file, the line and the field."""
    values, lines = load_yaml_mapping(config_path)
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"{config_path}: unknown fields {unknown}")
    values = check_option_values(parser, values, config_path, lines, hints)
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False


def _train_parser():
    from transformers import HfArgumentParser

    from .config import TISDPOConfig

    parser = HfArgumentParser(
        (TrainArguments, TISDPOConfig), prog="tisdpo train",
        usage="tisdpo train [--config run.yaml] [--field value ...]  (`tisdpo train --help` lists the fields)",
    )
    parser.add_argument("--config", default=None, help="YAML file with TrainArguments / TISDPOConfig fields.")
    hints = {**typing.get_type_hints(TrainArguments), **typing.get_type_hints(TISDPOConfig)}
    accept_none_strings(parser, hints)
    return parser, hints


def parse_train_args(argv: list[str]) -> tuple[TrainArguments, TISDPOConfig]:
    """`TrainArguments` and `TISDPOConfig` from ``argv`` (``--config run.yaml`` gives defaults). An unknown flag,
    a value of the wrong type or a setting the config rejects is a usage error (exit status 2); a problem in the
    YAML file an ``InputError``. ``None`` (or ``none``, ``null``) sets an optional field to None."""
    from .config import TISDPOConfig

    parser, hints = _train_parser()
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a file name")
        config_path, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    if config_path is not None:
        known = {f.name for dc in (TrainArguments, TISDPOConfig) for f in fields(dc) if f.init}
        apply_yaml_defaults(parser, config_path, known, hints)
    _, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unknown_option_message(unknown, parser))
    try:
        # the trailing namespace holds only --config, already consumed above
        train_args, config, _ = parser.parse_args_into_dataclasses(args=argv)
    except (TypeError, ValueError) as err:  # TISDPOConfig / TrainingArguments reject a setting
        parser.error(str(err))
    return train_args, config


def train(argv: list[str]) -> int:
    """Train with TISDPOTrainer (`tisdpo train --config run.yaml [--field value ...]`)."""
    from .data import load_preference_dataset
    from .trainer import TISDPOTrainer

    train_args, config = parse_train_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # everything the user named is checked here, before any model is loaded
    for option in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path"):
        check_model_path(getattr(train_args, option), f"--{option}")
    check_data_source(train_args.dataset_name, "--dataset_name")
    resume = resolve_resume_from_checkpoint(config.resume_from_checkpoint, config.output_dir)
    load_kwargs = {"name": train_args.dataset_config} if train_args.dataset_config else {}
    train_set = load_preference_dataset(train_args.dataset_name, split=train_args.dataset_train_split, **load_kwargs)
    if train_args.max_train_samples is not None:
        train_set = train_set.select(range(min(train_args.max_train_samples, len(train_set))))
    check_preference_data(train_set, train_args.dataset_name)
    eval_set = None
    if train_args.dataset_test_split:
        eval_set = load_preference_dataset(train_args.dataset_name, split=train_args.dataset_test_split, **load_kwargs)
        check_preference_data(eval_set, f"{train_args.dataset_name} [{train_args.dataset_test_split}]")
    tokenizer = None
    if train_args.tokenizer_name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(train_args.tokenizer_name_or_path)
    try:
        trainer = TISDPOTrainer(
            model=train_args.model_name_or_path,
            ref_model=train_args.ref_model_name_or_path,
            args=config,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
        )
    except InputError as err:  # a row the tokenisation rejected: name the file too
        raise InputError(f"{train_args.dataset_name}: {err}") from err
    if resume is not None:
        logger.info("Resuming from %s.", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    trainer.save_state()
    if eval_set is not None:
        trainer.evaluate()
    return 0


class _LazyCommand:
    """A plugin command whose module is imported only when the command runs (`tisdpo --help` imports none)."""

    def __init__(self, module_name: str, name: str, summary: str):
        self.module_name, self.name, self.__doc__ = module_name, name, summary

    def __call__(self, argv: list[str]) -> int | None:
        return importlib.import_module(self.module_name).CLI_COMMANDS[self.name](argv)


def _declared_commands(module_name: str, spec) -> dict[str, str] | None:
    """The `CLI_COMMANDS` of a module not imported yet, read from its source: command name -> the function's
    docstring. None when the source does not hold a literal `CLI_COMMANDS = {"name": function, ...}`."""
    origin = getattr(spec, "origin", None)
    if module_name in sys.modules or not isinstance(origin, str) or not origin.endswith(".py"):
        return None
    with open(origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    docs = {n.name: ast.get_docstring(n) or "" for n in tree.body if isinstance(n, ast.FunctionDef)}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and \
                any(isinstance(t, ast.Name) and t.id == "CLI_COMMANDS" for t in node.targets):
            pairs = list(zip(node.value.keys, node.value.values, strict=True))
            if all(isinstance(k, ast.Constant) and isinstance(k.value, str) and isinstance(v, ast.Name)
                   and v.id in docs for k, v in pairs):
                return {k.value: docs[v.id] for k, v in pairs}
    return None


def commands() -> dict[str, Callable[[list[str]], int | None]]:
    """All commands: `train` plus the `CLI_COMMANDS` of every installed plugin module. A module whose source
    declares them literally is imported only when one of its commands runs."""
    found: dict[str, Callable[[list[str]], int | None]] = {"train": train}
    for module_name in PLUGIN_MODULES:
        spec = importlib.util.find_spec(module_name)
        if spec is None:
            continue
        declared = _declared_commands(module_name, spec)
        if declared is not None:
            entries = {name: _LazyCommand(module_name, name, doc) for name, doc in declared.items()}
        else:
            entries = getattr(importlib.import_module(module_name), "CLI_COMMANDS", {})
        for name, func in entries.items():
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
    try:
        status = available[name](rest)
    except InputError as err:  # bad input the message already locates; real bugs keep their traceback
        print(f"tisdpo: error: {err}", file=sys.stderr)
        return 2
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
