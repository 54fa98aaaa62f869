"""One input factory shared by every provider, and the providers themselves.

``make_inputs(case, variant, device)`` builds the inputs of one benchmark case: padded ``[2B, L, D]``
last hidden states with ragged prompts (``labels`` is ``ignore_index`` on prompt and padding), the LM
head ``[V, D]``, per-token reference log-probs and token weights, and for the KL variant a reference
head and reference hidden states. Every provider computes the TIS-DPO loss of those inputs and its
gradients w.r.t. ``hidden`` and ``weight``; ``provider.step(inputs, variant)`` returns a closure that
runs one forward+backward.

Providers (``PROVIDERS``):

- ``naive``: materialised fp32 ``[2B, L, V]`` logits, ``log_softmax``, gather, weighted DPO in PyTorch
  — what TRL's ``DPOTrainer`` and the official TIS-DPO code do (logits for prompt rows included;
  the KL variant takes the full-vocabulary KL of the materialised policy and reference logits).
- ``torch_compile_chunked``: a fair hand-written baseline: response rows only, chunks of rows through
  a ``torch.compile``'d log-softmax+gather with activation checkpointing (each chunk's logits are
  recomputed in backward instead of stored).
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (torch.compile'd, chunks over pairs). It
  takes no token weights and no precomputed reference log-probs, so it runs with
  ``use_ref_model=False``: unit weights and a zero reference term. Its loss value therefore differs
  from the others, its work does not (policy head forward+backward; the reference term is one
  constant per sequence).
- ``liger_flce``: Liger's fused linear cross-entropy (``reduction="none"``, a Triton kernel) for
  per-token log-probs, then the weighted DPO loss in PyTorch; CUDA only (on CPU the kernel runs
  only under ``TRITON_INTERPRET=1``, correct but not a performance path).
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy(..., reduction="none")`` for per-token
  log-probs, then the weighted DPO loss in PyTorch; CUDA only, optional (``cut-cross-entropy``).
- ``tisdpo_torch`` / ``tisdpo_split`` / ``tisdpo_triton``: ours, ``fused_tis_dpo_loss(..., backend="torch"|
  "split"|"triton")`` (the split path runs on CPU too: torch GEMMs and its torch elementwise twin).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .shapes import Case

IGNORE_INDEX = -100
BETA = 0.1
ALPHA = 0.5
# Peaked ("trained-like") logits: background logits ~ N(0, PEAKED_LOGIT_STD^2), the label lifted to
# about log V + std^2/2 so that it holds roughly half of the probability mass; mean entropy is then
# ~2 nats and almost every vocabulary entry is far below bf16 resolution, as for a trained model.
PEAKED_LOGIT_STD = 4.0
# Reference = policy perturbed by this much (relative), so log-ratios and KLs are small but nonzero.
REFERENCE_NOISE = 0.02


@dataclass
class BenchInputs:
    """Inputs of one case; see the module docstring. All on one device.

    ``hidden [2B, L, D]`` and ``weight [V, D]`` in the case dtype with ``requires_grad``;
    ``labels [2B, L]`` int64; ``ref_logps``, ``token_weights`` ``[2B, L]`` float32 (0 outside responses);
    ``ref_hidden [2B, L, D]`` / ``ref_weight [V, D]`` (no grad) for the KL variant, else ``None``
(``ref_logps`` are that reference model's log-probs in both variants).
    ``row_index [N]``: flat indices of the response tokens; ``row_seq [N]``: their sequence ids;
    ``entropy``: mean entropy (nats) of the policy softmax over a sample of response rows.
    """

    case: Case
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_logps: torch.Tensor
    token_weights: torch.Tensor
    ref_hidden: torch.Tensor | None
    ref_weight: torch.Tensor | None
    row_index: torch.Tensor
    row_seq: torch.Tensor
    entropy: float

    def zero_grad(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


@torch.no_grad()
def _rows_log_softmax_stats(hidden_rows, weight, labels_rows, rows_per_chunk=1024):
    """Label log-probs and softmax entropies of ``hidden_rows [n, D]`` in fp32, chunked over rows."""
    logps, entropies = [], []
    for s in range(0, hidden_rows.shape[0], rows_per_chunk):
        z = (hidden_rows[s:s + rows_per_chunk] @ weight.T).float()
        logp = z.log_softmax(-1)
        logps.append(logp.gather(1, labels_rows[s:s + rows_per_chunk, None]).squeeze(1))
        entropies.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(logps), torch.cat(entropies)


def make_inputs(case: Case, variant: str, device: torch.device | str, seed: int = 0) -> BenchInputs:
    """Build the inputs of ``case`` on ``device`` (deterministic given ``seed``)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    d, v = case.head.hidden_size, case.head.vocab_size
    prompts = case.prompt_lengths()
    num_seqs, seq_len = len(prompts), max(prompts) + case.tokens

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    labels = torch.full((num_seqs, seq_len), IGNORE_INDEX, dtype=torch.long, device=device)
    for s, p in enumerate(prompts):
        labels[s, p:p + case.tokens] = torch.randint(0, v, (case.tokens,), generator=gen, device=device)
    response = labels != IGNORE_INDEX
    row_index = response.reshape(-1).nonzero().squeeze(1)
    row_seq = row_index // seq_len
    row_labels = labels.reshape(-1)[row_index]

    weight = randn(v, d) / math.sqrt(d)  # rows of norm ~1: hidden ~ N(0, I) gives logits ~ N(0, 1)
    if case.logits == "random":
        hidden = randn(num_seqs, seq_len, d)
    elif case.logits == "peaked":
        hidden = PEAKED_LOGIT_STD * randn(num_seqs, seq_len, d)
        lift = math.log(v) + PEAKED_LOGIT_STD**2 / 2
        flat = hidden.view(-1, d)
        flat[row_index] += lift * weight[row_labels] / weight[row_labels].square().sum(-1, keepdim=True)
    else:
        raise ValueError(f"case.logits must be 'random' or 'peaked', got {case.logits!r}")
    hidden, weight = hidden.to(case.dtype), weight.to(case.dtype)

    # The reference model: the policy head and hidden states perturbed by REFERENCE_NOISE.
    ref_hidden = (hidden.float() + REFERENCE_NOISE * hidden.float().std() * randn(num_seqs, seq_len, d)).to(case.dtype)
    ref_weight = (weight.float() + REFERENCE_NOISE * randn(v, d) / math.sqrt(d)).to(case.dtype)
    ref_rows, _ = _rows_log_softmax_stats(ref_hidden.view(-1, d)[row_index], ref_weight, row_labels)
    _, entropy = _rows_log_softmax_stats(hidden.view(-1, d)[row_index[:4096]], weight, row_labels[:4096])
    ref_logps = torch.zeros(num_seqs * seq_len, device=device)
    ref_logps[row_index] = ref_rows
    token_weights = torch.zeros(num_seqs * seq_len, device=device)
    token_weights[row_index] = 0.7 + 0.6 * torch.rand(row_index.numel(), generator=gen, device=device)
    if variant != "tisdpo_kl":  # only the KL variant hands the reference model to the providers
        ref_hidden = ref_weight = None
    return BenchInputs(
        case=case, hidden=hidden.requires_grad_(), weight=weight.requires_grad_(), labels=labels,
        ref_logps=ref_logps.view(num_seqs, seq_len), token_weights=token_weights.view(num_seqs, seq_len),
        ref_hidden=ref_hidden, ref_weight=ref_weight, row_index=row_index, row_seq=row_seq,
        entropy=entropy.mean().item(),
    )


def weighted_pair_loss(inputs: BenchInputs, logps_rows: torch.Tensor, token_kl_rows: torch.Tensor | None = None,
                       ref_logps_rows: torch.Tensor | None = None):
    """TIS-DPO loss (docs/design.md §1.2, §1.3) from per-token policy log-probs of the response rows ``[N]`` (fp32).

    ``M_s = sum_t w_t (lp_t - lpref_t)``, ``h = M_c - M_r`` (``- alpha (K_c - K_r)`` with the token KL,
    ``K_s = sum_t w_t KL_t``), ``loss = mean(-log sigmoid(beta h))``. ``lpref`` is
    ``inputs.ref_logps`` unless ``ref_logps_rows`` (computed by the provider) is given.
    """
    num_seqs = inputs.labels.shape[0]
    w = inputs.token_weights.view(-1)[inputs.row_index]
    lpref = inputs.ref_logps.view(-1)[inputs.row_index] if ref_logps_rows is None else ref_logps_rows

    def seq_sum(values):
        return torch.zeros(num_seqs, dtype=values.dtype, device=values.device).index_add(0, inputs.row_seq, values)

    m = seq_sum(w * (logps_rows.float() - lpref))
    b = num_seqs // 2
    h = m[:b] - m[b:]
    if token_kl_rows is not None:
        k = seq_sum(w * token_kl_rows.float())
        h = h - ALPHA * (k[:b] - k[b:])
    return -F.logsigmoid(BETA * h).mean()


# ------------------------------------------------------------------------------------------------
# loss closures, one per provider: inputs, variant -> () -> scalar loss
# ------------------------------------------------------------------------------------------------


def _naive_loss(inputs: BenchInputs, variant: str):
    def loss():
        logp = (inputs.hidden @ inputs.weight.T).float().log_softmax(-1)  # [2B, L, V] fp32, all rows
        token_logp = logp.gather(-1, inputs.labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        rows = inputs.row_index
        if variant != "tisdpo_kl":
            return weighted_pair_loss(inputs, token_logp.view(-1)[rows])
        with torch.no_grad():
            ref_logp = (inputs.ref_hidden @ inputs.ref_weight.T).float().log_softmax(-1)
            ref_token_logp = ref_logp.gather(-1, inputs.labels.clamp_min(0).unsqueeze(-1)).view(-1)[rows]
        token_kl = (logp.exp() * (logp - ref_logp)).sum(-1).view(-1)[rows]
        return weighted_pair_loss(inputs, token_logp.view(-1)[rows], token_kl, ref_token_logp)

    return loss


def _compiled_chunk_logps(h, w, y):
    z = (h @ w.T).float()
    return z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)


@functools.cache
def _compiled_chunk():
    # One graph per distinct chunk shape (full chunks and the last one, per case): allow enough.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(_compiled_chunk_logps, dynamic=False)


def compile_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk of ``torch_compile_chunked``: 1024 on GPU (~0.6 GB of fp32 logits at V=152k);
    on CPU the same 16 MiB logits budget as our torch path."""
    return 1024 if device.type == "cuda" else max(1, (1 << 22) // vocab_size)


def _compile_chunked_loss(inputs: BenchInputs, variant: str):
    chunk_fn = _compiled_chunk()
    d = inputs.case.head.hidden_size
    rows = compile_chunk_rows(inputs.case.head.vocab_size, inputs.hidden.device)
    labels_rows = inputs.labels.view(-1)[inputs.row_index]

    def loss():
        h = inputs.hidden.view(-1, d).index_select(0, inputs.row_index)
        parts = [checkpoint(chunk_fn, h[s:s + rows], inputs.weight, labels_rows[s:s + rows], use_reentrant=False)
                 for s in range(0, h.shape[0], rows)]
        return weighted_pair_loss(inputs, torch.cat(parts))

    return loss


def _liger_loss(inputs: BenchInputs, variant: str):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, use_ref_model=False)
    return lambda: fn(inputs.weight, inputs.hidden, inputs.labels)[0]


def _liger_flce_loss(inputs: BenchInputs, variant: str):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    d = inputs.case.head.hidden_size

    def loss():
        nll = liger_fused_linear_cross_entropy(inputs.hidden.view(-1, d), inputs.weight, inputs.labels.view(-1),
                                               ignore_index=IGNORE_INDEX, reduction="none")
        return weighted_pair_loss(inputs, -nll.view(-1)[inputs.row_index])

    return loss


def _cce_loss(inputs: BenchInputs, variant: str):
    from cut_cross_entropy import linear_cross_entropy

    def loss():
        nll = linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels, ignore_index=IGNORE_INDEX,
                                   reduction="none")
        return weighted_pair_loss(inputs, -nll.reshape(-1)[inputs.row_index])

    return loss


def _ours_loss(backend: str):
    def build(inputs: BenchInputs, variant: str):
        from tisdpo_kernels import fused_tis_dpo_loss

        if variant == "tisdpo_kl":
            kwargs = dict(ref_hidden=inputs.ref_hidden, ref_weight=inputs.ref_weight, kl="tisdpo")
        else:
            kwargs = dict(ref_logps=inputs.ref_logps)
        return lambda: fused_tis_dpo_loss(inputs.hidden, inputs.weight, inputs.labels,
                                          token_weights=inputs.token_weights, beta=BETA, alpha=ALPHA,
                                          backend=backend, **kwargs)[0]

    return build


# ------------------------------------------------------------------------------------------------
# availability
# ------------------------------------------------------------------------------------------------


def _missing(module: str) -> str | None:
    try:
        __import__(module)
    except ImportError as exc:
        return f"{module} is not importable ({exc})"
    return None


def _always(device: torch.device) -> str | None:
    return None


def _needs_liger(device: torch.device) -> str | None:
    return _missing("liger_kernel")


def _needs_liger_cuda(device: torch.device) -> str | None:
    if device.type != "cuda":
        return ("Liger's fused linear cross-entropy is a Triton kernel: on CPU it runs only under "
                "TRITON_INTERPRET=1 (values and gradients correct, checked), which is no performance path")
    return _missing("liger_kernel")


def _needs_cce_cuda(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "Cut Cross-Entropy's kernels need CUDA"
    return _missing("cut_cross_entropy")


def _needs_triton_cuda(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the Triton backend on CPU runs only in the Triton interpreter, far too slow to benchmark"
    return _missing("triton")


@dataclass(frozen=True)
class Provider:
    """A way to compute the loss: ``build(inputs, variant)`` returns a closure computing the scalar
    loss; ``unavailable(device)`` says why it cannot run on ``device`` (``None`` when it can)."""

    name: str
    variants: tuple[str, ...]
    build: Callable[[BenchInputs, str], Callable[[], torch.Tensor]]
    unavailable: Callable[[torch.device], str | None]
    ours: bool = False

    def step(self, inputs: BenchInputs, variant: str) -> Callable[[], None]:
        """A closure running one forward+backward (gradients land in ``inputs.hidden/weight.grad``)."""
        if variant not in self.variants:
            raise ValueError(f"provider {self.name!r} has no variant {variant!r} (has {self.variants})")
        loss_fn = self.build(inputs, variant)

        def run():
            loss_fn().backward()

        return run


PROVIDERS = {
    p.name: p
    for p in (
        Provider("naive", ("tisdpo", "tisdpo_kl"), _naive_loss, _always),
        Provider("torch_compile_chunked", ("tisdpo",), _compile_chunked_loss, _always),
        Provider("liger", ("tisdpo",), _liger_loss, _needs_liger),
        Provider("liger_flce", ("tisdpo",), _liger_flce_loss, _needs_liger_cuda),
        Provider("cce", ("tisdpo",), _cce_loss, _needs_cce_cuda),
        Provider("tisdpo_torch", ("tisdpo", "tisdpo_kl"), _ours_loss("torch"), _always, ours=True),
        Provider("tisdpo_split", ("tisdpo", "tisdpo_kl"), _ours_loss("split"), _always, ours=True),
        Provider("tisdpo_triton", ("tisdpo", "tisdpo_kl"), _ours_loss("triton"), _needs_triton_cuda, ours=True),
    )
}
