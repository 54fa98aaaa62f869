"""Pieces of TRL's `DPOTrainer` surface that `TISDPOTrainer` accepts: custom collators, TR-DPO reference syncing.

* `TRLFeatureAliases` wraps a user's `data_collator`: each row it receives has our tokenised columns
  (`prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`, weights, reference log-probs) plus TRL's names for
  the token ids (`prompt_ids`, `chosen_ids`, `rejected_ids`), so a collator written for TRL reads its usual keys.
* `normalize_batch` accepts what such a collator returns: our layout (`PreferenceCollator`'s) or TRL's
  (`input_ids`, `attention_mask`, `completion_mask`, `[2B, T]`, the B chosen rows first), turned into ours.
* `SyncRefModelCallback`: TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656), every `ref_model_sync_steps`
  optimiser steps `ref <- alpha * policy + (1 - alpha) * ref` (`ref_model_mixup_alpha`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from .data import IGNORE_INDEX
from .distributed import gathered_parameters
from .formats import TRL_TOKENIZED_COLUMNS


class TRLFeatureAliases:
    """`collator(rows)` with TRL's column names added to every row (the values are the same lists)."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [dict(f, **{trl: f[ours] for trl, ours in TRL_TOKENIZED_COLUMNS.items() if ours in f})
                for f in features]
        return self.collator(rows)


def normalize_batch(inputs: dict[str, Any]) -> dict[str, Any]:
    """A collated batch in our layout. Ours passes through (a padded one without `cu_seqlens` gets row bounds);
    TRL's `[2B, T]` `input_ids` / `attention_mask` / `completion_mask` gets shifted `labels` (the next token where
    it is a completion token, else -100) and `cu_seqlens`."""
    if "labels" not in inputs:
        if "completion_mask" not in inputs or "input_ids" not in inputs:
            raise ValueError(
                "the data_collator's batch has neither `labels` (TISDPOTrainer's layout, see PreferenceCollator) nor "
                f"`input_ids` + `completion_mask` (TRL's layout); got keys {sorted(inputs)}"
            )
        input_ids = inputs["input_ids"]
        keep = inputs["completion_mask"].bool()
        if "attention_mask" in inputs:
            keep = keep & inputs["attention_mask"].bool()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = torch.where(keep[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
        inputs = {k: v for k, v in inputs.items() if k != "completion_mask"}
        inputs["labels"] = labels
    if "cu_seqlens" not in inputs:
        if "position_ids" in inputs:
            raise ValueError("a packed batch (with `position_ids`) must carry `cu_seqlens`")
        rows, width = inputs["labels"].shape
        if rows % 2:
            raise ValueError(f"a padded batch needs 2B rows (B chosen, then B rejected), got {rows}")
        inputs["cu_seqlens"] = torch.arange(rows + 1, dtype=torch.int32, device=inputs["labels"].device) * width
    return inputs


def check_syncable(policy: torch.nn.Module, ref: torch.nn.Module) -> None:
    """`sync_ref_model` mixes parameters one to one: the two models must have the same parameter names and shapes."""
    ours = {n: p.shape for n, p in policy.named_parameters()}
    theirs = {n: p.shape for n, p in ref.named_parameters()}
    if ours != theirs:
        raise ValueError(
            "`sync_ref_model=True` needs a reference model with the policy's parameters (same names and shapes); "
            "pass no `ref_model` (a copy of the policy) or one of the same architecture"
        )


class SyncRefModelCallback(TrainerCallback):
    """TR-DPO's soft update of the reference model after every `sync_steps`-th optimiser step."""

    def __init__(self, policy: Callable[[], torch.nn.Module], ref: Callable[[], torch.nn.Module], alpha: float,
                 sync_steps: int):
        self.policy, self.ref, self.alpha, self.sync_steps = policy, ref, alpha, sync_steps

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.sync_steps != 0:
            return
        policy = dict(self.policy().named_parameters())
        for name, ref_param in self.ref().named_parameters():
            # FSDP2: both are DTensors sharded alike, mixed shard by shard; ZeRO-3: both gathered, every rank
            # computes the same mix, rank 0's is kept (a partition alone is an empty placeholder)
            with gathered_parameters([policy[name]]), gathered_parameters([ref_param], modifier_rank=0):
                ref_param.mul_(1.0 - self.alpha).add_(policy[name].detach().to(ref_param.dtype), alpha=self.alpha)


__all__ = ["SyncRefModelCallback", "TRLFeatureAliases", "check_syncable", "normalize_batch"]
