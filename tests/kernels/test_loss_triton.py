"""``fused_tis_dpo_loss(..., backend="triton")`` end to end against ``reference.py``: every KL variant,
weight source (none, per-token, contrastive with an in-kernel transform), loss type and layout.

On CPU the kernels run under the Triton interpreter (``conftest.py``). The inputs are float32 (the
kernels take fp32/fp16/bf16); the truth is the reference in float64 on the same values, and our
error must stay within 2x the reference's own float32 error (plus a small floor)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tisdpo_kernels import FusedTISDPOLoss, fused_linear_logprobs, fused_tis_dpo_loss
from tisdpo_kernels.reference import reference_linear_logprobs, reference_tis_dpo_loss

from ..batches import make_batch
from ..test_loss import KLS, WEIGHTS, _inputs, _run
from ..test_objectives import TRL_LOSS_TYPES, fused_and_trl
from .helpers import assert_close_to_truth

SHAPE = dict(pairs=3, seq_len=23, dim=40, vocab=211, scale=0.5)


def _batch(dtype, device, **overrides):
    b = make_batch(dtype=dtype, **{**SHAPE, **overrides})
    for name, value in vars(b).items():
        if isinstance(value, torch.Tensor):
            setattr(b, name, value.to(device))
    return b


def _as64(kw):
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                and v.is_floating_point() else tuple(t.double() for t in v) if isinstance(v, tuple) else v)
            for k, v in kw.items()}


def _check(kw, opts, backend="triton"):
    ours = _run(fused_tis_dpo_loss, kw, backend=backend, **opts)
    same = _run(reference_tis_dpo_loss, kw, **opts)
    truth = _run(reference_tis_dpo_loss, _as64(kw), **opts)
    assert set(ours[1]) == set(truth[1])
    named = [("loss", ours[0], same[0], truth[0])]
    named += [(k, ours[1][k], same[1][k], truth[1][k]) for k in truth[1]]
    named += [(f"grad{i}", o, s, t) for i, (o, s, t) in enumerate(zip(ours[2], same[2], truth[2], strict=True))]
    # every token of the batch + vocab + both dims: the sums behind the loss and its gradients
    ref_dim = kw["ref_hidden"].shape[-1] if "ref_hidden" in kw else 0
    reduction = kw["labels"].numel() + sum(kw["weight"].shape) + ref_dim
    for name, o, s, t in named:
        assert_close_to_truth(name, o, s, t, reduction=reduction, factor=2.0)


@pytest.mark.parametrize("kl,weights,layout", list(itertools.product(KLS, WEIGHTS, ["padded", "packed"])))
def test_triton_loss_matches_reference(kl, weights, layout, device):
    b = _batch(torch.float32, device)
    _check(_inputs(b, kl, weights, layout, ref="hidden" if kl else "logps"), dict(kl=kl, beta=0.3))


@pytest.mark.parametrize("kl,layout", list(itertools.product(KLS, ["padded", "packed"])))
def test_split_loss_matches_reference(kl, layout, device):
    """The vocabulary-split backend through the full loss (Triton elementwise passes under the interpreter)."""
    b = _batch(torch.float32, device)
    _check(_inputs(b, kl, "token", layout, ref="hidden" if kl else "logps"), dict(kl=kl, beta=0.3), backend="split")


def test_split_and_torch_backends_agree_on_bfloat16(device):
    """bf16 inputs through the split path: fp32 loss, bf16 gradients close to the torch path's."""
    b = _batch(torch.bfloat16, device)
    kw = _inputs(b, "tisdpo", "token", "packed")
    loss_s, _, grads_s = _run(fused_tis_dpo_loss, kw, kl="tisdpo", backend="split")
    loss_c, _, grads_c = _run(fused_tis_dpo_loss, kw, kl="tisdpo", backend="torch")
    assert loss_s.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads_s)
    torch.testing.assert_close(loss_s, loss_c, rtol=1e-3, atol=1e-4)
    for gs, gc in zip(grads_s, grads_c, strict=True):  # both round to bf16 (eps 2**-8) at different points
        torch.testing.assert_close(gs.float(), gc.float(), rtol=2e-2, atol=1e-2 * gc.float().abs().max().item())


def test_auto_backend_and_split_options(device):
    from tisdpo_kernels.loss import _resolve_backend
    from tisdpo_kernels.ops._config import auto_backend

    assert auto_backend(4096) == "split" and auto_backend(2048) == "split" and auto_backend(256) == "triton"
    assert _resolve_backend("auto", torch.device("cpu"), 4096) == "torch"
    b = _batch(torch.float32, device)
    with pytest.raises(ValueError, match="grad_filter_eps"):
        _run(fused_tis_dpo_loss, _inputs(b, None, "none", "padded", ref="logps"), backend="split",
             grad_filter_eps=1e-3)
    with pytest.raises(ValueError, match="fp32_precision"):
        _run(fused_tis_dpo_loss, _inputs(b, None, "none", "padded", ref="logps"), backend="split",
             fp32_precision="fast")


@pytest.mark.parametrize("transform", ["origin", "threshold", "exp_clamp"])
def test_triton_in_kernel_weight_transforms(transform, device):
    b = _batch(torch.float32, device)
    _check(_inputs(b, None, "contrastive", "padded", ref="logps", transform=transform), dict(beta=0.2))


@pytest.mark.parametrize("loss_type,label_smoothing", [("cdpo", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_triton_loss_types(loss_type, label_smoothing, device):
    b = _batch(torch.float32, device)
    _check(_inputs(b, None, "token", "packed", ref="logps"),
           dict(loss_type=loss_type, label_smoothing=label_smoothing, beta=0.5))


@pytest.mark.parametrize("ld_alpha", [None, 0.3])
def test_triton_every_trl_loss_type_equals_trl(ld_alpha, device):
    """All of TRL's loss types in one weighted combination (each weight distinct, so a wrong term shows), with
    and without LD-DPO: the float32 Triton path within 2x TRL's own float32 error of TRL's float64 loss and
    gradients (``tests/test_objectives.py`` holds the transcription of TRL 1.16)."""
    weights = [0.1 * (k + 1) for k in range(len(TRL_LOSS_TYPES))]
    (ours, g_ours), (same, g_same), (truth, g_truth) = fused_and_trl(
        TRL_LOSS_TYPES, weights, backend="triton", dtype=torch.float32, ld_alpha=ld_alpha, device=device,
        pairs=3, seq_len=23, dim=40, vocab=211)
    reduction = 2 * 3 * 23 + 211 + 40  # every token of the batch + vocab + dim, as in _check
    assert_close_to_truth("loss", ours, same, truth, reduction=reduction)
    for name, o, s, t in zip(("hidden", "weight", "bias"), g_ours, g_same, g_truth, strict=True):
        assert_close_to_truth(name, o, s, t, reduction=reduction)


def test_triton_refuses_wpo_naming_the_option(device):
    b = _batch(torch.float32, device)
    with pytest.raises(ValueError, match="use_weighting.*backend='torch'"):
        fused_tis_dpo_loss(**_inputs(b, None, "none", "padded", ref="logps"), backend="triton", use_weighting=True)


def test_triton_and_torch_backends_agree_on_half_precision(device):
    """fp16 inputs: both backends return fp32 losses and fp16 gradients that agree closely."""
    b = _batch(torch.float16, device)
    kw = _inputs(b, "tdpo2", "token", "padded")
    loss_t, metrics_t, grads_t = _run(fused_tis_dpo_loss, kw, kl="tdpo2", backend="triton")
    loss_c, metrics_c, grads_c = _run(fused_tis_dpo_loss, kw, kl="tdpo2", backend="torch")
    assert loss_t.dtype == torch.float32
    assert all(g.dtype == torch.float16 for g in grads_t)
    torch.testing.assert_close(loss_t, loss_c, rtol=1e-3, atol=1e-4)
    for gt, gc in zip(grads_t, grads_c, strict=True):
        torch.testing.assert_close(gt.float(), gc.float(), rtol=2e-2, atol=2e-3)


def test_fused_linear_logprobs_triton(device):
    b = _batch(torch.float32, device)
    hidden = b.hidden.clone().requires_grad_()
    ours = fused_linear_logprobs(hidden, b.weight, b.labels, bias=b.bias, backend="triton")
    valid = b.labels != -100
    truth = reference_linear_logprobs(hidden.double(), b.weight.double(), b.labels.clamp(min=0),
                                      bias=b.bias.double()) * valid
    assert ours.shape == b.labels.shape and bool((ours[~valid] == 0).all())
    torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-5)
    g_ours, = torch.autograd.grad(ours.sum(), hidden)
    g_truth, = torch.autograd.grad(truth.sum(), hidden)
    torch.testing.assert_close(g_ours.double(), g_truth.double(), rtol=1e-4, atol=1e-5)


def test_module_runs_the_triton_backend(device):
    b = _batch(torch.float32, device)
    kw = _inputs(b, None, "token", "padded", ref="logps")
    loss_m, _ = FusedTISDPOLoss(beta=0.2, backend="triton")(**kw)
    loss_f, _ = fused_tis_dpo_loss(**kw, beta=0.2, backend="torch")
    torch.testing.assert_close(loss_m, loss_f, rtol=1e-5, atol=1e-6)


def test_float64_is_refused_with_a_pointer_to_the_torch_backend(device):
    b = _batch(torch.float64, device)
    with pytest.raises(TypeError, match="backend='torch'"):
        fused_tis_dpo_loss(**_inputs(b, None, "none", "padded", ref="logps"), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("kl", KLS)
def test_gpu_bf16_loss_close_to_float64_truth(kl):
    """bf16 on a GPU at a longer sequence and a real-sized vocabulary: loss and gradients near the
    float64 reference (bf16 inputs, fp32 math: loose, dtype-appropriate tolerances)."""
    b = _batch(torch.bfloat16, "cuda", pairs=2, seq_len=1500, dim=512, vocab=32003)
    kw = _inputs(b, kl, "token", "padded", ref="hidden" if kl else "logps")
    loss, _, grads = _run(fused_tis_dpo_loss, kw, kl=kl, backend="triton")
    loss64, _, grads64 = _run(reference_tis_dpo_loss, _as64(kw), kl=kl)
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-2, atol=2e-3)
    for g, g64 in zip(grads, grads64, strict=True):
        assert g.dtype == torch.bfloat16
        err = ((g.double() - g64).norm() / g64.norm()).item()
        assert err < 2e-2, err


def test_deterministic_option_is_bitwise_reproducible_and_exact(device):
    b = _batch(torch.float32, device)
    kw = _inputs(b, "tisdpo", "token", "padded")
    first = _run(fused_tis_dpo_loss, kw, kl="tisdpo", backend="triton", deterministic=True)
    second = _run(fused_tis_dpo_loss, kw, kl="tisdpo", backend="triton", deterministic=True)
    default = _run(fused_tis_dpo_loss, kw, kl="tisdpo", backend="triton")
    for g1, g2, g0 in zip(first[2], second[2], default[2], strict=True):
        assert torch.equal(g1, g2)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)


def test_grad_filter_eps_tiny_is_exact_and_large_changes_gradients(device):
    """A filter threshold far below every probability skips nothing; one above them all keeps only the
    label tiles, which must change the weight gradient (so the option really reaches the kernels)."""
    b = _batch(torch.float32, device, vocab=4001)  # many vocabulary tiles without a label
    kw = _inputs(b, None, "token", "padded", ref="logps")
    exact = _run(fused_tis_dpo_loss, kw, backend="triton")
    tiny = _run(fused_tis_dpo_loss, kw, backend="triton", grad_filter_eps=1e-30)
    coarse = _run(fused_tis_dpo_loss, kw, backend="triton", grad_filter_eps=0.5)
    for g0, g1 in zip(exact[2], tiny[2], strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(exact[2][1], coarse[2][1])
    torch.testing.assert_close(exact[0], coarse[0])  # the forward is never filtered


@pytest.mark.parametrize("option,value", [("grad_filter_eps", 0.0), ("grad_filter_eps", 2.0), ("chunk_size", 0)])
def test_bad_kernel_options(option, value, device):
    b = _batch(torch.float32, device)
    with pytest.raises(ValueError, match=option):
        fused_tis_dpo_loss(**_inputs(b, None, "none", "padded", ref="logps"), backend="triton", **{option: value})
