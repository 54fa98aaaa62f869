"""``token_stats``: the policy's per-token entropy, mean logit and is-top-1 (TRL's ``entropy``, ``logits/*`` and
``mean_token_accuracy``; docs/design.md §4) of every backend against the oracle on materialised logits.

Inputs with awkward sizes (29 rows, D=24, V=600: not a multiple of the torch chunk, of the split path's 256
columns or of the Triton tiles' 32, and split across 3 vocabulary splits by both kernel families) and exact ties:
two identical LM-head rows (index 300 and 520: the second and third split of both, so the maximum before a label
520 comes from a split other than the first and the label's own) hold the maximum logit of rows 0-7, so a label
300 is the argmax and a label 520 is not (``argmax`` returns the first maximum); labels 0 and V-1 (nothing / every
column before them) and labels that are the argmax complete the set.

Tolerances, against float64 truths of the same (rounded) inputs: the entropy ``lse - sum_v p_v z_v`` is two
terms of size at most ``max|z| + log V``, each a chain of sums over V (and the logits over D) in the math dtype
(float32 for fp32/bf16 inputs, float64 for float64): ``8 eps(math) sqrt(V + D) (max|z| + log V)`` (the
random-walk model and the factor 8 of ``tests/tolerance.py``); the mean logit ``h . mean_v(W) + mean(b)`` is a
sum over D of products whose size is ``|h| . mean_v|W| + mean|b|``, its mean over V of the same length:
``8 eps(math) sqrt(V + D)`` times that size. is-top-1 is exact (the label's logit and the maxima are the same
rounded values), and so are the token counts.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tisdpo_kernels import backends, fused_tis_dpo_loss
from tisdpo_kernels.chunked import chunked_linear_kl, chunked_linear_logprobs
from tisdpo_kernels.ops._common import mean_logits
from tisdpo_kernels.ops.linear_kl import triton_linear_kl
from tisdpo_kernels.ops.linear_logprobs import triton_linear_logprobs
from tisdpo_kernels.ops.linear_split import split_linear_kl, split_linear_logprobs, split_plan
from tisdpo_kernels.reference import reference_tis_dpo_loss, reference_token_stats

from .helpers import SMALL_TILES, loss_batch

N, D, V = 29, 24, 600
LO, HI = 300, 520  # identical LM-head rows, the maximum of rows 0-7, in the second and third vocabulary splits
SCRATCH = N * 256 * 4  # the split path's 256-column splits: 3 of them over V=600


def _head(dtype, seed=0):
    """``hidden [N, D]``, ``weight [V, D]``, ``bias [V]``, ``labels [N]`` with the ties of the module docstring."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 3 / D**0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    u = torch.randn(D, generator=g, dtype=torch.float64)
    u /= u.norm()
    weight[LO] = weight[HI] = 4 * u
    bias[LO] = bias[HI] = 0.25
    hidden[:8] = 3 * u + 0.1 * torch.randn(8, D, generator=g, dtype=torch.float64)
    hidden, weight, bias = (t.to(dtype) for t in (hidden, weight, bias))
    labels = torch.randint(0, V, (N,), generator=g)
    z = hidden.double() @ weight.double().T + bias.double()
    labels[:4], labels[4:8] = LO, HI
    labels[8:16] = z[8:16].argmax(-1)
    labels[16], labels[17] = 0, V - 1
    return hidden, weight, bias, labels


def _torch(h, w, b, y, ref=None):
    if ref is None:
        return chunked_linear_logprobs(h, w, y, bias=b, chunk_size=5, token_stats=True)
    return chunked_linear_kl(h, w, y, *ref, "tis", bias=b, ref_bias=b, chunk_size=5, token_stats=True)


def _split(elementwise):
    def run(h, w, b, y, ref=None):
        kw = dict(scratch_bytes=SCRATCH, elementwise=elementwise, token_stats=True)
        if ref is None:
            return split_linear_logprobs(h, w, y, b, **kw)
        return split_linear_kl(h, w, y, *ref, "tdpo", bias=b, ref_bias=b, **kw)
    return run


def _triton(h, w, b, y, ref=None):
    if ref is None:
        return triton_linear_logprobs(h, w, y, b, config=SMALL_TILES, token_stats=True)
    return triton_linear_kl(h, w, y, *ref, "tis", bias=b, ref_bias=b, config=SMALL_TILES, token_stats=True)


PATHS = {"torch": _torch, "split-torch": _split("torch"), "split-triton": _split("triton"), "triton": _triton}
DTYPES = {"torch": (torch.float64, torch.float32, torch.bfloat16)}


def _cases():
    for path in PATHS:
        for dtype in DTYPES.get(path, (torch.float32, torch.bfloat16)):
            for kl in (False, True):
                yield pytest.param(path, dtype, kl, id=f"{path}-{str(dtype)[6:]}-{'kl' if kl else 'logps'}")


def _math_eps(dtype):
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def test_the_split_path_runs_three_splits_here():
    assert split_plan(N, V, D, torch.float32, False, SCRATCH).cols == 256  # 3 splits over V=600
    assert SMALL_TILES.fwd_splits == 3 and V % SMALL_TILES.fwd.block_v


@pytest.mark.parametrize("path,dtype,kl", list(_cases()))
def test_per_token_statistics_equal_the_oracle(path, dtype, kl):
    h, w, b, y = _head(dtype)
    ref = (h.flip(0), w) if kl else None  # any reference head: the statistics are the policy's
    out = PATHS[path](h, w, b, y, ref)
    entropy, is_top1 = out[-2], out[-1]
    truth_entropy, truth_mean, truth_top1 = reference_token_stats(h.double(), w.double(), y, bias=b.double())
    z = h.double() @ w.double().T + b.double()
    eps, k = _math_eps(dtype), math.sqrt(V + D)

    assert entropy.shape == (N,) and is_top1.dtype == torch.bool
    entropy_bound = 8 * eps * k * (z.abs().max().item() + math.log(V))
    err = (entropy.double() - truth_entropy).abs().max().item()
    print(f"{path} {dtype}: entropy error {err:.2e} (bound {entropy_bound:.2e})")
    assert err <= entropy_bound
    assert torch.equal(is_top1, truth_top1)
    # the ties: a label tied with an earlier index is not the argmax; the oracle agrees (argmax's first maximum)
    assert is_top1[:4].all() and not is_top1[4:8].any() and is_top1[8:16].all()

    mean = mean_logits(h, w, b)
    size = h.double().abs() @ w.double().abs().mean(0) + b.double().abs().mean()
    assert ((mean.double() - truth_mean).abs() <= 8 * eps * k * size).all()


@pytest.mark.parametrize("path", list(PATHS))
def test_statistics_leave_logps_and_gradients_unchanged(path):
    """The same log-probs (bit for bit) and gradients with and without ``token_stats``; without it the head
    functions return what they always did."""
    h, w, b, y = (t.requires_grad_() if t.is_floating_point() else t for t in _head(torch.float32))
    calls = {"torch": lambda **kw: chunked_linear_logprobs(h, w, y, bias=b, chunk_size=5, **kw),
             "split-torch": lambda **kw: split_linear_logprobs(h, w, y, b, scratch_bytes=SCRATCH,
                                                               elementwise="torch", **kw),
             "split-triton": lambda **kw: split_linear_logprobs(h, w, y, b, scratch_bytes=SCRATCH,
                                                                elementwise="triton", **kw),
             "triton": lambda **kw: triton_linear_logprobs(h, w, y, b, config=SMALL_TILES, **kw)}
    plain = calls[path]()
    assert isinstance(plain, torch.Tensor)
    with_stats = calls[path](token_stats=True)
    assert len(with_stats) == 3 and not with_stats[1].requires_grad and not with_stats[2].requires_grad
    assert torch.equal(plain, with_stats[0])
    g = torch.linspace(-1, 1, N)
    grads = torch.autograd.grad(plain, (h, w, b), g)
    grads_stats = torch.autograd.grad(with_stats[0], (h, w, b), g)
    for a, c in zip(grads, grads_stats, strict=True):
        assert torch.equal(a, c)


LAYOUTS = ("padded", "packed", "row_index")


def _loss_inputs(layout, dtype):
    """Loss keyword arguments of a batch with ragged prompts, padding and a hole in a response, laid out padded,
    packed (``cu_seqlens``) or as explicit rows with one row used twice (``row_index``, prefix sharing)."""
    bt = loss_batch(dtype, torch.device("cpu"), vocab=V, dim=D)
    kw = dict(hidden=bt.hidden, weight=bt.weight, labels=bt.labels, bias=bt.bias, ref_hidden=bt.ref_hidden,
              ref_weight=bt.ref_weight, ref_bias=bt.ref_bias)
    rows, width = bt.labels.shape
    if layout == "padded":
        return kw
    flat = {k: (v.reshape(-1, v.shape[-1]) if v.dim() == 3 else v.reshape(-1)) if k in ("hidden", "ref_hidden",
                                                                                         "labels") else v
            for k, v in kw.items()}
    cu = torch.arange(rows + 1, dtype=torch.int32) * width
    if layout == "packed":
        return dict(flat, cu_seqlens=cu)
    # row_index: the rows of each sequence's response positions, the first chosen response row shared with the
    # first rejected sequence's (a shared prompt row), labels per entry
    valid = (bt.labels != -100).reshape(-1)
    index = valid.nonzero().squeeze(1)
    seq = index // width
    first_rejected = (seq == rows // 2).nonzero()[0]
    index[first_rejected] = index[0].item()
    counts = torch.bincount(seq, minlength=rows)
    cu_rows = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    return dict(kw, labels=bt.labels.reshape(-1)[valid], row_index=index, cu_seqlens=cu_rows,
                hidden=kw["hidden"], ref_hidden=kw["ref_hidden"])


def _explicit(kw):
    """The ``row_index`` call as the packed call on the named rows (what the oracle takes)."""
    if "row_index" not in kw:
        return kw
    idx = kw["row_index"]
    out = {k: v for k, v in kw.items() if k != "row_index"}
    out["hidden"] = kw["hidden"].reshape(-1, D)[idx]
    out["ref_hidden"] = kw["ref_hidden"].reshape(-1, D)[idx]
    return out


def _double(kw):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}


@pytest.mark.parametrize("backend", list(backends.TABLE))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kl", [None, "tdpo2"])
def test_loss_metrics_equal_the_oracle(backend, layout, kl):
    """``fused_tis_dpo_loss(token_stats=True)``'s ``entropy``, ``logits/chosen``, ``logits/rejected``,
    ``mean_token_accuracy`` and token counts equal the float64 oracle's on the same fp32 inputs (means over the
    response tokens only: prompts, padding and the hole are left out; several sequences per side)."""
    kw = _loss_inputs(layout, torch.float32)
    loss, metrics = fused_tis_dpo_loss(**kw, kl=kl, backend=backend, token_stats=True)
    _, truth = reference_tis_dpo_loss(**_double(_explicit(kw)), kl=kl, token_stats=True)
    eps, k = _math_eps(torch.float32), math.sqrt(V + D)
    h = _explicit(kw)["hidden"].double()
    z = h @ kw["weight"].double().T + kw["bias"].double()
    bounds = {"entropy": 8 * eps * k * (z.abs().max().item() + math.log(V)),
              "logits/chosen": 8 * eps * k * z.abs().max().item(), "logits/rejected": 8 * eps * k * z.abs().max().item(),
              "mean_token_accuracy": 0.0, "tokens/chosen": 0.0, "tokens/rejected": 0.0}
    for name, bound in bounds.items():
        err = abs(metrics[name].item() - truth[name].item())
        print(f"{backend} {layout} {name}: {metrics[name].item():.8g} vs {truth[name].item():.8g}")
        assert err <= bound, (name, err, bound)
    labels = loss_batch(torch.float32, torch.device("cpu"), vocab=V, dim=D).labels
    half = labels.shape[0] // 2
    assert metrics["tokens/chosen"] == (labels[:half] != -100).sum() > 0
    assert metrics["tokens/rejected"] == (labels[half:] != -100).sum() > 0


def test_off_by_default_and_refused_by_name():
    """Without ``token_stats`` no statistic is computed or returned; a backend without the capability refuses it
    by name (and ``auto`` picks one that has it)."""
    kw = _loss_inputs("padded", torch.float32)
    _, metrics = fused_tis_dpo_loss(**kw, backend="torch")
    assert not {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "tokens/chosen"} & set(metrics)
    lacking = dataclasses.replace(backends.TABLE["split"], token_stats=False,
                                  lacks=(("token_stats", "planted for this test"),))
    error = backends.refusal(lacking, torch.device("cpu"), token_stats=True, have_triton=True)
    assert isinstance(error, ValueError)
    assert "backend='split' does not support token_stats: planted for this test; supported by: torch, triton, " \
        "split" in str(error)
    assert backends.refusal(lacking, torch.device("cpu"), have_triton=True) is None
    with pytest.raises(TypeError, match="token_stats must be a bool"):
        fused_tis_dpo_loss(**kw, backend="torch", token_stats=1)
