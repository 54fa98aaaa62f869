"""What the trainer and the weight estimator know about a causal LM: its attention and packing rules, its
fingerprint, how it is loaded, and the one route from a batch to per-token label log-probs.

The route (`docs/design.md §6`): `decoder_hidden_states` runs the (possibly wrapped) model with its LM head applied
to no position (`logits_to_keep` = an empty index, so no `[tokens, vocab]` logits exist) while a forward hook on the
decoder body keeps the last hidden states; `head_forward(lm_head(model), label_logprobs_fn(labels, ...), rows)`
(`tisdpo.distributed`) then runs `tisdpo_kernels.fused_linear_logprobs` as the head module's call, so that an
FSDP2 / DeepSpeed ZeRO-3 engine gathers the head weight there (`docs/design.md §5`). The trainer's loss, its
reference precompute and the weight estimator (`tisdpo.weights`, through `token_logps`) all take this route.
"""

from __future__ import annotations

import hashlib
import inspect

import numpy as np
import pyarrow.compute as pc
import torch
from torch import nn

from tisdpo_kernels import fused_linear_logprobs

from .data import IGNORE_INDEX
from .distributed import gathered_parameters, head_forward
from .formats import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS
from .prefix import PREFIX_DOC_IDS, prefix_model_inputs
from .pretrained import load_pretrained_model

# Attention implementations for which transformers turns packed `position_ids` (no attention mask) into exact
# per-sequence attention: varlen kernels for flash attention, a block-diagonal mask for the others.
PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention", "sdpa", "eager")
# Of those, the ones where packing also saves memory and time (no dense [N, N] mask): used when padding_free=None.
EFFICIENT_PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


# ----------------------------------------------------------------------------------------------------------------
# attention and packing
# ----------------------------------------------------------------------------------------------------------------


def attn_implementation(model: nn.Module) -> str:
    """The attention implementation of `model`'s config (`"eager"` when it names none)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def packing_supported(attn: str) -> bool:
    """Whether attention implementation `attn` handles packed `position_ids` exactly (`PACKING_ATTENTION`)."""
    # hub kernels such as "kernels-community/flash-attn2" use the same varlen path as flash_attention_2
    return attn in PACKING_ATTENTION or "flash" in attn


def packs_efficiently(model: nn.Module) -> bool:
    """Whether packing saves memory and time with `model`'s attention (a varlen or block-sparse kernel)."""
    attn = attn_implementation(model)
    return attn in EFFICIENT_PACKING_ATTENTION or "flash" in attn


# ----------------------------------------------------------------------------------------------------------------
# the model's parts
# ----------------------------------------------------------------------------------------------------------------


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel` (False when peft is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def check_architecture(model: nn.Module, name: str) -> None:
    """The route needs an LM head (its weight goes to the loss) and a forward with `logits_to_keep` (to skip it).
    A `TypeError` naming `name` otherwise."""
    base = model.get_base_model() if is_peft_model(model) else model
    if not hasattr(base, "get_output_embeddings") or base.get_output_embeddings() is None:
        raise TypeError(f"`{name}` ({type(base).__name__}) has no output embedding (LM head)")
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise TypeError(
            f"`{name}` ({type(base).__name__}) has no `logits_to_keep` forward argument, so its LM head cannot be "
            "skipped; use a causal-LM class from transformers >= 4.50"
        )
    if not hasattr(base, "get_decoder"):
        raise TypeError(f"`{name}` ({type(base).__name__}) has no `get_decoder()` to read hidden states from")


def lm_head(model: nn.Module) -> nn.Module:
    """The output embedding module whose weight (and bias) go to the fused loss, inside its own forward
    (`head_forward`): sharded or not, the engine gathers it there."""
    return model.get_output_embeddings()


# ----------------------------------------------------------------------------------------------------------------
# hidden states -> label log-probs
# ----------------------------------------------------------------------------------------------------------------


def decoder_hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor], unwrapped: nn.Module | None = None,
                          router_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last hidden states of `model` (possibly wrapped by DDP / FSDP2 / DeepSpeed), with the LM head applied to no
    position, and the model's MoE load-balancing loss when `router_aux` (else None).

    Args:
        model: the model to call (the engine's wrapper, whose hooks gather sharded parameters).
        inputs: a `tisdpo.data.PreferenceCollator` batch (padded `[2B, T]` or packed `[1, N]`) or a
            `tisdpo.prefix.PrefixSharedCollator` batch (its mask is built for the model's attention).
        unwrapped: `model` without its wrapper (default: `model`), whose `get_decoder()` gets the hook.
    Returns:
        `([rows, T, D] hidden states in the model's dtype, aux loss or None)`.
    """
    decoder = (model if unwrapped is None else unwrapped).get_decoder()
    captured: list[torch.Tensor] = []

    def keep(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    if PREFIX_DOC_IDS in inputs:  # [prompt | chosen | rejected] rows: the 4-D mask (or block mask) of tisdpo.prefix
        kwargs = prefix_model_inputs(inputs, attn_implementation(decoder), decoder.get_input_embeddings().weight.dtype)
    else:
        kwargs = {"input_ids": inputs["input_ids"]}
        if "attention_mask" in inputs:
            kwargs["attention_mask"] = inputs["attention_mask"]
        if "position_ids" in inputs:
            kwargs["position_ids"] = inputs["position_ids"]
    if router_aux:
        kwargs["output_router_logits"] = True
    no_positions = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    handle = decoder.register_forward_hook(keep)
    try:
        output = model(**kwargs, use_cache=False, logits_to_keep=no_positions)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder forward per model call, saw {len(captured)}")
    return captured[0], output.aux_loss if router_aux else None


def label_logprobs_fn(labels: torch.Tensor, backend: str = "auto", chunk_size: int | None = None,
                      row_index: torch.Tensor | None = None):
    """The `fn` of `head_forward` for per-token label log-probs: `fn(weight, bias, rows)` ->
    `fused_linear_logprobs(rows, weight, labels, ...)` (`labels` `[N]` int64, -100 off the responses)."""

    def logprobs(weight, bias, rows):
        return fused_linear_logprobs(rows, weight, labels, bias=bias, ignore_index=IGNORE_INDEX, backend=backend,
                                     chunk_size=chunk_size, row_index=row_index)

    return logprobs


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor], backend: str = "auto",
                chunk_size: int | None = None, unwrapped: nn.Module | None = None) -> torch.Tensor:
    """Per-token label log-probs of a `PreferenceCollator` batch (padded or packed) or a `PrefixSharedCollator`
    batch (its explicit `row_index`) under a causal LM, shaped like `batch["labels"]`, float32 (float64 for a
    float64 model), 0 off the responses: `decoder_hidden_states`, then `fused_linear_logprobs` as the LM head's
    call (`head_forward`; no `[tokens, vocab]` logits). `backend`, `chunk_size`: `fused_linear_logprobs`'s;
    `unwrapped`: as in `decoder_hidden_states`."""
    hidden, _ = decoder_hidden_states(model, batch, unwrapped)
    labels = batch["labels"]
    fn = label_logprobs_fn(labels.reshape(-1), backend, chunk_size, batch.get("row_index"))
    logps = head_forward(lm_head(model if unwrapped is None else unwrapped), fn, hidden.reshape(-1, hidden.shape[-1]))
    return logps.view(labels.shape)


# ----------------------------------------------------------------------------------------------------------------
# fingerprints and loading
# ----------------------------------------------------------------------------------------------------------------


_CHECKSUM_CHUNK = 1 << 22
_CHECKSUM_MOD = 65521
_CHECKSUM_GROUP = 64  # chunks summed at once: 256 MiB of the tensor, a [64, 65521] int64 partial sum


def _bytes_checksum(tensor: torch.Tensor) -> tuple[int, int]:
    """A Fletcher-style checksum of every byte of `tensor`, computed on its device: the byte sum and the sum over
    4 MiB chunks of (chunk index + 1) times the chunk's bytes weighted by their position in it (mod 65521, + 1),
    the latter mod 2**61 - 1. Any change of a value changes it (barring collisions of the position weights); exact
    integer maths, so equal on every device. One pass over the bytes, no widened copy of them: a chunk's weighted
    sum is `sum_r (r + 1) * (sum of its bytes at positions = r mod 65521)`, the inner sums accumulated in int32."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    weights = torch.arange(1, _CHECKSUM_MOD + 1, device=data.device, dtype=torch.int64)
    plain, weighted, index = 0, 0, 0
    full = data.numel() // _CHECKSUM_CHUNK * _CHECKSUM_CHUNK
    blocks = [data[:full].view(-1, _CHECKSUM_CHUNK)] if full else []
    if full < data.numel():
        blocks.append(data[full:].view(1, -1))
    for block in blocks:
        for group in block.split(_CHECKSUM_GROUP):
            rows, length = group.shape
            periods = length // _CHECKSUM_MOD * _CHECKSUM_MOD
            rest = group[:, periods:].to(torch.int64)
            plain += int(rest.sum())
            by_position = (rest * weights[: length - periods]).sum(1)  # no integer matmul on CUDA
            if periods:  # column sums <= 64 * 255 (int32 is exact), times a weight <= 65521, 65521 columns: < 2**47
                columns = group[:, :periods].view(rows, -1, _CHECKSUM_MOD).sum(1, dtype=torch.int32).to(torch.int64)
                plain += int(columns.sum())
                by_position = by_position + (columns * weights).sum(1)
            for value in by_position.tolist():
                index += 1
                weighted = (weighted + index * value) % (2**61 - 1)
    return plain, weighted


def model_fingerprint(model: nn.Module, frozen_only: bool = False, include_config: bool = True) -> str:
    """A hash identifying a model's weights: config, parameter names, shapes, dtypes and a checksum of every byte
    of every parameter (`_bytes_checksum`, on the parameter's device: an edit anywhere changes the fingerprint,
    without copying gigabytes to the host). `frozen_only` hashes only parameters that do not require grad (a PEFT
    model's base weights, not its freshly initialised adapter); `include_config=False` leaves the config out (the
    Trainer edits runtime flags such as `use_cache` in it)."""
    hasher = hashlib.sha256()
    config = getattr(model, "config", None)
    if include_config and config is not None and hasattr(config, "to_json_string"):
        hasher.update(config.to_json_string(use_diff=False).encode())
    for name, param in model.named_parameters():
        if frozen_only and param.requires_grad:
            continue
        with gathered_parameters([param]):  # a ZeRO-3 partition: its whole value (all ranks call this)
            hasher.update(f"{name}:{tuple(param.shape)}:{param.dtype}:{_bytes_checksum(param)}".encode())
    return hasher.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """A hash of the token ids of a tokenised preference dataset (a `datasets.Dataset`, row order included)."""
    hasher = hashlib.sha256()
    table = dataset.select_columns([PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS]).flatten_indices().data.table
    for name in (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS):
        column = table.column(name).combine_chunks()
        hasher.update(name.encode())
        hasher.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        hasher.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return hasher.hexdigest()


def load_causal_lm(name_or_path: str, *, device: str, dtype: str | None = None, device_map=None):
    """``AutoModelForCausalLM.from_pretrained`` (a ``.gguf`` file included: ``tisdpo.pretrained``) in eval mode on
    ``device``; ``dtype`` default: bfloat16 on a CUDA device that supports it, float32 otherwise. ``device_map``
    (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict, transformers' meaning): the layers spread over the
    visible devices instead (a model too large for one GPU); ``device`` then only picks the default dtype."""
    if dtype is None:
        on_cuda = str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        resolved = torch.bfloat16 if on_cuda else torch.float32
    else:
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (e.g. bfloat16), got {dtype!r}")
    if device_map is not None:
        return load_pretrained_model(name_or_path, dtype=resolved, device_map=device_map).eval()
    return load_pretrained_model(name_or_path, dtype=resolved).to(device).eval()
