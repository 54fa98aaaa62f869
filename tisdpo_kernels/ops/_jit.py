"""Triton device functions that several kernel families share (``@triton.jit``, inlined into the kernels).

Only kernel modules import this one (it imports Triton, and ``@triton.jit`` picks compiled or interpreted when the
module is imported); the plain-torch helpers every backend shares are in ``_common.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def offsets64(index, stride):
    # index * stride passes 2**31 for row offsets of a [n, D] matrix once n*D > 2**31 (e.g. 600k
    # tokens at D=4096) and for [V, D] heads such as V=256000, D=8192: form the product in int64.
    return index.to(tl.int64) * stride
