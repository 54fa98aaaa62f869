"""Random preference batches with awkward shapes for the loss tests (padded and packed layouts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Batch:
    hidden: torch.Tensor  # [2B, T, D]
    weight: torch.Tensor  # [V, D]
    bias: torch.Tensor  # [V]
    labels: torch.Tensor  # [2B, T]
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    ref_bias: torch.Tensor
    ref_logps: torch.Tensor  # [2B, T]
    token_weights: torch.Tensor  # [2B, T]
    pos_logps: torch.Tensor
    neg_logps: torch.Tensor
    pad: int = 0  # trailing padding positions of every row

    def packed(self):
        """The same batch in the packed layout: tensors ``[N, ...]`` of the kept tokens and ``cu_seqlens``.

        Every sequence keeps its prompt and response but drops trailing padding (the last ``pad``
        positions); sequences are concatenated chosen first, as in the padded layout.
        """
        keep = self.labels.new_ones(self.labels.shape, dtype=torch.bool)
        if self.pad:
            keep[:, -self.pad:] = False
        lengths = keep.sum(1)
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        fields = {}
        for name in ("hidden", "labels", "ref_hidden", "ref_logps", "token_weights", "pos_logps", "neg_logps"):
            t = getattr(self, name)
            fields[name] = t[keep]
        return fields, cu


def make_batch(pairs=3, seq_len=13, dim=7, vocab=37, dtype=torch.float64, pad=2, scale=1.0) -> Batch:
    """Ragged prompts (each sequence a different prompt length), trailing padding of ``pad`` positions,
    and a few ignored positions inside responses; sizes deliberately not multiples of any block."""
    n = 2 * pairs
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    labels = torch.randint(0, vocab, (n, seq_len), generator=g)
    for i in range(n):
        prompt = 1 + (i * 3) % (seq_len - pad - 2)
        labels[i, :prompt] = IGNORE
    if pad:
        labels[:, -pad:] = IGNORE
    labels[0, seq_len - pad - 2] = IGNORE  # a hole inside a response
    return Batch(
        hidden=rnd(n, seq_len, dim, s=scale), weight=rnd(vocab, dim, s=scale), bias=rnd(vocab, s=0.5),
        labels=labels,
        ref_hidden=rnd(n, seq_len, dim, s=scale), ref_weight=rnd(vocab, dim, s=scale), ref_bias=rnd(vocab, s=0.5),
        ref_logps=-rnd(n, seq_len).abs() - 1.0, token_weights=rnd(n, seq_len).abs() + 0.5,
        pos_logps=-rnd(n, seq_len).abs(), neg_logps=-rnd(n, seq_len).abs(), pad=pad,
    )
