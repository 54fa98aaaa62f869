"""The backend contract: every backend of ``tisdpo_kernels.backends.TABLE`` through the same cases.

Variants (the ``variant`` fixture): ``torch``; ``split``, its fused elementwise passes in Triton (compiled on CUDA,
the interpreter on CPU); ``split-twin``, the split path on plain CPU tensors without the interpreter (its torch
elementwise twin, torch's per-sequence sums); ``triton``. Cases, each for every variant:

- the loss against the float64 oracle (``reference.py``) for every ``kl`` mode, weight source (none, per token,
  contrastive) and layout (padded, packed), and at a second shape; bounds from ``tests/tolerance.py``;
- ``fused_linear_logprobs`` and ``FusedTISDPOLoss``;
- the head functions on strided (non-contiguous) inputs;
- zero response rows: a lone call of the head functions, and for every ``kl`` mode a batch whose rows three
  context-parallel "ranks" share, one holding none: rows -> head -> sums -> pair objective per rank, the other
  ranks' sums added as constants (what ``group=`` does), forward and backward against the oracle;
- capabilities: each honoured where the table says so and refused, by name, elsewhere; what ``auto`` picks; bad
  option values; the rendered table.

Shapes are small and awkward (sizes no multiple of a tile, masked tokens, several sequences). docs/design.md §3
(backends) and §7 (how we know it works).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from tisdpo_kernels import FusedTISDPOLoss, backends, fused_linear_logprobs, fused_tis_dpo_loss
from tisdpo_kernels.backends import BACKENDS, TABLE, KernelOptions, auto_backend, resolve
from tisdpo_kernels.objectives import KL_MODES, PairLossOptions, SequenceSums, pair_objective, sequence_layout
from tisdpo_kernels.ops import linear_split
from tisdpo_kernels.reference import reference_linear_logprobs, reference_tis_dpo_loss

from ..batches import make_batch
from ..test_loss import KLS, WEIGHTS, _inputs, _run
from .helpers import assert_close_to_truth, check_loss_against_oracle, loss_batch, make_head, upstream_grad

VARIANTS = ("torch", "split", "split-twin", "triton")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    backend: str
    device: torch.device


@pytest.fixture(params=VARIANTS)
def variant(request, device, monkeypatch):
    """One backend as the tests run it; ``split-twin``: CPU tensors with TRITON_INTERPRET unset."""
    if request.param == "split-twin":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return Variant(request.param, "split", torch.device("cpu"))
    return Variant(request.param, request.param, device)


def _honours(backend: str, capability: str) -> bool:
    b = TABLE[backend]
    return {"grad_filter_eps": b.grad_filter, "use_weighting": b.log_collision, "float64": b.float64,
            "deterministic": True}[capability]


# ----------------------------------------------------------------------------------------------
# values and gradients against the float64 oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl,weights,layout", list(itertools.product(KLS, WEIGHTS, ["padded", "packed"])))
def test_loss_matches_the_float64_oracle(variant, kl, weights, layout):
    b = loss_batch(torch.float32, variant.device)
    check_loss_against_oracle(_inputs(b, kl, weights, layout, ref="hidden" if kl else "logps"), dict(kl=kl, beta=0.3),
                              variant.backend)


@pytest.mark.parametrize("kl", KLS)
def test_loss_matches_the_float64_oracle_at_a_second_shape(variant, kl):
    """4 pairs x 29 positions, D=33, V=301, the reference head given (with and without a KL variant); the torch
    path in chunks of 17 rows."""
    b = loss_batch(torch.float32, variant.device, pairs=4, seq_len=29, dim=33, vocab=301)
    check_loss_against_oracle(_inputs(b, kl, "token", "padded"), dict(kl=kl), variant.backend, chunk_size=17)


def test_fused_linear_logprobs(variant):
    b = loss_batch(torch.float32, variant.device)
    hidden = b.hidden.clone().requires_grad_()
    ours = fused_linear_logprobs(hidden, b.weight, b.labels, bias=b.bias, backend=variant.backend)
    valid = b.labels != -100
    truth = reference_linear_logprobs(hidden.double(), b.weight.double(), b.labels.clamp(min=0),
                                      bias=b.bias.double()) * valid
    assert ours.shape == b.labels.shape and bool((ours[~valid] == 0).all())
    torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-5)
    g_ours, = torch.autograd.grad(ours.sum(), hidden)
    g_truth, = torch.autograd.grad(truth.sum(), hidden)
    torch.testing.assert_close(g_ours.double(), g_truth.double(), rtol=1e-4, atol=1e-5)


def test_module_runs_the_backend(variant):
    b = loss_batch(torch.float32, variant.device)
    kw = _inputs(b, None, "token", "padded", ref="logps")
    loss_m, _ = FusedTISDPOLoss(beta=0.2, backend=variant.backend)(**kw)
    loss_f, _ = fused_tis_dpo_loss(**kw, beta=0.2, backend="torch")
    torch.testing.assert_close(loss_m, loss_f, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the head functions: strides, zero rows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [77, 300])
def test_strided_inputs(variant, vocab, monkeypatch):
    """Transposed views of hidden and weight, every other label and bias entry: strides are honoured (the split
    path in 256-column splits, 2 of them at V=300)."""
    dev = variant.device
    monkeypatch.setattr(linear_split, "SPLIT_SCRATCH_BYTES", 29 * 256 * 5)
    g = torch.Generator().manual_seed(13)
    hidden = torch.randn(24, 29, generator=g).to(dev).T.requires_grad_()  # [29, 24], stride (1, 29)
    weight = (torch.randn(24, vocab, generator=g) / 3).to(dev).T.requires_grad_()  # [V, 24]
    bias = torch.randn(2 * vocab, generator=g).to(dev)[::2].requires_grad_()
    labels = torch.randint(0, vocab, (58,), generator=g).to(dev)[::2]
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not labels.is_contiguous()
    up = upstream_grad(29, dev)
    leaves = (hidden, weight, bias)
    ours = TABLE[variant.backend].logprobs(hidden, weight, labels, bias, KernelOptions())
    assert ours.dtype == torch.float32
    ours_grads = torch.autograd.grad(ours, leaves, up)
    same = reference_linear_logprobs(hidden, weight, labels, bias=bias)
    same_grads = torch.autograd.grad(same, leaves, up)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    truth = reference_linear_logprobs(leaves64[0], leaves64[1], labels, bias=leaves64[2])
    truth_grads = torch.autograd.grad(truth, leaves64, up.double())
    reduction = 29 + vocab + 24  # rows + vocab + dim: the sums behind each value
    assert_close_to_truth("logps", ours, same, truth, reduction=reduction, factor=2.0)
    torch.testing.assert_close(ours, same, rtol=1e-5, atol=1e-5)
    for name, o, s, t, leaf in zip(("d_hidden", "d_weight", "d_bias"), ours_grads, same_grads, truth_grads, leaves,
                                   strict=True):
        assert o.dtype == leaf.dtype
        assert_close_to_truth(name, o, s, t, reduction=reduction, factor=2.0)
        torch.testing.assert_close(o, s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kl", KLS)
def test_zero_rows(variant, kl):
    """A call with no response row: ``[0]`` outputs, a backward that runs, zero head gradients, ``[0, D]`` row
    gradients (``ref_logps`` alone is non-differentiable: once one shared empty tensor stood for all three KL
    outputs, and marking it made ``logps`` and the KL non-differentiable too)."""
    hidden, weight, b, labels = make_head(0, 40, 16, torch.float32, variant.device)
    impl = TABLE[variant.backend]
    if kl is None:
        outs = (impl.logprobs(hidden, weight, labels, b, KernelOptions()),)
    else:
        ref_hidden, ref_weight, ref_bias, _ = make_head(0, 40, 12, torch.float32, variant.device, seed=1)
        logps, ref_logps, token_kl = impl.kl(hidden, weight, labels, ref_hidden.detach(), ref_weight.detach(),
                                             "tis" if kl == "tisdpo" else "tdpo", b, ref_bias.detach(),
                                             KernelOptions())
        assert ref_logps.shape == (0,) and not ref_logps.requires_grad
        outs = (logps, token_kl)
    assert all(o.shape == (0,) and o.requires_grad for o in outs)
    d_hidden, d_weight, d_bias = torch.autograd.grad(sum(o.sum() for o in outs), (hidden, weight, b))
    assert d_hidden.shape == (0, 16) and not d_weight.any() and not d_bias.any()


def _add(a: SequenceSums, b: SequenceSums) -> SequenceSums:
    return SequenceSums(**{f.name: None if getattr(a, f.name) is None else getattr(a, f.name) + getattr(b, f.name)
                           for f in dataclasses.fields(SequenceSums)})


def _detached(s: SequenceSums) -> SequenceSums:
    return SequenceSums(**{f.name: None if getattr(s, f.name) is None else getattr(s, f.name).detach()
                           for f in dataclasses.fields(SequenceSums)})


@pytest.mark.parametrize("ranks", ["one", "three-one-empty"])
@pytest.mark.parametrize("kl,weights", [(None, "contrastive"), ("tisdpo", "token"), ("tdpo1", "none"),
                                        ("tdpo2", "token")])
def test_rows_heads_sums_and_pair_objective_chain_into_the_oracle_loss(variant, kl, weights, ranks):
    """Response rows -> the backend's head function -> its sums function -> ``pair_objective``: loss, metrics and
    the gradients of hidden / weight / bias equal ``reference_tis_dpo_loss`` in fp32. ``three-one-empty``: the rows
    shared by three context-parallel ranks, the first holding none; each rank's loss is the pair objective of its
    own sums plus the others' as constants (``group=``'s all-reduce), and the ranks' gradients add up to the
    oracle's."""
    dev = variant.device
    b = make_batch(dtype=torch.float32)
    hidden, weight, bias = (t.to(dev).requires_grad_() for t in (b.hidden, b.weight, b.bias))
    labels = b.labels.to(dev)
    ref_hidden, ref_weight, ref_bias = b.ref_hidden.to(dev), b.ref_weight.to(dev), b.ref_bias.to(dev)
    tw, pos, neg = b.token_weights.to(dev), b.pos_logps.to(dev), b.neg_logps.to(dev)
    options = PairLossOptions(beta=0.3, alpha=0.7, kl=kl)
    extra = {"token": dict(token_weights=tw), "contrastive": dict(contrastive_logps=(pos, neg),
                                                                   weight_transform="exp_clamp"), "none": {}}[weights]
    loss_ref, metrics_ref = reference_tis_dpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                                                   ref_weight=ref_weight, ref_bias=ref_bias, **extra,
                                                   **options.as_kwargs())
    grads_ref = torch.autograd.grad(loss_ref, (hidden, weight, bias))

    impl, opts = TABLE[variant.backend], KernelOptions()
    layout = sequence_layout(labels)
    flat = labels.reshape(-1)
    index = (flat != -100).nonzero().squeeze(1)
    shares = [index] if ranks == "one" else [index[:0], index[:23], index[23:]]

    def rank_sums(rows):
        seq_ids, y = layout.seq_ids[rows], flat[rows]
        h_rows = hidden.reshape(-1, hidden.shape[-1])[rows]
        rh_rows = ref_hidden.reshape(-1, ref_hidden.shape[-1])[rows]
        token_kl = None
        if kl is None:
            logps = impl.logprobs(h_rows, weight, y, bias, opts)
            lpref = impl.logprobs(rh_rows, ref_weight, y, ref_bias, opts).detach()
        else:
            logps, lpref, token_kl = impl.kl(h_rows, weight, y, rh_rows, ref_weight,
                                             "tis" if kl == "tisdpo" else "tdpo", bias, ref_bias, opts)
        return impl.sums(logps, lpref, tw.reshape(-1)[rows] if weights == "token" else None, seq_ids,
                         layout.num_seqs, token_kl=token_kl, kl=kl,
                         contrastive=(pos.reshape(-1)[rows], neg.reshape(-1)[rows]) if weights == "contrastive"
                         else None, weight_transform="exp_clamp", transform_kwargs=None)

    sums = [rank_sums(rows) for rows in shares]
    grads = [torch.zeros_like(t) for t in (hidden, weight, bias)]
    for r, own in enumerate(sums):
        total = own
        for q, other in enumerate(sums):
            if q != r:
                total = _add(total, _detached(other))
        loss, metrics = pair_objective(total, options)
        for acc, g in zip(grads, torch.autograd.grad(loss, (hidden, weight, bias)), strict=True):
            acc += g
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        assert set(metrics) == set(metrics_ref)
        for k in metrics:
            torch.testing.assert_close(metrics[k], metrics_ref[k], rtol=1e-5, atol=1e-5, msg=k)
    for a, c in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# capabilities: honoured or refused by name
# ----------------------------------------------------------------------------------------------


def _refused(backend, capability, exc=ValueError):
    """The one refusal form, naming the backend, the argument and the backends that honour it."""
    supporters = ", ".join(name for name in TABLE if _honours(name, capability.split()[0]))
    return pytest.raises(exc, match=rf"^backend='{backend}' does not support {capability}\b.*; "
                                    rf"supported by: {supporters}$")


def test_grad_filter_eps(variant):
    """Honoured: a threshold far below every probability skips nothing; one above them all keeps only the label
    tiles, which must change the weight gradient (the option reaches the kernels), never the forward."""
    b = loss_batch(torch.float32, variant.device, vocab=4001)  # many vocabulary tiles without a label
    kw = _inputs(b, None, "token", "padded", ref="logps")
    if not _honours(variant.backend, "grad_filter_eps"):
        with _refused(variant.backend, "grad_filter_eps"):
            fused_tis_dpo_loss(**kw, backend=variant.backend, grad_filter_eps=1e-3)
        return
    exact = _run(fused_tis_dpo_loss, kw, backend=variant.backend)
    tiny = _run(fused_tis_dpo_loss, kw, backend=variant.backend, grad_filter_eps=1e-30)
    coarse = _run(fused_tis_dpo_loss, kw, backend=variant.backend, grad_filter_eps=0.5)
    for g0, g1 in zip(exact[2], tiny[2], strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(exact[2][1], coarse[2][1])
    torch.testing.assert_close(exact[0], coarse[0])  # the forward is never filtered


def test_use_weighting(variant):
    """WPO: honoured means the loss and gradients of the oracle; elsewhere a refusal naming ``use_weighting``."""
    b = loss_batch(torch.float32, variant.device)
    kw = _inputs(b, None, "token", "packed", ref="logps")
    if not _honours(variant.backend, "use_weighting"):
        with _refused(variant.backend, "use_weighting"):
            fused_tis_dpo_loss(**kw, backend=variant.backend, use_weighting=True)
        return
    check_loss_against_oracle(kw, dict(use_weighting=True, loss_type="sigmoid_norm"), variant.backend)


def test_deterministic(variant):
    """``deterministic=True``: bit-identical gradients twice, and within float32 noise of the default backward;
    where the table says "always" (or "cpu", on CPU tensors), the default backward is bit-identical twice too."""
    b = loss_batch(torch.float32, variant.device)
    kw = _inputs(b, "tisdpo", "token", "padded")
    first = _run(fused_tis_dpo_loss, kw, kl="tisdpo", backend=variant.backend, deterministic=True)
    second = _run(fused_tis_dpo_loss, kw, kl="tisdpo", backend=variant.backend, deterministic=True)
    default = _run(fused_tis_dpo_loss, kw, kl="tisdpo", backend=variant.backend)
    for g1, g2, g0 in zip(first[2], second[2], default[2], strict=True):
        assert torch.equal(g1, g2)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    mode = TABLE[variant.backend].deterministic
    if mode == "always" or (mode == "cpu" and torch.device(variant.device).type == "cpu"):
        again = _run(fused_tis_dpo_loss, kw, kl="tisdpo", backend=variant.backend)
        for g0, g3 in zip(default[2], again[2], strict=True):
            assert torch.equal(g0, g3)


def test_float64(variant):
    b = loss_batch(torch.float64, variant.device)
    kw = _inputs(b, None, "none", "padded", ref="logps")
    if not _honours(variant.backend, "float64"):
        with _refused(variant.backend, "float64 inputs", TypeError):
            fused_tis_dpo_loss(**kw, backend=variant.backend)
        return
    ours, _ = fused_tis_dpo_loss(**kw, backend=variant.backend)
    want, _ = reference_tis_dpo_loss(**kw)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=0)


def test_every_backend_has_every_kl_variant_and_a_missing_one_is_refused_by_name():
    assert all(b.kl_variants == KL_MODES for b in TABLE.values())  # the oracle tests above run each
    lacking = dataclasses.replace(TABLE["split"], kl_variants=(None, "tisdpo"), lacks=(("kl", "not here"),))
    error = backends.refusal(lacking, torch.device("cpu"), kl="tdpo2")
    assert isinstance(error, ValueError)
    assert str(error) == "backend='split' does not support kl='tdpo2': not here; supported by: torch, triton, split"


@pytest.mark.parametrize("name", list(TABLE))
def test_plain_cpu_without_the_interpreter(name, monkeypatch):
    """CPU tensors with TRITON_INTERPRET unset: a backend that lists plain CPU runs, the others refuse."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b = loss_batch(torch.float32, "cpu")
    kw = _inputs(b, None, "none", "padded", ref="logps")
    if "cpu" in TABLE[name].devices:
        loss, _ = fused_tis_dpo_loss(**kw, backend=name)
        assert torch.isfinite(loss)
    else:
        with pytest.raises(ValueError, match=rf"^backend='{name}' does not support CPU tensors without "
                                             r"TRITON_INTERPRET=1: .*; supported by: torch, split$"):
            fused_tis_dpo_loss(**kw, backend=name)


@pytest.mark.parametrize("name", BACKENDS)
def test_without_the_triton_package(name, monkeypatch):
    """Where ``triton`` does not import, a backend that needs it refuses, ``torch`` runs, ``auto`` picks it."""
    monkeypatch.setattr(backends, "triton_available", lambda: False)
    b = loss_batch(torch.float32, "cpu")
    kw = _inputs(b, None, "none", "padded", ref="logps")
    if name != "auto" and TABLE[name].needs_triton:
        with pytest.raises(ValueError, match=rf"^backend='{name}' does not support running without the `triton` "
                                             r"package: .*; supported by: torch$"):
            fused_tis_dpo_loss(**kw, backend=name)
    else:
        loss, _ = fused_tis_dpo_loss(**kw, backend=name)
        assert torch.isfinite(loss)
    assert resolve("auto", torch.device("cuda"), 4096).name == "torch"


def test_what_auto_picks():
    assert auto_backend(4096) == "split" and auto_backend(2048) == "split" and auto_backend(256) == "triton"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve("auto", cpu, 4096).name == "torch"
    assert resolve("auto", cpu, 256).name == "torch"
    assert resolve("auto", cuda, 4096).name == "split"
    assert resolve("auto", cuda, 511).name == "triton"
    assert resolve("auto", cuda, 512).name == "split"
    assert resolve("auto", cuda, 4096, grad_filter_eps=2**-12).name == "triton"
    assert resolve("auto", cuda, 4096, use_weighting=True).name == "torch"
    assert resolve("auto", cuda, 256, dtype=torch.float64).name == "torch"
    with pytest.raises(ValueError, match=r"^backend='auto' found no backend .*backend='torch' does not support "
                                         r"grad_filter_eps: .*; supported by: triton$"):
        resolve("auto", cpu, 4096, grad_filter_eps=2**-12)
    # nothing supports both: the refusal of the first choice for the hidden size
    with pytest.raises(ValueError, match=r"^backend='auto' found no backend .*\('triton', 'split', 'torch' tried\): "
                                         r"backend='triton' does not support use_weighting"):
        resolve("auto", cuda, 256, grad_filter_eps=2**-12, use_weighting=True)
    with pytest.raises(ValueError, match=r"^backend='auto' found no backend .*\('split', 'triton', 'torch' tried\): "
                                         r"backend='split' does not support grad_filter_eps"):
        resolve("auto", cuda, 4096, grad_filter_eps=2**-12, use_weighting=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve("cuda", cpu)


@pytest.mark.parametrize("option,value", [("grad_filter_eps", 0.0), ("grad_filter_eps", 2.0), ("chunk_size", 0),
                                          ("fp32_precision", "fast")])
def test_bad_option_values(variant, option, value):
    b = loss_batch(torch.float32, variant.device)
    with pytest.raises(ValueError, match=option):
        fused_tis_dpo_loss(**_inputs(b, None, "none", "padded", ref="logps"), backend=variant.backend,
                           **{option: value})
    with pytest.raises(ValueError, match=option):
        fused_linear_logprobs(b.hidden, b.weight, b.labels, backend=variant.backend, **{option: value})


def test_the_rendered_table_lists_every_backend_and_capability():
    table = backends.markdown_table()
    lines = table.splitlines()
    header = lines[0]
    for column in ("devices", "needs `triton`", "`kl`", "`grad_filter_eps`", "`deterministic`", "`use_weighting`",
                   "float64"):
        assert column in header
    assert len(lines) == 2 + len(BACKENDS)
    assert [line.split("|")[1].strip() for line in lines[2:]] == [f"`{name}`" for name in BACKENDS]
    assert all(line.count("|") == header.count("|") for line in lines)
    columns = [c.strip() for c in header.split("|")[1:-1]]
    for name, b in TABLE.items():
        row = next(line for line in lines if line.startswith(f"| `{name}` |"))
        cell = dict(zip(columns, (c.strip() for c in row.split("|")[1:-1]), strict=True))
        assert all(backends.DEVICES[d] in cell["devices"] for d in b.devices)
        assert cell["needs `triton`"] == ("yes" if b.needs_triton else "no")
        assert cell["`kl`"] == "all"
        for column, honoured in (("`grad_filter_eps`", b.grad_filter), ("`use_weighting` (WPO)", b.log_collision),
                                 ("float64", b.float64)):
            assert cell[column] == "yes" if honoured else cell[column].startswith("refused"), (name, column)
        assert cell["`deterministic`"].startswith("always") == (b.deterministic == "always")
    text = backends.help_text()
    docs = fused_tis_dpo_loss.__doc__
    for name in BACKENDS:
        assert f"'{name}'" in text and f'``"{name}"``' in docs
