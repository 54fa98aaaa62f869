"""``python -m tisdpo_kernels``: a quick self-check of the installed loss against the oracle.

Runs every loss variant on a small random batch through the default backend of this machine and
through ``reference.py`` (materialised logits), prints the largest relative differences of loss and
gradients, and exits non-zero if any exceeds the tolerance.
"""

from __future__ import annotations

import sys

import torch

from . import fused_tis_dpo_loss
from .reference import reference_tis_dpo_loss


def main() -> int:
    # PyTorch's CPU exp (MKL vector maths) can be off by ~1e-4 relative on one thread for the first large call of a
    # process after a matmul (seen in about 1 process in 10); take that call here, off the measured results.
    torch.logsumexp(torch.randn(64, 64) @ torch.randn(64, 256), dim=-1)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs, seq_len, dim, vocab = 2, 33, 48, 1003
    hidden = torch.randn(2 * pairs, seq_len, dim, device=device)
    weight = torch.randn(vocab, dim, device=device) * 0.2
    ref_hidden, ref_weight = hidden + 0.1 * torch.randn_like(hidden), weight + 0.01 * torch.randn_like(weight)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), device=device)
    labels[:, :7] = -100
    token_weights = torch.rand(labels.shape, device=device) + 0.5
    worst = 0.0
    print(f"tisdpo_kernels self-check on {device}: {2 * pairs} sequences x {seq_len} tokens, D={dim}, V={vocab}")
    for kl in (None, "tisdpo", "tdpo1", "tdpo2"):
        results = []
        for fn in (fused_tis_dpo_loss, reference_tis_dpo_loss):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss, metrics = fn(h, w, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                               token_weights=token_weights, kl=kl)
            results.append((loss.detach(), *torch.autograd.grad(loss, (h, w)), metrics["rewards/margins"]))
        errs = [((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(*results, strict=True)]
        worst = max(worst, *errs)
        print(f"  kl={str(kl):7s} loss={results[0][0].item():.6f}  max rel. diff vs reference "
              f"(loss, dH, dW, margin): " + ", ".join(f"{e:.1e}" for e in errs))
    ok = worst < 1e-4
    print("OK" if ok else f"FAILED: worst relative difference {worst:.2e} >= 1e-4")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
