"""TIS-DPO (token-level importance sampling DPO), DPO and TDPO training on the Hugging Face stack.

`TISDPOConfig` / `TISDPOTrainer` mirror TRL's `DPOConfig` / `DPOTrainer`, with the loss computed by the fused,
logits-free kernels of `tisdpo_kernels`. The `tisdpo` console command is `tisdpo.cli:main`.

The names below are imported on first use, so that `import tisdpo.cli` (and `tisdpo --help`) does not load torch
and transformers.
"""

import importlib

_EXPORTS = {
    "PreferenceCollator": "data",
    "TISDPOConfig": "config",
    "TISDPOTrainer": "trainer",
    "prepare_preference_dataset": "data",
    "tokenize_row": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
