"""Token weights for TIS-DPO: their estimation from a contrastive model pair (``docs/design.md §1.4`` and ``§1.5``).

Token reward: ``r_t = log pi_plus(y_t) - log pi_minus(y_t)`` for every response token, from a "good" model
``pi_plus`` and a "bad" model ``pi_minus``. ``estimate_token_weights(dataset, pi_plus, pi_minus, tokenizer,
method="P"|"S"|"D")`` (and ``tisdpo estimate-weights``, ``tisdpo.commands.estimate_weights``) computes it for every
response token, in resumable, cached shards, and writes the columns of ``tisdpo.response_weights``' convention:
``chosen_weights`` holds ``r_t``, ``rejected_weights`` holds ``-r_t``. The log-probs take the trainer's route
(``tisdpo.modeling.token_logps``: the decoder's last hidden states, then ``tisdpo_kernels.fused_linear_logprobs`` as
the LM head's call, so a sharded model works as in training). How to train ``pi_plus``/``pi_minus``:
``tisdpo.contrastive``. The transforms that turn the columns into training weights: ``tisdpo.response_weights``
(``transform_token_weights`` is also importable from here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .config import TISDPOConfig
from .data import PreferenceCollator, split_responses, tokenize_row
from .formats import (
    CHOSEN_IDS,
    PROMPT_IDS,
    REJECTED_IDS,
    TEXT_COLUMNS,
    TOKENIZATION_MODES,
    TRUNCATION_MODES,
    WEIGHT_COLUMNS,
    extract_prompt,
    is_conversational,
)
from .modeling import attn_implementation, check_architecture, model_fingerprint, packs_efficiently, token_logps
from .prefix import PrefixSharedCollator, check_attention
from .response_weights import transform_token_weights

logger = logging.getLogger(__name__)

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
    prompt. Implicit-prompt examples are split first (``tisdpo.formats.extract_prompt``). The responses are
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
        weightless = [{k: v for k, v in ex.items() if k not in WEIGHT_COLUMNS}
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
    columns = [c for c in TEXT_COLUMNS if c in dataset.column_names]
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


def _processes() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` default group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_from_rank0(value):
    """Rank 0's ``value`` (a picklable object) on every rank of the default group."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _shards_to_compute(bounds, paths, identities, run_dir: str, n: int) -> list[int]:
    """Indices of the shards the cache lacks (missing, or not reusable: logged with the reason)."""
    todo = []
    for i, ((lo, hi), path, identity) in enumerate(zip(bounds, paths, identities, strict=True)):
        reason = _shard_mismatch(path, identity)
        if reason is None:
            continue
        if reason != "missing":
            logger.warning("token weights: recomputing %s (rows %d-%d): %s", path, lo, hi - 1, reason)
        todo.append(i)
    if todo:
        logger.info("token weights: computing %d of %d shards (%d of %d pairs) into the cache %s", len(todo),
                    len(bounds), sum(bounds[i][1] - bounds[i][0] for i in todo), n, run_dir)
    else:
        logger.info("token weights: reused the cache %s (all %d shards, %d pairs); no model call", run_dir,
                    len(bounds), n)
    return todo


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
    memory); the decoder's last hidden states go to ``tisdpo_kernels.fused_linear_logprobs`` run as the LM head's
    call (``tisdpo.modeling.token_logps``, the trainer's route: a sharded model's head weight is gathered there;
    full logits are never built).

    Methods (``docs/design.md §1.5``): ``"S"`` (``pi_plus`` SFT on chosen, ``pi_minus`` SFT on rejected) and ``"D"``
    (``pi_plus`` DPO, ``pi_minus`` reverse DPO) take two models; ``"P"`` takes one model (``pi_plus``;
    ``pi_minus`` must be None) and scores every response under two system prompts,
    ``system_prompts = (good, bad)`` (defaults: ``DEFAULT_SYSTEM_PROMPTS``).

    Output columns (the convention of ``tisdpo.response_weights`` and of ``TISDPOConfig``): ``chosen_weights`` holds
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
    (``tisdpo.modeling.model_fingerprint``, or ``model_ids`` if given), the tokenizer, the method and system
    prompts, the truncation options, and the shard and batch sizes and the layout (padded or packed). Each shard's
    Parquet metadata records what it covers: the run key, its row range and a fingerprint of those rows'
    texts. A rerun reuses the shards that match and recomputes, with a log line saying why, any that is
    missing, unreadable (truncated, not Parquet) or describes other rows, contents or options: an
    interrupted run resumes where it stopped and a finished one costs no model call (logged with the cache
    location); the result is identical to an uninterrupted run. Memory: one batch of per-token results at
    a time (each batch is streamed into its shard file).

    Several processes (``torch.distributed`` initialised with more than one rank, as ``tisdpo estimate-weights``
    does under ``torchrun`` / ``accelerate launch``): rank 0 checks the cache and names the shards to compute,
    the ranks take disjoint ones (every ``world_size``-th of that list), each writes its own shard files, and
    after a barrier rank 0 assembles the result (then the other ranks read it too). The shards, and so the
    output, are byte-identical to one process's; a rerun after a rank died reuses every finished shard. The
    group's timeout must exceed one rank's share of the work (the command line's is a week).

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
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start', got {truncation_mode!r}")
    if tokenization not in TOKENIZATION_MODES:
        raise ValueError(f"tokenization must be one of {TOKENIZATION_MODES}, got {tokenization!r}")
    truncation["tokenization"] = tokenization  # tokenize_row's options: the trainer's truncation and tokenization
    if device is None:
        device = next(pi_plus.parameters()).device
    for model, name in ((pi_plus, "pi_plus"), (pi_minus, "pi_minus")):
        if model is not None:
            check_architecture(model, name)
            model.eval()

    if padding_free is None:
        padding_free = packs_efficiently(pi_plus) and (pi_minus is None or packs_efficiently(pi_minus))
    models = [m for m in (pi_plus, pi_minus) if m is not None]
    if prefix_sharing is None:
        prefix_sharing = all(attn_implementation(m) == "flex_attention" for m in models)
    if prefix_sharing:
        names = ("pi_plus", "pi_minus")[: len(models)]
        how = [check_attention(attn_implementation(m), name) for m, name in zip(models, names, strict=True)]
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
    rank, world = _processes()
    todo = _shards_to_compute(bounds, paths, identities, run_dir, n) if rank == 0 else None
    if world > 1:
        todo = _broadcast_from_rank0(todo)
    mine = [(bounds[i], paths[i], identities[i]) for i in todo[rank::world]]
    estimator = _Estimator(pi_plus, pi_minus, tokenizer, method, tuple(system_prompts), backend, device,
                           padding_free, truncation, prefix_sharing)
    share = sum(hi - lo for (lo, hi), _, _ in mine)
    total, initial = (n, n - share) if world == 1 else (share, 0)  # several processes: rank 0's share
    with tqdm(total=total, initial=initial, desc=f"token weights ({method})", unit="pair",
              disable=not progress or rank != 0) as pbar:
        for (lo, hi), path, identity in mine:
            _compute_shard(estimator, dataset, lo, hi, batch_size, path, identity, pbar)

    if world > 1:
        dist.barrier()  # every shard is written
        if rank != 0:
            dist.barrier()  # rank 0 has built the arrow cache of the result: read it
    weights = datasets.Dataset.from_parquet(paths, cache_dir=os.path.join(run_dir, "arrow"))
    if world > 1 and rank == 0:
        dist.barrier()
    dropped = weights.data.column("chosen_weights").null_count
    if dropped and rank == 0:
        logger.warning("token weights: %d of %d pairs have no weights (None): their prompt or a response is empty "
                       "after truncation (%s), so the trainer drops them too", dropped, n,
                       ", ".join(f"{k}={v}" for k, v in truncation.items()))
    base = dataset.remove_columns([c for c in WEIGHT_COLUMNS if c in dataset.column_names])
    if base._indices is not None:  # a select()/shuffle() view: column-wise concatenation needs plain rows
        base = base.flatten_indices()
    return datasets.concatenate_datasets([base, weights], axis=1)


__all__ = ["DEFAULT_SYSTEM_PROMPTS", "METHODS", "estimate_token_weights", "transform_token_weights",
           "with_system_prompt"]
