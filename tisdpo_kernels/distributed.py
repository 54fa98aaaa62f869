"""The loss side of context parallelism: per-sequence sums all-reduced across a process group.

When one sequence is split across the ranks of a group (context-parallel attention shards the tokens of long
pairs), each rank holds some response rows of each sequence, possibly none. ``fused_tis_dpo_loss(...,
group=g)`` computes each rank's partial per-sequence sums, adds them up across ``g`` here, and evaluates the pair
loss on the global sums, so every rank of ``g`` returns the same loss and metrics.

Gradient: every rank back-propagates that same global loss ``L(S)``, ``S = sum_r S_r``; the gradient of its own
partial sums is ``dL/dS_r = dL/dS``, so the all-reduce's backward is the identity (no second collective). Each
rank's rows thus get exactly their gradient of the global loss; a parameter's gradient (the LM head's, say) is a
rank's share of the full one and must be *summed* over the group, not averaged.

Tested on CPU with 2 gloo processes in ``tests/trainer/test_distributed.py`` (``test_group_loss_*``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .objectives import SequenceSums


def check_group(group) -> None:
    """``group`` must be a ``torch.distributed.ProcessGroup`` of an initialised default group."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group= needs an initialised torch.distributed (init_process_group) on every rank")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")


class _SumAcrossGroup(torch.autograd.Function):
    """``all_reduce(x, SUM)`` whose backward passes the gradient through unchanged (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def global_response_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Response tokens per sequence summed over ``group`` (``counts``: ``[num_seqs]`` int64 of this rank).

    Raises ``ValueError`` when the ranks disagree on the number of sequences (their ``cu_seqlens`` / padded rows
    must describe the same 2B sequences, each rank holding its own slice of them)."""
    n = counts.numel()
    sizes = torch.tensor([n, -n], dtype=torch.long, device=counts.device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    if int(sizes[0]) != n or int(-sizes[1]) != n:
        raise ValueError(
            f"group=: the ranks hold different numbers of sequences (this rank {n}, others between "
            f"{int(-sizes[1])} and {int(sizes[0])}); every rank's labels/cu_seqlens must describe the same 2B sequences"
        )
    total = counts.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` summed over ``group`` (a copy; no gradient): the token statistics' sums and counts."""
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_sequence_sums(sums: SequenceSums, group) -> SequenceSums:
    """The per-sequence sums of every rank of ``group`` added up, in one collective, differentiable (identity
    backward). Each field of ``sums`` is ``[num_seqs]`` of one dtype, or None (an optional sum every rank leaves
    out alike)."""
    fields = [f.name for f in dataclasses.fields(SequenceSums) if getattr(sums, f.name) is not None]
    stacked = torch.stack([getattr(sums, name) for name in fields])
    total = _SumAcrossGroup.apply(stacked, group)
    return SequenceSums(**dict(zip(fields, total.unbind(0), strict=True)))
