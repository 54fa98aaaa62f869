"""Public API: ``fused_tis_dpo_loss``, ``fused_linear_logprobs`` and ``FusedTISDPOLoss``.

This module validates inputs (a clear ``ValueError``/``TypeError`` naming the argument, never a
silent wrong number or an out-of-bounds read), drops prompt/padding rows before any matmul,
hands the per-token work to a backend and turns per-sequence sums into the loss and its
metrics (``objectives.pair_objective``, with the scalar options gathered in ``objectives.PairLossOptions``).

Backends: ``backends.TABLE`` names them (``"torch"``, ``"triton"``, ``"split"``, plus ``"auto"``), holds each one's
head and sums functions and what it supports, and says what ``"auto"`` picks and why a backend refuses a call
(``backends.resolve``; the table as Markdown: ``backends.markdown_table()``; docs/design.md §3). Nothing here
compares backend names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backends import BACKENDS  # noqa: F401 (the backend names, imported from here by tisdpo.config)
from .backends import kernel_options, resolve
from .distributed import all_reduce_sequence_sums, all_reduce_sum, check_group, global_response_counts
from .objectives import PairLossOptions, ld_token_weights, pair_objective, sequence_layout
from .ops._common import check_ref_head, mean_logits
from .transforms import token_weights_from_contrastive, transform_params

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _check_float(name, t, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match hidden's dtype {dtype}")


def _check_linear(hidden, weight, bias, labels, ignore_index, prefix=""):
    """Shared checks of (hidden, weight, bias, labels); returns the vocabulary size."""
    _check_float(f"{prefix}hidden", hidden)
    _check_float(f"{prefix}weight", weight, hidden.dtype)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be [V, D], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}hidden size {hidden.shape[-1]} does not match {prefix}weight's hidden size {weight.shape[1]}"
        )
    if bias is not None:
        _check_float(f"{prefix}bias", bias, hidden.dtype)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must be [V]={weight.shape[0]}, got shape {tuple(bias.shape)}")
    for name, t in ((f"{prefix}weight", weight), (f"{prefix}bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if labels is None:
        return weight.shape[0]
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    vocab = weight.shape[0]
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first} "
            f"({int(bad.sum())} bad positions)"
        )
    return vocab


def _check_token_tensor(name, t, labels_shape, valid_mask):
    """A per-token float tensor shaped like labels, finite at response positions."""
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor shaped like labels, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(labels_shape):
        raise ValueError(f"{name} shape {tuple(t.shape)} must equal labels shape {tuple(labels_shape)}")
    if t.device != valid_mask.device:
        raise ValueError(f"{name} is on {t.device} but labels is on {valid_mask.device}")
    if not bool(torch.isfinite(t[valid_mask]).all()):
        raise ValueError(f"{name} has non-finite values (NaN/inf) at response positions")


def _check_log_probs(name, t, valid_mask):
    """Log-probabilities are <= 0; the bound leaves 1e-3 for rounding of a log-softmax computed elsewhere (bf16
    logits give |errors| far below it), so a positive value is a negative log-likelihood passed by mistake."""
    values = t[valid_mask]
    if values.numel() and bool((values > 1e-3).any()):
        raise ValueError(f"{name} must be log-probabilities (<= 0 at response positions); its largest value is "
                         f"{float(values.max()):g}: a negative log-likelihood (-log p) passed by mistake?")


def _check_cu_seqlens(cu_seqlens, n_tokens):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError("cu_seqlens must be an int32/int64 tensor [2B+1]")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 3 or (cu_seqlens.numel() - 1) % 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with 2B+1 entries (B chosen then B rejected sequences); got "
            f"{cu_seqlens.numel()} entries, i.e. {cu_seqlens.numel() - 1} sequences, which do not pair up"
        )
    cu = cu_seqlens.to(torch.long)
    if cu[0].item() != 0 or cu[-1].item() != n_tokens or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at the number of tokens {n_tokens}; "
            f"got {cu_seqlens.tolist()}"
        )


def _check_finite_result(result, inputs):
    """One rule for non-finite inputs the forward reads whole (hidden, weight, bias and their reference twins):
    instead of scanning each input on every call, check the (small) result for NaN/inf -- ``result`` holds the
    loss and the per-sequence sums, or the per-token log-probs -- and only when it is not finite look for the
    input to blame. Cost per call: one reduction over the result and one host sync (``bool``), which waits for
    the forward kernels to finish before the backward is queued; the input scans run only on the error path.
    ``inputs``: ``(name, tensor, or a function returning one, or None)`` pairs, hidden rows restricted to the
    response rows."""
    if bool(torch.isfinite(result).all()):
        return
    for name, t in inputs:
        t = t() if callable(t) else t
        if t is not None:
            bad = ~torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(dim=1) if t.dim() else ~torch.isfinite(t)
            if bool(bad.any()):
                where = "response rows" if name.endswith("hidden") else "rows"
                raise ValueError(f"{name} has non-finite values (NaN/inf): {int(bad.sum())} of {bad.numel()} "
                                 f"{where}, so the loss would be NaN/inf")
    names = ", ".join(name for name, t in inputs if t is not None)
    raise ValueError(f"the loss is not finite although every input ({names}) is: the values overflow in the "
                     "computation (e.g. hidden states or logits too large for the dtype)")


@dataclass(frozen=True)
class _Rows:
    """The response rows of a batch, flattened: index into the flattened batch and sequence ids."""

    index: torch.Tensor  # [n] int64 positions in the flattened batch
    seq_ids: torch.Tensor  # [n] int64 sequence of each row
    labels: torch.Tensor  # [n] int64
    num_seqs: int


def _response_rows(labels, cu_seqlens, ignore_index, group=None) -> _Rows:
    layout = sequence_layout(labels, cu_seqlens)
    flat = labels.reshape(-1)
    index = (flat != ignore_index).nonzero().squeeze(1)
    seq_ids = layout.seq_ids[index]
    counts = torch.bincount(seq_ids, minlength=layout.num_seqs)
    if group is not None:  # context parallel: a rank may hold no row of a sequence, the group must hold one
        counts = global_response_counts(counts, group)
    empty = (counts == 0).nonzero().squeeze(1)
    if empty.numel():
        raise ValueError(
            f"labels: sequence(s) {empty.tolist()} have no response token (every label is ignore_index="
            f"{ignore_index}); each chosen/rejected sequence needs at least one"
        )
    return _Rows(index=index, seq_ids=seq_ids, labels=flat[index].to(torch.long), num_seqs=layout.num_seqs)


def _gather_rows(t, index):
    return t.reshape(-1, t.shape[-1]).index_select(0, index)


def _check_row_index(row_index, labels, hidden):
    """The explicit-rows form: ``row_index`` ``[n]`` int32/int64 into ``hidden.reshape(-1, D)``, one per entry
    of the 1-D ``labels`` ``[n]``. Returns a zero-copy ``[n, D]`` stand-in for ``hidden`` (its dtype, device and
    the shape of the gathered rows) for the shared shape/dtype/label checks of ``_check_linear``."""
    _check_float("hidden", hidden)
    if not isinstance(row_index, torch.Tensor) or row_index.dtype not in (torch.int32, torch.int64):
        got = getattr(row_index, "dtype", type(row_index).__name__)
        raise TypeError(f"row_index must be an int32/int64 tensor [n], got {got}")
    if row_index.dim() != 1:
        raise ValueError(f"row_index must be 1-D [n], got shape {tuple(row_index.shape)}")
    if row_index.device != hidden.device:
        raise ValueError(f"row_index is on {row_index.device} but hidden is on {hidden.device}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.numel() != row_index.numel():
        raise ValueError(
            f"with row_index, labels must be 1-D with one label per row: labels shape "
            f"{tuple(getattr(labels, 'shape', ()))}, row_index has {row_index.numel()} entries"
        )
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., D], got shape {tuple(hidden.shape)}")
    rows = math.prod(hidden.shape[:-1])
    bad = (row_index < 0) | (row_index >= rows)
    if bool(bad.any()):
        raise ValueError(
            f"row_index must lie in [0, {rows}) (the rows of hidden.reshape(-1, D)); found {row_index[bad][0].item()} "
            f"({int(bad.sum())} bad entries)"
        )
    return hidden.reshape(-1, hidden.shape[-1])[:1].expand(row_index.numel(), -1)


# ----------------------------------------------------------------------------------------------
# token statistics (TRL's DPOTrainer metrics)
# ----------------------------------------------------------------------------------------------

TOKEN_STAT_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")
# the token counts (metric names) each of TOKEN_STAT_METRICS averages over: entropy over chosen plus rejected
TOKEN_STAT_COUNTS = {"entropy": ("tokens/chosen", "tokens/rejected"), "logits/chosen": ("tokens/chosen",),
                     "logits/rejected": ("tokens/rejected",), "mean_token_accuracy": ("tokens/chosen",)}


def token_stat_sums(entropy, mean_logit, is_top1, is_chosen) -> torch.Tensor:
    """The sums behind ``TOKEN_STAT_METRICS`` over one call's response tokens, ``[6]`` fp32 (fp64 for fp64
    stats): entropy over all tokens, mean logit over chosen and over rejected tokens, chosen tokens whose label is
    the argmax, chosen and rejected token counts. Inputs ``[n]``: ``entropy`` and ``mean_logit`` float,
    ``is_top1`` and ``is_chosen`` bool."""
    cd = torch.float64 if entropy.dtype == torch.float64 else torch.float32
    chosen = is_chosen.to(cd)
    rejected = 1 - chosen
    entropy, mean_logit = entropy.detach().to(cd), mean_logit.detach().to(cd)
    return torch.stack([entropy.sum(), (mean_logit * chosen).sum(), (mean_logit * rejected).sum(),
                        (is_top1.to(cd) * chosen).sum(), chosen.sum(), rejected.sum()])


def token_stat_means(sums: torch.Tensor, group=None) -> dict[str, torch.Tensor]:
    """``TOKEN_STAT_METRICS`` and the counts ``tokens/{chosen,rejected}`` from ``token_stat_sums``' ``[6]``
    (summed over ``group`` first when given), each a scalar; a mean over no tokens is 0 (TRL's convention)."""
    if group is not None:
        sums = all_reduce_sum(sums, group)
    entropy, chosen_logits, rejected_logits, correct, n_chosen, n_rejected = sums.unbind(0)

    def mean(total, count):
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))

    return {"entropy": mean(entropy, n_chosen + n_rejected), "logits/chosen": mean(chosen_logits, n_chosen),
            "logits/rejected": mean(rejected_logits, n_rejected), "mean_token_accuracy": mean(correct, n_chosen),
            "tokens/chosen": n_chosen, "tokens/rejected": n_rejected}


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def fused_linear_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, backend="auto", chunk_size=None,
                          deterministic=False, grad_filter_eps=None, row_index=None, fp32_precision="tf32"):
    """Per-token label log-probs without materialising the logits.

    Plain-torch equivalent::

        logp = torch.log_softmax((hidden @ weight.T + bias).float(), -1)
        out = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != ignore_index)

    With ``row_index`` the same with ``hidden`` replaced by ``hidden.reshape(-1, D)[row_index]``.

    Args:
        hidden: ``[..., D]`` fp16/bf16/fp32/fp64 (any leading shape, e.g. ``[B, T, D]`` or packed ``[N, D]``).
        weight: ``[V, D]``, same dtype. bias: ``[V]`` or None.
        labels: ``[...]`` integer, ``hidden.shape[:-1]``, already aligned with ``hidden`` (no shift inside); with
            ``row_index``: ``[n]``, the label of each named row.
        row_index: ``[n]`` int32/int64 or None: explicit rows of ``hidden.reshape(-1, D)`` whose log-probs are
            wanted (a row may appear several times, e.g. a shared prompt's last row predicting the first token of
            two responses, see ``tisdpo.prefix``); its gradients add up.
        backend, chunk_size, deterministic, grad_filter_eps, fp32_precision: as in :func:`fused_tis_dpo_loss`.
    Returns:
        ``[...]`` (``[n]`` with ``row_index``) float32 (float64 for float64 inputs), 0 at ignored positions;
        differentiable w.r.t. hidden, weight and bias.
    """
    if row_index is None:
        _check_linear(hidden, weight, bias, labels, ignore_index)
    else:
        _check_linear(_check_row_index(row_index, labels, hidden), weight, bias, labels, ignore_index)
    opts = kernel_options(chunk_size, deterministic, grad_filter_eps, fp32_precision)
    impl = resolve(backend, hidden.device, weight.shape[1], dtype=hidden.dtype, grad_filter_eps=grad_filter_eps)
    flat = labels.reshape(-1)
    index = (flat != ignore_index).nonzero().squeeze(1)
    hidden_index = index if row_index is None else row_index.to(torch.long)[index]
    h_rows = _gather_rows(hidden, hidden_index)
    rows = impl.logprobs(h_rows, weight, flat[index].to(torch.long), bias, opts)
    _check_finite_result(rows.detach(), (("hidden", h_rows), ("weight", weight), ("bias", bias)))
    out = torch.zeros(flat.shape[0], dtype=rows.dtype, device=rows.device).index_copy(0, index, rows)
    return out.view(labels.shape)


def fused_tis_dpo_loss(
    hidden, weight, labels, *, bias=None, ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
    token_weights=None, contrastive_logps=None, weight_transform="origin", transform_kwargs=None,
    beta=0.1, alpha=0.5, kl=None, loss_type="sigmoid", label_smoothing=0.0, loss_weights=None, discopop_tau=0.05,
    ld_alpha=None, use_weighting=False, ignore_index=-100, cu_seqlens=None, backend="auto", chunk_size=None,
    deterministic=False, grad_filter_eps=None, row_index=None, group=None, fp32_precision="tf32", token_stats=False,
):
    """TIS-DPO / DPO / TDPO loss from last hidden states, never materialising ``[tokens, V]`` logits.

    Per response token ``t`` (labels != ignore_index): ``lp_t = log softmax(h_t W^T + b)[y_t]``,
    ``m_t = lp_t - lpref_t``; per sequence ``M = sum_t w_t m_t``; per pair
    ``loss = -log sigmoid(beta (M_c - M_r))`` averaged over pairs (TIS-DPO, Liu et al. 2024,
    arXiv 2410.04350; with ``w_t = 1`` it is DPO, Rafailov et al. 2023). See docs/design.md §1.3 for the KL
    variants (``kl="tisdpo"|"tdpo1"|"tdpo2"``, TDPO: Zeng et al. 2024) and ``tisdpo_kernels.objectives`` for
    the ``loss_type`` formulas: TRL's names and meanings (``"sigmoid"``, ``"ipo"`` (length-normalised),
    ``"hinge"``, ``"robust"``, ``"exo_pair"``, ``"nca_pair"``, ``"bco_pair"``, ``"sppo_hard"``, ``"aot"``,
    ``"aot_unpaired"``, ``"apo_zero"``, ``"apo_down"``, ``"discopop"``, ``"sigmoid_norm"``, ``"sft"``) plus
    ``"cdpo"`` (sigmoid with ``label_smoothing``: conservative DPO).

    Args:
        hidden: padded ``[2B, T, D]`` (rows ``0..B-1`` chosen, ``B..2B-1`` rejected) or packed ``[N, D]``
            with ``cu_seqlens``. fp16/bf16/fp32/fp64; math in fp32 (fp64 for fp64 inputs).
        weight: ``[V, D]`` LM head, same dtype. bias: ``[V]`` or None.
        labels: ``[2B, T]`` or ``[N]`` integer, aligned with ``hidden``; ``ignore_index`` marks prompt/padding.
        ref_logps: per-token reference log-probs shaped like ``labels``; or ``ref_hidden`` (``[..., D_ref]``
            shaped like ``hidden``) + ``ref_weight`` ``[V, D_ref]`` (+ ``ref_bias``) computed inside without
            grad. The KL variants need the latter.
        token_weights: per-token weights shaped like ``labels`` (none: DPO). Or ``contrastive_logps=(pos,
            neg)``, each shaped like ``labels``, turned into weights by ``weight_transform`` applied to
            ``r = pos - neg`` on chosen and to ``-r`` on rejected tokens (``transform_kwargs`` override the
            transform's defaults, see ``transforms.apply_weight_transform``).
        loss_type: a loss type or a list of them (TRL's form), combined as ``sum_k loss_weights[k] * loss_k``
            (``loss_weights``: one finite number per type, default 1 each). label_smoothing: ``eps`` in [0, 0.5)
            of ``cdpo``, ``robust``, ``exo_pair``, ``aot``, ``aot_unpaired`` (refused with any other type).
            discopop_tau: ``tau`` of ``discopop``.
        ld_alpha: LD-DPO (None: off; in [0, 1]): the response tokens past the shorter response's length in each
            pair get token weight ``ld_alpha`` (times any other token weight), for policy and reference alike
            (``objectives.ld_token_weights``).
        use_weighting: WPO: each pair's loss times ``exp(mean_t(lp - log sum_v p(v)^2)_c + (..)_r)``, a
            constant (``objectives.pair_objective``). Needs the full policy distribution per token: the torch
            backend computes it in its chunked pass; ``"split"`` and ``"triton"`` do not, so they refuse it (and
            ``"auto"`` picks ``"torch"``).
        cu_seqlens: ``[2B+1]`` int32/int64 boundaries of packed sequences, chosen first then rejected.
        row_index: explicit response rows (prefix-shared layouts, ``tisdpo.prefix``): ``[n]`` int32/int64 indices
            into ``hidden.reshape(-1, D)`` (any leading shape), one per entry of ``labels`` ``[n]``; a row may
            appear twice (a shared prompt's last row predicts the first chosen and the first rejected token).
            Needs ``cu_seqlens`` ``[2B+1]``, the sequence boundaries over these ``n`` entries (chosen sequences
            first). ``ref_hidden`` stays shaped like ``hidden`` and is gathered with the same rows; ``ref_logps``,
            ``token_weights`` and ``contrastive_logps`` are shaped like ``labels``. The result equals the packed
            call on ``hidden.reshape(-1, D)[row_index]``; gradients of a repeated row add up.
        backend: ``"auto"`` | ``"torch"`` | ``"split"`` | ``"triton"``, the rows of ``backends.TABLE``
            (``backends.markdown_table()`` lists what each supports). ``"auto"``: on CUDA with Triton the backend
            ``backends.AUTO_BACKENDS`` expects fastest for the hidden size (``"triton"`` below D=512, ``"split"``
            from it), ``"triton"`` whenever ``grad_filter_eps`` is set, ``"torch"`` for ``use_weighting`` and
            float64; ``"torch"`` elsewhere. A backend that cannot honour an argument refuses it, naming it and
            the backends that support it. chunk_size: rows per chunk of the torch path.
        deterministic: Triton only: an atomic-free, bit-reproducible backward (about 1.3x its FLOPs); the
            torch and split paths are always deterministic (at no cost).
        grad_filter_eps: Triton only: skip the gradient matmuls of vocabulary tiles whose probabilities all
            stay below it and that hold no label (e.g. ``2**-12``, below bf16 resolution; an approximation).
            ``None`` (default): exact. The torch and split paths are always exact and refuse it.
        group: a ``torch.distributed.ProcessGroup`` across which each sequence's rows are split (context
            parallelism): every rank passes its own rows of the same 2B sequences (its slice of ``cu_seqlens``
            or of the padded ``T``; a rank may hold no row of a sequence), the per-sequence sums are all-reduced
            before the pair loss, and every rank returns the global loss and metrics. Each rank's rows get the
            gradient of that global loss; sum (do not average) parameter gradients over the group. See
            ``tisdpo_kernels.distributed``.
        fp32_precision: fp32 inputs on CUDA: ``"tf32"`` (default: tf32 tensor cores allowed; the Triton
            kernels use them, the split path's cuBLAS GEMMs use them where the process allows tf32, e.g.
            ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or ``TrainingArguments(tf32=True)``: the loss
            never flips that process-wide flag) or ``"ieee"`` (full fp32 products, several times slower; the split
            path computes them in fp64 when the process allows tf32). Half-precision inputs and the torch path are
            unaffected.
        token_stats: also the policy's per-token statistics behind TRL's ``DPOTrainer`` metrics, computed in the
            same pass over the vocabulary (no logits; docs/design.md §4), without gradient (default False: not
            computed, no cost). A backend without them refuses (``backends.TABLE``).
    Returns:
        ``(loss, metrics)``: scalar loss (float32, float64 for float64 inputs) and a dict of detached
        scalars averaged over pairs: ``rewards/{chosen,rejected,margins,accuracies}``,
        ``logps/{chosen,rejected}`` (summed, unweighted), ``logps/{chosen,rejected}_weighted``,
        ``weights/{chosen,rejected}_mean`` (these include the ``ld_alpha`` weights), with a KL variant
        ``kl/{chosen,rejected}`` and with ``use_weighting`` ``weights/wpo_pair_mean``. With ``token_stats``, means
        over response tokens (not pairs; over the group's tokens with ``group``), TRL's names and definitions:
        ``entropy`` (of the policy's next-token distribution, chosen and rejected tokens), ``logits/chosen`` and
        ``logits/rejected`` (the logit averaged over the vocabulary), ``mean_token_accuracy`` (chosen tokens whose
        label is the argmax, the first index winning ties), each 0 over no tokens; and ``tokens/chosen``,
        ``tokens/rejected``, the counts they average over (``TOKEN_STAT_COUNTS``: calls combine as the sum of
        mean x count over the sum of count).
    Raises:
        ``ValueError`` naming the argument for bad input, including a NaN/inf in ``hidden`` (response rows),
        ``weight``, ``bias`` or their ``ref_`` twins, found when the loss or a per-sequence sum is not finite
        (one host sync per call), and a ``weight_transform`` / ``transform_kwargs`` without ``contrastive_logps``.
    """
    options = PairLossOptions(beta=beta, alpha=alpha, kl=kl, loss_type=loss_type, label_smoothing=label_smoothing,
                              loss_weights=loss_weights, discopop_tau=discopop_tau, ld_alpha=ld_alpha,
                              use_weighting=use_weighting)

    if row_index is not None:
        vocab = _check_linear(_check_row_index(row_index, labels, hidden), weight, bias, labels, ignore_index)
        if cu_seqlens is None:
            raise ValueError("row_index needs cu_seqlens: the [2B+1] sequence boundaries over the rows it names")
        _check_cu_seqlens(cu_seqlens, labels.numel())
        cu_seqlens = cu_seqlens.to(hidden.device)
    else:
        vocab = _check_linear(hidden, weight, bias, labels, ignore_index)
    if row_index is None and cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [2B, T, D] (or packed [N, D] with cu_seqlens), got {tuple(hidden.shape)}")
        if hidden.shape[0] == 0:
            raise ValueError("hidden has no rows: a padded batch needs at least one pair (B chosen then B rejected)")
        if hidden.shape[0] % 2:
            raise ValueError(f"hidden has an odd number of rows ({hidden.shape[0]}): rows must be B chosen then "
                             "B rejected")
    elif row_index is None:
        if hidden.dim() != 2:
            raise ValueError(f"with cu_seqlens, hidden must be packed [N, D], got {tuple(hidden.shape)}")
        _check_cu_seqlens(cu_seqlens, hidden.shape[0])
        cu_seqlens = cu_seqlens.to(hidden.device)

    has_ref_model = ref_hidden is not None or ref_weight is not None
    if (ref_logps is None) == (not has_ref_model):
        raise ValueError("pass exactly one of ref_logps or (ref_hidden and ref_weight)")
    if has_ref_model and (ref_hidden is None or ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together")
    if kl is not None and not has_ref_model:
        raise ValueError(f"kl={kl!r} needs the full reference distribution: pass ref_hidden and ref_weight, "
                         "not ref_logps")
    valid = labels != ignore_index
    if ref_logps is not None:
        _check_token_tensor("ref_logps", ref_logps, labels.shape, valid)
        _check_log_probs("ref_logps", ref_logps, valid)
    else:
        _check_linear(ref_hidden, ref_weight, ref_bias, None, ignore_index, prefix="ref_")
        check_ref_head(hidden, weight, ref_hidden, ref_weight, same_dtype=False)  # the torch path takes any pair
    if token_weights is not None and contrastive_logps is not None:
        raise ValueError("pass token_weights or contrastive_logps, not both")
    if token_weights is not None:
        _check_token_tensor("token_weights", token_weights, labels.shape, valid)
    if contrastive_logps is not None:
        if not isinstance(contrastive_logps, (tuple, list)) or len(contrastive_logps) != 2:
            raise TypeError("contrastive_logps must be a pair (pos_logps, neg_logps)")
        for name, t in zip(("contrastive_logps[0]", "contrastive_logps[1]"), contrastive_logps, strict=True):
            _check_token_tensor(name, t, labels.shape, valid)
    transform_params(weight_transform, transform_kwargs)  # an unknown name or key is an error whatever the weights
    if contrastive_logps is None and (weight_transform != "origin" or transform_kwargs):
        given = "token_weights, which are used as given" if token_weights is not None else "no weights (DPO)"
        raise ValueError(
            f"weight_transform={weight_transform!r} / transform_kwargs apply to contrastive_logps only, but the call "
            f"passes {given}; transform token weights before the call (tisdpo_kernels.transforms."
            "apply_weight_transform) or leave weight_transform='origin'"
        )

    if group is not None:
        check_group(group)
        if ld_alpha is not None:
            raise ValueError("ld_alpha with group= is not supported: LD-DPO's shared length is a per-rank position "
                             "here, and a sequence's rows are split across the group")
    opts = kernel_options(chunk_size, deterministic, grad_filter_eps, fp32_precision)
    if not isinstance(token_stats, bool):
        raise TypeError(f"token_stats must be a bool, got {type(token_stats).__name__}")
    impl = resolve(backend, hidden.device, weight.shape[1], dtype=hidden.dtype, kl=kl,
                   grad_filter_eps=grad_filter_eps, use_weighting=use_weighting, token_stats=token_stats)
    extras = {}  # only backends with log_collision / token_stats take these
    if use_weighting:
        extras["log_collision"] = True
    if token_stats:
        extras["token_stats"] = True
    rows = _response_rows(labels, cu_seqlens, ignore_index, group)
    hidden_index = rows.index if row_index is None else row_index.to(torch.long)[rows.index]
    h_rows = _gather_rows(hidden, hidden_index)
    token_kl = collision = None
    if kl is not None:
        mode = "tis" if kl == "tisdpo" else "tdpo"
        ref_rows = _gather_rows(ref_hidden.detach(), hidden_index)
        out = impl.kl(h_rows, weight, rows.labels, ref_rows, ref_weight.detach(), mode, bias,
                      None if ref_bias is None else ref_bias.detach(), opts, **extras)
        logps, lpref, token_kl = out[:3]
        if use_weighting:
            collision = out[3]
    else:
        out = impl.logprobs(h_rows, weight, rows.labels, bias, opts, **extras)
        out = out if isinstance(out, tuple) else (out,)
        logps, collision = out[0], (out[1] if use_weighting else None)
        if ref_logps is not None:
            lpref = ref_logps.reshape(-1)[rows.index].to(logps.dtype)
        else:
            with torch.no_grad():
                lpref = impl.logprobs(_gather_rows(ref_hidden, hidden_index), ref_weight, rows.labels, ref_bias,
                                      opts)
    w = None if token_weights is None else token_weights.reshape(-1)[rows.index].to(logps.dtype).detach()
    contrastive = None
    if contrastive_logps is not None:
        contrastive = tuple(t.reshape(-1)[rows.index].to(logps.dtype).detach() for t in contrastive_logps)
    if ld_alpha is not None:  # LD-DPO as token weights, times the given / transformed ones
        if contrastive is not None:
            w = token_weights_from_contrastive(*contrastive, rows.seq_ids < rows.num_seqs // 2, weight_transform,
                                               transform_kwargs)
            contrastive = None
        ld = ld_token_weights(rows.seq_ids, rows.num_seqs, ld_alpha).to(logps.dtype)
        w = ld if w is None else w * ld
    sums = impl.sums(logps, lpref.detach(), w, rows.seq_ids, rows.num_seqs, token_kl=token_kl, kl=kl,
                     contrastive=contrastive, weight_transform=weight_transform, transform_kwargs=transform_kwargs,
                     **({"log_collision": collision} if use_weighting else {}))
    if group is not None:
        sums = all_reduce_sequence_sums(sums, group)
    loss, metrics = pair_objective(sums, options)
    if token_stats:  # the policy's entropy and is-top-1 come last from the head function
        stat_sums = token_stat_sums(out[-2], mean_logits(h_rows, weight, bias), out[-1],
                                    rows.seq_ids < rows.num_seqs // 2)
        metrics.update(token_stat_means(stat_sums, group))
    ref_rows = None if ref_hidden is None else (lambda: _gather_rows(ref_hidden, hidden_index))
    _check_finite_result(torch.cat([loss.detach().reshape(1), sums.M.detach(), sums.LP.detach(), sums.K.detach()]),
                         (("hidden", h_rows), ("weight", weight), ("bias", bias), ("ref_hidden", ref_rows),
                          ("ref_weight", ref_weight), ("ref_bias", ref_bias)))
    return loss, metrics


class FusedTISDPOLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`fused_tis_dpo_loss` (Liger-style): options at construction,
    tensors at call time. ``forward(hidden, weight, labels, **tensors) -> (loss, metrics)``."""

    def __init__(self, *, beta=0.1, alpha=0.5, kl=None, loss_type="sigmoid", label_smoothing=0.0, loss_weights=None,
                 discopop_tau=0.05, ld_alpha=None, use_weighting=False, weight_transform="origin",
                 transform_kwargs=None, ignore_index=-100, backend="auto", chunk_size=None, deterministic=False,
                 grad_filter_eps=None, fp32_precision="tf32", token_stats=False):
        super().__init__()
        self.options = dict(beta=beta, alpha=alpha, kl=kl, loss_type=loss_type, label_smoothing=label_smoothing,
                            loss_weights=loss_weights, discopop_tau=discopop_tau, ld_alpha=ld_alpha,
                            use_weighting=use_weighting,
                            weight_transform=weight_transform, transform_kwargs=transform_kwargs,
                            ignore_index=ignore_index, backend=backend, chunk_size=chunk_size,
                            deterministic=deterministic, grad_filter_eps=grad_filter_eps,
                            fp32_precision=fp32_precision, token_stats=token_stats)

    def forward(self, hidden, weight, labels, **tensors):
        return fused_tis_dpo_loss(hidden, weight, labels, **tensors, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
