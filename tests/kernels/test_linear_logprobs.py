"""``ops/linear_logprobs.py``: values and gradients against ``reference.reference_linear_logprobs``.

CPU runs go through the Triton interpreter (fp32 and fp16 here; bf16 ``tl.dot`` is wrong in the
interpreter, so bf16 is covered by the ``gpu`` tests). Shapes are deliberately not multiples of any
tile, and some tests pass small tile configs to force several row, vocabulary and hidden-size tiles.
Strided inputs and zero rows are cases of the backend contract (``test_backend_contract.py``).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tisdpo_kernels.ops._config import LinearConfig, TileConfig
from tisdpo_kernels.ops._jit import offsets64
from tisdpo_kernels.ops.linear_logprobs import LinearParams, linear_forward, triton_linear_logprobs
from tisdpo_kernels.reference import reference_linear_logprobs

from .helpers import SMALL_TILES, assert_close_to_truth, make_head, upstream_grad


def _leaves(hidden, weight, bias):
    return [t for t in (hidden, weight, bias) if t is not None]


def check_against_reference(hidden, weight, bias, labels, factor=2.0, **kwargs):
    """Forward and backward (non-uniform upstream gradient) of the kernels against a float64 truth,
    within ``factor`` x the error of the reference computed at the input dtype."""
    g = upstream_grad(labels.shape[0], hidden.device)
    leaves = _leaves(hidden, weight, bias)
    ours = triton_linear_logprobs(hidden, weight, labels, bias, **kwargs)
    assert ours.dtype == torch.float32
    ours_grads = torch.autograd.grad(ours, leaves, g)
    same = reference_linear_logprobs(hidden, weight, labels, bias=bias)
    same_grads = torch.autograd.grad(same, leaves, g)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    h64, w64 = leaves64[:2]
    truth = reference_linear_logprobs(h64, w64, labels, bias=leaves64[2] if bias is not None else None)
    truth_grads = torch.autograd.grad(truth, leaves64, g.double())
    reduction = sum(weight.shape) + labels.shape[0]  # rows + vocab + dim: the sums behind each value
    assert_close_to_truth("logps", ours, same, truth, reduction=reduction, factor=factor)
    names = ("d_hidden", "d_weight", "d_bias")[: len(leaves)]
    for name, o, s, t, leaf in zip(names, ours_grads, same_grads, truth_grads, leaves, strict=True):
        assert o.dtype == leaf.dtype
        assert_close_to_truth(name, o, s, t, reduction=reduction, factor=factor)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(dtype, bias, deterministic, device):
    # fp16 rounds the logit gradient to fp16 before the dH / dW matmuls (as on the GPU) where the
    # reference rounds only the result; seen here: at most 1.3x torch's error.
    hidden, weight, b, labels = make_head(37, 301, 45, dtype, device, bias=bias)
    check_against_reference(hidden, weight, b, labels, deterministic=deterministic)


def test_bfloat16_inputs(device):
    """bf16 in, fp32 log-probs, bf16 gradients. Under the interpreter the tiles are upcast before
    ``tl.dot`` (its bf16 dot is wrong), so this checks the dtype plumbing; the GPU test checks bf16 math."""
    hidden, weight, b, labels = make_head(37, 301, 45, torch.bfloat16, device, seed=9)
    # on a GPU the logit gradient is rounded to bf16 before the dH / dW matmuls: 3x torch's error there
    check_against_reference(hidden, weight, b, labels, factor=3.0 if device.type == "cuda" else 2.0)


@pytest.mark.parametrize("deterministic", [False, True])
def test_many_tiles_and_vocabulary_splits(deterministic, device):
    """3 row tiles x 5 vocabulary tiles x 3 hidden chunks; forward split 3 ways, backward 2 ways."""
    hidden, weight, b, labels = make_head(37, 150, 45, torch.float32, device, seed=1)
    check_against_reference(hidden, weight, b, labels, deterministic=deterministic, config=SMALL_TILES)


def test_backward_with_one_vocabulary_tile_per_program(device):
    cfg = LinearConfig(fwd=TileConfig(16, 32, 16), bwd=TileConfig(16, 32, 16), fwd_splits=1, bwd_splits=None)
    hidden, weight, b, labels = make_head(20, 70, 20, torch.float32, device, seed=2)
    check_against_reference(hidden, weight, b, labels, config=cfg)


def test_upstream_gradient_is_applied_per_row(device):
    """Rows with a zero upstream gradient get exactly zero d_hidden; the others scale with their own
    gradient (Liger PR #1298 scaled every row by the first row's)."""
    hidden, weight, b, labels = make_head(21, 90, 24, torch.float32, device, seed=3)
    g = torch.zeros(21, device=device)
    g[4], g[17] = 3.0, -0.5
    d_hidden, = torch.autograd.grad(triton_linear_logprobs(hidden, weight, labels, b), hidden, g)
    ref, = torch.autograd.grad(reference_linear_logprobs(hidden, weight, labels, bias=b), hidden, g)
    others = torch.ones(21, dtype=torch.bool, device=device)
    others[[4, 17]] = False
    assert torch.equal(d_hidden[others], torch.zeros_like(d_hidden[others]))
    torch.testing.assert_close(d_hidden, ref, rtol=1e-5, atol=1e-6)


def test_deterministic_backward_is_bitwise_reproducible(device):
    hidden, weight, b, labels = make_head(37, 150, 45, torch.float32, device, seed=4)
    g = upstream_grad(37, device)

    def grads():
        out = triton_linear_logprobs(hidden, weight, labels, b, deterministic=True, config=SMALL_TILES)
        return torch.autograd.grad(out, (hidden, weight, b), g)

    first, second = grads(), grads()
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_forward_launcher_merges_vocabulary_splits(splits, device):
    """The launcher alone (no autograd): lse and label log-probs against torch, whatever the split."""
    hidden, weight, b, labels = make_head(33, 150, 40, torch.float32, device, seed=5)
    cfg = LinearConfig(fwd=TileConfig(16, 32, 16), bwd=TileConfig(16, 32, 16), fwd_splits=splits)
    with torch.no_grad():
        stats = linear_forward(hidden, weight, b, labels, LinearParams(config=cfg))
        logits = hidden.double() @ weight.double().T + b.double()
    lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(stats.lse.double(), lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(stats.logps.double(), logits.gather(1, labels[:, None])[:, 0] - lse,
                               rtol=1e-6, atol=1e-5)


def test_gradient_filtering_skips_exactly_the_tiles_without_labels(device):
    """With ``filter_eps`` above any probability, a (row tile, vocabulary tile) pair contributes to the
    gradients only if one of its rows has its label in it; the expected gradients are those of the
    reference logit gradient masked the same way."""
    cfg = LinearConfig(fwd=TileConfig(16, 32, 16), bwd=TileConfig(16, 32, 16), fwd_splits=1, bwd_splits=None)
    n, vocab = 37, 150
    hidden, weight, b, labels = make_head(n, vocab, 30, torch.float32, device, seed=6)
    labels[:16] = torch.randint(0, 32, (16,), device=device)  # first row tile: labels in the first vocab tile
    g = upstream_grad(n, device)
    grads = torch.autograd.grad(triton_linear_logprobs(hidden, weight, labels, b, filter_eps=2.0, config=cfg),
                                (hidden, weight, b), g)
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T + b.double()
        dz = -g.double()[:, None] * torch.softmax(logits, -1)
        dz[torch.arange(n), labels] += g.double()
        row_tile, col_tile = torch.arange(n, device=device) // 16, labels // 32
        kept = torch.zeros(triton.cdiv(n, 16), triton.cdiv(vocab, 32), dtype=torch.bool, device=device)
        kept[row_tile, col_tile] = True
        dz *= kept[row_tile][:, torch.arange(vocab, device=device) // 32]
        expected = (dz @ weight.double(), dz.T @ hidden.double(), dz.sum(0))
    assert not bool(kept.all())  # the test must skip something
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_gradient_filtering_with_tiny_eps_is_exact(device):
    hidden, weight, b, labels = make_head(30, 100, 30, torch.float32, device, seed=7)
    check_against_reference(hidden, weight, b, labels, filter_eps=1e-30)


def test_only_requested_gradients(device):
    hidden, weight, b, labels = make_head(19, 64, 16, torch.float32, device, seed=8)
    weight.requires_grad_(False)
    out = triton_linear_logprobs(hidden, weight, labels, b)
    d_hidden, d_bias = torch.autograd.grad(out.sum(), (hidden, b))
    ref = torch.autograd.grad(reference_linear_logprobs(hidden, weight, labels, bias=b).sum(), (hidden, b))
    torch.testing.assert_close(d_hidden, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_bias, ref[1], rtol=1e-5, atol=1e-6)


@triton.jit
def _offsets_probe_kernel(index_ptr, out_ptr, out32_ptr, stride, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    index = tl.load(index_ptr + i)  # int32, like tl.arange-based row indices
    tl.store(out_ptr + i, offsets64(index, stride))
    tl.store(out32_ptr + i, (index * stride).to(tl.int64))  # what a kernel without the cast computes


def test_offsets_are_64_bit_past_2_31(device):
    """Row index x row stride beyond 2**31 (e.g. 600k rows x D=4096, or V=256000 x D=8192) must not wrap."""
    stride = 8192
    index = torch.tensor([0, 1, 262_143, 262_144, 300_001, 600_000, 2**31 - 1, 7], dtype=torch.int32, device=device)
    out = torch.empty(8, dtype=torch.int64, device=device)
    out32 = torch.empty_like(out)
    _offsets_probe_kernel[(1,)](index, out, out32, stride, BLOCK=8)
    assert out.tolist() == [i * stride for i in index.tolist()]
    assert out32.tolist() != out.tolist()  # the probe can tell: 32-bit products wrap


def test_bad_inputs(device, monkeypatch):
    hidden, weight, b, labels = make_head(5, 20, 8, torch.float32, device)
    with pytest.raises(TypeError, match="hidden"):
        triton_linear_logprobs(hidden.double(), weight.double(), labels)
    with pytest.raises(TypeError, match="weight"):
        triton_linear_logprobs(hidden, weight.half(), labels)
    with pytest.raises(ValueError, match="D="):
        triton_linear_logprobs(hidden[:, :7], weight, labels)
    with pytest.raises(ValueError, match="bias"):
        triton_linear_logprobs(hidden, weight, labels, b[:-1])
    with pytest.raises(TypeError, match="labels"):
        triton_linear_logprobs(hidden, weight, labels.int())
    with pytest.raises(ValueError, match="labels"):
        triton_linear_logprobs(hidden, weight, labels[:-1])
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            triton_linear_logprobs(hidden, weight, labels)


# ----------------------------------------------------------------------------------------------
# GPU: bf16 and real sizes (compiled kernels)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference(dtype, deterministic):
    hidden, weight, b, labels = make_head(1031, 32003, 257, dtype, torch.device("cuda"), seed=10)
    # bf16 rounds the logit gradient to 8 bits before the dH / dW matmuls: allow 3x torch's error there
    check_against_reference(hidden, weight, b, labels, factor=3.0 if dtype == torch.bfloat16 else 2.0,
                            deterministic=deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("n,vocab", [(70_001, 2_053), (257, 256_000)])
def test_gpu_many_rows_or_large_vocabulary(n, vocab):
    """More than 65,536 rows (Liger PR #1294's grid overflow) and a Gemma-sized vocabulary."""
    hidden, weight, _, labels = make_head(n, vocab, 64, torch.bfloat16, torch.device("cuda"), seed=11, bias=False)
    check_against_reference(hidden, weight, None, labels, factor=3.0)


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_reproducible():
    hidden, weight, b, labels = make_head(2049, 50_000, 512, torch.bfloat16, torch.device("cuda"), seed=12)
    g = upstream_grad(2049, hidden.device)
    runs = [torch.autograd.grad(triton_linear_logprobs(hidden, weight, labels, b, deterministic=True),
                                (hidden, weight, b), g) for _ in range(2)]
    for a, c in zip(*runs, strict=True):
        assert torch.equal(a, c)
