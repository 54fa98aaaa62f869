"""Prefix-shared preference pairs: one `[prompt | chosen | rejected]` row per pair, the prompt run once.

For a pair with P prompt tokens and C, R response tokens the decoder processes P + C + R tokens instead of the
2P + C + R of the usual layout (two sequences, `tisdpo.data.PreferenceCollator`); the method of "Accelerating
Direct Preference Optimization with Prefix Sharing" (Wang & Hegde, arXiv 2410.20305). What makes it exact:

* positions: the prompt takes 0..P-1, the chosen response P..P+C-1, the rejected response restarts at P
  (P..P+R-1), so every token has the position it has in its own unshared sequence;
* attention (`allowed`): the prompt is causal; a chosen token sees the prompt and the earlier chosen tokens; a
  rejected token sees the prompt and the earlier rejected tokens, never a chosen one. Several pairs may share one
  packed row ("documents", `prefix_doc_ids`): tokens of different pairs never see each other;
* labels: the prompt's last hidden state predicts both the first chosen and the first rejected token, so the
  response rows are named explicitly (`row_index`, with per-row `labels` and `cu_seqlens` over the rows; see
  `tisdpo_kernels.fused_tis_dpo_loss`), the shared row twice.

Attention backends (`prefix_model_inputs`; transformers returns a 4-D `attention_mask` or a `BlockMask` to the
attention functions as it is): `flex_attention` gets a FlexAttention `BlockMask` (block-sparse, no `[N, N]`
tensor; FlexAttention has no backward on CPU, so train with it on CUDA); `sdpa` a dense 4-D boolean mask
`[rows, 1, T, T]` (True = attend) and `eager` the same as an additive mask (0 / the dtype's minimum) in the
model's dtype. Flash-attention kernels take no custom mask and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .formats import (
    CHOSEN_IDS,
    CHOSEN_WEIGHTS,
    PROMPT_IDS,
    REF_CHOSEN_LOGPS,
    REF_REJECTED_LOGPS,
    REJECTED_IDS,
    REJECTED_WEIGHTS,
)

PREFIX_DOC_IDS = "prefix_doc_ids"
PREFIX_PARTS = "prefix_parts"
PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2
# attention implementations that accept the custom mask, and how it reaches them
PREFIX_ATTENTION = {
    "flex_attention": "FlexAttention with a block mask",
    "sdpa": "sdpa with a dense 4-D boolean mask",
    "eager": "eager attention with a dense 4-D additive mask",
}


def check_attention(attn_implementation: str, name: str = "model") -> str:
    """The description of how prefix-shared attention runs with `attn_implementation` (for the log); a
    `ValueError` for an implementation that cannot take the mask (flash-attention and other custom kernels)."""
    if attn_implementation not in PREFIX_ATTENTION:
        raise ValueError(
            f"prefix sharing needs an attention implementation that accepts a custom mask "
            f"({sorted(PREFIX_ATTENTION)}); `{name}` uses {attn_implementation!r}"
        )
    return PREFIX_ATTENTION[attn_implementation]


def allowed(doc_ids: torch.Tensor, parts: torch.Tensor, b, q, k) -> torch.Tensor:
    """Whether query position `q` of row `b` attends key position `k` (broadcasting index tensors, or the scalar
    indices of a FlexAttention `mask_mod`): same pair, causal, and never rejected -> chosen. A padding position
    attends itself only (no fully masked query row)."""
    doc_q, doc_k = doc_ids[b, q], doc_ids[b, k]
    crosses = (parts[b, q] == REJECTED) & (parts[b, k] == CHOSEN)
    return ((doc_q == doc_k) & (doc_q != PAD) & (k <= q) & ~crosses) | (q == k)


def dense_mask(doc_ids: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """`[rows, 1, T, T]` bool, True where attention is allowed (`allowed`), from `[rows, T]` ids."""
    rows, width = doc_ids.shape
    device = doc_ids.device
    b = torch.arange(rows, device=device).view(rows, 1, 1, 1)
    idx = torch.arange(width, device=device)
    return allowed(doc_ids, parts, b, idx.view(1, 1, width, 1), idx.view(1, 1, 1, width))


def block_mask(doc_ids: torch.Tensor, parts: torch.Tensor):
    """A FlexAttention `BlockMask` of `allowed` for `[rows, T]` ids (heads broadcast)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = doc_ids.shape

    def mask_mod(b, h, q, k):
        return allowed(doc_ids, parts, b, q, k)

    # compiled on CUDA (as transformers builds its own block masks): the eager construction evaluates `mask_mod` on
    # the whole [T, T] grid at once; on CPU (forward only, no FlexAttention backward there) eager is quicker
    return create_block_mask(mask_mod, rows, None, width, width, device=doc_ids.device, _compile=doc_ids.is_cuda)


def prefix_model_inputs(batch: dict[str, torch.Tensor], attn_implementation: str,
                        dtype: torch.dtype) -> dict[str, Any]:
    """Decoder keyword arguments for a `PrefixSharedCollator` batch: `input_ids`, `position_ids` and the
    attention mask in the form `attn_implementation` takes (see the module docstring); `dtype`: the model's
    compute dtype (for eager's additive mask)."""
    check_attention(attn_implementation)
    doc_ids, parts = batch[PREFIX_DOC_IDS], batch[PREFIX_PARTS]
    if attn_implementation == "flex_attention":
        mask = block_mask(doc_ids, parts)
    elif attn_implementation == "sdpa":
        mask = dense_mask(doc_ids, parts)
    else:
        keep = dense_mask(doc_ids, parts)
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": mask}


@dataclass
class PrefixSharedCollator:
    """Collate tokenised pairs (`tisdpo.data.prepare_preference_dataset`'s columns) into one
    `[prompt | chosen | rejected]` row per pair.

    Pair i with P prompt, C chosen and R rejected tokens starts at flat offset o (the row's start in the flattened
    `[rows * T]` batch, or its start in the packed row). Its response rows (`row_index`, into
    `hidden.reshape(-1, D)`): chosen token j is predicted from o+P-1+j; rejected token 0 from o+P-1 (the shared
    prompt row) and rejected token j >= 1 from o+P+C+j-1. The rows of all chosen responses come first (pair
    order), then those of the rejected ones; `cu_seqlens` marks the 2B sequences over those rows, as
    `fused_tis_dpo_loss(..., row_index=..., cu_seqlens=...)` takes them.

    Padded (`padding_free=False`), T = longest row: input_ids / position_ids / attention_mask (1 on tokens: the
    padding mask, replaced by the prefix mask in the forward) / prefix_doc_ids / prefix_parts `[B, T]` int64.
    Packed (`padding_free=True`, all pairs in one row, N tokens): input_ids / position_ids / prefix_doc_ids /
    prefix_parts `[1, N]` int64. Both: labels `[n]` int64 and row_index `[n]` int64 (n = total response tokens),
    cu_seqlens `[2B+1]` int32, and when the pairs carry them token_weights / ref_logps `[n]` float32.
    prefix_doc_ids: the pair of each token (0..B-1), -1 on padding; prefix_parts: 0 prompt, 1 chosen, 2 rejected,
    -1 padding.
    """

    pad_token_id: int
    padding_free: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("`features` is empty")
        float_columns = {"token_weights": (CHOSEN_WEIGHTS, REJECTED_WEIGHTS),
                         "ref_logps": (REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS)}
        present = {name: [f.get(cols[0]) is not None for f in features] for name, cols in float_columns.items()}
        if any(len(set(flags)) > 1 for flags in present.values()):
            raise ValueError("either every pair of a batch carries weights (reference log-probs) or none does")
        carried = [name for name, flags in present.items() if flags[0]]

        tokens, positions, docs, parts = [], [], [], []
        # per side, per pair: the response rows relative to the pair's start, and their labels
        rows: dict[str, list[list[int]]] = {"chosen": [], "rejected": []}
        labels_of: dict[str, list[list[int]]] = {"chosen": [], "rejected": []}
        values = {name: {"chosen": [], "rejected": []} for name in carried}
        for i, f in enumerate(features):
            prompt, chosen, rejected = list(f[PROMPT_IDS]), list(f[CHOSEN_IDS]), list(f[REJECTED_IDS])
            if not prompt or not chosen or not rejected:
                raise ValueError(f"pair {i} has an empty prompt or response")
            for name in carried:
                for side, column, response in zip(("chosen", "rejected"), float_columns[name], (chosen, rejected),
                                                  strict=True):
                    if len(f[column]) != len(response):
                        raise ValueError(f"pair {i}: `{column}` has {len(f[column])} values for a "
                                         f"{len(response)}-token {side} response")
                    values[name][side].append(list(f[column]))
            n_p, n_c, n_r = len(prompt), len(chosen), len(rejected)
            tokens.append(prompt + chosen + rejected)
            positions.append(list(range(n_p + n_c)) + list(range(n_p, n_p + n_r)))
            docs.append([i] * (n_p + n_c + n_r))
            parts.append([PROMPT] * n_p + [CHOSEN] * n_c + [REJECTED] * n_r)
            rows["chosen"].append(list(range(n_p - 1, n_p + n_c - 1)))
            rows["rejected"].append([n_p - 1] + list(range(n_p + n_c, n_p + n_c + n_r - 1)))
            labels_of["chosen"].append(chosen)
            labels_of["rejected"].append(rejected)

        lengths = [len(t) for t in tokens]
        if self.padding_free:
            starts = [0]
            for n in lengths[:-1]:
                starts.append(starts[-1] + n)

            def flat(seqs):
                return torch.tensor([sum(seqs, [])], dtype=torch.long)

            batch = {"input_ids": flat(tokens), "position_ids": flat(positions), PREFIX_DOC_IDS: flat(docs),
                     PREFIX_PARTS: flat(parts)}
        else:
            width = max(lengths)
            starts = [i * width for i in range(len(features))]

            def padded(seqs, value):
                return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

            batch = {"input_ids": padded(tokens, self.pad_token_id), "position_ids": padded(positions, 0),
                     "attention_mask": padded([[1] * n for n in lengths], 0), PREFIX_DOC_IDS: padded(docs, PAD),
                     PREFIX_PARTS: padded(parts, PAD)}

        index, labels, bounds = [], [], [0]
        for side in ("chosen", "rejected"):
            for start, relative, side_labels in zip(starts, rows[side], labels_of[side], strict=True):
                index += [start + r for r in relative]
                labels += side_labels
                bounds.append(bounds[-1] + len(side_labels))
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        batch["row_index"] = torch.tensor(index, dtype=torch.long)
        batch["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
        for name in carried:
            batch[name] = torch.tensor(sum(values[name]["chosen"] + values[name]["rejected"], []),
                                       dtype=torch.float32)
        return batch


__all__ = [
    "PREFIX_ATTENTION", "PREFIX_DOC_IDS", "PREFIX_PARTS", "PrefixSharedCollator", "allowed", "block_mask",
    "check_attention", "dense_mask", "prefix_model_inputs",
]
