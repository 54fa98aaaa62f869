"""``fused_tis_dpo_loss(..., backend="triton")`` and ``backend="split"`` beyond the backend contract
(``test_backend_contract.py``): the in-kernel weight transforms, loss types (every TRL type against TRL), and
half-precision inputs against the torch backend.

On CPU the kernels run under the Triton interpreter (``conftest.py``). The inputs are float32 (the
kernels take fp32/fp16/bf16); the truth is the reference in float64 on the same values, and our
error must stay within 2x the reference's own float32 error (plus a small floor)."""

from __future__ import annotations

import pytest
import torch

from tisdpo_kernels import fused_tis_dpo_loss
from tisdpo_kernels.reference import reference_tis_dpo_loss

from ..test_loss import KLS, _inputs, _run
from ..test_objectives import TRL_LOSS_TYPES, fused_and_trl
from .helpers import as64, assert_close_to_truth, check_loss_against_oracle, loss_batch


def test_split_and_torch_backends_agree_on_bfloat16(device):
    """bf16 inputs through the split path: fp32 loss, bf16 gradients close to the torch path's."""
    b = loss_batch(torch.bfloat16, device)
    kw = _inputs(b, "tisdpo", "token", "packed")
    loss_s, _, grads_s = _run(fused_tis_dpo_loss, kw, kl="tisdpo", backend="split")
    loss_c, _, grads_c = _run(fused_tis_dpo_loss, kw, kl="tisdpo", backend="torch")
    assert loss_s.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads_s)
    torch.testing.assert_close(loss_s, loss_c, rtol=1e-3, atol=1e-4)
    for gs, gc in zip(grads_s, grads_c, strict=True):  # both round to bf16 (eps 2**-8) at different points
        torch.testing.assert_close(gs.float(), gc.float(), rtol=2e-2, atol=1e-2 * gc.float().abs().max().item())


@pytest.mark.parametrize("transform", ["origin", "threshold", "exp_clamp"])
def test_triton_in_kernel_weight_transforms(transform, device):
    b = loss_batch(torch.float32, device)
    check_loss_against_oracle(_inputs(b, None, "contrastive", "padded", ref="logps", transform=transform),
                              dict(beta=0.2), "triton")


@pytest.mark.parametrize("loss_type,label_smoothing", [("cdpo", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_triton_loss_types(loss_type, label_smoothing, device):
    b = loss_batch(torch.float32, device)
    check_loss_against_oracle(_inputs(b, None, "token", "packed", ref="logps"),
                              dict(loss_type=loss_type, label_smoothing=label_smoothing, beta=0.5), "triton")


@pytest.mark.parametrize("ld_alpha", [None, 0.3])
def test_triton_every_trl_loss_type_equals_trl(ld_alpha, device):
    """All of TRL's loss types in one weighted combination (each weight distinct, so a wrong term shows), with
    and without LD-DPO: the float32 Triton path within 2x TRL's own float32 error of TRL's float64 loss and
    gradients (``tests/test_objectives.py`` holds the transcription of TRL 1.16)."""
    weights = [0.1 * (k + 1) for k in range(len(TRL_LOSS_TYPES))]
    (ours, g_ours), (same, g_same), (truth, g_truth) = fused_and_trl(
        TRL_LOSS_TYPES, weights, backend="triton", dtype=torch.float32, ld_alpha=ld_alpha, device=device,
        pairs=3, seq_len=23, dim=40, vocab=211)
    reduction = 2 * 3 * 23 + 211 + 40  # every token of the batch + vocab + dim, as in check_loss_against_oracle
    assert_close_to_truth("loss", ours, same, truth, reduction=reduction)
    for name, o, s, t in zip(("hidden", "weight", "bias"), g_ours, g_same, g_truth, strict=True):
        assert_close_to_truth(name, o, s, t, reduction=reduction)


def test_triton_and_torch_backends_agree_on_half_precision(device):
    """fp16 inputs: both backends return fp32 losses and fp16 gradients that agree closely."""
    b = loss_batch(torch.float16, device)
    kw = _inputs(b, "tdpo2", "token", "padded")
    loss_t, metrics_t, grads_t = _run(fused_tis_dpo_loss, kw, kl="tdpo2", backend="triton")
    loss_c, metrics_c, grads_c = _run(fused_tis_dpo_loss, kw, kl="tdpo2", backend="torch")
    assert loss_t.dtype == torch.float32
    assert all(g.dtype == torch.float16 for g in grads_t)
    torch.testing.assert_close(loss_t, loss_c, rtol=1e-3, atol=1e-4)
    for gt, gc in zip(grads_t, grads_c, strict=True):
        torch.testing.assert_close(gt.float(), gc.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kl", KLS)
def test_gpu_bf16_loss_close_to_float64_truth(kl):
    """bf16 on a GPU at a longer sequence and a real-sized vocabulary: loss and gradients near the
    float64 reference (bf16 inputs, fp32 math: loose, dtype-appropriate tolerances)."""
    b = loss_batch(torch.bfloat16, "cuda", pairs=2, seq_len=1500, dim=512, vocab=32003)
    kw = _inputs(b, kl, "token", "padded", ref="hidden" if kl else "logps")
    loss, _, grads = _run(fused_tis_dpo_loss, kw, kl=kl, backend="triton")
    loss64, _, grads64 = _run(reference_tis_dpo_loss, as64(kw), kl=kl)
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-2, atol=2e-3)
    for g, g64 in zip(grads, grads64, strict=True):
        assert g.dtype == torch.bfloat16
        err = ((g.double() - g64).norm() / g64.norm()).item()
        assert err < 2e-2, err
