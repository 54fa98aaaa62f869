"""The torch (chunked) path of the public API against the reference oracle in float64, and peers.

The float32 cases every backend shares (the oracle within ``tests/tolerance.py``'s bounds, strides, zero rows,
capabilities) are in ``tests/kernels/test_backend_contract.py``."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tisdpo_kernels import FusedTISDPOLoss, fused_linear_logprobs, fused_tis_dpo_loss
from tisdpo_kernels.reference import reference_linear_logprobs, reference_tis_dpo_loss

from .batches import IGNORE, make_batch

KLS = [None, "tisdpo", "tdpo1", "tdpo2"]
WEIGHTS = ["none", "token", "contrastive"]


def _inputs(b, kl, weights, layout, bias=True, ref="hidden", transform="threshold_and_scale"):
    """Keyword arguments of one call (padded or packed), with leaf tensors that require grad."""
    if layout == "packed":
        fields, cu = b.packed()
    else:
        fields, cu = {k: getattr(b, k) for k in ("hidden", "labels", "ref_hidden", "ref_logps", "token_weights",
                                                  "pos_logps", "neg_logps")}, None
    hidden = fields["hidden"].clone().requires_grad_()
    weight = b.weight.clone().requires_grad_()
    kw = dict(hidden=hidden, weight=weight, labels=fields["labels"], cu_seqlens=cu)
    if bias:
        kw["bias"] = b.bias.clone().requires_grad_()
    if kl is not None or ref == "hidden":
        kw.update(ref_hidden=fields["ref_hidden"], ref_weight=b.ref_weight, ref_bias=b.ref_bias if bias else None)
    else:
        kw["ref_logps"] = fields["ref_logps"]
    if weights == "token":
        kw["token_weights"] = fields["token_weights"]
    elif weights == "contrastive":
        kw.update(contrastive_logps=(fields["pos_logps"], fields["neg_logps"]), weight_transform=transform)
    return kw


def _run(fn, kw, **opts):
    loss, metrics = fn(**kw, **opts)
    leaves = [kw[k] for k in ("hidden", "weight", "bias") if k in kw]
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), metrics, grads


def _max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _assert_close_results(ours, ref, rel):
    loss_o, met_o, grads_o = ours
    loss_r, met_r, grads_r = ref
    assert set(met_o) == set(met_r)
    errs = {"loss": _max_rel(loss_o, loss_r)}
    errs.update({k: _max_rel(met_o[k], met_r[k]) for k in met_r})
    errs.update({f"grad{i}": _max_rel(go, gr) for i, (go, gr) in enumerate(zip(grads_o, grads_r, strict=True))})
    print({k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= rel, errs


@pytest.mark.parametrize("kl,weights,layout", list(itertools.product(KLS, WEIGHTS, ["padded", "packed"])))
def test_chunked_matches_reference_float64(kl, weights, layout):
    b = make_batch(dtype=torch.float64)
    opts = dict(kl=kl, beta=0.3, alpha=0.7)
    ours = _run(fused_tis_dpo_loss, _inputs(b, kl, weights, layout), backend="torch", chunk_size=5, **opts)
    ref = _run(reference_tis_dpo_loss, _inputs(b, kl, weights, layout), **opts)
    _assert_close_results(ours, ref, rel=1e-6)


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("cdpo", 0.2), ("ipo", 0.0),
                                                      ("hinge", 0.0)])
@pytest.mark.parametrize("bias,ref", [(True, "logps"), (False, "hidden")])
def test_loss_types_match_reference_float64(loss_type, label_smoothing, bias, ref):
    b = make_batch(dtype=torch.float64)
    opts = dict(loss_type=loss_type, label_smoothing=label_smoothing, beta=0.5)
    kw = dict(kl=None, weights="token", layout="padded", bias=bias, ref=ref)
    ours = _run(fused_tis_dpo_loss, _inputs(b, **kw), backend="torch", chunk_size=4, **opts)
    ref_result = _run(reference_tis_dpo_loss, _inputs(b, **kw), **opts)
    _assert_close_results(ours, ref_result, rel=1e-6)


@pytest.mark.parametrize("transform", ["origin", "threshold", "threshold_and_scale", "exp_clamp"])
def test_contrastive_transforms_match_reference(transform):
    b = make_batch(dtype=torch.float64)
    ours = _run(fused_tis_dpo_loss, _inputs(b, None, "contrastive", "padded", transform=transform), backend="torch")
    ref = _run(reference_tis_dpo_loss, _inputs(b, None, "contrastive", "padded", transform=transform))
    _assert_close_results(ours, ref, rel=1e-6)


def test_padded_and_packed_agree():
    b = make_batch(dtype=torch.float64)
    padded = _run(fused_tis_dpo_loss, _inputs(b, "tdpo2", "token", "padded"), kl="tdpo2", backend="torch")
    packed = _run(fused_tis_dpo_loss, _inputs(b, "tdpo2", "token", "packed"), kl="tdpo2", backend="torch")
    assert torch.allclose(padded[0], packed[0], rtol=1e-12, atol=0)
    for k in padded[1]:
        assert torch.allclose(padded[1][k], packed[1][k], rtol=1e-12, atol=1e-14), k
    assert torch.allclose(padded[2][1], packed[2][1], rtol=1e-10, atol=1e-14)  # dW


def test_hand_computed_dpo():
    """One pair, V=2, D=1, one response token each, W = [[1], [0]], b = 0, reference log-probs 0.

    chosen: h = 2, label 0 -> lp = 2 - log(e^2 + 1); rejected: h = -1, label 0 -> lp = -1 - log(e^-1 + 1).
    DPO loss = -log sigmoid(beta (lp_c - lp_r)), with token weights 1.
    """
    hidden = torch.tensor([[[2.0]], [[-1.0]]], dtype=torch.float64)
    weight = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    labels = torch.tensor([[0], [0]])
    lp_c = 2 - torch.log(torch.exp(torch.tensor(2.0, dtype=torch.float64)) + 1)
    lp_r = -1 - torch.log(torch.exp(torch.tensor(-1.0, dtype=torch.float64)) + 1)
    expected = -F.logsigmoid(0.1 * (lp_c - lp_r))
    loss, metrics = fused_tis_dpo_loss(hidden, weight, labels, ref_logps=torch.zeros(2, 1, dtype=torch.float64),
                                       backend="torch")
    assert torch.allclose(loss, expected, rtol=1e-14)
    assert torch.allclose(metrics["logps/chosen"], lp_c)
    assert metrics["rewards/accuracies"].item() == 1.0


def test_fused_linear_logprobs_matches_reference_and_zero_on_ignored():
    b = make_batch(dtype=torch.float64)
    h = b.hidden.clone().requires_grad_()
    w = b.weight.clone().requires_grad_()
    g_out = torch.randn(b.labels.shape, dtype=torch.float64)  # non-uniform upstream gradient
    ours = fused_linear_logprobs(h, w, b.labels, bias=b.bias, backend="torch", chunk_size=3)
    ref = reference_linear_logprobs(h, w, b.labels, bias=b.bias)
    assert ours.shape == b.labels.shape and ours.dtype == torch.float64
    assert torch.equal(ours[b.labels == IGNORE], torch.zeros_like(ours[b.labels == IGNORE]))
    assert (ours <= 0).all()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    go = torch.autograd.grad((ours * g_out).sum(), (h, w))
    gr = torch.autograd.grad((ref * g_out).sum(), (h, w))
    for a, r in zip(go, gr, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_fp32_outputs_and_input_dtype_grads(dtype):
    b = make_batch(dtype=dtype, pairs=2, seq_len=9, dim=16, vocab=53, scale=0.5)
    kw = _inputs(b, None, "token", "padded")
    loss, metrics, grads = _run(fused_tis_dpo_loss, kw, backend="torch")
    assert loss.dtype == torch.float32
    assert all(g.dtype == dtype for g in grads)
    b32 = make_batch(dtype=torch.float32, pairs=2, seq_len=9, dim=16, vocab=53, scale=0.5)
    kw32 = _inputs(b32, None, "token", "padded")
    for k in ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias"):
        kw32[k] = kw[k].detach().float().requires_grad_(kw[k].requires_grad)
    kw32["token_weights"] = kw["token_weights"].float()
    loss32, _, grads32 = _run(fused_tis_dpo_loss, kw32, backend="torch")
    torch.testing.assert_close(loss, loss32, rtol=1e-5, atol=1e-6)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # one rounding of the gradient to the input dtype
    for g, g32 in zip(grads, grads32, strict=True):
        torch.testing.assert_close(g.float(), g32, rtol=tol, atol=tol * g32.abs().max().item())


def test_gradcheck_chunked_functions():
    from tisdpo_kernels.chunked import chunked_linear_kl, chunked_linear_logprobs

    n, d, v = 5, 3, 7
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (n,))
    rh, rw = torch.randn(n, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: chunked_linear_logprobs(a, b, y, bias=c, chunk_size=2),
                                    (h, w, bias))
    for mode in ("tis", "tdpo"):
        def f(a, b, c, mode=mode):
            lp, _, kl = chunked_linear_kl(a, b, y, rh, rw, mode, bias=c, chunk_size=2)
            return lp, kl

        assert torch.autograd.gradcheck(f, (h, w, bias))


def test_gradcheck_full_loss():
    b = make_batch(dtype=torch.float64, pairs=2, seq_len=6, dim=3, vocab=5, pad=1)

    def f(h, w):
        return fused_tis_dpo_loss(h, w, b.labels, ref_hidden=b.ref_hidden, ref_weight=b.ref_weight,
                                  token_weights=b.token_weights, kl="tisdpo", backend="torch", chunk_size=4)[0]

    assert torch.autograd.gradcheck(f, (b.hidden.clone().requires_grad_(), b.weight.clone().requires_grad_()))


def test_module_wraps_function():
    b = make_batch(dtype=torch.float64)
    mod = FusedTISDPOLoss(beta=0.2, kl="tdpo1", backend="torch")
    loss_m, _ = mod(b.hidden, b.weight, b.labels, ref_hidden=b.ref_hidden, ref_weight=b.ref_weight)
    loss_f, _ = fused_tis_dpo_loss(b.hidden, b.weight, b.labels, ref_hidden=b.ref_hidden, ref_weight=b.ref_weight,
                                   beta=0.2, kl="tdpo1", backend="torch")
    assert torch.equal(loss_m, loss_f)
    assert "tdpo1" in repr(mod)


# ------------------------------------------------------------------------------------------------
# peers: with unit weights our loss is plain DPO
# ------------------------------------------------------------------------------------------------


def _trl_style_sigmoid_dpo(logits_policy, logits_ref, input_ids, loss_mask, beta):
    """A TRL-style DPO: shift inside, full log_softmax, summed masked log-probs, chosen rows first."""
    labels = input_ids[:, 1:]
    mask = loss_mask[:, 1:]
    lp = torch.log_softmax(logits_policy[:, :-1], -1).gather(-1, labels[..., None]).squeeze(-1)
    lr = torch.log_softmax(logits_ref[:, :-1], -1).gather(-1, labels[..., None]).squeeze(-1)
    lp, lr = (lp * mask).sum(-1), (lr * mask).sum(-1)
    b = lp.shape[0] // 2
    logits = (lp[:b] - lr[:b]) - (lp[b:] - lr[b:])
    return -F.logsigmoid(beta * logits).mean()


def test_unit_weights_equal_trl_style_dpo():
    pairs, t, d, v = 3, 11, 8, 41
    h = torch.randn(2 * pairs, t, d, dtype=torch.float64, requires_grad=True)
    rh = torch.randn(2 * pairs, t, d, dtype=torch.float64)
    w, rw = torch.randn(v, d, dtype=torch.float64, requires_grad=True), torch.randn(v, d, dtype=torch.float64)
    input_ids = torch.randint(0, v, (2 * pairs, t))
    loss_mask = torch.ones_like(input_ids)
    loss_mask[:, :4] = 0
    loss_mask[2, -2:] = 0
    trl = _trl_style_sigmoid_dpo(h @ w.T, rh @ rw.T, input_ids, loss_mask, beta=0.1)
    labels = input_ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, IGNORE)
    labels = torch.cat([labels, torch.full((2 * pairs, 1), IGNORE)], 1)  # aligned with hidden: no shift inside
    ours, _ = fused_tis_dpo_loss(h, w, labels, ref_hidden=rh, ref_weight=rw, token_weights=torch.ones(labels.shape,
                                 dtype=torch.float64), backend="torch", chunk_size=7)
    torch.testing.assert_close(ours, trl, rtol=1e-12, atol=0)
    g_ours = torch.autograd.grad(ours, (h, w))
    g_trl = torch.autograd.grad(trl, (h, w))
    for a, r in zip(g_ours, g_trl, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_unit_weights_equal_liger_fused_linear_dpo(loss_type):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    b = make_batch(dtype=torch.float32, pairs=3, seq_len=12, dim=16, vocab=45, scale=0.5)
    h = b.hidden.clone().requires_grad_()
    w = b.weight.clone().requires_grad_()
    lig_loss_fn = liger.LigerFusedLinearDPOLoss(beta=0.1, compiled=False, use_ref_model=True, loss_type=loss_type)
    out = lig_loss_fn(w, h, b.labels, None, b.ref_hidden, b.ref_weight, None)
    lig = out[0] if isinstance(out, tuple) else out
    ours, metrics = fused_tis_dpo_loss(h, w, b.labels, ref_hidden=b.ref_hidden, ref_weight=b.ref_weight,
                                       loss_type=loss_type, backend="torch")
    torch.testing.assert_close(ours, lig, rtol=1e-5, atol=1e-6)
    g_ours = torch.autograd.grad(ours, (h, w))
    g_lig = torch.autograd.grad(lig, (h, w))
    for a, r in zip(g_ours, g_lig, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
