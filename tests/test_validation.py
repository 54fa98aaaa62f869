"""Every bad input gets a ValueError/TypeError whose message names the argument."""

from __future__ import annotations

import pytest
import torch

from tisdpo_kernels import fused_linear_logprobs, fused_tis_dpo_loss

from .batches import IGNORE, make_batch

_DROP = object()  # marks an argument to leave out of the call


@pytest.fixture
def b():
    return make_batch(dtype=torch.float32, pairs=2, seq_len=8, dim=5, vocab=11)


def _call(b, **over):
    kw = dict(hidden=b.hidden, weight=b.weight, labels=b.labels, ref_logps=b.ref_logps, backend="torch")
    kw.update(over)
    return fused_tis_dpo_loss(**{k: v for k, v in kw.items() if v is not _DROP})



def test_valid_call_passes(b):
    loss, _ = _call(b)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("bad", [-1, 11, 10_000])
def test_label_out_of_range(b, bad):
    labels = b.labels.clone()
    labels[1, -3] = bad
    with pytest.raises(ValueError, match="labels"):
        _call(b, labels=labels)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_logprobs(b.hidden, b.weight, labels, backend="torch")


def test_custom_ignore_index_is_respected(b):
    labels = b.labels.masked_fill(b.labels == IGNORE, 5000)
    with pytest.raises(ValueError, match="labels"):
        _call(b, labels=labels)  # 5000 is out of range under the default ignore_index
    loss, _ = _call(b, labels=labels, ignore_index=5000)
    ref, _ = _call(b)
    assert torch.equal(loss, ref)


def test_non_integer_labels(b):
    with pytest.raises(TypeError, match="labels"):
        _call(b, labels=b.labels.float())


def test_odd_row_count(b):
    with pytest.raises(ValueError, match="odd"):
        _call(b, hidden=b.hidden[:3], labels=b.labels[:3], ref_logps=b.ref_logps[:3])


def test_unpaired_cu_seqlens(b):
    fields, cu = b.packed()
    with pytest.raises(ValueError, match="cu_seqlens"):
        _call(b, hidden=fields["hidden"], labels=fields["labels"], ref_logps=fields["ref_logps"], cu_seqlens=cu[:-1])
    bad_end = cu.clone()
    bad_end[-1] += 1
    with pytest.raises(ValueError, match="cu_seqlens"):
        _call(b, hidden=fields["hidden"], labels=fields["labels"], ref_logps=fields["ref_logps"], cu_seqlens=bad_end)
    with pytest.raises(TypeError, match="cu_seqlens"):
        _call(b, hidden=fields["hidden"], labels=fields["labels"], ref_logps=fields["ref_logps"],
              cu_seqlens=cu.float())


def test_hidden_size_mismatch(b):
    with pytest.raises(ValueError, match="hidden size"):
        _call(b, weight=torch.randn(11, 6))


def test_mismatched_dtypes(b):
    with pytest.raises(TypeError, match="weight"):
        _call(b, weight=b.weight.double())
    with pytest.raises(TypeError, match="bias"):
        _call(b, bias=torch.zeros(11, dtype=torch.float16))
    with pytest.raises(TypeError, match="hidden"):
        _call(b, hidden=b.hidden.long())


def test_sequence_without_response_token(b):
    labels = b.labels.clone()
    labels[2] = IGNORE
    with pytest.raises(ValueError, match=r"labels: sequence\(s\) \[2\]"):
        _call(b, labels=labels)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_token_weights(b, value):
    w = b.token_weights.clone()
    w[0, -3] = value
    assert b.labels[0, -3] != IGNORE
    with pytest.raises(ValueError, match="token_weights"):
        _call(b, token_weights=w)
    pad = b.token_weights.clone()
    pad[0, -1] = value  # non-finite at an ignored (padding) position is not read
    assert b.labels[0, -1] == IGNORE
    _call(b, token_weights=pad)


def test_non_finite_ref_logps(b):
    r = b.ref_logps.clone()
    r[1, -3] = float("nan")
    with pytest.raises(ValueError, match="ref_logps"):
        _call(b, ref_logps=r)


def test_wrongly_shaped_ref_logps_and_token_weights(b):
    with pytest.raises(ValueError, match="ref_logps"):
        _call(b, ref_logps=b.ref_logps[:, :-1])
    with pytest.raises(ValueError, match="token_weights"):
        _call(b, token_weights=b.token_weights.reshape(-1))
    with pytest.raises(ValueError, match="contrastive_logps"):
        _call(b, contrastive_logps=(b.pos_logps, b.neg_logps[:, 1:]))


def test_kl_without_ref_hidden(b):
    with pytest.raises(ValueError, match="ref_hidden"):
        _call(b, kl="tdpo1")


@pytest.mark.parametrize("arg,value", [("kl", "tdpo3"), ("loss_type", "kto"), ("backend", "cuda"),
                                       ("weight_transform", "rank_based")])
def test_unknown_options(b, arg, value):
    over = {arg: value}
    if arg == "weight_transform":
        over["contrastive_logps"] = (b.pos_logps, b.neg_logps)
    with pytest.raises(ValueError, match=arg):
        _call(b, **over)


def test_reference_given_twice_or_not_at_all(b):
    with pytest.raises(ValueError, match="ref_logps"):
        _call(b, ref_hidden=b.ref_hidden, ref_weight=b.ref_weight)
    with pytest.raises(ValueError, match="ref_logps"):
        _call(b, ref_logps=_DROP)
    with pytest.raises(ValueError, match="ref_hidden and ref_weight"):
        _call(b, ref_logps=_DROP, ref_hidden=b.ref_hidden)


def test_reference_vocab_mismatch(b):
    with pytest.raises(ValueError, match="ref_weight"):
        _call(b, ref_logps=_DROP, ref_hidden=b.ref_hidden, ref_weight=b.ref_weight[:-1])


def test_bad_scalars(b):
    with pytest.raises(ValueError, match="beta"):
        _call(b, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        _call(b, label_smoothing=0.7)
    with pytest.raises(ValueError, match="label_smoothing"):
        _call(b, label_smoothing=0.1, loss_type="ipo")


def test_triton_backend_on_cpu_without_interpreter_is_refused(b, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _call(b, backend="triton")


def test_weight_transform_needs_contrastive_logps(b):
    """A transform is applied to contrastive_logps only: given with token_weights (or with no weights) it used to
    be ignored silently, even an unknown name."""
    with pytest.raises(ValueError, match="weight_transform='exp_clamp' / transform_kwargs apply to contrastive_logps "
                                         "only, but the call passes token_weights"):
        _call(b, token_weights=b.token_weights, weight_transform="exp_clamp")
    with pytest.raises(ValueError, match="passes no weights"):
        _call(b, weight_transform="threshold")
    with pytest.raises(ValueError, match="rank_based"):
        _call(b, token_weights=b.token_weights, weight_transform="rank_based")
    with pytest.raises(ValueError, match="transform_kwargs"):
        _call(b, token_weights=b.token_weights, transform_kwargs={"mu": 2.0})
    _call(b, token_weights=b.token_weights, weight_transform="origin")


@pytest.mark.parametrize("name", ["hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_read_whole_raise_naming_them(b, name, value):
    """One rule: a NaN/inf in an input the forward reads gives a ValueError naming it (checked on the loss and the
    per-sequence sums), never a NaN loss."""
    kw = dict(bias=b.bias, ref_logps=_DROP, ref_hidden=b.ref_hidden, ref_weight=b.ref_weight, ref_bias=b.ref_bias,
              hidden=b.hidden, weight=b.weight)
    bad = kw[name].clone()
    if name.endswith("hidden"):
        assert b.labels[1, -3] != IGNORE
        bad[1, -3, 2] = value  # a response row
    else:
        bad.view(-1)[4] = value
    kw[name] = bad
    with pytest.raises(ValueError, match=rf"^{name} has non-finite values \(NaN/inf\): 1 of \d+ "):
        _call(b, **kw)
    if name in ("hidden", "weight", "bias"):
        with pytest.raises(ValueError, match=rf"^{name} has non-finite"):
            fused_linear_logprobs(kw["hidden"], kw["weight"], b.labels, bias=kw["bias"], backend="torch")


def test_non_finite_hidden_outside_the_responses_is_not_read(b):
    hidden = b.hidden.clone()
    assert b.labels[0, 0] == IGNORE
    hidden[0, 0] = float("nan")
    loss, _ = _call(b, hidden=hidden)
    assert torch.isfinite(loss)


def test_overflow_inside_the_computation_is_named(b):
    huge = torch.full_like(b.ref_logps, -3e38)  # finite log-probs, but the rejected sums -lpref overflow float32
    with pytest.raises(ValueError, match="the loss is not finite although every input"):
        _call(b, ref_logps=huge.masked_fill(torch.arange(4)[:, None] < 2, -1.0))


def test_batch_without_pairs_raises_padded_and_packed(b):
    with pytest.raises(ValueError, match="hidden has no rows"):
        _call(b, hidden=b.hidden[:0], labels=b.labels[:0], ref_logps=b.ref_logps[:0])
    fields, cu = b.packed()
    with pytest.raises(ValueError, match="cu_seqlens"):
        _call(b, hidden=fields["hidden"][:0], labels=fields["labels"][:0], ref_logps=fields["ref_logps"][:0],
              cu_seqlens=cu[:1])


def test_positive_ref_logps_are_refused(b):
    """A negative log-likelihood passed as `ref_logps` (positive values) is refused by name; values at ignored
    positions are not read, and log-softmax rounding just above 0 passes."""
    valid = b.labels != IGNORE
    nll = -b.ref_logps.clamp(max=0)
    row, col = valid.nonzero()[0].tolist()
    nll[row, col] = 2.5 + nll.max()  # the largest value, named in the message
    with pytest.raises(ValueError, match=r"^ref_logps must be log-probabilities .* largest value is"):
        _call(b, ref_logps=nll)
    near_zero = torch.where(valid, torch.full_like(b.ref_logps, 1e-6), torch.full_like(b.ref_logps, 5.0))
    loss, _ = _call(b, ref_logps=near_zero)
    assert torch.isfinite(loss)
