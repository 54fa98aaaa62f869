"""Fused LM-head + log-softmax + TIS-DPO loss kernels (Triton) with a pure-PyTorch path.

``fused_tis_dpo_loss`` and ``fused_linear_logprobs`` never materialise ``[tokens, vocab]`` logits;
``backends`` names their backends and what each supports, ``objectives`` and ``transforms`` hold the O(batch)
maths every backend shares, ``reference`` the plain-PyTorch oracle they are tested against.
"""

from .loss import FusedTISDPOLoss, fused_linear_logprobs, fused_tis_dpo_loss

__all__ = ["FusedTISDPOLoss", "fused_linear_logprobs", "fused_tis_dpo_loss"]
__version__ = "0.1.0"
