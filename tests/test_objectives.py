"""``objectives.py`` (every loss type, ``loss_weights``, ``ld_alpha``, WPO) against a transcription of TRL 1.16's
``DPOTrainer`` loss: through ``objectives.pair_objective`` on per-sequence sums and through ``fused_tis_dpo_loss``
(torch backend) on hidden states, values and gradients, in float64.

Tolerances: both sides evaluate the same float64 formulas; they differ only in summation order (segment sums of
at most ~30 terms, a vocabulary log-sum-exp of 37) and in algebraically equal rearrangements (``s_c - s_r``
against ``(P_c - P_r) - (R_c - R_r)``), each a few float64 ulps (2.2e-16) times the terms' size: 1e-10 relative
leaves a wide margin and still catches any formula error (the smallest ones seen, e.g. a missing length
normalisation, change the loss by more than 1e-2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tisdpo_kernels import fused_tis_dpo_loss
from tisdpo_kernels.objectives import LOSS_TYPES, SMOOTHED_LOSS_TYPES, PairLossOptions, ld_token_weights
from tisdpo_kernels.objectives import pair_objective, sequence_sums
from tisdpo_kernels.reference import reference_tis_dpo_loss

from .batches import IGNORE, make_batch

TRL_LOSS_TYPES = [t for t in LOSS_TYPES if t != "cdpo"]  # cdpo is ours (TRL < 1.0's smoothed sigmoid)
RTOL = 1e-10  # see the module docstring


def _options(loss_type):
    """label_smoothing where the loss type reads it (exo_pair needs one > 0), else 0."""
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    eps = 0.1 if any(t in SMOOTHED_LOSS_TYPES for t in types) else 0.0
    return dict(beta=0.3, label_smoothing=eps, discopop_tau=0.7)


# ------------------------------------------------------------------------------------------------
# the transcription of TRL 1.16 (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss, f_divergence_type
# "reverse_kl"), on per-sequence sums: policy / reference summed log-probs of chosen (c) and rejected (r)
# ------------------------------------------------------------------------------------------------


def trl_per_sequence_loss(loss_type, pol_c, pol_r, ref_c, ref_r, len_c, len_r, sft_nll, beta, eps, tau):
    ls, sg = F.logsigmoid, torch.sigmoid
    lr_c, lr_r = pol_c - ref_c, pol_r - ref_r  # chosen_logratios, rejected_logratios
    delta = lr_c - lr_r
    if loss_type == "sigmoid":
        return -ls(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        return (lr_c / len_c - lr_r / len_r - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        e = torch.tensor(eps, dtype=delta.dtype)
        return sg(beta * delta) * (ls(beta * delta) - torch.log1p(-e)) + sg(-beta * delta) * (ls(-beta * delta)
                                                                                             - torch.log(e))
    if loss_type == "nca_pair":
        return -ls(beta * lr_c) - 0.5 * ls(-beta * lr_c) - 0.5 * ls(-beta * lr_r)
    if loss_type == "robust":
        return (-(1 - eps) * ls(beta * delta) + eps * ls(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -ls(beta * lr_c) - ls(-beta * lr_r)
    if loss_type == "sppo_hard":
        return (lr_c - 0.5 / beta) ** 2 + (lr_r + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            d = torch.sort(pol_c - pol_r, dim=0)[0] - torch.sort(ref_c - ref_r, dim=0)[0]
        else:
            d = torch.sort(lr_c, dim=0)[0] - torch.sort(lr_r, dim=0)[0]
        return -ls(beta * d) * (1 - eps) - ls(-beta * d) * eps
    if loss_type == "apo_zero":
        return 1 - sg(beta * lr_c) + sg(beta * lr_r)
    if loss_type == "apo_down":
        return sg(beta * lr_c) + 1 - sg(beta * delta)
    if loss_type == "discopop":
        x = beta * delta
        return -ls(x) * (1 - sg(x / tau)) + torch.exp(-x) * sg(x / tau)
    if loss_type == "sft":
        return sft_nll.expand(pol_c.shape[0])
    if loss_type == "sigmoid_norm":
        return -ls(beta * (lr_c / len_c - lr_r / len_r))
    raise AssertionError(loss_type)


def trl_loss(loss_types, loss_weights, seq, *, beta, label_smoothing, discopop_tau, wpo=None):
    """``sum_k w_k mean(per_sequence_loss_k [* wpo])``; ``seq`` holds the per-sequence tensors."""
    total = 0.0
    for loss_type, w in zip(loss_types, loss_weights or [1.0] * len(loss_types), strict=True):
        per = trl_per_sequence_loss(loss_type, *seq, beta, label_smoothing, discopop_tau)
        if wpo is not None:
            per = per * wpo
        total = total + per.mean() * w
    return total


def trl_on_logits(hidden, weight, bias, labels, ref_logps, loss_types, loss_weights=None, *, beta, label_smoothing,
                  discopop_tau, ld_alpha=None, use_weighting=False):
    """TRL's step on padded ``[2B, T]`` rows (chosen first), full logits, precomputed reference log-probs."""
    logits = hidden @ weight.T + bias
    mask = labels != IGNORE
    per_token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    ref_per_token = ref_logps * mask
    lens = mask.sum(1)
    if ld_alpha is None:
        logps, ref = per_token.sum(1), ref_per_token.sum(1)
    else:
        pos = mask.cumsum(1)
        shared = torch.minimum(*lens.chunk(2)).repeat(2)[:, None]
        shared_mask, tail_mask = (pos > 0) & (pos <= shared) & mask, (pos > shared) & mask
        logps = (per_token * shared_mask).sum(1) + ld_alpha * (per_token * tail_mask).sum(1)
        ref = (ref_per_token * shared_mask).sum(1) + ld_alpha * (ref_per_token * tail_mask).sum(1)
    b = labels.shape[0] // 2
    sft_nll = -per_token[:b][mask[:b]].mean()
    wpo = None
    if use_weighting:
        with torch.no_grad():
            log_sum_sq = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
            w = torch.exp(((per_token - log_sum_sq) * mask).sum(1) / lens)
        wpo = w[:b] * w[b:]
    seq = (logps[:b], logps[b:], ref[:b], ref[b:], lens[:b].to(logps.dtype), lens[b:].to(logps.dtype), sft_nll)
    return trl_loss(loss_types, loss_weights, seq, beta=beta, label_smoothing=label_smoothing,
                    discopop_tau=discopop_tau, wpo=wpo)


# ------------------------------------------------------------------------------------------------
# pair_objective on per-sequence sums
# ------------------------------------------------------------------------------------------------

LENGTHS = [5, 1, 30, 7, 2, 9, 3, 30]  # 4 pairs: chosen then rejected; one-token and equal-length responses


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    seq_ids = torch.arange(len(LENGTHS)).repeat_interleave(torch.tensor(LENGTHS))
    n = seq_ids.numel()
    lp = (-4 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()
    lpref = -4 * torch.rand(n, generator=g, dtype=torch.float64)
    return lp, lpref, seq_ids


def _trl_on_tokens(lp, lpref, seq_ids, loss_types, loss_weights, opts):
    num = len(LENGTHS)

    def seg(v):
        return torch.zeros(num, dtype=v.dtype).index_add(0, seq_ids, v)

    pol, ref, lens = seg(lp), seg(lpref), seg(torch.ones_like(lp))
    b = num // 2
    sft_nll = -lp[seq_ids < b].mean()
    return trl_loss(loss_types, loss_weights, (pol[:b], pol[b:], ref[:b], ref[b:], lens[:b], lens[b:], sft_nll), **opts)


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_pair_objective_equals_trl(loss_type):
    lp, lpref, seq_ids = _tokens()
    opts = _options(loss_type)
    sums = sequence_sums(lp, lpref, torch.ones_like(lp), seq_ids, len(LENGTHS))
    ours, _ = pair_objective(sums, PairLossOptions(loss_type=[loss_type], **opts))
    trl = _trl_on_tokens(lp, lpref, seq_ids, [loss_type], None, opts)
    print(loss_type, ours.item(), trl.item())
    torch.testing.assert_close(ours, trl, rtol=RTOL, atol=1e-13)
    (g_ours,), (g_trl,) = torch.autograd.grad(ours, lp), torch.autograd.grad(trl, lp)
    torch.testing.assert_close(g_ours, g_trl, rtol=RTOL, atol=1e-13)


@pytest.mark.parametrize("loss_type,loss_weights", [
    (["sigmoid", "sft"], [1.0, 1.0]),  # RPO
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
    (["ipo", "hinge", "ipo", "discopop"], [0.5, -0.3, 2.0, 1.5]),  # a repeated type, a negative weight
    (["robust", "exo_pair", "aot", "aot_unpaired", "nca_pair"], None),  # default weights 1
])
def test_loss_weights_combinations_equal_trl(loss_type, loss_weights):
    lp, lpref, seq_ids = _tokens(seed=1)
    opts = _options(loss_type)
    sums = sequence_sums(lp, lpref, torch.ones_like(lp), seq_ids, len(LENGTHS))
    ours, _ = pair_objective(sums, PairLossOptions(loss_type=loss_type, loss_weights=loss_weights, **opts))
    trl = _trl_on_tokens(lp, lpref, seq_ids, loss_type, loss_weights, opts)
    torch.testing.assert_close(ours, trl, rtol=RTOL, atol=1e-13)
    (g_ours,), (g_trl,) = torch.autograd.grad(ours, lp), torch.autograd.grad(trl, lp)
    torch.testing.assert_close(g_ours, g_trl, rtol=RTOL, atol=1e-13)
    # the combination is the weighted sum of the single terms
    singles = [pair_objective(sums, PairLossOptions(loss_type=t, **_options(t)))[0] for t in loss_type]
    want = sum(w * s for w, s in zip(loss_weights or [1.0] * len(singles), singles, strict=True))
    torch.testing.assert_close(ours, want, rtol=RTOL, atol=1e-13)


def test_string_and_list_forms_agree_and_cdpo_is_the_old_smoothed_sigmoid():
    lp, lpref, seq_ids = _tokens(seed=2)
    sums = sequence_sums(lp, lpref, torch.ones_like(lp), seq_ids, len(LENGTHS))
    assert torch.equal(pair_objective(sums, PairLossOptions(loss_type="sigmoid"))[0],
                       pair_objective(sums, PairLossOptions(loss_type=["sigmoid"]))[0])
    b = len(LENGTHS) // 2
    h = 0.1 * (sums.M[:b] - sums.M[b:])
    want = (-(0.9 * F.logsigmoid(h)) - 0.1 * F.logsigmoid(-h)).mean()
    torch.testing.assert_close(pair_objective(sums, PairLossOptions(loss_type="cdpo", label_smoothing=0.1))[0], want,
                               rtol=1e-14, atol=0)


def test_ld_token_weights_hand_computed():
    """Pair 0: chosen 3 tokens, rejected 1 -> shared 1; pair 1: chosen 2, rejected 2 -> shared 2.
    Sequences (chosen 0, 1 | rejected 2, 3): weights 1, a, a | 1, 1 | 1 | 1, 1."""
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    assert ld_token_weights(seq_ids, 4, 0.25).tolist() == [1, 0.25, 0.25, 1, 1, 1, 1, 1]


# ------------------------------------------------------------------------------------------------
# fused_tis_dpo_loss on hidden states (torch backend)
# ------------------------------------------------------------------------------------------------


def _leaves(dtype=torch.float64, device="cpu", **shape):
    b = make_batch(dtype=dtype, **{**dict(pairs=3, seq_len=14, dim=8, vocab=37), **shape})
    for name, value in vars(b).items():
        if isinstance(value, torch.Tensor):
            setattr(b, name, value.to(device))
    return b, [t.clone().requires_grad_() for t in (b.hidden, b.weight, b.bias)]


def fused_and_trl(loss_type, loss_weights=None, backend="torch", dtype=torch.float64, ld_alpha=None,
                  use_weighting=False, device="cpu", **shape):
    """Our loss and gradients (w.r.t. hidden, weight, bias) on one batch, then TRL's at our dtype and TRL's in
    float64 (the truth) on the same values."""
    b, leaves = _leaves(dtype, device, **shape)
    opts = _options(loss_type)
    ours, _ = fused_tis_dpo_loss(*leaves[:2], b.labels, bias=leaves[2], ref_logps=b.ref_logps, backend=backend,
                                 chunk_size=5, loss_type=loss_type, loss_weights=loss_weights, ld_alpha=ld_alpha,
                                 use_weighting=use_weighting, **opts)
    grads = torch.autograd.grad(ours, leaves)
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    results = [(ours.detach(), grads)]
    for d in (dtype, torch.float64):  # TRL at our dtype, and the float64 truth
        tl = [t.detach().to(d).requires_grad_() for t in leaves]
        trl = trl_on_logits(*tl, b.labels, b.ref_logps.to(d), types, loss_weights, ld_alpha=ld_alpha,
                            use_weighting=use_weighting, **opts)
        results.append((trl.detach(), torch.autograd.grad(trl, tl)))
    return results


def _assert_equal_to_trl(ours, trl, rtol=RTOL):
    (loss_o, grads_o), (loss_t, grads_t) = ours, trl
    print(f"loss ours {loss_o.item():.15g} trl {loss_t.item():.15g}")
    torch.testing.assert_close(loss_o, loss_t, rtol=rtol, atol=1e-13)
    for name, go, gt in zip(("hidden", "weight", "bias"), grads_o, grads_t, strict=True):
        torch.testing.assert_close(go, gt, rtol=rtol, atol=1e-13 * gt.abs().max().item(), msg=name)


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_fused_equals_trl(loss_type):
    ours, _, trl = fused_and_trl(loss_type)
    _assert_equal_to_trl(ours, trl)


def test_fused_combination_ld_alpha_and_wpo_equal_trl():
    types, weights = ["sigmoid", "ipo", "sft", "apo_down"], [1.0, 0.3, 0.7, 0.5]
    for ld_alpha, use_weighting in ((0.4, False), (None, True), (0.0, True)):
        ours, _, trl = fused_and_trl(types, weights, ld_alpha=ld_alpha, use_weighting=use_weighting)
        _assert_equal_to_trl(ours, trl)


def test_ld_alpha_one_is_plain_dpo_and_weighted_logps_are_trls():
    """ld_alpha=1 changes nothing; with ld_alpha, ``logps/chosen_weighted`` is TRL's ``logps/chosen``."""
    b, leaves = _leaves()
    kw = dict(bias=leaves[2], ref_logps=b.ref_logps, backend="torch")
    plain, _ = fused_tis_dpo_loss(*leaves[:2], b.labels, **kw)
    one, _ = fused_tis_dpo_loss(*leaves[:2], b.labels, ld_alpha=1.0, **kw)
    torch.testing.assert_close(plain, one, rtol=1e-14, atol=0)
    _, metrics = fused_tis_dpo_loss(*leaves[:2], b.labels, ld_alpha=0.5, **kw)
    mask = b.labels != IGNORE
    logits = b.hidden @ b.weight.T + b.bias
    per_token = torch.log_softmax(logits, -1).gather(-1, b.labels.clamp(min=0)[..., None])[..., 0] * mask
    lens = mask.sum(1)
    shared = torch.minimum(*lens.chunk(2)).repeat(2)[:, None]
    pos = mask.cumsum(1)
    trl_logps = (per_token * (pos <= shared)).sum(1) + 0.5 * (per_token * (pos > shared)).sum(1)
    torch.testing.assert_close(metrics["logps/chosen_weighted"], trl_logps[:3].mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kl", [None, "tisdpo", "tdpo2"])
def test_ld_alpha_and_wpo_compose_with_token_weights_and_kl(kl):
    """TIS-DPO weights x LD-DPO weights inside M, WPO outside: chunked path equals the float64 reference."""
    b, leaves = _leaves()
    kw = dict(bias=leaves[2], ref_hidden=b.ref_hidden, ref_weight=b.ref_weight, token_weights=b.token_weights,
              loss_type=["sigmoid_norm", "sft"], loss_weights=[1.0, 0.5], kl=kl, ld_alpha=0.3, use_weighting=True)
    ours, m_ours = fused_tis_dpo_loss(*leaves[:2], b.labels, backend="torch", chunk_size=4, **kw)
    ref, m_ref = reference_tis_dpo_loss(*leaves[:2], b.labels, **kw)
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=0)
    assert set(m_ours) == set(m_ref) and "weights/wpo_pair_mean" in m_ours
    for k in m_ref:
        torch.testing.assert_close(m_ours[k], m_ref[k], rtol=RTOL, atol=1e-14, msg=k)
    for go, gr in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(ref, leaves), strict=True):
        torch.testing.assert_close(go, gr, rtol=RTOL, atol=1e-13 * gr.abs().max().item())
    # the weights really do act: without ld_alpha the loss differs
    other, _ = fused_tis_dpo_loss(*leaves[:2], b.labels, backend="torch", **{**kw, "ld_alpha": None})
    assert not torch.allclose(ours, other)


def test_log_collision_of_the_chunked_path():
    from tisdpo_kernels.chunked import chunked_linear_kl, chunked_linear_logprobs
    from tisdpo_kernels.reference import reference_log_collision

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(11, 6, generator=g, dtype=torch.float64), torch.randn(29, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 29, (11,), generator=g)
    want = torch.log((torch.softmax(h @ w.T, -1) ** 2).sum(-1))
    torch.testing.assert_close(reference_log_collision(h, w), want, rtol=1e-13, atol=0)
    _, coll = chunked_linear_logprobs(h, w, y, chunk_size=4, log_collision=True)
    torch.testing.assert_close(coll, want, rtol=1e-13, atol=0)
    *_, coll_kl = chunked_linear_kl(h, w, y, h.flip(0), w, "tis", chunk_size=3, log_collision=True)
    torch.testing.assert_close(coll_kl, want, rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------------------
# bad options
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("over,match", [
    (dict(loss_type=[]), "loss_type"),
    (dict(loss_type=["sigmoid", "dpo"]), "loss_type"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights"),
    (dict(loss_type="sigmoid", loss_weights=[float("nan")]), "loss_weights"),
    (dict(label_smoothing=0.1), "cdpo"),  # TRL ignores it for sigmoid; we refuse it, naming the old meaning
    (dict(loss_type="exo_pair"), "exo_pair' needs label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(loss_type="aot_unpaired", use_weighting=True), "use_weighting"),
    (dict(loss_type="aot", kl="tdpo1"), "KL"),
])
def test_bad_options(over, match):
    b = make_batch()
    kw = dict(ref_hidden=b.ref_hidden, ref_weight=b.ref_weight, backend="torch")
    with pytest.raises(ValueError, match=match):
        fused_tis_dpo_loss(b.hidden, b.weight, b.labels, **{**kw, **over})


def test_bad_options_of_pair_loss_options():
    """The same checks on ``PairLossOptions`` itself (what ``pair_objective`` takes)."""
    for over, match in [(dict(beta=0.0), "beta"), (dict(alpha=float("inf")), "alpha"), (dict(kl="tdpo3"), "kl"),
                        (dict(loss_type="kto"), "loss_type"), (dict(ld_alpha=-0.1), "ld_alpha"),
                        (dict(loss_type="aot", kl="tdpo1"), "KL")]:
        with pytest.raises(ValueError, match=match):
            PairLossOptions(**over)


def test_pair_loss_options_are_the_loss_keywords():
    """Each field of ``PairLossOptions`` is a keyword of ``fused_tis_dpo_loss``, ``reference_tis_dpo_loss`` and
    ``FusedTISDPOLoss`` with the same default, so a caller can pass its options through by field name; lists are
    kept as tuples (the options are immutable and hashable)."""
    import dataclasses
    import inspect

    from tisdpo_kernels import FusedTISDPOLoss

    for fn in (fused_tis_dpo_loss, reference_tis_dpo_loss, FusedTISDPOLoss.__init__):
        params = inspect.signature(fn).parameters
        for f in dataclasses.fields(PairLossOptions):
            assert params[f.name].kind == inspect.Parameter.KEYWORD_ONLY, (fn, f.name)
            assert params[f.name].default == f.default, (fn, f.name)
    opts = PairLossOptions(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], kl="tdpo2")
    assert opts.loss_type == ("sigmoid", "sft") and opts.loss_weights == (1.0, 0.5)
    assert opts.terms == (("sigmoid", 1.0), ("sft", 0.5))
    assert hash(opts) == hash(PairLossOptions(**opts.as_kwargs()))
    assert set(opts.as_kwargs()) == {f.name for f in dataclasses.fields(PairLossOptions)}
