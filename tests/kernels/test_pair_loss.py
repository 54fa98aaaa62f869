"""``ops/pair_loss.py``: per-sequence sums and their per-token gradients against ``objectives.sequence_sums``
(with weights from ``transforms.token_weights_from_contrastive``). The head kernels chained into these sums and
the pair objective, against ``reference.reference_tis_dpo_loss``, are a case of the backend contract
(``test_backend_contract.py``)."""

from __future__ import annotations

import pytest
import torch

from tisdpo_kernels.objectives import sequence_sums
from tisdpo_kernels.ops.pair_loss import triton_sequence_sums
from tisdpo_kernels.transforms import token_weights_from_contrastive

FIELDS = ("M", "LP", "LPW", "K", "W", "count")
TRANSFORMS = ["origin", "threshold", "threshold_and_scale", "exp_clamp"]


def make_tokens(lengths, dtype, device, seed=0):
    """Per-token leaves of sequences with the given lengths (chosen first): log-probs, reference
    log-probs, weights, token KL, and contrastive log-probs; plus sorted sequence ids."""
    g = torch.Generator().manual_seed(seed)
    seq_ids = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths)).to(device)
    n = seq_ids.shape[0]

    def rnd(lo, hi, grad=True):
        t = (torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    return dict(lp=rnd(-4, 0), ref=rnd(-4, 0), w=rnd(0.3, 1.7), kl=rnd(0, 0.5),
                pos=rnd(-3, 0, False), neg=rnd(-3, 0, False)), seq_ids


# one sequence longer than the kernel's 256-token block, a one-token one, odd lengths
LENGTHS = [5, 1, 300, 7, 2, 9]


def _run_both(t, seq_ids, num_seqs, weights, kl, transform="origin", transform_kwargs=None):
    """Our sums and the reference's, and the gradients of one random combination of M, LP, LPW, K."""
    token_kl = t["kl"] if kl is not None else None
    contrastive = (t["pos"], t["neg"]) if weights == "contrastive" else None
    given = t["w"] if weights == "token" else None
    ours = triton_sequence_sums(t["lp"], t["ref"], given, seq_ids, num_seqs, token_kl=token_kl, kl=kl,
                                contrastive_logps=contrastive, weight_transform=transform,
                                transform_kwargs=transform_kwargs)
    if weights == "contrastive":
        w = token_weights_from_contrastive(t["pos"], t["neg"], seq_ids < num_seqs // 2, transform, transform_kwargs)
    elif weights == "token":
        w = t["w"]
    else:
        w = torch.ones_like(t["lp"])
    ref = sequence_sums(t["lp"], t["ref"], w, seq_ids, num_seqs, token_kl=token_kl, kl=kl)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(num_seqs, generator=g, dtype=torch.float64).to(t["lp"]) for _ in range(4)]
    leaves = [t["lp"], t["ref"]] + ([t["w"]] if weights == "token" else []) + ([t["kl"]] if kl else [])

    def grads(sums):
        obj = sum((u * getattr(sums, f)).sum() for u, f in zip(upstream, FIELDS[:4], strict=True))
        return torch.autograd.grad(obj, leaves, allow_unused=True)

    return ours, ref, grads(ours), grads(ref)


@pytest.mark.parametrize("kl", [None, "tisdpo", "tdpo1", "tdpo2"])
@pytest.mark.parametrize("weights", ["none", "token", "contrastive"])
def test_matches_reference_float64(weights, kl, device):
    t, seq_ids = make_tokens(LENGTHS, torch.float64, device)
    ours, ref, ours_g, ref_g = _run_both(t, seq_ids, len(LENGTHS), weights, kl, transform="threshold_and_scale")
    for f in FIELDS:
        torch.testing.assert_close(getattr(ours, f), getattr(ref, f), rtol=1e-12, atol=1e-12)
    for a, b in zip(ours_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transform,kwargs", [(name, None) for name in TRANSFORMS] + [
    ("exp_clamp", {"k": 2.0, "mu": 0.5, "lower": -1.0, "upper": 1.0}),
    ("threshold_and_scale", {"lower": -0.5, "upper": 0.5, "min_weight": 0.5, "max_weight": 2.0}),
])
def test_weight_transforms_float32(transform, kwargs, device):
    t, seq_ids = make_tokens(LENGTHS, torch.float32, device, seed=2)
    ours, ref, ours_g, ref_g = _run_both(t, seq_ids, len(LENGTHS), "contrastive", "tisdpo", transform, kwargs)
    for f in FIELDS:
        torch.testing.assert_close(getattr(ours, f), getattr(ref, f), rtol=1e-5, atol=1e-4)
    for a, b in zip(ours_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_hand_computed_case(device):
    """One pair, two chosen tokens and one rejected, contrastive rewards r = (1, -2 | 0.5), ``threshold``.

    Chosen weights T(r) = clamp(r, -1, 1) = (1, -1); rejected T(-r) = clamp(-0.5) = -0.5. With
    lp = (-1, -2 | -3), lpref = (-0.5, -1 | -1): M_c = 1*(-0.5) + (-1)*(-1) = 0.5, M_r = -0.5*(-2) = 1,
    LP = (-3, -3), LPW_c = -1 + 2 = 1, LPW_r = 1.5, W = (0, -0.5), count = (2, 1)."""
    lp = torch.tensor([-1.0, -2.0, -3.0], device=device, requires_grad=True)
    ref = torch.tensor([-0.5, -1.0, -1.0], device=device)
    pos = torch.tensor([0.0, -2.0, -0.5], device=device)
    neg = torch.tensor([-1.0, 0.0, -1.0], device=device)
    sums = triton_sequence_sums(lp, ref, None, torch.tensor([0, 0, 1], device=device), 2,
                                contrastive_logps=(pos, neg), weight_transform="threshold")
    expected = {"M": [0.5, 1.0], "LP": [-3.0, -3.0], "LPW": [1.0, 1.5], "W": [0.0, -0.5], "count": [2.0, 1.0],
                "K": [0.0, 0.0]}
    for f, want in expected.items():
        assert getattr(sums, f).tolist() == want, f
    d_lp, = torch.autograd.grad(sums.M.sum(), lp)  # d M / d lp = w
    assert d_lp.tolist() == [1.0, -1.0, -0.5]


def test_deterministic(device):
    t, seq_ids = make_tokens([700, 3, 250, 31], torch.float32, device, seed=3)
    runs = [triton_sequence_sums(t["lp"], t["ref"], t["w"], seq_ids, 4, token_kl=t["kl"], kl="tisdpo")
            for _ in range(2)]
    for f in FIELDS:
        assert torch.equal(getattr(runs[0], f), getattr(runs[1], f))


def test_bad_inputs(device):
    t, seq_ids = make_tokens([3, 2, 4, 1], torch.float32, device)
    lp, ref = t["lp"], t["ref"]
    with pytest.raises(ValueError, match="sorted"):
        triton_sequence_sums(lp, ref, None, seq_ids.flip(0), 4)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        triton_sequence_sums(lp, ref, None, seq_ids, 2)
    with pytest.raises(ValueError, match="num_seqs"):
        triton_sequence_sums(lp, ref, None, seq_ids, 5)
    with pytest.raises(ValueError, match="not both"):
        triton_sequence_sums(lp, ref, t["w"], seq_ids, 4, contrastive_logps=(t["pos"], t["neg"]))
    with pytest.raises(ValueError, match="weight_transform"):
        triton_sequence_sums(lp, ref, None, seq_ids, 4, contrastive_logps=(t["pos"], t["neg"]),
                             weight_transform="rank_based")
    with pytest.raises(ValueError, match="token_kl"):
        triton_sequence_sums(lp, ref, None, seq_ids, 4, token_kl=t["kl"][:-1], kl="tdpo1")
    with pytest.raises(ValueError, match="kl must be"):
        triton_sequence_sums(lp, ref, None, seq_ids, 4, kl="tdpo3")
    with pytest.raises(TypeError, match="policy_logps"):
        triton_sequence_sums(lp.half(), ref, None, seq_ids, 4)


@pytest.mark.gpu
def test_gpu_matches_reference_many_tokens():
    lengths = [4096, 17, 8191, 1, 3000, 255, 256, 257]
    t, seq_ids = make_tokens(lengths, torch.float32, torch.device("cuda"), seed=5)
    ours, ref, ours_g, ref_g = _run_both(t, seq_ids, len(lengths), "contrastive", "tisdpo", "exp_clamp")
    for f in FIELDS:
        torch.testing.assert_close(getattr(ours, f), getattr(ref, f), rtol=1e-5, atol=1e-3)
    for a, b in zip(ours_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
