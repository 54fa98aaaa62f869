"""Acceptance of the torch path's memory (a measurement, not a timed benchmark): on CPU, one
forward+backward of the TIS-DPO loss at 2 x 4096 response tokens, D=256, V=32000 must take at most
5% of the extra peak memory of the naive materialised-logits loss.

Both figures are the peak RSS of a fresh subprocess above its RSS once the inputs exist
(``benchmarks.memory.cpu_peak_extra_bytes``). Runs in smoke mode too (about a minute on 2 cores).
"""

from __future__ import annotations

import torch

from .memory import cpu_peak_extra_bytes
from .shapes import HEADS, Case

ACCEPTANCE_CASE = Case(HEADS["cpu-small"], tokens=4096, logits="random", dtype=torch.float32)
MAX_FRACTION = 0.05


def test_torch_path_extra_memory_is_within_5_percent_of_naive():
    naive = cpu_peak_extra_bytes("naive", "tisdpo", ACCEPTANCE_CASE)
    ours = cpu_peak_extra_bytes("tisdpo_torch", "tisdpo", ACCEPTANCE_CASE)
    # the naive loss holds at least the fp32 logits [N, V] and their gradient
    logits_bytes = ACCEPTANCE_CASE.num_response_tokens * ACCEPTANCE_CASE.head.vocab_size * 4
    print(f"\n{ACCEPTANCE_CASE.id}: naive {naive / 2**20:.0f} MiB, tisdpo_torch {ours / 2**20:.0f} MiB "
          f"({ours / naive:.1%} of naive)")
    assert naive >= logits_bytes, f"naive measured {naive} B, less than its own logits ({logits_bytes} B)"
    assert ours <= MAX_FRACTION * naive, f"tisdpo_torch {ours} B > {MAX_FRACTION:.0%} of naive {naive} B"
