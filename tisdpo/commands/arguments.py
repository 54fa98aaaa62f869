"""The argument helpers the `tisdpo` commands share: `TrainArguments` (what to train on), the YAML + flags parsing
of `tisdpo train` (`parse_train_args`, also read by `tisdpo contrastive`) and its checks (`check_train_inputs`),
the `--config file.yaml` defaults of the argparse commands (`apply_yaml_defaults`, `parse_with_yaml`) and their
flag types (`optional_int`, `auto_bool`).
Bad input is an `InputError` naming the file, the line and the field, or an argparse usage error (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from ..config import TISDPOConfig
from ..validation import (
    InputError,
    accept_none_strings,
    check_data_source,
    check_model_path,
    check_option_values,
    check_output_dir,
    config_path_of,
    load_yaml_mapping,
    unknown_option_message,
)


@dataclass
class TrainArguments:
    """What to train on: the model, the reference model and the data."""

    model_name_or_path: str = field(metadata={"help": "Policy model: hub name, local directory or .gguf file."})
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


def _train_fields() -> set[str]:
    """The keys a `tisdpo train` YAML file may hold: the fields of `TrainArguments` and `TISDPOConfig`."""
    return {f.name for dc in (TrainArguments, TISDPOConfig) for f in fields(dc) if f.init}


def _train_parser():
    from transformers import HfArgumentParser

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
    parser, hints = _train_parser()
    config_path, argv = config_path_of(argv)
    if config_path is not None:
        apply_yaml_defaults(parser, config_path, _train_fields(), hints)
    _, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unknown_option_message(unknown, parser))
    try:
        # the trailing namespace holds only --config, already consumed above
        train_args, config, _ = parser.parse_args_into_dataclasses(args=argv)
    except (TypeError, ValueError) as err:  # TISDPOConfig / TrainingArguments reject a setting
        parser.error(str(err))
    return train_args, config


def check_train_inputs(train_args: TrainArguments, config: TISDPOConfig) -> None:
    """What `tisdpo train` and `tisdpo contrastive` check before loading anything: the model, reference and
    tokenizer paths, the data source, `--max_train_samples` and `--output_dir` (`InputError` naming the option)."""
    for option, kind in (("model_name_or_path", "model"), ("ref_model_name_or_path", "model"),
                         ("tokenizer_name_or_path", "tokenizer")):
        check_model_path(getattr(train_args, option), f"--{option}", kind)
    check_data_source(train_args.dataset_name, "--dataset_name")
    if train_args.max_train_samples is not None and train_args.max_train_samples < 1:
        raise InputError(f"--max_train_samples must be >= 1 (or None: all pairs), got {train_args.max_train_samples}")
    check_output_dir(config.output_dir)


def parse_with_yaml(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config file.yaml`` mapping of option names (``batch_size`` or ``batch-size``)
    supplies defaults that flags on the command line override. The file may be the one ``tisdpo train``
    reads: fields of ``TrainArguments`` / ``TISDPOConfig`` are accepted (those this command shares, such as
    ``max_length`` or ``padding_free``, are used; the others are ignored); any other key is an error."""
    config_path, rest = config_path_of(list(sys.argv[1:] if argv is None else argv))
    if config_path is not None:
        apply_yaml_defaults(parser, config_path, {a.dest for a in parser._actions} | _train_fields())
    args = parser.parse_args(rest)
    ours = {a.dest for a in parser._actions}
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k in ours})


def optional_int(text: str) -> int | None:
    """argparse type: a positive int, or ``None``/``none``/``null`` for no limit."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or None, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or None, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a positive int."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def auto_bool(value) -> bool | None:
    """``--padding-free`` / ``--prefix-sharing`` ``auto|true|false``, or the trainer YAML's ``true|false|null``."""
    if value is None or isinstance(value, bool):
        return value
    return {"auto": None, "true": True, "false": False}[value]
