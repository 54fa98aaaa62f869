"""Scratch memory of the split path: one forward+backward at 2 x 4096 tokens, D=256, V=32000 (bf16), and the
whole extra memory at the Llama-3-8B head (2 x 8192 tokens, D=4096, V=128256, bf16).

Counted, not sampled: the path runs on ``meta`` tensors (shapes and strides only, no data, so the
full size costs milliseconds), the GEMMs take the same ``out_dtype`` branch as on CUDA, and a
``TorchDispatchMode`` adds up the bytes of every tensor any op creates while it is alive (views and
``out=`` results share their base's storage and are not counted again). The fused elementwise pass runs
as its torch twin (``elementwise="torch"``; Triton kernels cannot run on meta tensors); the twin's own
temporaries are not counted, because the Triton kernels it stands for allocate nothing (they read and
write the launcher's buffers in place) -- on plain CPU the twin does need several ``[rows, S]`` fp32
temporaries on top of the cap. What must stay under
the cap is everything except the returned gradients, the fp32 ``[n, D]`` ``dH`` accumulator and
``[n]`` per-row vectors (statistics, upstream gradients), which the module docstring lists apart.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tisdpo_kernels.ops.linear_split import split_linear_kl, split_linear_logprobs

N, D, V = 2 * 4096, 256, 32000


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created by ops inside the mode, while alive."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.paused = False

    def paused_in(self, fn):
        """``fn`` run without counting what it creates (it must write its results into existing tensors)."""
        def run(*args, **kwargs):
            self.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = False
        return run

    def _release(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        results = out if isinstance(out, (tuple, list)) else (out,)
        for spec, t in zip(func._schema.returns, results, strict=False):
            if isinstance(t, torch.Tensor) and spec.alias_info is None:
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                weakref.finalize(t, self._release, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def _leaf(*shape):
    return torch.empty(*shape, device="meta", dtype=torch.bfloat16).requires_grad_()


def _count(n, d, v, kl, cap, monkeypatch, bias=True):
    """``(peak live bytes, gradients)`` of one split forward+backward on meta tensors (the twin's temporaries
    uncounted, see the module docstring)."""
    from tisdpo_kernels.ops import linear_split

    hidden, weight, b = _leaf(n, d), _leaf(v, d), _leaf(v) if bias else None
    labels = torch.zeros(n, dtype=torch.long, device="meta")
    g = torch.empty(n, device="meta")
    mode = LiveBytes()
    for name in ("_dz_torch", "_stats_torch"):
        monkeypatch.setattr(linear_split, name, mode.paused_in(getattr(linear_split, name)))
    with mode:
        if kl is None:
            outs, upstream = (split_linear_logprobs(hidden, weight, labels, b, scratch_bytes=cap,
                                                    elementwise="torch"),), (g,)
        else:
            logps, _, token_kl = split_linear_kl(hidden, weight, labels, _leaf(n, d).detach(), _leaf(v, d).detach(),
                                                 kl, b, scratch_bytes=cap, elementwise="torch")
            outs, upstream = (logps, token_kl), (g, g)
        grads = torch.autograd.grad(outs, tuple(t for t in (hidden, weight, b) if t is not None), upstream)
    return mode.peak, grads


@pytest.mark.parametrize("kl,cap", [(None, 32 * 2**20), ("tis", None)])
def test_scratch_of_one_forward_backward_stays_under_the_cap(kl, cap, monkeypatch):
    from tisdpo_kernels.ops._config import SPLIT_SCRATCH_BYTES

    peak, grads = _count(N, D, V, kl, cap, monkeypatch)
    returned = sum(t.untyped_storage().nbytes() for t in grads)
    accumulator = N * D * 4
    per_row = 24 * N * 4  # at most ~20 [n] fp32 vectors live: statistics, lse, logps, KL, upstream copies
    scratch = peak - returned - accumulator - per_row
    limit = SPLIT_SCRATCH_BYTES if cap is None else cap
    print(f"\nkl={kl} cap={limit / 2**20:.0f} MiB: peak {peak / 2**20:.1f} MiB, scratch {scratch / 2**20:.1f} MiB")
    assert scratch <= limit
    # and the cap is really used (a path that silently materialised [n, V] fp32 logits would need 1 GB)
    assert peak < N * V * 4 / 4


@pytest.mark.parametrize("kl", [None, "tis"])
def test_extra_memory_at_the_llama_head(kl, monkeypatch):
    """Beside the weight gradient (1002 MiB): the fp32 dH accumulator (256 MiB) and the default split scratch
    (192 MiB), 448 MiB at most plus ``[n]`` vectors; the bf16 cast of dH comes after the scratch is freed (576
    MiB when it stacked on the logits and dz of the last split), and net of both gradients <= 0.5 GiB."""
    n, d, v = 16384, 4096, 128256
    peak, (d_hidden, d_weight) = _count(n, d, v, kl, None, monkeypatch, bias=False)
    beside_dw = peak - d_weight.untyped_storage().nbytes()
    net = beside_dw - d_hidden.untyped_storage().nbytes()
    print(f"\nkl={kl}: peak {peak / 2**20:.0f} MiB, beside dW {beside_dw / 2**20:.0f} MiB, net {net / 2**20:.0f} MiB")
    assert beside_dw <= 448 * 2**20 + 24 * n * 4  # per-row vectors as above
    assert net <= 2**29
