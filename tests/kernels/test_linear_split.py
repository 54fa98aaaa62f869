"""``ops/linear_split.py``: the vocabulary-split path, values and gradients against ``reference.py``.

On CPU the fused elementwise passes run through the Triton interpreter (``elementwise="triton"``) and as
the torch twin (``elementwise="torch"``); the GEMMs run in fp32 on CPU (the ``out_dtype`` GEMMs are
CUDA-only), so the bf16 interpreter trap (``tl.dot``) does not arise: these kernels have no ``tl.dot``,
and bf16 tensors really pass through them here (bias loads, ``dz`` stores). Scratch caps are chosen to
force several splits, a short last split and row chunks (``n`` and ``V`` not multiples of anything).
Strided inputs and zero rows are cases of the backend contract (``test_backend_contract.py``).
"""

from __future__ import annotations

import pytest
import torch

from tisdpo_kernels.ops import linear_split
from tisdpo_kernels.ops.linear_split import (
    scratch_bytes_per_element,
    split_linear_kl,
    split_linear_logprobs,
    split_plan,
)
from tisdpo_kernels.reference import reference_linear_logprobs, reference_token_kl

from .helpers import assert_close_to_truth, make_head, upstream_grad

N, V, D, D_REF = 37, 301, 24, 23  # D small enough that 10-row chunks + the [256, D] dW buffer undercut whole rows


def _cap(dtype, kl, layout):
    """A scratch cap giving ``layout``: "whole" (all rows, 256-col splits: 256+45), "chunked" (10-row chunks)."""
    per = scratch_bytes_per_element(dtype, kl)
    if layout == "whole":
        return N * 256 * per
    return 256 * D * 4 + 10 * 256 * per


# bf16/fp16 round dz to the input dtype (round-to-nearest, eps/2 per element) before the dH / dW GEMMs, as
# on the GPU, where the reference rounds only the results: on top of the reference's own eps/2 output
# rounding that adds eps/2 times the cancellation of the row sums (sum |dz h| / |sum dz h|, 2-3 here), so
# 3x the reference's error (as the GPU tests of the all-Triton kernels) plus the dtype floor of
# tests/tolerance.py. Seen over 6 seeds without the floor: at most 3.5x in bf16, 3.1x in fp16, 1.7x in fp32.
def _factor(dtype):
    return 2.0 if dtype == torch.float32 else 3.0


REDUCTION = N + V + D  # the sums feeding a gradient: logits over D, softmax over V, dW over rows


def _leaves(*ts):
    return [t for t in ts if t is not None]


def _truth_and_same(fn, tensors, grads_of, upstream):
    """``fn`` at the input dtype and in float64, with the gradients of ``grads_of(outputs)`` under ``upstream``."""
    out = fn(*tensors)
    leaves = _leaves(*tensors[:3])
    same_grads = torch.autograd.grad(grads_of(out), leaves, upstream)
    t64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    out64 = fn(*t64)
    truth_grads = torch.autograd.grad(grads_of(out64), _leaves(*t64[:3]), [u.double() for u in upstream])
    return out, same_grads, out64, truth_grads


@pytest.mark.parametrize("layout", ["whole", "chunked"])
@pytest.mark.parametrize("elementwise", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logprobs_match_reference(dtype, elementwise, layout, device):
    hidden, weight, b, labels = make_head(N, V, D, dtype, device, seed=1)
    plan = split_plan(N, V, D, dtype, False, _cap(dtype, False, layout))
    assert plan.cols == 256 and plan.chunked == (layout == "chunked")
    g = upstream_grad(N, device)
    ours = split_linear_logprobs(hidden, weight, labels, b, scratch_bytes=_cap(dtype, False, layout),
                                 elementwise=elementwise)
    ours_grads = torch.autograd.grad(ours, (hidden, weight, b), g)
    same, same_grads, truth, truth_grads = _truth_and_same(
        lambda h, w, bb: reference_linear_logprobs(h, w, labels, bias=bb), (hidden, weight, b), lambda o: (o,), (g,))
    assert ours.dtype == torch.float32
    assert_close_to_truth("logps", ours, same, truth, reduction=REDUCTION + D_REF, factor=_factor(dtype))
    for name, o, s, t, leaf in zip(("d_hidden", "d_weight", "d_bias"), ours_grads, same_grads, truth_grads,
                                   (hidden, weight, b), strict=True):
        assert o.dtype == leaf.dtype
        assert_close_to_truth(name, o, s, t, reduction=REDUCTION + D_REF, factor=_factor(dtype))


@pytest.mark.parametrize("layout", ["whole", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["tis", "tdpo"])
def test_kl_matches_reference(mode, dtype, layout, device):
    hidden, weight, b, labels = make_head(N, V, D, dtype, device, seed=2)
    ref_hidden, ref_weight, rb, _ = make_head(N, V, D_REF, dtype, device, seed=3)
    ref_hidden, ref_weight, rb = ref_hidden.detach(), ref_weight.detach(), rb.detach()
    g, gk = upstream_grad(N, device), upstream_grad(N, device, torch.Generator().manual_seed(9)).flip(0)
    cap = _cap(dtype, True, layout)
    logps, ref_logps, kl = split_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, b, rb,
                                           scratch_bytes=cap)
    assert not ref_logps.requires_grad
    ours_grads = torch.autograd.grad((logps, kl), (hidden, weight, b), (g, gk))

    def reference(h, w, bb, rh, rw, rbb):
        return (reference_linear_logprobs(h, w, labels, bias=bb), reference_linear_logprobs(rh, rw, labels, bias=rbb),
                reference_token_kl(h, w, rh, rw, bias=bb, ref_bias=rbb, mode=mode))

    same, same_grads, truth, truth_grads = _truth_and_same(
        reference, (hidden, weight, b, ref_hidden, ref_weight, rb), lambda o: (o[0], o[2]), (g, gk))
    for name, o, s, t in zip(("logps", "ref_logps", "kl"), (logps, ref_logps, kl), same, truth, strict=True):
        assert_close_to_truth(name, o, s, t, reduction=REDUCTION + D_REF, factor=_factor(dtype))
    for name, o, s, t in zip(("d_hidden", "d_weight", "d_bias"), ours_grads, same_grads, truth_grads, strict=True):
        assert_close_to_truth(name, o, s, t, reduction=REDUCTION + D_REF, factor=_factor(dtype))


@pytest.mark.parametrize("mode", [None, "tis", "tdpo"])
def test_gradients_are_bitwise_reproducible(mode, device):
    """Atomic-free by construction: two backward passes give identical bits (chunked rows, several splits)."""
    hidden, weight, b, labels = make_head(N, V, D, torch.bfloat16, device, seed=4)
    ref_hidden, ref_weight, rb, _ = make_head(N, V, D, torch.bfloat16, device, seed=5)
    g = upstream_grad(N, device)

    def grads():
        cap = _cap(torch.bfloat16, mode is not None, "chunked")
        if mode is None:
            out = split_linear_logprobs(hidden, weight, labels, b, scratch_bytes=cap)
            return torch.autograd.grad(out, (hidden, weight, b), g)
        logps, _, kl = split_linear_kl(hidden, weight, labels, ref_hidden.detach(), ref_weight.detach(), mode, b,
                                       rb.detach(), scratch_bytes=cap)
        return torch.autograd.grad((logps, kl), (hidden, weight, b), (g, g.flip(0)))

    for a, c in zip(grads(), grads(), strict=True):
        assert torch.equal(a, c)


def test_without_bias_and_only_some_gradients(device):
    hidden, weight, _, labels = make_head(N, V, D, torch.float32, device, bias=False, seed=6)
    weight.requires_grad_(False)
    g = upstream_grad(N, device)
    d_hidden, = torch.autograd.grad(split_linear_logprobs(hidden, weight, labels, scratch_bytes=N * 256 * 4), hidden, g)
    ref, = torch.autograd.grad(reference_linear_logprobs(hidden, weight, labels), hidden, g)
    torch.testing.assert_close(d_hidden, ref, rtol=1e-5, atol=1e-6)


def test_split_plan():
    # rows whole: the widest 256-multiple that fits, at most SPLIT_MAX_COLUMNS
    assert split_plan(16384, 128256, 4096, torch.bfloat16, False, 192 * 2**20) == \
        linear_split.SplitPlan(rows=16384, cols=2048, chunked=False)
    assert split_plan(10, 300, 8, torch.float32, False, 1 << 30).cols == 512
    # 2 x 64k rows: n x 256 alone passes the cap, so rows are chunked (2048-column splits) and scratch stays bounded
    plan = split_plan(131072, 128256, 4096, torch.bfloat16, True, 128 * 2**20)
    assert plan.cols == 2048 and plan.chunked
    assert plan.rows * plan.cols * scratch_bytes_per_element(torch.bfloat16, True) + plan.cols * 4096 * 4 \
        <= 128 * 2**20
    with pytest.raises(ValueError, match="scratch_bytes"):
        split_plan(100, 1000, 4096, torch.float32, False, 1000)


def test_bad_options(device):
    hidden, weight, b, labels = make_head(5, 20, 8, torch.float32, device)
    with pytest.raises(ValueError, match="fp32_precision"):
        split_linear_logprobs(hidden, weight, labels, fp32_precision="fast")
    with pytest.raises(ValueError, match="scratch_bytes"):
        split_linear_logprobs(hidden, weight, labels, scratch_bytes=0)
    with pytest.raises(ValueError, match="mode"):
        split_linear_kl(hidden, weight, labels, hidden.detach(), weight.detach(), "forward")
    with pytest.raises(TypeError, match="hidden"):
        split_linear_logprobs(hidden.double(), weight.double(), labels)


# ----------------------------------------------------------------------------------------------
# GPU: compiled kernels, cuBLAS out_dtype GEMMs, real sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", [None, "tis", "tdpo"])
def test_gpu_matches_reference(mode, dtype):
    n, vocab, dim = 1031, 32003, 257
    hidden, weight, b, labels = make_head(n, vocab, dim, dtype, torch.device("cuda"), seed=10)
    ref_hidden, ref_weight, rb, _ = make_head(n, vocab, dim, dtype, torch.device("cuda"), seed=11)
    g, gk = upstream_grad(n, "cuda"), upstream_grad(n, "cuda", torch.Generator().manual_seed(9))
    cap = 8 * 2**20  # several splits of 256-multiples at these sizes
    if mode is None:
        outs = (split_linear_logprobs(hidden, weight, labels, b, scratch_bytes=cap),)
        ups = (g,)
    else:
        lp, _, kl = split_linear_kl(hidden, weight, labels, ref_hidden.detach(), ref_weight.detach(), mode, b,
                                    rb.detach(), scratch_bytes=cap)
        outs, ups = (lp, kl), (g, gk)
    ours = torch.autograd.grad(outs, (hidden, weight, b), ups)

    def reference(h, w, bb, rh, rw, rbb):
        lp = reference_linear_logprobs(h, w, labels, bias=bb)
        if mode is None:
            return (lp,)
        return lp, reference_token_kl(h, w, rh, rw, bias=bb, ref_bias=rbb, mode=mode)

    tensors = (hidden, weight, b, ref_hidden.detach(), ref_weight.detach(), rb.detach())
    same, same_grads, truth, truth_grads = _truth_and_same(reference, tensors, lambda o: o, ups)
    for name, o, s, t in zip(("logps", "kl")[:len(outs)], outs, same, truth, strict=True):
        assert_close_to_truth(name, o, s, t, reduction=n + vocab + 2 * dim, factor=_factor(dtype))
    for name, o, s, t in zip(("d_hidden", "d_weight", "d_bias"), ours, same_grads, truth_grads, strict=True):
        assert_close_to_truth(name, o, s, t, reduction=n + vocab + 2 * dim, factor=_factor(dtype))


@pytest.mark.gpu
def test_gpu_gradients_are_bitwise_reproducible():
    hidden, weight, b, labels = make_head(4099, 50_000, 512, torch.bfloat16, torch.device("cuda"), seed=12)
    g = upstream_grad(4099, "cuda")
    runs = [torch.autograd.grad(split_linear_logprobs(hidden, weight, labels, b), (hidden, weight, b), g)
            for _ in range(2)]
    for a, c in zip(*runs, strict=True):
        assert torch.equal(a, c)
