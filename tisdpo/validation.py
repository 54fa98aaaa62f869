"""Checks of what a user hands to `tisdpo`: YAML configs, option values, paths, data files and their rows.

Every check raises `InputError` (a `ValueError`) whose message names the file or the option, the line or row where
there is one, and the field or column, so that `tisdpo` can print it as one line (`tisdpo: error: ...`, exit
status 2) instead of a traceback. Rows count from 0, as `dataset[i]` does; lines of a file count from 1.

The command line runs the data checks right after loading the data, before any model is loaded; the trainer runs
the per-row ones again while tokenising (`tisdpo.data`), so the Python API gets the same messages.

This module imports only the standard library, yaml and `tisdpo.formats` at import time (`tisdpo --help` stays
fast).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import types
import typing
from collections import Counter
from enum import Enum
from typing import Any

import yaml

from .formats import DATA_EXTENSIONS, PROMPT_IDS, REF_COLUMNS, WEIGHT_COLUMNS, pair_drop_reason

logger = logging.getLogger(__name__)

FLOAT32_MAX = 3.4028234663852886e38
NONE_STRINGS = ("None", "null")


class InputError(ValueError):
    """Bad input from the user (a file, a row, a field, an option). `tisdpo` prints the message without a
    traceback; the message names where the problem is."""


# ----------------------------------------------------------------------------------------------------------------
# YAML configs and option values
# ----------------------------------------------------------------------------------------------------------------


def load_yaml_mapping(path: str, option: str = "--config") -> tuple[dict[str, Any], dict[str, int]]:
    """The mapping of a YAML config file and the line (from 1) of each of its keys; `batch-size` reads as
    `batch_size`. A missing file, a syntax error, a file that is not a mapping or a key given twice (also as
    `batch-size` and `batch_size`) is an `InputError`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError(f"{option}: no such file: {path!r}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{option}: cannot read {path!r}: {err}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise InputError(f"{path}{where}: YAML syntax error: {problem}") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise InputError(f"{path}: must hold a mapping of option names to values, got a {type(values).__name__}")
    lines: dict[str, int] = {}
    for key, _ in node.value:
        name, line = str(key.value).replace("-", "_"), key.start_mark.line + 1
        if name in lines:  # yaml keeps the last value silently
            raise InputError(f"{path}, line {line}: `{name}` is given twice (first on line {lines[name]})")
        lines[name] = line
    return {str(k).replace("-", "_"): v for k, v in values.items()}, lines


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list"}
    origin = typing.get_origin(hint) or hint
    return names.get(origin, getattr(origin, "__name__", str(hint)))


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a (non-string) YAML value has the type `hint` of a dataclass field; unknown hints accept anything."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return isinstance(value, hint) or value in [m.value for m in hint]
    if (origin or hint) is list:
        item = (typing.get_args(hint) or (Any,))[0]
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if (origin or hint) is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_option_values(parser: argparse.ArgumentParser, values: dict[str, Any], path: str,
                        lines: dict[str, int] | None = None, hints: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the values a YAML file gives for the options of `parser` (keys are option `dest`s) before they become
    the parser's defaults: a string is converted as if it were typed after its flag (and must be one of the
    option's choices), any other value must have the field's type (`hints`, from the dataclasses) or, without a
    hint, the option's `int`/`float` type. `InputError` names the file, the line and the field.

    Returns the values with YAML's `true`/`false` turned into the strings `"true"`/`"false"` for fields that take a
    string but not a bool (`resume_from_checkpoint: true`)."""
    actions = {a.dest: a for a in parser._actions}
    values = dict(values)
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            continue
        where = f"{path}, line {lines[key]}" if lines and key in lines else path
        hint = (hints or {}).get(key)
        if isinstance(value, bool) and hint is not None and _conforms("", hint) and not _conforms(True, hint):
            value = values[key] = str(value).lower()
        if isinstance(value, str):
            try:
                converted = action.type(value) if callable(action.type) else value
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise InputError(f"{where}: `{key}`: invalid value {value!r} ({err})") from None
            if action.choices is not None and converted is not None and converted not in action.choices:
                choices = ", ".join(repr(c) for c in action.choices)
                raise InputError(f"{where}: `{key}` must be one of {choices}, got {value!r}")
            continue
        if hint is not None:
            ok = _conforms(value, hint)
        elif action.type in (int, float):
            ok = _conforms(value, action.type) or (value is None and action.default is None)
        else:
            ok = True
        if not ok:
            expected = _describe(hint if hint is not None else action.type)
            raise InputError(f"{where}: `{key}` must be {expected}, got {value!r} ({type(value).__name__})")
    return values


def accept_none_strings(parser: argparse.ArgumentParser, hints: dict[str, Any]) -> None:
    """Let every option whose field may be None take `None` (or `null`) on the command line and in YAML strings,
    meaning None (`--kl None`, `--max_length None`). Fields that also take a list (`report_to`) are left to
    `TrainingArguments`, which reads their strings itself."""
    for action in parser._actions:
        hint = hints.get(action.dest)
        if hint is None or type(None) not in typing.get_args(hint) or not callable(action.type):
            continue
        if any((typing.get_origin(a) or a) is list for a in typing.get_args(hint)):
            continue
        convert = action.type

        def none_or(text, convert=convert):
            return None if text in NONE_STRINGS else convert(text)

        none_or.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
        action.type = none_or


def config_path_of(argv: list[str], option: str = "--config") -> tuple[str | None, list[str]]:
    """The file of `--config FILE` (or `--config=FILE`) in `argv` and `argv` without it. Given twice, or without a
    file, it is an `InputError` (argparse would keep one of the two silently)."""
    found, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == option:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise InputError(f"{option} needs a file name")
            found.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(option + "="):
            found.append(arg[len(option) + 1:])
        else:
            rest.append(arg)
        i += 1
    if len(found) > 1:
        raise InputError(f"{option} is given {len(found)} times ({', '.join(found)}); give one file (flags on the "
                         "command line override its values)")
    return (found[0] if found else None), rest


def unknown_option_message(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """argparse's `unrecognized arguments` message, with the closest known option for each unknown flag."""
    known = [s for a in parser._actions for s in a.option_strings]
    hints = []
    for arg in unknown:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1)
            if close:
                hints.append(f"{arg}: did you mean {close[0]}?")
    return "unrecognized arguments: " + " ".join(unknown) + ("" if not hints else " (" + "; ".join(hints) + ")")


# ----------------------------------------------------------------------------------------------------------------
# paths
# ----------------------------------------------------------------------------------------------------------------


def _path_like(value: str) -> bool:
    """True for a string that can only be a local path, not a hub id (`name` or `namespace/name`)."""
    return (os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1 or "\\" in value
            or value.endswith("/") or os.path.splitext(value)[1].lower() in DATA_EXTENSIONS)


_SAVED_FILES = {"model": ("config.json", "adapter_config.json"),
                "tokenizer": ("tokenizer_config.json", "tokenizer.json", "config.json")}


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set to 1/true)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # an id the hub client rejects is not in its cache either
        return False


def hub_unreachable(value: str, option: str, reason: str) -> InputError:
    """The error for a hub id (`namespace/name`) that is no local path while the hub cannot be reached."""
    return InputError(f"{option}: {value!r} is not a local directory, and the hub is unreachable ({reason})")


def check_model_path(value: str | None, option: str, kind: str = "model") -> None:
    """A model (`kind="model"`: config.json or adapter_config.json) or tokenizer (`kind="tokenizer"`) given as a
    local path must be a directory holding one, or a `.gguf` file; a hub id (`name` or `namespace/name`) that is
    not a local directory is left to transformers, unless the hub is switched off (`hub_offline`) and the id is
    not in the local hub cache."""
    if value is None:
        return
    if value.lower().endswith(".gguf"):
        if not os.path.isfile(value):
            raise InputError(f"{option}: no such GGUF file: {value!r}")
        return
    if os.path.isdir(value):
        saved = _SAVED_FILES[kind]
        if not any(os.path.exists(os.path.join(value, f)) for f in saved):
            what = "config.json (not a saved model)" if kind == "model" else "tokenizer_config.json (not a tokenizer)"
            raise InputError(f"{option}: {value!r} is a directory without {what}")
        return
    if os.path.exists(value):
        raise InputError(f"{option}: {value!r} is a file; give the directory of a saved {kind} or a .gguf file")
    if _path_like(value):
        raise InputError(f"{option}: no such directory: {value!r}")
    if hub_offline() and not _in_hub_cache(value, _SAVED_FILES[kind][0]):
        raise hub_unreachable(value, option, "HF_HUB_OFFLINE=1, and it is not in the local hub cache")


def check_output_dir(value: str, option: str = "--output_dir") -> None:
    """The output directory must be a directory (or not exist yet, under a directory) that this process can write."""
    if os.path.exists(value) and not os.path.isdir(value):
        raise InputError(f"{option}: {value!r} is a file, not a directory")
    existing = value
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep)) or "."
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == value else f"cannot be created: {existing!r} is"
        raise InputError(f"{option}: {value!r} {what} not writable")


def check_data_source(value: str, option: str) -> None:
    """A data source that looks like a local path (a data-file extension, `./`, `/`, ...) must exist; a
    local data file must not be empty."""
    if os.path.isfile(value):
        if os.path.getsize(value) == 0 or not _has_content(value):
            raise InputError(f"{option}: {value} is empty (no preference pairs)")
        return
    if not os.path.exists(value) and _path_like(value):
        raise InputError(f"{option}: no such file or directory: {value!r}")


def _has_content(path: str) -> bool:
    with open(path, "rb") as f:
        return bool(f.read(1 << 16).strip())


# ----------------------------------------------------------------------------------------------------------------
# data files and rows
# ----------------------------------------------------------------------------------------------------------------


def weight_values(value: Any, column: str) -> list[float]:
    """One row's weight column as floats: a list of finite numbers that fit in float32. `InputError` otherwise,
    naming the column and the first bad value (callers add the file and the row)."""
    if isinstance(value, str):
        raise InputError(f"`{column}` must be a list of numbers (one per response token), got the string {value!r}")
    if value is None:
        raise InputError(f"`{column}` is null; give a list of numbers (one per response token)")
    try:
        items = list(value)
    except TypeError:
        raise InputError(f"`{column}` must be a list of numbers, got {value!r} ({type(value).__name__})") from None
    out = []
    for i, w in enumerate(items):
        if isinstance(w, bool) or not isinstance(w, (int, float)) and not _is_numpy_number(w):
            raise InputError(f"`{column}`[{i}] must be a number, got {w!r} ({type(w).__name__})")
        w = float(w)
        if not math.isfinite(w):
            raise InputError(f"`{column}`[{i}] is {w} (weights must be finite)")
        if abs(w) > FLOAT32_MAX:
            raise InputError(f"`{column}`[{i}] is {w:g}, beyond float32's range (+-3.4e38)")
        out.append(w)
    return out


def _is_numpy_number(value: Any) -> bool:
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    return kind in ("f", "i", "u") and getattr(value, "ndim", 1) == 0


def check_weight_columns(dataset, source: str, null_rows: bool = False) -> None:
    """Every row's `chosen_weights` / `rejected_weights` (when the columns exist, both or neither): a list of
    finite numbers within float32's range (`null_rows=True`: or null, a pair `tisdpo estimate-weights` wrote no
    weights for). Numeric list columns are checked in bulk with numpy; other column types are read row by row. The
    token counts are checked at tokenisation (they need the tokenizer)."""
    import numpy as np
    import pyarrow as pa

    present = [c for c in WEIGHT_COLUMNS if c in dataset.column_names]
    if len(present) == 1:
        raise InputError(f"{source}: has `{present[0]}` but no `{(set(WEIGHT_COLUMNS) - set(present)).pop()}` "
                         "column; give both or neither")
    table = dataset.select_columns(present).flatten_indices().data.table if present else None
    for column in present:
        arrow = table.column(column).combine_chunks()
        numeric = pa.types.is_list(arrow.type) and (pa.types.is_floating(arrow.type.value_type)
                                                    or pa.types.is_integer(arrow.type.value_type))
        if numeric and arrow.null_count == 0 and arrow.values.null_count == 0:
            values = arrow.values.to_numpy(zero_copy_only=False).astype(np.float64)
            bad = ~np.isfinite(values) | (np.abs(values) > FLOAT32_MAX)
            if not bad.any():
                continue
            offsets = arrow.offsets.to_numpy()
            first = int(np.argmax(bad))
            row = int(np.searchsorted(offsets, first, side="right") - 1)
        else:
            row = None
        rows = range(len(dataset)) if row is None else [row]
        for i in rows:
            value = dataset[i][column]
            if value is None and null_rows:
                continue
            try:
                weight_values(value, column)
            except InputError as err:
                raise InputError(f"{source}, row {i}: {err}") from None


LOGP_TOLERANCE = 1e-3


def check_ref_logp_columns(dataset, source: str) -> None:
    """Per-token reference log-prob columns (`ref_chosen_token_logps`, `ref_rejected_token_logps`), when present,
    hold log-probabilities: finite and <= 0 (up to `LOGP_TOLERANCE`, float rounding). A positive value is most
    likely a negative log-likelihood passed by mistake; `InputError` names the row, the column and the index."""
    import numpy as np

    present = [c for c in REF_COLUMNS if c in dataset.column_names]
    if not present:
        return
    table = dataset.select_columns(present).flatten_indices().data.table
    for column in present:
        arrow = table.column(column).combine_chunks()
        values = arrow.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(values) | (values > LOGP_TOLERANCE)
        if not bad.any():
            continue
        first = int(np.argmax(bad))
        offsets = arrow.offsets.to_numpy() - int(arrow.offsets[0].as_py())
        row = int(np.searchsorted(offsets, first, side="right") - 1)
        value = values[first]
        why = ("log-probs are <= 0; a negative log-likelihood (-log p) passed by mistake?" if np.isfinite(value)
               else "log-probs must be finite")
        raise InputError(f"{source}, row {row}: `{column}`[{first - offsets[row]}] is {value:g} ({why})")


CHAT_ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")


def check_chat_messages(example: dict[str, Any]) -> None:
    """In a conversational example (`chosen` is a list of messages), every message of `prompt`, `chosen` and
    `rejected` must be an object with a known `role` (`CHAT_ROLES`) and a `content`; `InputError` names the field,
    the message and the role (callers add the file and the row). Other examples pass unchecked."""
    chosen = example.get("chosen")
    if not (isinstance(chosen, list) and chosen and all(isinstance(m, dict) for m in chosen)):
        return
    for column in ("prompt", "chosen", "rejected"):
        messages = example.get(column)
        if messages is None and column == "prompt":
            continue
        if not isinstance(messages, list):
            raise InputError(f"`{column}` must be a list of messages like `chosen`, got {type(messages).__name__}")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise InputError(f"`{column}`[{i}] must be a message object with `role` and `content`, got "
                                 f"{type(message).__name__}")
            keys = [str(k) for k, v in message.items() if v is not None]  # a datasets row fills absent keys with None
            if message.get("role") is None:
                raise InputError(f"`{column}`[{i}] has no `role` (keys: {', '.join(keys)}); each message needs `role` "
                                 "and `content`")
            if message["role"] not in CHAT_ROLES:
                raise InputError(f"`{column}`[{i}] has the unknown role {message['role']!r} (roles: "
                                 f"{', '.join(CHAT_ROLES)})")
            if message.get("content") is None and message.get("tool_calls") is None:
                raise InputError(f"`{column}`[{i}] has no `content` (keys: {', '.join(keys)})")


def check_preference_data(dataset, source: str) -> None:
    """The columns of a preference dataset (`chosen` and `rejected`, or already tokenised ids), its weight and
    reference log-prob columns and, in conversational data, every message's role (`check_chat_messages`);
    `source` (the file or hub name) leads every message."""
    columns = dataset.column_names
    if len(dataset) == 0:
        raise InputError(f"{source}: has no rows (no preference pairs)")
    if PROMPT_IDS not in columns:
        missing = [c for c in ("chosen", "rejected") if c not in columns]
        if missing:
            raise InputError(f"{source}: no {' or '.join(f'`{c}`' for c in missing)} column (columns: "
                             f"{', '.join(columns)}); a preference dataset needs `chosen` and `rejected`")
    check_weight_columns(dataset, source)
    check_ref_logp_columns(dataset, source)
    first = dataset[0]
    if isinstance(first.get("chosen"), list):
        texts = [c for c in ("prompt", "chosen", "rejected") if c in columns]
        values = {c: dataset[c] for c in texts}
        for i in range(len(dataset)):
            try:
                check_chat_messages({c: values[c][i] for c in texts})
            except InputError as err:
                raise InputError(f"{source}, row {i}: {err}") from None


def diagnose_json_lines(path: str) -> None:
    """Find the first line of a JSON / JSON Lines file that `datasets` could not read and raise an `InputError`
    naming it: bytes that are not UTF-8, a line that is not valid JSON or not an object, or a weight column that
    is not a list of numbers. Returns without raising when no such line is found."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise InputError(f"{path}, line {line}, column {column}: byte {raw[err.start:err.start + 1]!r} is not "
                         "UTF-8 (save the file as UTF-8)") from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON array of objects
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}, line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}") from None
        numbered = [(f"row {i}", r) for i, r in enumerate(records)] if isinstance(records, list) else []
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}, line {lineno}, column {err.colno}: invalid JSON: {err.msg}") from None
    for where, record in numbered:
        if not isinstance(record, dict):
            raise InputError(f"{path}, {where}: must be a JSON object with `chosen` and `rejected`, got "
                             f"{type(record).__name__}")
        for column in WEIGHT_COLUMNS:
            if column in record:
                try:
                    weight_values(record[column], column)
                except InputError as err:
                    raise InputError(f"{path}, {where}: {err}") from None


# ----------------------------------------------------------------------------------------------------------------
# pairs that carry no preference
# ----------------------------------------------------------------------------------------------------------------


_REASON_TEXT = {
    "identical": "identical chosen and rejected responses",
    "empty chosen": "an empty chosen response",
    "empty rejected": "an empty rejected response",
}


def _reasons_batch(batch: dict[str, list], indices: list[int], name: str) -> dict[str, list]:
    keys = list(batch)
    reasons = []
    for i, index in enumerate(indices):
        row = {k: batch[k][i] for k in keys}
        try:  # a message without a role would read as an empty response: say what is wrong instead
            check_chat_messages(row)
        except InputError as err:
            raise InputError(f"{name} row {index}: {err}") from None
        reasons.append(pair_drop_reason(row) or "")
    return {"reason": reasons}


def drop_degenerate_pairs(dataset, name: str = "train", num_proc: int | None = None):
    """`dataset` without the pairs `tisdpo.formats.pair_drop_reason` rejects; their count per reason goes to the log.
    A conversational row with a bad message (`check_chat_messages`) is an `InputError` naming `name` and the row."""
    reasons = dataset.map(_reasons_batch, batched=True, with_indices=True, fn_kwargs={"name": name},
                          remove_columns=dataset.column_names, num_proc=num_proc,
                          desc=f"Checking {name} preference pairs")["reason"]
    counts = Counter(r for r in reasons if r)
    if not counts:
        return dataset
    logger.warning("Dropped %d of %d %s pairs: %s.", sum(counts.values()), len(dataset), name,
                   ", ".join(f"{n} with {_REASON_TEXT[r]}" for r, n in sorted(counts.items())))
    return dataset.select([i for i, r in enumerate(reasons) if not r])
