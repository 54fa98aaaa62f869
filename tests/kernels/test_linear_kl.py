"""``ops/linear_kl.py``: log-probs of both heads and the per-token KL, values and policy gradients,
against ``reference.reference_token_kl`` / ``reference.reference_linear_logprobs``.

CPU runs go through the Triton interpreter (fp32, fp16); bf16 and real sizes are ``gpu`` tests.
The reference head has its own hidden size (``D_ref != D``), as with a differently sized reference model.
"""

from __future__ import annotations

import pytest
import torch

from tisdpo_kernels.ops.linear_kl import triton_linear_kl
from tisdpo_kernels.reference import reference_linear_logprobs, reference_token_kl

from .helpers import SMALL_TILES, assert_close_to_truth, make_head, upstream_grad


def make_pair(n, vocab, dim, ref_dim, dtype, device, bias=True, ref_bias=True, seed=0):
    """Policy leaves (hidden, weight, bias), labels and a constant reference head (hidden, weight, bias)."""
    hidden, weight, b, labels = make_head(n, vocab, dim, dtype, device, bias=bias, seed=seed)
    ref_hidden, ref_weight, rb, _ = make_head(n, vocab, ref_dim, dtype, device, bias=ref_bias, seed=seed + 100)
    return hidden, weight, b, labels, ref_hidden.detach(), ref_weight.detach(), None if rb is None else rb.detach()


def _reference(hidden, weight, b, labels, ref_hidden, ref_weight, rb, mode):
    logps = reference_linear_logprobs(hidden, weight, labels, bias=b)
    ref_logps = reference_linear_logprobs(ref_hidden, ref_weight, labels, bias=rb)
    kl = reference_token_kl(hidden, weight, ref_hidden, ref_weight, bias=b, ref_bias=rb, mode=mode)
    return logps, ref_logps, kl


def check_kl_against_reference(mode, hidden, weight, b, labels, ref_hidden, ref_weight, rb, factor=2.0,
                               grad_logps=True, **kwargs):
    """Values of all three outputs and policy gradients of ``sum(g * logps) + sum(gk * kl)`` against a
    float64 truth, within ``factor`` x the error of the reference at the input dtype."""
    n = labels.shape[0]
    g = upstream_grad(n, hidden.device) if grad_logps else None
    gk = upstream_grad(n, hidden.device, torch.Generator().manual_seed(9)).flip(0)
    leaves = [t for t in (hidden, weight, b) if t is not None]

    def run(fn, tensors, cast=None):
        h, w, bb, rh, rw, rbb = tensors
        logps, ref_logps, kl = fn(h, w, bb, labels, rh, rw, rbb, mode)
        outs, grads = (kl,) if g is None else (logps, kl), (gk,) if g is None else (g, gk)
        lv = [t for t in (h, w, bb) if t is not None]
        return (logps, ref_logps, kl), torch.autograd.grad(outs, lv, [x.to(cast or x.dtype) for x in grads])

    ours, ours_grads = run(lambda h, w, bb, y, rh, rw, rbb, m: triton_linear_kl(h, w, y, rh, rw, m, bb, rbb, **kwargs),
                           (hidden, weight, b, ref_hidden, ref_weight, rb))
    assert all(o.dtype == torch.float32 for o in ours)
    assert not ours[1].requires_grad
    same, same_grads = run(_reference, (hidden, weight, b, ref_hidden, ref_weight, rb))
    as64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad)
            for t in (hidden, weight, b, ref_hidden, ref_weight, rb)]
    truth, truth_grads = run(_reference, as64, cast=torch.float64)
    reduction = n + sum(weight.shape) + ref_weight.shape[1]  # rows + vocab + both dims: the sums behind each value
    for name, o, s, t in zip(("logps", "ref_logps", "kl"), ours, same, truth, strict=True):
        assert_close_to_truth(name, o, s, t, reduction=reduction, factor=factor)
    names = ("d_hidden", "d_weight", "d_bias")[: len(leaves)]
    for name, o, s, t, leaf in zip(names, ours_grads, same_grads, truth_grads, leaves, strict=True):
        assert o.dtype == leaf.dtype
        assert_close_to_truth(name, o, s, t, reduction=reduction, factor=factor)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["tis", "tdpo"])
def test_matches_reference(mode, dtype, deterministic, device):
    tensors = make_pair(29, 211, 40, 23, dtype, device, ref_bias=deterministic, seed=1)
    check_kl_against_reference(mode, *tensors, deterministic=deterministic)


@pytest.mark.parametrize("mode", ["tis", "tdpo"])
def test_many_tiles_and_vocabulary_splits(mode, device):
    tensors = make_pair(37, 150, 40, 20, torch.float32, device, bias=False, seed=2)
    check_kl_against_reference(mode, *tensors, config=SMALL_TILES)


@pytest.mark.parametrize("mode", ["tis", "tdpo"])
def test_gradient_of_the_kl_alone(mode, device):
    """Only the KL feeds the loss (the log-probs' upstream gradient is None in the backward)."""
    tensors = make_pair(23, 100, 24, 24, torch.float32, device, seed=3)
    check_kl_against_reference(mode, *tensors, grad_logps=False)


@pytest.mark.parametrize("mode", ["tis", "tdpo"])
def test_identical_models_have_zero_kl_and_zero_kl_gradient(mode, device):
    hidden, weight, b, labels = make_head(25, 120, 32, torch.float32, device, seed=4)
    logps, ref_logps, kl = triton_linear_kl(hidden, weight, labels, hidden.detach(), weight.detach(), mode, b,
                                            b.detach())
    torch.testing.assert_close(logps.detach(), ref_logps, rtol=0, atol=1e-6)
    assert kl.abs().max().item() < 1e-5
    grads = torch.autograd.grad(kl.sum(), (hidden, weight, b))
    assert max(gr.abs().max().item() for gr in grads) < 1e-4


def test_reference_receives_no_gradient(device):
    hidden, weight, b, labels, ref_hidden, ref_weight, rb = make_pair(11, 50, 16, 16, torch.float32, device, seed=5)
    ref_hidden.requires_grad_()
    ref_weight.requires_grad_()
    logps, _, kl = triton_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, "tis", b, rb)
    (logps.sum() + kl.sum()).backward()
    assert ref_hidden.grad is None and ref_weight.grad is None
    assert hidden.grad is not None and weight.grad is not None


def test_kl_is_non_negative_on_peaked_logits(device):
    hidden, weight, b, labels, ref_hidden, ref_weight, rb = make_pair(31, 90, 16, 16, torch.float32, device, seed=6)
    for mode in ("tis", "tdpo"):
        kl = triton_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, mode, b, rb)[2]
        assert bool((kl > 0).all()), kl


def test_deterministic_backward_is_bitwise_reproducible(device):
    hidden, weight, b, labels, ref_hidden, ref_weight, rb = make_pair(37, 150, 40, 20, torch.float32, device, seed=7)
    g = upstream_grad(37, device)

    def grads():
        logps, _, kl = triton_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, "tdpo", b, rb,
                                        deterministic=True, config=SMALL_TILES)
        return torch.autograd.grad((logps, kl), (hidden, weight, b), (g, g.flip(0)))

    for a, c in zip(grads(), grads(), strict=True):
        assert torch.equal(a, c)


def test_gradient_filtering_with_tiny_eps_is_exact(device):
    tensors = make_pair(30, 100, 30, 30, torch.float32, device, seed=8)
    check_kl_against_reference("tdpo", *tensors, filter_eps=1e-30)


def test_bad_inputs(device):
    hidden, weight, b, labels, ref_hidden, ref_weight, rb = make_pair(6, 30, 8, 5, torch.float32, device)
    with pytest.raises(ValueError, match="mode"):
        triton_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, "forward")
    with pytest.raises(ValueError, match="ref_weight has vocabulary"):
        triton_linear_kl(hidden, weight, labels, ref_hidden, ref_weight[:-1], "tis")
    with pytest.raises(ValueError, match=r"ref_hidden shape \(5, 5\) must match hidden's leading shape \(6,\)"):
        triton_linear_kl(hidden, weight, labels, ref_hidden[:5], ref_weight, "tis")
    with pytest.raises(ValueError, match="ref_hidden has D="):
        triton_linear_kl(hidden, weight, labels, ref_hidden[:, :4], ref_weight, "tis")
    with pytest.raises(TypeError, match="ref_hidden"):
        triton_linear_kl(hidden, weight, labels, ref_hidden.half(), ref_weight.half(), "tis")


# ----------------------------------------------------------------------------------------------
# GPU: bf16 and real sizes (compiled kernels)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["tis", "tdpo"])
def test_gpu_matches_reference(mode, dtype, deterministic):
    tensors = make_pair(1031, 32003, 257, 129, dtype, torch.device("cuda"), seed=10)
    # bf16 rounds the logit gradient to 8 bits before the dH / dW matmuls: allow 3x torch's error there
    check_kl_against_reference(mode, *tensors, factor=3.0 if dtype == torch.bfloat16 else 2.0,
                               deterministic=deterministic)


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_reproducible():
    hidden, weight, b, labels, ref_hidden, ref_weight, rb = make_pair(2049, 50_000, 512, 512, torch.bfloat16,
                                                                      torch.device("cuda"), seed=12)
    g = upstream_grad(2049, hidden.device)
    runs = []
    for _ in range(2):
        logps, _, kl = triton_linear_kl(hidden, weight, labels, ref_hidden, ref_weight, "tis", b, rb,
                                        deterministic=True)
        runs.append(torch.autograd.grad((logps, kl), (hidden, weight, b), (g, g)))
    for a, c in zip(*runs, strict=True):
        assert torch.equal(a, c)

