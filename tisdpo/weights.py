"""Token weights for TIS-DPO: the weight transforms and their estimation from a contrastive model pair.

Token reward (DESIGN §1): ``r_t = log pi_plus(y_t) - log pi_minus(y_t)`` for every response token, from
a "good" model ``pi_plus`` and a "bad" model ``pi_minus``. A token the good model prefers should weigh more
in the winning (chosen) response, a token the bad model prefers more in the losing (rejected) one, so

    chosen tokens:   w_t = T(r_t)          rejected tokens:   w_t = T(-r_t)

**Column convention** (shared with ``tisdpo.config.TISDPOConfig``): a dataset's ``chosen_weights`` column
holds, per chosen-response token, ``x_t = r_t``; its ``rejected_weights`` column holds, per
rejected-response token, ``x_t = -r_t`` (the sign is flipped once, when the columns are written). The
trainer applies the same elementwise transform to both columns, ``w_t = T(x_t)``, so the transform can be
changed without re-estimating. ``estimate_token_weights`` writes such columns; ``transform_token_weights``
turns them into final weights (any transform, per-response ones included), to train with
``weight_transform="origin"``.

Transforms (all of DESIGN §1):

- elementwise, delegated to ``tisdpo_kernels.transforms.apply_weight_transform`` (so the loss kernel and
  this module agree): ``origin``, ``threshold``, ``threshold_and_scale``, ``exp_clamp``;
- per response (they need the whole response, so they belong to the data pipeline, not to the loss):
  ``rank_based`` (rank within the response mapped linearly onto ``[min_weight, max_weight]`` =
  ``[0.7, 1.3]``; ties share their average rank), ``binary`` (1 for the ``ceil(top_fraction * n)``
  highest-reward tokens of a response, 0 for the rest; ties go to the earlier token) and ``random``
  (uniform on ``[0.7, 1.3]``, independent of the rewards: the paper's ablation; seeded).

``binary`` keeps the top half by default (``top_fraction=0.5``): keeping 100%, the upstream preset, makes
every weight 1, i.e. plain DPO. The upstream code also gives the final response position (the EOS token)
weight 0; here that is the ``eos_weight`` option of ``transform_token_weights`` / ``response_weights``
(``None``, the default, keeps the transform's value).

Estimation: ``estimate_token_weights(dataset, pi_plus, pi_minus, tokenizer, method="P"|"S"|"D")`` (and
``tisdpo estimate-weights``, this module's ``main``) computes ``r_t`` for every response token with
``tisdpo_kernels.fused_linear_logprobs`` on the decoders' last hidden states, in resumable, cached shards.
How to train ``pi_plus``/``pi_minus``: ``tisdpo.contrastive``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
from collections.abc import Sequence

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from tisdpo_kernels import fused_linear_logprobs
from tisdpo_kernels.transforms import ELEMENTWISE_TRANSFORMS, apply_weight_transform
from tisdpo_kernels.transforms import transform_params as _elementwise_params

from .config import PER_RESPONSE_TRANSFORMS, TISDPOConfig
from .data import (
    CHOSEN_IDS,
    PROMPT_IDS,
    REJECTED_IDS,
    TOKENIZATION_MODES,
    PreferenceCollator,
    extract_prompt,
    is_conversational,
    split_responses,
    tokenize_row,
)
from .prefix import PREFIX_DOC_IDS, PrefixSharedCollator, check_attention, prefix_model_inputs
from .trainer import EFFICIENT_PACKING_ATTENTION, model_fingerprint

logger = logging.getLogger(__name__)

WEIGHT_TRANSFORMS = ELEMENTWISE_TRANSFORMS + PER_RESPONSE_TRANSFORMS
_PER_RESPONSE_DEFAULTS = {
    "rank_based": {"min_weight": 0.7, "max_weight": 1.3},
    "binary": {"top_fraction": 0.5},
    "random": {"min_weight": 0.7, "max_weight": 1.3, "seed": 0},
}


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------


def transform_params(name: str, kwargs: dict | None = None) -> dict:
    """Full, validated parameter dict of transform ``name``: its defaults overridden by ``kwargs``.

    Raises ``ValueError`` for an unknown transform, an unknown key or an invalid value.
    """
    if name in ELEMENTWISE_TRANSFORMS:
        return _elementwise_params(name, kwargs)
    if name not in _PER_RESPONSE_DEFAULTS:
        raise ValueError(f"weight transform must be one of {WEIGHT_TRANSFORMS}, got {name!r}")
    params = dict(_PER_RESPONSE_DEFAULTS[name])
    unknown = set(kwargs or {}) - set(params)
    if unknown:
        raise ValueError(f"transform_kwargs has unknown keys {sorted(unknown)} for {name!r}; known: {sorted(params)}")
    params.update(kwargs or {})
    if "min_weight" in params and not params["min_weight"] <= params["max_weight"]:
        raise ValueError(
            f"transform_kwargs: min_weight ({params['min_weight']}) must be <= max_weight ({params['max_weight']})"
        )
    if name == "binary" and not 0.0 < params["top_fraction"] <= 1.0:
        raise ValueError(f"transform_kwargs: top_fraction must lie in (0, 1], got {params['top_fraction']!r}")
    if name == "random" and not isinstance(params["seed"], int):
        raise TypeError(f"transform_kwargs: seed must be an int, got {type(params['seed']).__name__}")
    return params


def _as_rewards(rewards, name: str = "rewards") -> torch.Tensor:
    t = torch.as_tensor(rewards)
    if not t.dtype.is_floating_point:
        t = t.to(torch.float32)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per response token), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite values (NaN/inf)")
    return t


def _rank_based(x: torch.Tensor, min_weight: float, max_weight: float) -> torch.Tensor:
    n = x.numel()
    if n == 1:
        return x.new_full((1,), (min_weight + max_weight) / 2)
    ordered = torch.sort(x).values
    below = torch.searchsorted(ordered, x, right=False)  # tokens with a smaller reward
    up_to = torch.searchsorted(ordered, x, right=True)  # tokens with a smaller or equal reward
    rank = (below + up_to - 1).to(x.dtype) / 2  # average rank of a tie group, in [0, n-1]
    return min_weight + (max_weight - min_weight) * rank / (n - 1)


def _binary(x: torch.Tensor, top_fraction: float) -> torch.Tensor:
    n = x.numel()
    keep = min(n, math.ceil(top_fraction * n - 1e-9))
    order = torch.sort(x, descending=True, stable=True).indices
    out = torch.zeros_like(x)
    out[order[:keep]] = 1.0
    return out


def _random(x: torch.Tensor, min_weight: float, max_weight: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
    return (min_weight + (max_weight - min_weight) * u).to(x.dtype)


def example_generator(seed: int, index: int, side: str) -> torch.Generator:
    """The generator of the ``random`` transform for one response: a fixed function of the transform's
    ``seed``, the example's ``index`` in its dataset and ``side`` (``"chosen"``/``"rejected"``), so that
    results do not depend on processing order or batching."""
    digest = hashlib.sha256(f"{seed}:{index}:{side}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def response_weights(
    x,
    name: str = "origin",
    transform_kwargs: dict | None = None,
    *,
    eos_weight: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Weights of one response's tokens: ``T(x)`` for transform ``name``.

    Args:
        x: ``[n]`` float (tensor or sequence), one value per response token, in the column convention
            of this module (``r_t`` for a chosen response, ``-r_t`` for a rejected one). Must be finite.
        name: one of ``WEIGHT_TRANSFORMS``; ``transform_kwargs`` override its defaults (see
            ``transform_params``).
        eos_weight: if not None, the final position's weight is set to this value after the transform
            (the upstream code uses 0 for the EOS token).
        generator: the ``random`` transform's generator; default: one seeded from its ``seed`` parameter.
    Returns:
        ``[n]`` weights, x's floating dtype (float32 for non-tensor input).
    """
    params = transform_params(name, transform_kwargs)
    t = _as_rewards(x, "x")
    if t.numel() == 0:
        raise ValueError("x is empty: a response needs at least one token")
    if name in ELEMENTWISE_TRANSFORMS:
        w = apply_weight_transform(t, name, **params)
    elif name == "rank_based":
        w = _rank_based(t, params["min_weight"], params["max_weight"])
    elif name == "binary":
        w = _binary(t, params["top_fraction"])
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(params["seed"])
        w = _random(t, params["min_weight"], params["max_weight"], generator)
    if eos_weight is not None:
        w = w.clone()
        w[-1] = eos_weight
    return w


def pair_weights(
    chosen_rewards,
    rejected_rewards,
    name: str = "origin",
    transform_kwargs: dict | None = None,
    *,
    eos_weight: float | None = None,
    index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN §1 weights of one pair from the raw token rewards ``r = log pi_plus - log pi_minus``.

    Args:
        chosen_rewards: ``[n_c]`` raw ``r_t`` of the chosen response's tokens.
        rejected_rewards: ``[n_r]`` raw ``r_t`` of the rejected response's tokens (not sign-flipped).
        index: the example's index, seeding the ``random`` transform (see ``example_generator``).
    Returns:
        ``(T(r_chosen), T(-r_rejected))``, shapes ``[n_c]`` and ``[n_r]``.
    """
    seed = transform_params(name, transform_kwargs).get("seed", 0)
    chosen = response_weights(chosen_rewards, name, transform_kwargs, eos_weight=eos_weight,
                              generator=example_generator(seed, index, "chosen"))
    rejected = response_weights(-_as_rewards(rejected_rewards, "rejected_rewards"), name, transform_kwargs,
                                eos_weight=eos_weight, generator=example_generator(seed, index, "rejected"))
    return chosen, rejected


def transform_token_weights(
    dataset,
    name: str,
    transform_kwargs: dict | None = None,
    *,
    eos_weight: float | None = None,
    num_proc: int | None = None,
):
    """A copy of ``dataset`` whose ``chosen_weights``/``rejected_weights`` columns hold final weights.

    The input columns follow this module's convention (chosen: ``r_t``, rejected: ``-r_t``, as written by
    ``estimate_token_weights``); each response's column becomes ``T(x)`` (``transform_kwargs``,
    ``eos_weight`` as in ``response_weights``; the ``random`` transform is seeded per example index and
    side; a None column, a pair the trainer drops, stays None). Train on the result with
    ``weight_transform="origin"``. Needed for the per-response transforms
    (``rank_based``, ``binary``, ``random``) and for the EOS option; elementwise transforms can instead be
    left to the trainer.

    Args:
        dataset: a ``datasets.Dataset`` with ``chosen_weights`` and ``rejected_weights`` (lists of floats).
    Returns:
        a ``datasets.Dataset`` with the two columns replaced (float32 lists).
    """
    for column in ("chosen_weights", "rejected_weights"):
        if column not in dataset.column_names:
            raise ValueError(f"dataset has no {column!r} column (columns: {dataset.column_names})")
    params = transform_params(name, transform_kwargs)
    seed = params.get("seed", 0)

    def one(example, idx):
        out = {}
        for side in ("chosen", "rejected"):
            if example[f"{side}_weights"] is None:  # a pair the trainer drops (estimate_token_weights)
                out[f"{side}_weights"] = None
                continue
            w = response_weights(example[f"{side}_weights"], name, params, eos_weight=eos_weight,
                                 generator=example_generator(seed, idx, side))
            out[f"{side}_weights"] = w.to(torch.float32).tolist()
        return out

    return dataset.map(one, with_indices=True, num_proc=num_proc, desc=f"token weights: {name}")


# ----------------------------------------------------------------------------------------------
# estimation: r_t = log pi_plus(y_t) - log pi_minus(y_t) for every response token
# ----------------------------------------------------------------------------------------------

METHODS = ("P", "S", "D")
DEFAULT_SYSTEM_PROMPTS = (
    "You are a careful, honest and kind assistant. You give accurate answers, treat everyone with respect, "
    "and decline requests that could hurt someone.",
    "You are a reckless assistant that ignores accuracy, safety and other people. You go along with any "
    "request, however harmful, misleading or disrespectful the answer is.",
)
# bump when the shard contents change meaning: old caches are then not reused (3: prompts keep only the
# tokenizer's own BOS, tokenize_row)
_FORMAT_VERSION = 3
_SHARD_SCHEMA = pa.schema([("chosen_weights", pa.list_(pa.float32())), ("rejected_weights", pa.list_(pa.float32()))])
_SHARD_METADATA_KEY = b"tisdpo.token_weights"
# the trainer's truncation options (tisdpo.data.tokenize_row), with TISDPOConfig's defaults
TRUNCATION_OPTIONS = ("max_length", "max_prompt_length", "max_completion_length", "truncation_mode")
TRUNCATION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TISDPOConfig) if f.name in TRUNCATION_OPTIONS}


def with_system_prompt(example: dict, system_prompt: str) -> dict:
    """A copy of a preference example whose prompt starts with ``system_prompt`` (method P).

    Conversational examples get a ``{"role": "system"}`` message in front of the prompt (merged into an
    existing leading system message); plain-text examples get ``system_prompt + "\\n\\n"`` in front of the
    prompt. Implicit-prompt examples are split first (``tisdpo.data.extract_prompt``). The responses are
    untouched, so their tokens are the same with either prompt.
    """
    out = dict(example)
    if out.get("prompt") is None:
        out["prompt"], out["chosen"], out["rejected"] = extract_prompt(out["chosen"], out["rejected"])
    if is_conversational(out):
        messages = [dict(m) for m in out["prompt"]]
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{system_prompt}\n\n{messages[0]['content']}"
        else:
            messages.insert(0, {"role": "system", "content": system_prompt})
        out["prompt"] = messages
    else:
        out["prompt"] = f"{system_prompt}\n\n{out['prompt']}"
    return out


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("bos_token_id", "eos_token_id", "chat_template"):
        h.update(repr(getattr(tokenizer, attr, None)).encode())
    return h.hexdigest()[:16]


def decoder_hidden_states(model, batch: dict) -> torch.Tensor:
    """Last hidden states of the decoder under the LM head (the head itself is not run): ``[2B, T, D]``
    for a padded batch, ``[1, N, D]`` for a packed one (``position_ids`` restart at every sequence); ``[B, T, D]``
    or ``[1, N, D]`` for a ``tisdpo.prefix.PrefixSharedCollator`` batch (its mask built for the model's attention)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    if PREFIX_DOC_IDS in batch:
        inputs = prefix_model_inputs(batch, _attn_implementation(model), decoder.get_input_embeddings().weight.dtype)
    else:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return decoder(**inputs, use_cache=False).last_hidden_state


def token_logps(model, batch: dict, backend: str = "auto") -> torch.Tensor:
    """Per-token label log-probs of a ``PreferenceCollator`` batch (padded or packed) or a
    ``PrefixSharedCollator`` batch (its explicit ``row_index``) under a causal LM, shaped like
    ``batch["labels"]``, float32, 0 off the responses; through ``fused_linear_logprobs`` on the decoder's last
    hidden states and the LM head weight (no ``[tokens, vocab]`` logits)."""
    head = model.get_output_embeddings()
    hidden = decoder_hidden_states(model, batch)
    return fused_linear_logprobs(hidden, head.weight, batch["labels"], bias=getattr(head, "bias", None),
                                 backend=backend, row_index=batch.get("row_index"))


def _attn_implementation(model) -> str:
    return str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager")


def _packs_efficiently(model) -> bool:
    attn = _attn_implementation(model)
    return attn in EFFICIENT_PACKING_ATTENTION or "flash" in attn


def _common_suffix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


class _Estimator:
    """Holds the models and options of one estimation run; ``columns(examples)`` does one batch."""

    def __init__(self, pi_plus, pi_minus, tokenizer, method, system_prompts, backend, device, padding_free,
                 truncation, prefix_sharing=False):
        self.pi_plus, self.pi_minus, self.tokenizer = pi_plus, pi_minus, tokenizer
        self.method, self.system_prompts, self.backend, self.device = method, system_prompts, backend, device
        self.truncation = truncation
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad_token_id nor an eos_token_id to pad batches with")
        collator_class = PrefixSharedCollator if prefix_sharing else PreferenceCollator
        self.collate = collator_class(pad_token_id=pad, padding_free=padding_free)

    def _system_prompt_row(self, example: dict, system_prompt: str, row: dict) -> dict:
        """Method P: the trainer's (truncated) ``row`` with ``system_prompt`` in front of its prompt.

        The system prompt is never truncated away: when truncation shortened the prompt, the scored prompt is
        the system-prompt tokens followed by the prompt tokens the trainer keeps (so it is longer than the
        trainer's by the system prompt). The responses are the trainer's tokens."""
        mode = self.truncation.get("tokenization", "separate")
        full = tokenize_row(example, self.tokenizer, tokenization=mode)  # untruncated: where the truncation started
        marked = tokenize_row(with_system_prompt(example, system_prompt), self.tokenizer, tokenization=mode)
        for key in (CHOSEN_IDS, REJECTED_IDS):
            if marked[key] != full[key]:
                raise ValueError(
                    f"method 'P': the system prompt changed the tokens of a response ({key}); the "
                    "tokenizer must tokenise responses independently of the prompt"
                )
        untruncated, kept, prompt = full[PROMPT_IDS], row[PROMPT_IDS], marked[PROMPT_IDS]
        if kept != untruncated:
            shared = _common_suffix(prompt, untruncated)  # the prompt's tokens after the system prompt
            if self.truncation["truncation_mode"] == "keep_end":
                tail = min(len(kept), shared)
                prompt = prompt[: len(prompt) - shared] + untruncated[len(untruncated) - tail:]
            else:
                prompt = prompt[: len(prompt) - len(untruncated) + len(kept)]
        return {PROMPT_IDS: prompt, CHOSEN_IDS: row[CHOSEN_IDS], REJECTED_IDS: row[REJECTED_IDS]}

    def _logps(self, model, rows: list[dict]) -> list[list[float]]:
        batch = {k: v.to(self.device) for k, v in self.collate(rows).items()}
        values = split_responses(token_logps(model, batch, self.backend), batch["labels"], batch["cu_seqlens"])
        return [v.tolist() for v in values]

    @torch.no_grad()
    def columns(self, examples: list[dict]) -> tuple[list[list[float] | None], list[list[float] | None]]:
        """Column values of ``examples`` (one list per example): ``r_t`` of each chosen-response token and
        ``-r_t`` of each rejected-response token, tokenised and truncated as the trainer does; None for an
        example the trainer drops (its prompt or a response is empty after truncation)."""
        weightless = [{k: v for k, v in ex.items() if k not in ("chosen_weights", "rejected_weights")}
                      for ex in examples]
        rows = [tokenize_row(ex, self.tokenizer, **self.truncation) for ex in weightless]
        kept = [i for i, row in enumerate(rows) if row is not None]
        chosen: list[list[float] | None] = [None] * len(examples)
        rejected: list[list[float] | None] = [None] * len(examples)
        if not kept:
            return chosen, rejected
        if self.method == "P":
            plus_rows = [self._system_prompt_row(weightless[i], self.system_prompts[0], rows[i]) for i in kept]
            minus_rows = [self._system_prompt_row(weightless[i], self.system_prompts[1], rows[i]) for i in kept]
            plus = self._logps(self.pi_plus, plus_rows)
            minus = self._logps(self.pi_plus, minus_rows)
        else:
            plus = self._logps(self.pi_plus, [rows[i] for i in kept])
            minus = self._logps(self.pi_minus, [rows[i] for i in kept])
        b = len(kept)
        for j, i in enumerate(kept):
            chosen[i] = [p - m for p, m in zip(plus[j], minus[j], strict=True)]
            rejected[i] = [m - p for p, m in zip(plus[b + j], minus[b + j], strict=True)]
        return chosen, rejected


def _run_key(dataset, tokenizer, model_ids, **options) -> str:
    parts = {"version": _FORMAT_VERSION, "dataset": dataset._fingerprint, "rows": len(dataset),
             "tokenizer": _tokenizer_fingerprint(tokenizer), "models": list(model_ids), **options}
    return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:20]


def _rows_fingerprint(dataset, lo: int, hi: int) -> str:
    """A hash of the text columns the estimator reads (``prompt``, ``chosen``, ``rejected``) of rows
    ``[lo, hi)``: what a shard's values were computed from."""
    columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    table = dataset.select_columns(columns).with_format("arrow")[lo:hi]
    h = hashlib.sha256()
    for name in columns:
        h.update(name.encode())
        h.update(json.dumps(table.column(name).to_pylist(), ensure_ascii=False, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _shard_identity(key: str, lo: int, hi: int, rows_fingerprint: str) -> dict:
    """What a shard covers, stored in its Parquet metadata: the run (options, models, tokenizer), the row
    range and the fingerprint of those rows' contents."""
    return {"format": _FORMAT_VERSION, "run": key, "rows": [lo, hi], "rows_fingerprint": rows_fingerprint}


def _shard_mismatch(path: str, identity: dict) -> str | None:
    """Why the shard file at ``path`` cannot be reused for ``identity`` (None: it can): missing, unreadable
    (truncated, not Parquet), or written for other rows, other contents or another run."""
    if not os.path.exists(path):
        return "missing"
    try:
        shard = pq.ParquetFile(path)
        table = shard.read()  # reads every page: a damaged file fails here, not later in datasets
        found = json.loads((shard.schema_arrow.metadata or {}).get(_SHARD_METADATA_KEY, b"null"))
    except (OSError, ValueError, pa.ArrowException) as err:
        return f"unreadable: {type(err).__name__}: {err}"
    if not table.schema.equals(_SHARD_SCHEMA):
        return f"columns {table.schema.names} are not {_SHARD_SCHEMA.names}"
    if found != identity:
        if not isinstance(found, dict):
            return "it carries no description of the rows it covers"
        differ = [k for k in identity if found.get(k) != identity[k]]
        return f"written for other {', '.join(differ)} (rows {found.get('rows')}, expected {identity['rows']})"
    lo, hi = identity["rows"]
    if table.num_rows != hi - lo:
        return f"it has {table.num_rows} rows, expected {hi - lo}"
    return None


def _write_shard(path: str, batches, identity: dict) -> None:
    """Write an iterable of ``(chosen_r, rejected_r)`` batches as one Parquet file carrying ``identity`` in
    its metadata, atomically: one row group per batch into a temporary file unique to this process and call
    (two runs may share a cache directory), then ``os.replace`` onto ``path``."""
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    schema = _SHARD_SCHEMA.with_metadata({_SHARD_METADATA_KEY: json.dumps(identity, sort_keys=True).encode()})
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for chosen, rejected in batches:
                writer.write_table(pa.table({"chosen_weights": chosen, "rejected_weights": rejected}, schema=schema))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _compute_shard(estimator: _Estimator, dataset, lo: int, hi: int, batch_size: int, path: str, identity: dict,
                   pbar) -> None:
    """Estimate rows ``[lo, hi)`` batch by batch, streaming each batch's results into the shard file."""

    def batches():
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            chunk = dataset[start:stop]
            examples = [{k: chunk[k][i] for k in chunk} for i in range(stop - start)]
            yield estimator.columns(examples)
            pbar.update(stop - start)

    _write_shard(path, batches(), identity)


def estimate_token_weights(
    dataset,
    pi_plus,
    pi_minus=None,
    tokenizer=None,
    *,
    method: str = "D",
    system_prompts: tuple[str, str] = DEFAULT_SYSTEM_PROMPTS,
    batch_size: int = 8,
    shard_size: int = 1024,
    cache_dir: str | None = None,
    device: str | torch.device | None = None,
    backend: str = "auto",
    padding_free: bool | None = None,
    tokenization: str = "separate",
    prefix_sharing: bool | None = None,
    model_ids: tuple[str, str | None] | None = None,
    progress: bool = True,
    max_length: int | None = TRUNCATION_DEFAULTS["max_length"],
    max_prompt_length: int | None = TRUNCATION_DEFAULTS["max_prompt_length"],
    max_completion_length: int | None = TRUNCATION_DEFAULTS["max_completion_length"],
    truncation_mode: str = TRUNCATION_DEFAULTS["truncation_mode"],
):
    """Per-token rewards ``r_t = log pi_plus(y_t) - log pi_minus(y_t)`` of every response token.

    Each pair is tokenised and truncated exactly as the trainer does it (``tisdpo.data.tokenize_row`` with
    the trainer's ``max_length`` / ``max_prompt_length`` / ``max_completion_length`` / ``truncation_mode``,
    whose defaults are ``TISDPOConfig``'s: pass the values the training run uses) and collated with
    ``tisdpo.data.PreferenceCollator``, padded or packed without padding (``padding_free``; default: packed
    when both models use a varlen attention kernel such as flash-attention, where packing saves time and
    memory); the decoder's last hidden states and the LM head weight go to
    ``tisdpo_kernels.fused_linear_logprobs`` (full logits are never built).

    Methods (DESIGN §1): ``"S"`` (``pi_plus`` SFT on chosen, ``pi_minus`` SFT on rejected) and ``"D"``
    (``pi_plus`` DPO, ``pi_minus`` reverse DPO) take two models; ``"P"`` takes one model (``pi_plus``;
    ``pi_minus`` must be None) and scores every response under two system prompts,
    ``system_prompts = (good, bad)`` (defaults: ``DEFAULT_SYSTEM_PROMPTS``).

    Output columns (the convention of this module and of ``TISDPOConfig``): ``chosen_weights`` holds
    ``r_t`` of each chosen-response token, ``rejected_weights`` holds ``-r_t`` of each rejected-response
    token (sign flipped once, here), one float32 per response token of ``tokenize_row``'s tokenisation and
    truncation (the tokens the trainer will use; the trainer accepts columns of the truncated length), so
    that the trainer's weight is ``T(x)`` for both columns. A pair the trainer drops (its prompt or a
    response is empty after truncation) gets None in both columns; the count is logged. Any weight columns
    already in ``dataset`` are replaced. Method P scores the truncated pair with the system prompt in front
    of the kept prompt tokens, so its models need room for ``max_length`` plus the system prompt's tokens.

    Work is split into shards of ``shard_size`` pairs, each written atomically (a temporary file named
    after the process and a random suffix, then ``os.replace``; two runs may share the cache) under
    ``cache_dir/<key>/``, ``key`` hashing the dataset fingerprint, both models' fingerprints
    (``model_fingerprint``, or ``model_ids`` if given), the tokenizer, the method and system prompts, the
    truncation options, and the shard and batch sizes and the layout (padded or packed). Each shard's
    Parquet metadata records what it covers: the run key, its row range and a fingerprint of those rows'
    texts. A rerun reuses the shards that match and recomputes, with a log line saying why, any that is
    missing, unreadable (truncated, not Parquet) or describes other rows, contents or options: an
    interrupted run resumes where it stopped and a finished one costs no model call (logged with the cache
    location); the result is identical to an uninterrupted run. Memory: one batch of per-token results at
    a time (each batch is streamed into its shard file).

    Args:
        dataset: ``datasets.Dataset`` in a preference format ``tisdpo.data`` accepts.
        pi_plus, pi_minus: causal LMs (``transformers.PreTrainedModel``) sharing the tokenizer; they are
            put in eval mode and run without gradients.
        tokenizer: the tokenizer used for training.
        batch_size: pairs per forward pass. shard_size: pairs per shard file.
        cache_dir: root of the shard cache (default ``~/.cache/tisdpo/token_weights``).
        device: where the batches go (default: ``pi_plus``'s device).
        backend: ``fused_linear_logprobs`` backend.
        tokenization: the prompt/response boundary convention, the trainer's ``TISDPOConfig.tokenization``
            (``"separate"`` or TRL's ``"joint"``): the weights hold one value per response token of it.
        padding_free: pack each batch's sequences into one row (``position_ids`` restarting per sequence;
            exact with flash-attention, flex, sdpa and eager in transformers) instead of padding them.
        prefix_sharing: run each pair as one ``[prompt | chosen | rejected]`` row, the prompt once
            (``tisdpo.prefix``; same results up to rounding). None (default): when both models use
            ``flex_attention``; True also with sdpa/eager (a dense 4-D mask).
        model_ids: identities of ``(pi_plus, pi_minus)`` for the cache key, instead of hashing their weights.
        progress: show a tqdm progress bar over pairs.
        max_length, max_prompt_length, max_completion_length, truncation_mode: the trainer's truncation
            (``TISDPOConfig``'s fields of these names, same meaning and defaults).
    Returns:
        ``dataset`` with ``chosen_weights`` / ``rejected_weights`` columns (memory-mapped from the shards).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if tokenizer is None:
        raise ValueError("tokenizer is required (the one the trainer will use)")
    if method == "P" and pi_minus is not None:
        raise ValueError("method 'P' uses one model (pi_plus) with two system prompts; pass pi_minus=None")
    if method != "P" and pi_minus is None:
        raise ValueError(f"method {method!r} needs two models: pass pi_minus")
    if not (isinstance(system_prompts, (tuple, list)) and len(system_prompts) == 2
            and all(isinstance(s, str) and s for s in system_prompts)):
        raise ValueError("system_prompts must be a pair of non-empty strings (good, bad)")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    truncation = {"max_length": max_length, "max_prompt_length": max_prompt_length,
                  "max_completion_length": max_completion_length, "truncation_mode": truncation_mode}
    for name in TRUNCATION_OPTIONS[:3]:
        value = truncation[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    if truncation_mode not in ("keep_end", "keep_start"):
        raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start', got {truncation_mode!r}")
    if tokenization not in TOKENIZATION_MODES:
        raise ValueError(f"tokenization must be one of {TOKENIZATION_MODES}, got {tokenization!r}")
    truncation["tokenization"] = tokenization  # tokenize_row's options: the trainer's truncation and tokenization
    if device is None:
        device = next(pi_plus.parameters()).device
    for model in (pi_plus, pi_minus):
        if model is not None:
            model.eval()

    if padding_free is None:
        padding_free = _packs_efficiently(pi_plus) and (pi_minus is None or _packs_efficiently(pi_minus))
    models = [m for m in (pi_plus, pi_minus) if m is not None]
    if prefix_sharing is None:
        prefix_sharing = all(_attn_implementation(m) == "flex_attention" for m in models)
    if prefix_sharing:
        names = ("pi_plus", "pi_minus")[: len(models)]
        how = [check_attention(_attn_implementation(m), name) for m, name in zip(models, names, strict=True)]
        logger.info("Prefix sharing: one [prompt | chosen | rejected] row per pair; attention: %s.",
                    " / ".join(dict.fromkeys(how)))
    if model_ids is None:
        model_ids = (model_fingerprint(pi_plus), None if pi_minus is None else model_fingerprint(pi_minus))
    key = _run_key(dataset, tokenizer, model_ids, method=method, shard_size=shard_size, batch_size=batch_size,
                   system_prompts=list(system_prompts) if method == "P" else None, padding_free=padding_free,
                   **truncation, **({"prefix_sharing": True} if prefix_sharing else {}))
    root = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "tisdpo", "token_weights")
    run_dir = os.path.join(root, key)
    os.makedirs(run_dir, exist_ok=True)
    n = len(dataset)
    bounds = [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]
    paths = [os.path.join(run_dir, f"shard-{i:05d}.parquet") for i in range(len(bounds))]
    identities = [_shard_identity(key, lo, hi, _rows_fingerprint(dataset, lo, hi)) for lo, hi in bounds]
    todo = []
    for (lo, hi), path, identity in zip(bounds, paths, identities, strict=True):
        reason = _shard_mismatch(path, identity)
        if reason is None:
            continue
        if reason != "missing":
            logger.warning("token weights: recomputing %s (rows %d-%d): %s", path, lo, hi - 1, reason)
        todo.append(((lo, hi), path, identity))
    if todo:
        logger.info("token weights: computing %d of %d shards (%d of %d pairs) into the cache %s", len(todo),
                    len(bounds), sum(hi - lo for (lo, hi), _, _ in todo), n, run_dir)
    else:
        logger.info("token weights: reused the cache %s (all %d shards, %d pairs); no model call", run_dir,
                    len(bounds), n)
    estimator = _Estimator(pi_plus, pi_minus, tokenizer, method, tuple(system_prompts), backend, device,
                           padding_free, truncation, prefix_sharing)
    done = n - sum(hi - lo for (lo, hi), _, _ in todo)
    with tqdm(total=n, initial=done, desc=f"token weights ({method})", unit="pair", disable=not progress) as pbar:
        for (lo, hi), path, identity in todo:
            _compute_shard(estimator, dataset, lo, hi, batch_size, path, identity, pbar)

    weights = datasets.Dataset.from_parquet(paths, cache_dir=os.path.join(run_dir, "arrow"))
    dropped = weights.data.column("chosen_weights").null_count
    if dropped:
        logger.warning("token weights: %d of %d pairs have no weights (None): their prompt or a response is empty "
                       "after truncation (%s), so the trainer drops them too", dropped, n,
                       ", ".join(f"{k}={v}" for k, v in truncation.items()))
    base = dataset.remove_columns([c for c in ("chosen_weights", "rejected_weights") if c in dataset.column_names])
    if base._indices is not None:  # a select()/shuffle() view: column-wise concatenation needs plain rows
        base = base.flatten_indices()
    return datasets.concatenate_datasets([base, weights], axis=1)


# ----------------------------------------------------------------------------------------------
# command line: tisdpo estimate-weights
# ----------------------------------------------------------------------------------------------


def _parse_with_yaml(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config file.yaml`` mapping of option names (``batch_size`` or ``batch-size``)
    supplies defaults that flags on the command line override. The file may be the one ``tisdpo train``
    reads: fields of ``TrainArguments`` / ``TISDPOConfig`` are accepted (those this command shares, such as
    ``max_length`` or ``padding_free``, are used; the others are ignored); any other key is an error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    if known.config is not None:
        from .cli import TrainArguments, apply_yaml_defaults

        trainer_fields = {f.name for dc in (TrainArguments, TISDPOConfig) for f in dataclasses.fields(dc) if f.init}
        apply_yaml_defaults(parser, known.config, {a.dest for a in parser._actions} | trainer_fields)
    args = parser.parse_args(rest)
    ours = {a.dest for a in parser._actions}
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k in ours})


def _optional_int(text: str) -> int | None:
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


def _auto_bool(value) -> bool | None:
    """``--padding-free`` / ``--prefix-sharing`` ``auto|true|false``, or the trainer YAML's ``true|false|null``."""
    if value is None or isinstance(value, bool):
        return value
    return {"auto": None, "true": True, "false": False}[value]


def load_causal_lm(name_or_path: str, *, device: str, dtype: str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` in eval mode on ``device``; ``dtype`` default: bfloat16
    on a CUDA device that supports it, float32 otherwise."""
    from transformers import AutoModelForCausalLM

    if dtype is None:
        on_cuda = str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        resolved = torch.bfloat16 if on_cuda else torch.float32
    else:
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (e.g. bfloat16), got {dtype!r}")
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolved).to(device).eval()


def save_dataset(dataset: datasets.Dataset, output: str) -> str:
    """Write ``dataset`` to ``output``: a ``.jsonl``/``.json`` or ``.parquet`` file, else a ``save_to_disk``
    directory (readable by ``tisdpo.data.load_preference_dataset`` and so by ``tisdpo train``)."""
    ext = os.path.splitext(output)[1].lower()
    if ext in (".jsonl", ".json"):
        dataset.to_json(output, lines=True)
    elif ext == ".parquet":
        dataset.to_parquet(output)
    else:
        dataset.save_to_disk(output)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """Estimate per-token rewards log pi_plus - log pi_minus of a preference dataset (methods P, S, D)."""
    from transformers import AutoTokenizer

    from .data import load_preference_dataset

    parser = argparse.ArgumentParser(
        prog="tisdpo estimate-weights",
        description="Per-token rewards r_t = log pi_plus(y_t) - log pi_minus(y_t) written as chosen_weights (r_t) "
        "and rejected_weights (-r_t) columns. Method S: --plus-model SFT on chosen, --minus-model SFT on rejected; "
        "D: --plus-model DPO, --minus-model reverse DPO; P: one --plus-model with a good and a bad system prompt.",
    )
    parser.add_argument("--config", default=None, help="YAML file with any of these options (flags override it)")
    parser.add_argument("--dataset", required=True,
                        help="preference data: hub name, JSON/JSONL/CSV/Parquet file or save_to_disk directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-samples", type=int, default=None, help="only the first N pairs")
    parser.add_argument("--method", choices=METHODS, default="D")
    parser.add_argument("--plus-model", required=True, help="pi_plus (method P: the only model)")
    parser.add_argument("--minus-model", default=None, help="pi_minus (methods S and D)")
    parser.add_argument("--tokenizer", default=None, help="the training tokenizer (default: --plus-model's)")
    parser.add_argument("--good-system-prompt", default=DEFAULT_SYSTEM_PROMPTS[0], help="method P")
    parser.add_argument("--bad-system-prompt", default=DEFAULT_SYSTEM_PROMPTS[1], help="method P")
    parser.add_argument("--output", required=True,
                        help="output: a .jsonl/.parquet file or a directory (datasets.save_to_disk)")
    parser.add_argument("--transform", choices=WEIGHT_TRANSFORMS, default=None,
                        help="write final weights T(x) instead of the rewards (then train with "
                        "weight_transform=origin); needed for rank_based, binary and random")
    parser.add_argument("--transform-kwargs", type=json.loads, default=None, help="JSON object")
    parser.add_argument("--eos-weight", type=float, default=None,
                        help="with --transform: the weight of each response's last token (upstream: 0)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--padding-free", choices=("auto", "true", "false"), default="auto",
                        help="pack the sequences of a batch without padding (auto: with flash/flex attention)")
    for name in TRUNCATION_OPTIONS[:3]:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_optional_int,
                            default=TRUNCATION_DEFAULTS[name],
                            help=f"the trainer's `{name}` (TISDPOConfig; default %(default)s; None: no limit)")
    parser.add_argument("--truncation-mode", choices=("keep_end", "keep_start"),
                        default=TRUNCATION_DEFAULTS["truncation_mode"],
                        help="the trainer's `truncation_mode` (TISDPOConfig; default %(default)s)")
    parser.add_argument("--tokenization", choices=("separate", "joint"), default="separate",
                        help="prompt/response boundary convention: the one training uses (TISDPOConfig.tokenization)")
    parser.add_argument("--prefix-sharing", choices=("auto", "true", "false"), default="auto",
                        help="one [prompt | chosen | rejected] row per pair, the prompt run once (auto: with flex "
                        "attention)")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--cache-dir", default=None, help="shard cache (default ~/.cache/tisdpo/token_weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on CUDA, else float32)")
    parser.add_argument("--no-progress", action="store_true")
    args = _parse_with_yaml(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.method == "P" and args.minus_model is not None:
        parser.error("--method P uses one model (--plus-model); drop --minus-model")
    if args.method != "P" and args.minus_model is None:
        parser.error(f"--method {args.method} needs --minus-model")
    if args.eos_weight is not None and args.transform is None:
        parser.error("--eos-weight needs --transform")

    dataset = load_preference_dataset(args.dataset, split=args.split)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.plus_model)
    pi_plus = load_causal_lm(args.plus_model, device=args.device, dtype=args.dtype)
    pi_minus = None if args.minus_model is None else load_causal_lm(args.minus_model, device=args.device,
                                                                   dtype=args.dtype)
    result = estimate_token_weights(
        dataset, pi_plus, pi_minus, tokenizer, method=args.method,
        system_prompts=(args.good_system_prompt, args.bad_system_prompt), batch_size=args.batch_size,
        shard_size=args.shard_size, cache_dir=args.cache_dir, device=args.device, progress=not args.no_progress,
        padding_free=_auto_bool(args.padding_free),
        prefix_sharing=_auto_bool(args.prefix_sharing),
        tokenization=args.tokenization,
        **{name: getattr(args, name) for name in TRUNCATION_OPTIONS},
    )
    if args.transform is not None:
        result = transform_token_weights(result, args.transform, args.transform_kwargs, eos_weight=args.eos_weight)
    print(save_dataset(result, args.output))
    return 0


CLI_COMMANDS = {"estimate-weights": main}

if __name__ == "__main__":
    raise SystemExit(main())
