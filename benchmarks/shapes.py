"""The shapes the benchmarks run at: LM heads of real models and the token counts per device.

A :class:`Case` is one input shape: an LM head (hidden size ``D``, vocabulary ``V``), one
preference pair (a chosen and a rejected sequence) with ``tokens`` response tokens each, a
ragged prompt in front of each response, and a logits regime (``"random"`` or ``"peaked"``).
Every provider runs on exactly the same inputs for a case (``providers.make_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Head:
    """An LM head: ``weight`` is ``[vocab_size, hidden_size]``."""

    name: str
    hidden_size: int
    vocab_size: int
    note: str


HEADS = {
    head.name: head
    for head in (
        Head("llama3-8b", 4096, 128256, "Llama-3-8B"),
        Head("qwen2.5-7b", 3584, 152064, "Qwen2.5-7B"),
        Head("gemma2-2b", 2304, 256000, "Gemma-2-2B"),
        Head("trl-7244", 4096, 151936, "the shape of TRL's public fused-kernel comparison (trl#7244)"),
        Head("cpu-small", 256, 32000, "CPU-sized head with a Llama-2-sized vocabulary"),
        Head("smoke", 48, 1000, "tiny head for the CI smoke run"),
    )
}

LOGITS_KINDS = ("random", "peaked")
# Loss variants: "tisdpo" = token weights + precomputed reference log-probs (policy forward+backward);
# "tisdpo_kl" = token weights + the reference head computed inside + the token-level KL (kl="tisdpo").
VARIANTS = ("tisdpo", "tisdpo_kl")


@dataclass(frozen=True)
class Case:
    """One benchmark input: ``pairs`` preference pairs of ``tokens`` response tokens per sequence."""

    head: Head
    tokens: int
    logits: str
    dtype: torch.dtype
    pairs: int = 1

    @property
    def num_response_tokens(self) -> int:
        """``N``: response tokens over all chosen and rejected sequences (the rows that cost FLOPs)."""
        return 2 * self.pairs * self.tokens

    def prompt_lengths(self) -> list[int]:
        """Ragged prompt lengths of the ``2 * pairs`` sequences (1/16 to 1/8 of the response)."""
        base = max(1, self.tokens // 16)
        return [base + (i * base) // max(1, 2 * self.pairs - 1) for i in range(2 * self.pairs)]

    @property
    def id(self) -> str:
        return f"{self.head.name}-{2 * self.pairs}x{self.tokens}-{self.logits}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def case_info(case: Case) -> dict:
    """JSON-friendly description of ``case`` (stored in each benchmark's ``extra_info``)."""
    return {
        "head": case.head.name, "hidden_size": case.head.hidden_size, "vocab_size": case.head.vocab_size,
        "sequences": 2 * case.pairs, "tokens_per_sequence": case.tokens,
        "response_tokens": case.num_response_tokens, "logits": case.logits, "dtype": _dtype_name(case.dtype),
    }


def flop_count(case: Case, variant: str) -> int:
    """Model FLOPs of one forward+backward over the response tokens.

    The policy head costs ``2 N D V`` forward and ``4 N D V`` backward (dH and dW); the KL variant
    adds the reference head's forward, ``2 N D V``. Prompt/padding rows, the log-softmax and any
    recomputation are not counted, so every provider is credited with the same work.
    """
    n, d, v = case.num_response_tokens, case.head.hidden_size, case.head.vocab_size
    return (8 if variant == "tisdpo_kl" else 6) * n * d * v


def executed_flop_count(case: Case, variant: str) -> int:
    """FLOPs a recompute design (ours, CCE, Liger's FLCE) executes in one forward+backward: the forward's
    logits ``2 N D V``, the backward's recomputed logits ``2 N D V`` plus ``dH`` and ``dW`` ``4 N D V``
    (``8 N D V``); the KL variant's reference head is formed in both passes (``12 N D V``). The floor of
    a fused DPO head: it cannot fold the gradient into the forward (the per-token upstream gradient
    needs the pair loss first)."""
    n, d, v = case.num_response_tokens, case.head.hidden_size, case.head.vocab_size
    return (12 if variant == "tisdpo_kl" else 8) * n * d * v


GPU_TOKENS = (1024, 4096, 8192, 16384, 32768)
GPU_HEADS = ("llama3-8b", "qwen2.5-7b", "gemma2-2b")
CPU_TOKENS = (256, 1024)
CPU_PEAKED_TOKENS = (256,)  # on CPU no provider skips work by logit magnitude: one peaked check is enough
SMOKE_TOKENS = 40


def cases_for(device_type: str, smoke: bool) -> list[Case]:
    """The benchmark cases for ``device_type`` (``"cuda"`` or ``"cpu"``); ``smoke``: tiny shapes for CI."""
    if smoke:
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        return [Case(HEADS["smoke"], SMOKE_TOKENS, "peaked", dtype)]
    if device_type == "cuda":
        cases = [Case(HEADS[h], t, kind, torch.bfloat16)
                 for h in GPU_HEADS for t in GPU_TOKENS for kind in LOGITS_KINDS]
        cases += [Case(HEADS["trl-7244"], 8192, kind, torch.bfloat16) for kind in LOGITS_KINDS]
        return cases
    head = HEADS["cpu-small"]
    cases = [Case(head, t, "random", torch.float32) for t in CPU_TOKENS]
    return cases + [Case(head, t, "peaked", torch.float32) for t in CPU_PEAKED_TOKENS]
