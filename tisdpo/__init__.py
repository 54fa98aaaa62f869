"""TIS-DPO (token-level importance sampling DPO), DPO and TDPO training on the Hugging Face stack.

`TISDPOConfig` / `TISDPOTrainer` mirror TRL's `DPOConfig` / `DPOTrainer`, with the loss computed by the fused,
logits-free kernels of `tisdpo_kernels`. The `tisdpo` console command is `tisdpo.cli:main`.
"""

from .config import TISDPOConfig
from .data import PreferenceCollator, prepare_preference_dataset, tokenize_row
from .trainer import TISDPOTrainer

__all__ = ["PreferenceCollator", "TISDPOConfig", "TISDPOTrainer", "prepare_preference_dataset", "tokenize_row"]
