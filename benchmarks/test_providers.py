"""Every provider computes what it claims, on the benchmark inputs (so the timings compare like with like).

Loss and gradients of each provider available here against ``tisdpo_kernels.reference`` in float64
on the same inputs; ``liger`` against the reference with unit weights and no reference term (what
``LigerFusedLinearDPOLoss(use_ref_model=False)`` computes).
"""

from __future__ import annotations

import pytest
import torch

from tisdpo_kernels.reference import reference_tis_dpo_loss

from .env import bench_device
from .providers import ALPHA, BETA, PROVIDERS, make_inputs
from .shapes import HEADS, LOGITS_KINDS, Case

DEVICE = bench_device()
# fp32 on CPU; on CUDA bf16, the dtype the fused kernels are benchmarked in.
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# A provider may err by 4x the naive provider's own error in this dtype (PyTorch's error, measured
# against the same float64 truth), and never needs to beat this floor. The floors: fp32, about
# 50 x eps32 x sqrt(V) at V=1000 (the peers sum the softmax and the gradients in orders of their own, chunk by
# chunk); bf16, its own rounding (eps 7.8e-3) plus a margin.
TOL_FLOOR = {torch.float32: 2e-4, torch.bfloat16: 1e-2}


def _reference(inputs, variant, provider):
    h = inputs.hidden.detach().double().requires_grad_()
    w = inputs.weight.detach().double().requires_grad_()
    if provider == "liger":
        kwargs = dict(ref_logps=torch.zeros_like(inputs.ref_logps, dtype=torch.float64))
    elif variant == "tisdpo_kl":
        kwargs = dict(ref_hidden=inputs.ref_hidden.double(), ref_weight=inputs.ref_weight.double(), kl="tisdpo",
                      token_weights=inputs.token_weights.double())
    else:
        kwargs = dict(ref_logps=inputs.ref_logps.double(), token_weights=inputs.token_weights.double())
    loss, _ = reference_tis_dpo_loss(h, w, inputs.labels, beta=BETA, alpha=ALPHA, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _relative_errors(provider, inputs, variant):
    """Loss and gradient errors of ``provider`` against the float64 reference, relative to its scale."""
    inputs.zero_grad()
    loss = PROVIDERS[provider].build(inputs, variant)()
    loss.backward()
    ref_loss, ref_dh, ref_dw = _reference(inputs, variant, provider)
    return {
        "loss": (loss.double() - ref_loss).abs().item() / max(ref_loss.abs().item(), 1e-3),
        "d_hidden": ((inputs.hidden.grad.double() - ref_dh).abs().max() / ref_dh.abs().max()).item(),
        "d_weight": ((inputs.weight.grad.double() - ref_dw).abs().max() / ref_dw.abs().max()).item(),
    }


def _cases():
    for name, provider in PROVIDERS.items():
        for variant in provider.variants:
            for logits in LOGITS_KINDS:
                yield pytest.param(name, variant, logits, id=f"{name}-{variant}-{logits}")


@pytest.mark.parametrize(("provider", "variant", "logits"), list(_cases()))
def test_provider_matches_reference(provider, variant, logits):
    reason = PROVIDERS[provider].unavailable(DEVICE)
    if reason:
        pytest.skip(reason)
    # 37 response tokens (ragged prompts of 2 and 4), D=48, V=1000: small and not a multiple of anything.
    inputs = make_inputs(Case(HEADS["smoke"], 37, logits, DTYPE), variant, DEVICE, seed=1)
    errors = _relative_errors(provider, inputs, variant)
    torch_errors = _relative_errors("naive", inputs, variant)
    tolerances = {k: max(TOL_FLOOR[DTYPE], 4 * torch_errors[k]) for k in errors}
    print(provider, variant, logits, "errors", errors, "tolerances", tolerances)
    assert all(errors[k] <= tolerances[k] for k in errors), (errors, tolerances)
