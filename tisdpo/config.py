"""`TISDPOConfig`: the training arguments of a TIS-DPO / DPO / TDPO run.

The class extends `transformers.TrainingArguments`, so every Trainer option (optimiser, schedule, checkpoints,
`report_to`, accelerate / FSDP / DeepSpeed settings) is available unchanged. The preference-optimisation fields
follow TRL's `DPOConfig` names wherever the meaning is the same (`beta`, `loss_type`, `label_smoothing`,
`max_length`, `max_prompt_length`, `max_completion_length`, `truncation_mode`, `padding_free`,
`precompute_ref_log_probs`, `precompute_ref_batch_size`, `model_init_kwargs`, `ref_model_init_kwargs`,
`disable_dropout`, `dataset_num_proc`); the rest are ours (`alpha`, `kl`, `weight_transform`,
`weight_transform_kwargs`, `reverse_preferences`, `ref_logps_cache_dir`, `loss_backend`, `loss_chunk_size`,
`liger_model_patches`).

Two defaults differ from `TrainingArguments` on purpose:

* activation (gradient) checkpointing is on unless `activation_checkpointing` or its deprecated alias
  `gradient_checkpointing` is set explicitly;
* a model given by name or path is loaded in bfloat16 on a CUDA device that supports it (float32 elsewhere),
  not in float32 everywhere (TRL's default, a common cause of out-of-memory errors). Pass
  `model_init_kwargs={"dtype": ...}` to choose.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from tisdpo_kernels.loss import BACKENDS as LOSS_BACKENDS
from tisdpo_kernels.reference import ELEMENTWISE_TRANSFORMS, KL_MODES, transform_params
from tisdpo_kernels.reference import LOSS_TYPES as PAIR_LOSS_TYPES

LOSS_TYPES = (*PAIR_LOSS_TYPES, "sft")
# need a whole response: the trainer applies them to the tokenised weight columns (tisdpo.weights), not in the loss
PER_RESPONSE_TRANSFORMS = ("rank_based", "binary", "random")
KL_VARIANTS = tuple(mode for mode in KL_MODES if mode is not None)
TRUNCATION_MODES = ("keep_end", "keep_start")
# transformers 5.x renamed `gradient_checkpointing` to `activation_checkpointing` (the old name became an alias)
_HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}


@dataclass
class TISDPOConfig(TrainingArguments):
    r"""Training arguments of `TISDPOTrainer`.

    Objective (per pair of chosen c / rejected r responses, see DESIGN.md section 1):
    `h = sum_t w_t (log pi(y_t) - log pi_ref(y_t))` over c minus the same over r, optionally minus a token-level KL
    term, and `loss = -log sigmoid(beta * h)` for `loss_type="sigmoid"`. Without token-weight columns in the data the
    weights are 1 and this is DPO; with them it is TIS-DPO.

    Token weights: the dataset columns `chosen_weights` / `rejected_weights` hold, per response token, the argument
    `x` of the weight transform, and the weight used is `w = T(x)` for both columns alike. For the paper's weights
    the chosen column holds `r_t = log pi_plus(y_t) - log pi_minus(y_t)` and the rejected column holds `-r_t` (the
    sign already flipped, so that the "bad" model's favourite tokens weigh more in the losing response). Columns that
    already hold final weights are used as they are with the default `weight_transform="origin"` (the identity).
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + [
        "model_init_kwargs",
        "ref_model_init_kwargs",
        "weight_transform_kwargs",
    ]

    # --- model loading ---
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the model is given as a name "
            "or path (a dict, or a JSON string on the command line). Without a `dtype` entry the model loads in "
            "bfloat16 on a CUDA device that supports it and in float32 otherwise."
        },
    )
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Like `model_init_kwargs`, for a reference model given as a name or path."},
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set the probability of every dropout module of both models to 0."}
    )
    liger_model_patches: bool = field(
        default=True,
        metadata={
            "help": "On CUDA, replace RMSNorm, SwiGLU and RoPE of architectures Liger-Kernel supports by its "
            "kernels (the cross-entropy patches are never applied: the loss is ours). Ignored on CPU."
        },
    )

    # --- objective ---
    beta: float = field(default=0.1, metadata={"help": "Inverse temperature of the preference loss."})
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "'sigmoid' (DPO / TIS-DPO), 'ipo', 'hinge', or 'sft' (summed negative log-likelihood of the chosen "
            "responses, averaged over pairs; no reference model).",
            "choices": list(LOSS_TYPES),
        },
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Conservative-DPO label smoothing in [0, 0.5) (sigmoid loss only)."}
    )
    kl: str | None = field(
        default=None,
        metadata={
            "help": "Token-level KL term: None, 'tisdpo' (TIS-DPO token_level), 'tdpo1' or 'tdpo2' (TDPO). Needs the "
            "reference model's full distribution, so it cannot be combined with precomputed reference log-probs.",
        },
    )
    alpha: float = field(default=0.5, metadata={"help": "Weight of the KL term for kl='tisdpo' and kl='tdpo2'."})
    weight_transform: str = field(
        default="origin",
        metadata={
            "help": "Elementwise transform T applied to the token-weight columns (w = T(x)): 'origin' (identity), "
            "'threshold' (clip to [-1, 1]), 'threshold_and_scale' (clip to [-1.5, 1.5], map to [0.7, 1.3]), "
            "'exp_clamp' (k * exp(mu * clamp(x, lower, upper))); per response, applied to the tokenised (truncated) "
            "responses before training: 'rank_based' (rank mapped onto [0.7, 1.3]), 'binary' (1 for the top half, "
            "else 0), 'random' (uniform [0.7, 1.3], seeded); see tisdpo.weights.",
            "choices": [*ELEMENTWISE_TRANSFORMS, *PER_RESPONSE_TRANSFORMS],
        },
    )
    weight_transform_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments of the weight transform, e.g. {\"k\": 1.0, \"mu\": 1.0} for exp_clamp."},
    )
    reverse_preferences: bool = field(
        default=False,
        metadata={
            "help": "Swap chosen and rejected (with their weight columns): trains the reverse-DPO contrastive model, "
            "or with loss_type='sft' the SFT-on-rejected one."
        },
    )

    # --- data ---
    max_length: int | None = field(
        default=1024, metadata={"help": "Maximum tokens of prompt + response per sequence (None: no limit)."}
    )
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Maximum prompt tokens, cut according to `truncation_mode` (None: no limit)."}
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Maximum tokens per response, cut at its end (None: no limit)."}
    )
    truncation_mode: str = field(
        default="keep_end",
        metadata={
            "help": "How a sequence longer than `max_length` is cut. 'keep_end': the shared prompt loses tokens from "
            "its start (down to one token) before any response loses tokens from its end; `max_prompt_length` keeps "
            "the end of the prompt. 'keep_start': each sequence keeps its first `max_length` tokens and "
            "`max_prompt_length` keeps the start of the prompt. A pair whose chosen or rejected response ends up "
            "empty is dropped (the count is logged).",
            "choices": list(TRUNCATION_MODES),
        },
    )
    padding_free: bool | None = field(
        default=None,
        metadata={
            "help": "Pack the chosen and rejected sequences of a batch into one row without padding (position_ids + "
            "cu_seqlens). None: pack when the attention implementation has a varlen/block-sparse kernel "
            "(flash_attention_2/3, flex_attention), pad otherwise. True also packs with sdpa/eager (exact, through a "
            "block-diagonal mask). False: always pad.",
            "nargs": "?",
            "const": True,
        },
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset tokenisation."})

    # --- reference model ---
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference per-token log-probs once before training and cache them on disk (keyed "
            "by the tokenised dataset's contents and the reference model), then train without a reference model."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Pairs per batch when precomputing reference log-probs (default: per_device_eval_batch_size)."
        },
    )
    ref_logps_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the reference log-prob cache (default: ~/.cache/tisdpo/ref_logps)."},
    )

    # --- fused loss ---
    loss_backend: str = field(
        default="auto",
        metadata={
            "help": "Implementation of the fused loss: 'auto' (Triton on CUDA, chunked PyTorch otherwise), "
            "'triton' or 'torch' (the chunked PyTorch path).",
            "choices": list(LOSS_BACKENDS),
        },
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Token rows per chunk of the 'torch' loss backend (None: its default)."}
    )

    if not _HAS_ACTIVATION_CHECKPOINTING:  # transformers < 5.x: `gradient_checkpointing` is a plain bool
        gradient_checkpointing: bool = field(
            default=True, metadata={"help": "Recompute activations in the backward pass to save memory."}
        )

    def __post_init__(self):
        unset = _HAS_ACTIVATION_CHECKPOINTING and self.activation_checkpointing is None
        if unset and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        super().__post_init__()
        for name in ("model_init_kwargs", "ref_model_init_kwargs", "weight_transform_kwargs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"`{name}` must be a dict or a JSON object string, got {value!r}")
        self._validate()

    def _validate(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.kl is not None and self.kl not in KL_VARIANTS:
            raise ValueError(f"`kl` must be None or one of {KL_VARIANTS}, got {self.kl!r}")
        if self.kl is not None and self.loss_type == "sft":
            raise ValueError("`kl` cannot be combined with loss_type='sft' (SFT has no reference model)")
        if self.kl is not None and self.precompute_ref_log_probs:
            raise ValueError(
                f"`kl={self.kl!r}` needs the reference model's full distribution on the fly; it cannot be combined "
                "with `precompute_ref_log_probs=True`"
            )
        # raises a ValueError naming weight_transform / transform_kwargs on an unknown name or key
        known = (*ELEMENTWISE_TRANSFORMS, *PER_RESPONSE_TRANSFORMS)
        if self.weight_transform not in known:
            raise ValueError(f"`weight_transform` must be one of {known}, got {self.weight_transform!r}")
        if self.weight_transform in PER_RESPONSE_TRANSFORMS:
            from .weights import transform_params as response_transform_params

            response_transform_params(self.weight_transform, self.weight_transform_kwargs)
        else:
            transform_params(self.weight_transform, self.weight_transform_kwargs)
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"`truncation_mode` must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        if self.loss_backend not in LOSS_BACKENDS:
            raise ValueError(f"`loss_backend` must be one of {LOSS_BACKENDS}, got {self.loss_backend!r}")
        if not self.beta > 0:
            raise ValueError(f"`beta` must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"`label_smoothing` must lie in [0, 0.5), got {self.label_smoothing}")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be None or >= 1, got {value}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"`max_length` must be >= 2 (one prompt and one response token), got {self.max_length}")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ValueError(f"`precompute_ref_batch_size` must be >= 1, got {self.precompute_ref_batch_size}")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"`loss_chunk_size` must be >= 1, got {self.loss_chunk_size}")

    def resolved_model_init_kwargs(self, which: str = "model") -> dict[str, Any]:
        """`from_pretrained` keyword arguments for the policy (`which="model"`) or reference (`"ref_model"`) model.

        Adds `dtype=torch.bfloat16` when no dtype is given and the run is on a CUDA device with bfloat16 support,
        `dtype=torch.float32` otherwise.
        """
        if which not in ("model", "ref_model"):
            raise ValueError(f"`which` must be 'model' or 'ref_model', got {which!r}")
        kwargs = dict((self.model_init_kwargs if which == "model" else self.ref_model_init_kwargs) or {})
        if "torch_dtype" in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        dtype = kwargs.get("dtype")
        if dtype is None:
            on_cuda = not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            kwargs["dtype"] = torch.bfloat16 if on_cuda else torch.float32
        elif isinstance(dtype, str) and dtype != "auto":
            resolved = getattr(torch, dtype, None)
            if not isinstance(resolved, torch.dtype):
                raise ValueError(f"`{which}_init_kwargs['dtype']` is not a torch dtype: {dtype!r}")
            kwargs["dtype"] = resolved
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        """As `TrainingArguments.to_dict`, with the torch dtypes inside the init kwargs turned into strings."""
        out = super().to_dict()
        for name in ("model_init_kwargs", "ref_model_init_kwargs"):
            if isinstance(out.get(name), dict):
                out[name] = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
                             for k, v in out[name].items()}
        return out
