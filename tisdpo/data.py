"""Preference data: loading, tokenisation, truncation and batch collation.

Accepted example formats (TRL's preference formats; their column names and the data-file table live in
`tisdpo.formats`):

* explicit prompt, plain text: `{"prompt": str, "chosen": str, "rejected": str}`;
* explicit prompt, conversational: `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}` with
  messages `{"role": ..., "content": ...}`, rendered with the tokenizer's chat template;
* implicit prompt: `{"chosen": ..., "rejected": ...}` full texts or dialogues sharing a prefix (Anthropic
  HH-RLHF's `"\n\nHuman: ...\n\nAssistant: ..."`); the shared prefix becomes the prompt
  (`tisdpo.formats.extract_prompt`).

Optional per-token columns `chosen_weights` / `rejected_weights` (one float per response token, as tokenised
by `tokenize_row`) ride along; see `TISDPOConfig` for what they hold.

Data already tokenised by TRL (`prompt_ids`, `chosen_ids`, `rejected_ids`) is used as it is (renamed to ours).
A `datasets.IterableDataset` (streaming) is tokenised on the fly, weight columns included.

Tokenisation at the prompt/response boundary (`tokenization`): `"separate"` (default) tokenises the prompt and each
response on their own, `"joint"` (TRL's convention) tokenises prompt + response together and splits where the
tokens of the prompt alone and of prompt + response diverge (TRL >= 1.16; `_split_joint`). Special tokens are the
tokenizer's own (as in TRL): the prompt gets what the tokenizer adds by itself (a Llama-style tokenizer's BOS;
nothing for GPT-2 / Pythia-style tokenizers, so no BOS the model never sees at inference), each plain-text response
gets the EOS token.

The tokenised dataset has the columns `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`
(response tokens only) and, when present, the weight columns and the per-token reference log-prob columns
`ref_chosen_token_logps` / `ref_rejected_token_logps` (added by the trainer's precompute step).

`PreferenceCollator` turns a list of tokenised pairs into one batch of 2B sequences, the B chosen ones first,
either padded (`[2B, T]`) or packed without padding (`[1, N]` with `position_ids` and `cu_seqlens`). Labels are
already shifted: `labels[..., t]` is the token predicted from the hidden state at position t, and is -100
(`IGNORE_INDEX`) on prompt, padding and the last position of each sequence.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from .formats import (
    CHOSEN_IDS,
    CHOSEN_WEIGHTS,
    DATA_FILE_BUILDERS,
    PROMPT_IDS,
    REF_CHOSEN_LOGPS,
    REF_REJECTED_LOGPS,
    REJECTED_IDS,
    REJECTED_WEIGHTS,
    TOKENIZATION_MODES,
    TOKENIZED_COLUMNS,
    TRL_TOKENIZED_COLUMNS,
    TRUNCATION_MODES,
    WEIGHT_COLUMNS,
    extract_prompt,
    is_conversational,
    is_messages,
    pair_drop_reason,
)
from .validation import (
    InputError,
    check_chat_messages,
    check_data_source,
    diagnose_json_lines,
    drop_degenerate_pairs,
    weight_values,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_warned: set[str] = set()

_SWAP = {
    "chosen": "rejected",
    "rejected": "chosen",
    CHOSEN_IDS: REJECTED_IDS,
    REJECTED_IDS: CHOSEN_IDS,
    CHOSEN_WEIGHTS: REJECTED_WEIGHTS,
    REJECTED_WEIGHTS: CHOSEN_WEIGHTS,
    REF_CHOSEN_LOGPS: REF_REJECTED_LOGPS,
    REF_REJECTED_LOGPS: REF_CHOSEN_LOGPS,
}


# ----------------------------------------------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------------------------------------------


def apply_chat_template(example: dict[str, Any], tokenizer) -> dict[str, str]:
    """Render a conversational example to `{"prompt", "chosen", "rejected"}` texts with the chat template.

    The prompt is rendered with `add_generation_prompt=True`; each response is the rendering of prompt +
    response with the prompt's rendering removed from its front (a `ValueError` if the template does not render
    the prompt as a prefix of the full dialogue).
    """
    if "prompt" in example and example["prompt"] is not None:
        prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
        if not (isinstance(prompt, list) and is_messages(chosen) and is_messages(rejected)):
            raise TypeError("a conversational example needs message lists in `prompt`, `chosen` and `rejected`")
    else:
        prompt, chosen, rejected = extract_prompt(example["chosen"], example["rejected"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational data needs a tokenizer with a `chat_template`")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = {"prompt": prompt_text}
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        full = tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(
                "the chat template does not render the prompt (with add_generation_prompt=True) as a prefix of "
                f"the prompt + {key} dialogue; cannot split the {key} response off"
            )
        out[key] = full[len(prompt_text):]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str, special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _split_joint(tokenizer, prompt: str, chosen: str, rejected: str,
                 special_tokens: bool) -> tuple[list[int], list[int], list[int]]:
    """TRL's convention (TRL >= 1.16): tokenise `prompt`, `prompt + chosen` and `prompt + rejected`; the prompt is
    the longest common prefix of the prompt's tokens and both full sequences, each response what follows it. Where
    tokens merge across the boundary (a prompt ending in a space, a word split between prompt and response) the
    merged token goes to the responses and the prompt loses its last tokens: no response text is lost.
    Returns `(prompt_ids, chosen_ids, rejected_ids)`."""
    prompt_ids = _encode(tokenizer, prompt, special_tokens)
    chosen_full = _encode(tokenizer, prompt + chosen, special_tokens)
    rejected_full = _encode(tokenizer, prompt + rejected, special_tokens)
    n_prompt = min(_common_prefix_length(prompt_ids, chosen_full), _common_prefix_length(prompt_ids, rejected_full))
    if n_prompt < len(prompt_ids):
        _warn_once(
            "joint-prefix",
            "tokenization='joint': the tokens of a prompt are not a prefix of the tokens of prompt + response (a "
            "merge across the boundary); as TRL does, the prompt is cut where they diverge "
            f"({tokenizer.decode(prompt_ids[n_prompt:])!r} moves into the responses' first token).",
        )
    return prompt_ids[:n_prompt], chosen_full[n_prompt:], rejected_full[n_prompt:]


def tokenize_row(
    example: dict[str, Any],
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
    tokenization: str = "separate",
) -> dict[str, list] | None:
    """Tokenise and truncate one preference example; None when it must be dropped.

    Plain text: the prompt is tokenised with the special tokens the tokenizer adds by itself (BOS for a
    Llama-style tokenizer, none for a GPT-2-style one that defines BOS but does not add it, as TRL does), and each
    response gets the EOS token at its end (when the tokenizer defines one and the text does not already end with
    it). A plain-text prompt ending in a space gets a warning (once): its tokens are not those of normal text.
    Chat-template text is tokenised as rendered. `tokenization`: `"separate"` (prompt and each response on their
    own) or `"joint"` (TRL's: prompt + response together, the prompt being the tokens the prompt alone shares with
    both; see `TISDPOConfig.tokenization`). Weight columns, when present, must hold one float per response token of
    this tokenisation, either of the whole response (they are truncated together with the tokens) or of the part the
    truncation keeps (as `tisdpo estimate-weights` writes them under the same truncation options).

    Returns `{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"[, "chosen_weights",
    "rejected_weights"]}`, or None if the prompt or a response is empty (after truncation).
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"`truncation_mode` must be 'keep_end' or 'keep_start', got {truncation_mode!r}")
    if tokenization not in TOKENIZATION_MODES:
        raise ValueError(f"`tokenization` must be one of {TOKENIZATION_MODES}, got {tokenization!r}")
    if "chosen" not in example or "rejected" not in example:
        raise ValueError(f"a preference example needs `chosen` and `rejected`, got keys {sorted(example)}")
    check_chat_messages(example)
    plain = not is_conversational(example)
    if plain:
        if example.get("prompt") is None:
            prompt, chosen, rejected = extract_prompt(example["chosen"], example["rejected"])
        else:
            prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
        if not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
            raise TypeError("`prompt`, `chosen` and `rejected` must all be strings or all be message lists")
    else:
        texts = apply_chat_template(example, tokenizer)
        prompt, chosen, rejected = texts["prompt"], texts["chosen"], texts["rejected"]

    eos = tokenizer.eos_token_id if plain else None
    if plain and prompt.endswith(" "):
        _warn_once(
            "prompt-space",
            "a prompt ends in a space: BPE tokenizers attach spaces to the following word, so its last token is one "
            "the model rarely sees; move the space to the start of the responses.",
        )
    if tokenization == "joint":
        if eos is not None:  # TRL appends the EOS text before tokenising
            chosen, rejected = (text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token
                                for text in (chosen, rejected))
        prompt_ids, chosen_ids, rejected_ids = _split_joint(tokenizer, prompt, chosen, rejected, plain)
    else:
        prompt_ids = _encode(tokenizer, prompt, special_tokens=plain)
        chosen_ids, rejected_ids = _encode(tokenizer, chosen), _encode(tokenizer, rejected)
        if eos is not None:
            chosen_ids = chosen_ids if chosen_ids and chosen_ids[-1] == eos else chosen_ids + [eos]
            rejected_ids = rejected_ids if rejected_ids and rejected_ids[-1] == eos else rejected_ids + [eos]

    responses = {"chosen": [chosen_ids, None], "rejected": [rejected_ids, None]}
    given = {}  # column -> (side, number of values, untruncated response length); checked after truncation
    for key, column in (("chosen", CHOSEN_WEIGHTS), ("rejected", REJECTED_WEIGHTS)):
        if example.get(column) is not None:
            weights = weight_values(example[column], column)
            given[column] = (key, len(weights), len(responses[key][0]))
            responses[key][1] = weights

    def cut_response(limit: int) -> None:
        for item in responses.values():
            item[0] = item[0][:limit]
            if item[1] is not None:
                item[1] = item[1][:limit]

    if max_completion_length is not None:
        cut_response(max_completion_length)
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        keep_end = truncation_mode == "keep_end"
        prompt_ids = prompt_ids[-max_prompt_length:] if keep_end else prompt_ids[:max_prompt_length]
    if max_length is not None:
        if truncation_mode == "keep_end":
            longest = max(len(item[0]) for item in responses.values())
            excess = len(prompt_ids) + longest - max_length
            if excess > 0:
                prompt_ids = prompt_ids[min(excess, len(prompt_ids) - 1):]
        else:
            prompt_ids = prompt_ids[:max_length]
        cut_response(max_length - len(prompt_ids))

    for column, (key, n_values, n_full) in given.items():  # the whole response, or the part truncation keeps
        n_kept = len(responses[key][0])
        if n_values not in (n_full, n_kept):
            kept = f" ({n_kept} after truncation)" if n_kept != n_full else ""
            raise ValueError(
                f"`{column}` has {n_values} values but the {key} response has {n_full} tokens{kept}; weights must be "
                "computed on the same tokenisation and truncation (tisdpo.data.tokenize_row)"
            )
    if not prompt_ids or any(len(item[0]) == 0 for item in responses.values()):
        return None
    out = {PROMPT_IDS: prompt_ids, CHOSEN_IDS: responses["chosen"][0], REJECTED_IDS: responses["rejected"][0]}
    if responses["chosen"][1] is not None or responses["rejected"][1] is not None:
        if responses["chosen"][1] is None or responses["rejected"][1] is None:
            raise ValueError(f"`{CHOSEN_WEIGHTS}` and `{REJECTED_WEIGHTS}` must be given together")
        out[CHOSEN_WEIGHTS], out[REJECTED_WEIGHTS] = responses["chosen"][1], responses["rejected"][1]
    return out


def _tokenize_batch(batch: dict[str, list], indices: list[int], tokenizer, options: dict[str, Any],
                    name: str = "train") -> dict[str, list]:
    keys = list(batch)
    out: dict[str, list] = {}
    for i in range(len(batch[keys[0]])):
        try:
            row = tokenize_row({k: batch[k][i] for k in keys}, tokenizer, **options)
        except (TypeError, ValueError) as err:  # bad data: name the row (the cause stays chained)
            raise InputError(f"{name} row {indices[i]}: {err}") from err
        if row is None:
            continue
        for k, v in row.items():
            out.setdefault(k, []).append(v)
    if not out:  # every row of this batch was dropped: keep the schema
        out = {PROMPT_IDS: [], CHOSEN_IDS: [], REJECTED_IDS: []}
        if CHOSEN_WEIGHTS in batch:
            out[CHOSEN_WEIGHTS], out[REJECTED_WEIGHTS] = [], []
    return out


def _column_names(dataset) -> list[str]:
    """Column names of a Dataset or IterableDataset (an IterableDataset without features: its first row's keys)."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)))


def swap_preferences(dataset: datasets.Dataset) -> datasets.Dataset:
    """Exchange chosen and rejected columns (texts, token ids, weights, reference log-probs)."""
    mapping = {old: new for old, new in _SWAP.items() if old in _column_names(dataset)}
    missing = [new for new in mapping.values() if new not in mapping]
    if missing:
        raise ValueError(f"cannot swap preferences: columns {missing} lack their counterparts")
    return dataset.rename_columns(mapping)


def prepare_preference_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
    reverse_preferences: bool = False,
    num_proc: int | None = None,
    name: str = "train",
    tokenization: str = "separate",
) -> datasets.Dataset | datasets.IterableDataset:
    """Tokenise a preference dataset (any accepted format) into the columns `PreferenceCollator` reads.

    Columns other than the text, weight and reference columns are dropped. An already tokenised dataset (with
    `prompt_input_ids`, or TRL's `prompt_ids` / `chosen_ids` / `rejected_ids`, renamed) is returned as is (after the
    optional swap). Pairs dropped because truncation emptied the prompt or a response are counted in the log. A
    `datasets.IterableDataset` is tokenised lazily, row by row as it is read (its dropped pairs are not counted).
    """
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(
            f"`{name}_dataset` must be a datasets.Dataset or datasets.IterableDataset, got {type(dataset).__name__}"
        )
    streaming = isinstance(dataset, datasets.IterableDataset)
    columns = _column_names(dataset)
    trl_columns = {old: new for old, new in TRL_TOKENIZED_COLUMNS.items() if old in columns}
    if trl_columns and PROMPT_IDS not in columns:
        dataset = dataset.rename_columns(trl_columns)
        columns = [trl_columns.get(c, c) for c in columns]
    if reverse_preferences:
        dataset = swap_preferences(dataset)
        columns = [_SWAP.get(c, c) for c in columns]
    if PROMPT_IDS in columns:
        missing = [c for c in (CHOSEN_IDS, REJECTED_IDS) if c not in columns]
        if missing:
            raise ValueError(f"tokenised `{name}_dataset` lacks the columns {missing}")
        return dataset.remove_columns([c for c in columns if c not in TOKENIZED_COLUMNS])
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise ValueError(f"`{name}_dataset` lacks the columns {missing} (has {columns})")
    if (CHOSEN_WEIGHTS in columns) != (REJECTED_WEIGHTS in columns):
        raise ValueError(f"`{name}_dataset` must have both or neither of {WEIGHT_COLUMNS}")
    if streaming:  # filtered lazily, as it is read (the drops are not counted)
        dataset = dataset.filter(lambda example: pair_drop_reason(example) is None)
    else:
        dataset = drop_degenerate_pairs(dataset, name, num_proc)
    options = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "max_completion_length": max_completion_length,
        "truncation_mode": truncation_mode,
        "tokenization": tokenization,
    }
    map_kwargs = {} if streaming else {"num_proc": num_proc, "desc": f"Tokenizing {name} preference pairs"}
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        fn_kwargs={"tokenizer": tokenizer, "options": options, "name": name},
        **map_kwargs,
    )
    if streaming:
        return tokenized
    dropped = len(dataset) - len(tokenized)
    if dropped:
        logger.warning(
            "Dropped %d of %d %s pairs whose prompt or response was empty after truncation "
            "(max_length=%s, max_prompt_length=%s, max_completion_length=%s, truncation_mode=%s).",
            dropped, len(dataset), name, max_length, max_prompt_length, max_completion_length, truncation_mode,
        )
    if len(tokenized) == 0:
        raise InputError(_nothing_left_message(dataset, tokenizer, options, name))
    return tokenized


def _nothing_left_message(dataset: datasets.Dataset, tokenizer, options: dict[str, Any], name: str) -> str:
    """Why no pair of `dataset` survived tokenisation: the truncation option (`max_length`, `max_prompt_length`,
    `max_completion_length`) without which its first pair would be kept, or the pairs themselves."""
    if len(dataset) == 0:
        return f"no {name} pair is left: every pair has identical or empty responses (see the log)"
    first = dataset[0]
    for option in ("max_completion_length", "max_prompt_length", "max_length"):
        if options[option] is not None and tokenize_row(first, tokenizer, **{**options, option: None}) is not None:
            return (f"no {name} pair is left after tokenisation and truncation (all {len(dataset)} dropped): "
                    f"--{option} {options[option]} empties every pair (row 0 keeps no prompt or no response "
                    "token); raise it or set it to None")
    return f"no {name} pair is left after tokenisation and truncation (all {len(dataset)} dropped)"


def load_preference_dataset(source: str, split: str = "train", **kwargs: Any) -> datasets.Dataset:
    """Load a dataset by hub name, local JSON/JSONL/CSV/Parquet file, or a `save_to_disk` directory.

    Extra keyword arguments go to `datasets.load_dataset` (e.g. `name=` for a configuration).
    """
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
        loaded = datasets.load_from_disk(source)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    extension = os.path.splitext(source)[1].lower()
    check_data_source(source, "dataset")
    if os.path.isfile(source):
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(f"unsupported data file extension {extension!r} in {source!r}; "
                             f"use {sorted(DATA_FILE_BUILDERS)}")
        builder = DATA_FILE_BUILDERS[extension]
        try:
            loaded = datasets.load_dataset(builder, data_files=source, split=split, **kwargs)
            loaded.data.table.validate(full=True)  # pyarrow's JSON reader lets bytes that are not UTF-8 through
            return loaded
        except Exception as err:  # name the line datasets could not read, or at least the file
            if builder == "json":
                diagnose_json_lines(source)
            raise InputError(f"{source}: cannot be read as {builder}: {type(err).__name__}: {err}") from err
    return datasets.load_dataset(source, split=split, **kwargs)


def save_dataset(dataset: datasets.Dataset, output: str) -> str:
    """Write ``dataset`` to ``output``: a ``.jsonl``/``.json`` or ``.parquet`` file, else a ``save_to_disk``
    directory (readable by ``load_preference_dataset`` and so by ``tisdpo train``)."""
    builder = DATA_FILE_BUILDERS.get(os.path.splitext(output)[1].lower())
    if builder == "json":
        dataset.to_json(output, lines=True)
    elif builder == "parquet":
        dataset.to_parquet(output)
    else:
        dataset.save_to_disk(output)
    return output


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PreferenceCollator:
    """Collate tokenised pairs into one batch of 2B sequences: the B chosen ones, then the B rejected ones.

    Sequence k is `prompt + response`; with P prompt tokens and R response tokens its labels are -100 at
    positions 0..P-2, the response tokens at P-1..P+R-2 and -100 at the last position (labels are shifted).
    Per-token columns (weights, reference log-probs) are placed at the same positions as the response labels
    and are 0 elsewhere.

    Padded (`padding_free=False`) output, T = longest sequence:
        input_ids [2B, T] int64 (right-padded with `pad_token_id`), attention_mask [2B, T] int64,
        labels [2B, T] int64, cu_seqlens [2B+1] int32 (row boundaries of the flattened batch, `k*T`).
    Packed (`padding_free=True`) output, N = total tokens:
        input_ids [1, N] int64, position_ids [1, N] int64 (restarting at 0 for every sequence),
        labels [1, N] int64, cu_seqlens [2B+1] int32 (sequence boundaries).
    Both, when the pairs carry them: token_weights [same as labels] float32 (chosen weights then rejected
    weights), ref_logps [same as labels] float32. `pad_to_multiple_of`: T (padded) or N (packed: the last
    sequence is extended with pad tokens, label -100, which causal attention keeps from touching the others) is
    rounded up to a multiple of it.
    """

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("`features` is empty")
        has_weights = [CHOSEN_WEIGHTS in f and f[CHOSEN_WEIGHTS] is not None for f in features]
        has_ref = [REF_CHOSEN_LOGPS in f and f[REF_CHOSEN_LOGPS] is not None for f in features]
        if len(set(has_weights)) > 1 or len(set(has_ref)) > 1:
            raise ValueError("either every pair of a batch carries weights (reference log-probs) or none does")
        sequences: list[tuple[list[int], list[int], list[float] | None, list[float] | None]] = []
        for side, ids_key, weight_key, ref_key in (
            ("chosen", CHOSEN_IDS, CHOSEN_WEIGHTS, REF_CHOSEN_LOGPS),
            ("rejected", REJECTED_IDS, REJECTED_WEIGHTS, REF_REJECTED_LOGPS),
        ):
            for f in features:
                prompt, response = list(f[PROMPT_IDS]), list(f[ids_key])
                if not prompt or not response:
                    raise ValueError(f"a pair has an empty prompt or {side} response")
                for key in (weight_key, ref_key):
                    if f.get(key) is not None and len(f[key]) != len(response):
                        raise ValueError(f"`{key}` has {len(f[key])} values for a {len(response)}-token response")
                sequences.append((prompt, response, f.get(weight_key), f.get(ref_key)))

        rows = []
        for prompt, response, weights, ref in sequences:
            n_prompt, n = len(prompt), len(prompt) + len(response)
            labels = [IGNORE_INDEX] * n
            labels[n_prompt - 1 : n - 1] = response
            row = {"input_ids": prompt + response, "labels": labels}
            for name, values in (("token_weights", weights), ("ref_logps", ref)):
                if values is not None:
                    dense = [0.0] * n
                    dense[n_prompt - 1 : n - 1] = values
                    row[name] = dense
            rows.append(row)
        float_keys = [k for k in ("token_weights", "ref_logps") if k in rows[0]]
        lengths = [len(r["input_ids"]) for r in rows]
        multiple = self.pad_to_multiple_of or 1

        if self.padding_free:
            extra = -sum(lengths) % multiple
            if extra:
                last = rows[-1]
                last["input_ids"] = last["input_ids"] + [self.pad_token_id] * extra
                last["labels"] = last["labels"] + [IGNORE_INDEX] * extra
                for key in float_keys:
                    last[key] = last[key] + [0.0] * extra
                lengths[-1] += extra
            batch = {
                "input_ids": torch.tensor([sum((r["input_ids"] for r in rows), [])], dtype=torch.long),
                "position_ids": torch.tensor([[p for n in lengths for p in range(n)]], dtype=torch.long),
                "labels": torch.tensor([sum((r["labels"] for r in rows), [])], dtype=torch.long),
            }
            for key in float_keys:
                batch[key] = torch.tensor([sum((r[key] for r in rows), [])], dtype=torch.float32)
            bounds = [0]
            for n in lengths:
                bounds.append(bounds[-1] + n)
            batch["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
            return batch

        width = -(-max(lengths) // multiple) * multiple

        def padded(key, value, dtype):
            return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows], dtype=dtype)

        batch = {
            "input_ids": padded("input_ids", self.pad_token_id, torch.long),
            "attention_mask": torch.tensor([[1] * n + [0] * (width - n) for n in lengths], dtype=torch.long),
            "labels": padded("labels", IGNORE_INDEX, torch.long),
        }
        for key in float_keys:
            batch[key] = padded(key, 0.0, torch.float32)
        batch["cu_seqlens"] = torch.arange(len(rows) + 1, dtype=torch.int32) * width
        return batch


def split_responses(values: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """A per-token tensor of a collated batch (padded or packed) -> one CPU float32 tensor per sequence holding
    the values at its response positions (labels != ``IGNORE_INDEX``), in order. ``cu_seqlens`` ``[2B+1]``: the
    sequence bounds in the flattened batch (``PreferenceCollator``'s). One device-to-host copy per batch."""
    flat = values.detach().reshape(-1).to("cpu", torch.float32)
    keep = (labels.reshape(-1) != IGNORE_INDEX).cpu()
    bounds = cu_seqlens.tolist()
    return [flat[a:b][keep[a:b]] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
