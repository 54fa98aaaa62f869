"""`TISDPOConfig`: the training arguments of a TIS-DPO / DPO / TDPO run.

The class extends `transformers.TrainingArguments`, so every Trainer option (optimiser, schedule, checkpoints,
`report_to`, accelerate / FSDP / DeepSpeed settings) is available unchanged. The preference-optimisation fields
follow TRL's `DPOConfig` names wherever the meaning is the same (`beta`, `loss_type`, `label_smoothing`,
`max_length`, `max_prompt_length`, `max_completion_length`, `truncation_mode`, `padding_free`,
`precompute_ref_log_probs`, `precompute_ref_batch_size`, `model_init_kwargs`, `ref_model_init_kwargs`,
`disable_dropout`, `dataset_num_proc`); the rest are ours (`alpha`, `kl`, `weight_transform`,
`weight_transform_kwargs`, `reverse_preferences`, `prefix_sharing`, `ref_logps_cache_dir`, `loss_backend`,
`loss_chunk_size`, `token_metrics`, `liger_model_patches`). The loss fields `loss_type` (a name or TRL's list form), `loss_weights`,
`label_smoothing`, `discopop_tau`, `ld_alpha`, `use_weighting` and the deprecated `rpo_alpha` mean what they mean in
TRL 1.16 (`tisdpo_kernels.objectives` lists every loss type's formula); `loss_type='cdpo'` is ours.

Defaults that differ from `TrainingArguments` are TRL `DPOConfig`'s, so that a script written for TRL's
`DPOTrainer` trains the same way after switching the import: `learning_rate=1e-6`, `logging_steps=10`,
`truncation_mode="keep_start"`, `max_length=1024`, no prompt-length limit (`max_prompt_length=None`), and activation
(gradient) checkpointing on unless `activation_checkpointing` or TRL's name `gradient_checkpointing` is set (either
name is accepted; the one the installed transformers wants is passed on, without its deprecation warning).
Where we keep our own choice, because it is the better one, the trainer logs it once (see
`TISDPOTrainer`'s docstring):

* a model given by name or path is loaded in bfloat16 on a CUDA device that supports it (float32 elsewhere),
  not in float32 everywhere (TRL's default, a common cause of out-of-memory errors). Pass
  `model_init_kwargs={"dtype": ...}` to choose;
* `bf16=None` (the default) turns bfloat16 mixed precision on where TRL does (a CUDA device, unless `fp16` is
  set) only if the device supports bfloat16, and off on CPU (TRL: on), where bfloat16 autocast is slower than
  float32 on most processors and costs accuracy;
* `tokenization="separate"`: prompt and responses are tokenised separately (see the field's help for why); `"joint"`
  is TRL's convention.

TRL fields we do not implement are rejected with a `ValueError` naming the field (`f_divergence_type` other than
`"reverse_kl"`, `generate_during_eval=True`); TRL's deprecated `pad_token` is honoured with TRL's deprecation warning.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from tisdpo_kernels.backends import BACKENDS as LOSS_BACKENDS
from tisdpo_kernels.backends import help_text as backends_help
from tisdpo_kernels.objectives import KL_MODES, LOSS_TYPES, SMOOTHED_LOSS_TYPES, check_ld_alpha, loss_terms

from .formats import TOKENIZATION_MODES, TRUNCATION_MODES
from .response_weights import WEIGHT_TRANSFORMS, response_transform_params

KL_VARIANTS = tuple(mode for mode in KL_MODES if mode is not None)
# transformers 5.x renamed `gradient_checkpointing` to `activation_checkpointing` (the old name became an alias)
_HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}


@dataclass
class TISDPOConfig(TrainingArguments):
    r"""Training arguments of `TISDPOTrainer`.

    Objective (per pair of chosen c / rejected r responses, see `docs/design.md §1.2`):
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

    # --- TrainingArguments fields with TRL DPOConfig's defaults ---
    learning_rate: float = field(
        default=1e-6, metadata={"help": "Initial learning rate (TRL's DPO default; TrainingArguments has 5e-5)."}
    )
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log every X update steps (an integer, or a ratio of the total steps if below 1)."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bfloat16 mixed precision. None: on for a CUDA device with bfloat16 support unless `fp16` is set "
            "(TRL's rule), off on CPU (TRL turns it on there too; bfloat16 autocast is slower on most CPUs).",
            "nargs": "?",
            "const": True,
        },
    )

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
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "Loss type(s), TRL's names and meanings (a name or a list; see tisdpo_kernels.objectives): "
            "'sigmoid' (DPO / TIS-DPO), 'hinge', 'ipo' (length-normalised, as in TRL), 'exo_pair', 'nca_pair', "
            "'robust', 'bco_pair' (no running reward mean, as in TRL 1.x), 'sppo_hard', 'aot', 'aot_unpaired', "
            "'apo_zero', 'apo_down', 'discopop', 'sigmoid_norm', 'sft' (negative log-likelihood of the chosen "
            "responses averaged over their tokens, as in TRL; 'sft' alone needs no reference model), and ours: "
            "'cdpo' (the sigmoid loss with `label_smoothing`, conservative DPO). Several types are summed with "
            "`loss_weights`.",
            "choices": list(LOSS_TYPES),
        },
    )
    loss_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per entry of `loss_type` (default 1 each): the loss is sum_k loss_weights[k] * "
            "loss_k, e.g. loss_type ['sigmoid', 'sft'] with [1, 1] (RPO) or ['sigmoid', 'bco_pair', 'sft'] with "
            "[0.8, 0.2, 1] (MPO)."
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Label smoothing in [0, 0.5) of 'robust', 'exo_pair' (where it must be > 0), 'aot', "
            "'aot_unpaired' and 'cdpo'. As in TRL it has no effect on 'sigmoid' (a warning says so); conservative "
            "DPO, what it meant with 'sigmoid' in tisdpo before, is loss_type='cdpo'."
        },
    )
    discopop_tau: float = field(
        default=0.05, metadata={"help": "Temperature tau of loss_type='discopop' (DiscoPOP paper default 0.05)."}
    )
    ld_alpha: float | None = field(
        default=None,
        metadata={
            "help": "LD-DPO alpha in [0, 1] (None: off): in each pair, the response tokens past the shorter "
            "response's length get token weight ld_alpha (policy and reference alike, as in TRL). It multiplies the "
            "TIS-DPO token weights."
        },
    )
    use_weighting: bool = field(
        default=False,
        metadata={
            "help": "WPO: multiply each pair's loss by the product of both responses' length-normalised "
            "probabilities under the policy (each token's probability over sum_v p(v)^2, no gradient), as in TRL. "
            "A per-pair weight on top of the token weights, computed from unweighted log-probs. Only "
            "loss_backend='torch' computes sum_v p(v)^2 ('auto' picks it; 'triton' and 'split' refuse)."
        },
    )
    rpo_alpha: float | None = field(
        default=None,
        metadata={
            "help": "Deprecated (TRL): the weight of an 'sft' term; use loss_type [..., 'sft'] with loss_weights "
            "[..., rpo_alpha]."
        },
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
            "else 0), 'random' (uniform [0.7, 1.3], seeded); see tisdpo.response_weights.",
            "choices": list(WEIGHT_TRANSFORMS),
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
        default=None,
        metadata={"help": "Maximum prompt tokens, cut according to `truncation_mode` (None, the default: no limit)."},
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Maximum tokens per response, cut at its end (None: no limit)."}
    )
    truncation_mode: str = field(
        default="keep_start",
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
    prefix_sharing: bool | None = field(
        default=None,
        metadata={
            "help": "Run each pair as one [prompt | chosen | rejected] row, the prompt once (P+C+R tokens instead of "
            "2P+C+R; tisdpo.prefix): rejected positions restart at the prompt's end and a custom mask keeps the "
            "responses apart. None: on with flex_attention (a block-sparse FlexAttention mask; train on CUDA, "
            "FlexAttention has no backward on CPU), off otherwise. True also runs it with sdpa/eager through a dense "
            "4-D [rows, 1, T, T] mask (exact; pays for long prompts). Not for flash attention or loss_type='sft'.",
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
            "help": "Implementation of the fused loss: " + backends_help() + ".",
            "choices": list(LOSS_BACKENDS),
        },
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Token rows per chunk of the 'torch' loss backend (None: its default)."}
    )
    token_metrics: bool = field(
        default=True,
        metadata={
            "help": "Log TRL DPOTrainer's per-token metrics of the policy (entropy, logits/chosen, logits/rejected, "
            "mean_token_accuracy), computed in the fused head's pass over the vocabulary. Off: those four are not "
            "logged and the head's forward skips their statistics (1.25-1.3x its cost on CPU, "
            "benchmarks/results/token-stats-cpu.json); num_tokens and the reward metrics are logged either way.",
        },
    )

    # --- TRL DPOConfig fields (trainer side) ---
    tokenization: str = field(
        default="separate",
        metadata={
            "help": "How the prompt/response boundary is tokenised. 'separate' (default): prompt and each response "
            "are tokenised on their own, so the response tokens are those a model generates after the prompt's "
            "tokens at inference (where the prompt is tokenised alone) and do not depend on the prompt (which the "
            "system-prompt weight method P relies on). 'joint': TRL's convention, prompt + response tokenised "
            "together and split where the prompt's own tokens and those of prompt + response diverge (TRL >= 1.16); "
            "a BPE merge across the boundary then yields a response token that starts inside the prompt (the "
            "prompt loses its last tokens, the response keeps all its text). Weight estimation "
            "(`tisdpo estimate-weights --tokenization`) must use the same mode as training.",
            "choices": list(TOKENIZATION_MODES),
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "Pad each batch's sequence length (padded layout) or total length (packed) to a multiple."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models and tokenizers loaded by name to run code from their repository."},
    )
    activation_offloading: bool = field(
        default=False,
        metadata={
            "help": "Move the activations the policy's forward saves for the backward off the compute device "
            "(`tisdpo.offload`): to pinned host memory from an accelerator, to a spill file from CPU."
        },
    )
    router_aux_loss_coef: float = field(
        default=0.001,
        metadata={
            "help": "Weight of a Mixture-of-Experts model's load-balancing auxiliary loss added to the training loss "
            "(TRL's default; no effect on models without a router; 0 disables it)."
        },
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "TR-DPO: every `ref_model_sync_steps` steps set ref = alpha * policy + (1 - alpha) * ref "
            "(needs a separate reference model: not with PEFT or precompute_ref_log_probs)."
        },
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO's alpha, in [0, 1]."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO's tau: steps between syncs."})
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={"help": "Only 'reverse_kl' (standard DPO) is supported; other f-DPO divergences are rejected."},
    )
    f_alpha_divergence_coef: float = field(
        default=0.5, metadata={"help": "Unused (f_divergence_type='alpha_divergence' is not supported)."}
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Deprecated (as in TRL): set `tokenizer.pad_token` and pass the tokenizer instead."},
    )
    generate_during_eval: bool = field(
        default=False, metadata={"help": "Not supported (removed in TRL); True is rejected."}
    )

    if not _HAS_ACTIVATION_CHECKPOINTING:  # transformers < 5.x: `gradient_checkpointing` is a plain bool
        gradient_checkpointing: bool = field(
            default=True, metadata={"help": "Recompute activations in the backward pass to save memory."}
        )
        activation_checkpointing: bool | None = field(
            default=None, metadata={"help": "The newer name of `gradient_checkpointing` (wins when set)."}
        )

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if self.rpo_alpha is not None:
            warnings.warn(
                "`rpo_alpha` is deprecated (as in TRL). It is equivalent to including 'sft' in `loss_type`; add 'sft' "
                "to `loss_type` and set its weight in `loss_weights` to `rpo_alpha`.",
                FutureWarning,
                stacklevel=3,
            )
        if _HAS_ACTIVATION_CHECKPOINTING:
            # TRL scripts say `gradient_checkpointing*`: pass it on under the name this transformers wants, so that
            # neither the old name nor our default triggers its deprecation warning
            for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                             ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
                if getattr(self, new) is None and getattr(self, old) is not None:
                    setattr(self, new, getattr(self, old))
                setattr(self, old, None)
            if self.activation_checkpointing is None:
                self.activation_checkpointing = True
        elif self.activation_checkpointing is not None:
            self.gradient_checkpointing = self.activation_checkpointing
        if self.bf16 is None:
            on_cuda = not self.use_cpu and torch.cuda.is_available()
            self.bf16 = on_cuda and torch.cuda.is_bf16_supported() and not self.fp16
            self._bf16_off_on_cpu = not on_cuda and not self.fp16  # TRL would turn it on here
        if self.pad_token is not None:
            warnings.warn(
                "`pad_token` is deprecated (TRL 1.1) and will be removed: set `tokenizer.pad_token` and pass the "
                "tokenizer as `processing_class` instead.",
                FutureWarning,
                stacklevel=3,
            )
        super().__post_init__()
        for name in ("model_init_kwargs", "ref_model_init_kwargs", "weight_transform_kwargs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"`{name}` must be a dict or a JSON object string, got {value!r}")
        self._validate()
        self._validate_trl_fields()

    def _validate_trl_fields(self) -> None:
        """The TRL `DPOConfig` fields of the trainer side: supported values, or a message saying what to use."""
        if self.tokenization not in TOKENIZATION_MODES:
            raise ValueError(f"`tokenization` must be one of {TOKENIZATION_MODES}, got {self.tokenization!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"`pad_to_multiple_of` must be None or >= 1, got {self.pad_to_multiple_of}")
        if not (math.isfinite(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0):
            raise ValueError(f"`router_aux_loss_coef` must be a finite number >= 0, got {self.router_aux_loss_coef}")
        divergence = getattr(self.f_divergence_type, "value", self.f_divergence_type)  # TRL once used an Enum
        if divergence != "reverse_kl":
            raise ValueError(
                f"`f_divergence_type={divergence!r}` is not supported: TISDPOTrainer implements the standard "
                "reverse-KL DPO objective only; use f_divergence_type='reverse_kl' (the default)"
            )
        self.f_divergence_type = divergence
        if self.generate_during_eval:
            raise ValueError(
                "`generate_during_eval=True` is not supported (TRL removed it too): the trainer never builds logits. "
                "To log samples, add a `transformers.TrainerCallback` whose `on_evaluate` calls `model.generate` on a "
                "few prompts."
            )
        if self.sync_ref_model:
            if self.precompute_ref_log_probs:
                raise ValueError(
                    "`sync_ref_model=True` updates the reference model during training, so its log-probs cannot be "
                    "precomputed: set `precompute_ref_log_probs=False`"
                )
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"`ref_model_mixup_alpha` must lie in [0, 1], got {self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"`ref_model_sync_steps` must be >= 1, got {self.ref_model_sync_steps}")

    def _validate(self) -> None:
        if self.kl is not None and self.kl not in KL_VARIANTS:
            raise ValueError(f"`kl` must be None or one of {KL_VARIANTS}, got {self.kl!r}")
        self._validate_loss()
        if self.kl is not None and self.sft_only:
            raise ValueError("`kl` cannot be combined with loss_type='sft' (SFT has no reference model)")
        if self.kl is not None and self.precompute_ref_log_probs:
            raise ValueError(
                f"`kl={self.kl!r}` needs the reference model's full distribution on the fly; it cannot be combined "
                "with `precompute_ref_log_probs=True`"
            )
        if self.prefix_sharing and self.sft_only:
            raise ValueError("`prefix_sharing=True` needs chosen and rejected responses; loss_type='sft' uses only the "
                             "chosen ones")
        # raises a ValueError naming weight_transform / transform_kwargs on an unknown name or key
        if self.weight_transform not in WEIGHT_TRANSFORMS:
            raise ValueError(f"`weight_transform` must be one of {WEIGHT_TRANSFORMS}, got {self.weight_transform!r}")
        response_transform_params(self.weight_transform, self.weight_transform_kwargs)
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"`truncation_mode` must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        if self.loss_backend not in LOSS_BACKENDS:
            raise ValueError(f"`loss_backend` must be one of {LOSS_BACKENDS}, got {self.loss_backend!r}")
        if not self.beta > 0:
            raise ValueError(f"`beta` must be > 0, got {self.beta}")
        for name in ("beta", "learning_rate"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"`{name}` must be a finite number, got {getattr(self, name)}")
        if not self.learning_rate >= 0:
            raise ValueError(f"`learning_rate` must be >= 0, got {self.learning_rate}")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be None or >= 1, got {value}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"`max_length` must be >= 2 (one prompt and one response token), got {self.max_length}")
        for name in ("precompute_ref_batch_size", "loss_chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")

    def _validate_loss(self) -> None:
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"`label_smoothing` must lie in [0, 0.5), got {self.label_smoothing}")
        # raises a ValueError naming loss_type / loss_weights / label_smoothing / discopop_tau on a bad value; the
        # smoothing goes on where a loss type reads it ('exo_pair' needs one > 0), elsewhere it only warns (below)
        smoothed = any(name in SMOOTHED_LOSS_TYPES for name in self.loss_type)
        loss_terms(self.loss_type, self.loss_weights, label_smoothing=self.label_smoothing if smoothed else 0.0,
                   discopop_tau=self.discopop_tau)
        if self.rpo_alpha is not None and "sft" in self.loss_type:
            raise ValueError("`rpo_alpha` is the deprecated form of an 'sft' term, and `loss_type` already has one; "
                             "set the 'sft' weight in `loss_weights` instead")
        check_ld_alpha(self.ld_alpha)
        kwargs = self.pair_loss_kwargs()
        if self.label_smoothing and not kwargs["label_smoothing"]:
            warnings.warn(
                f"`label_smoothing={self.label_smoothing}` has no effect with loss_type={self.loss_type} (as in TRL; "
                f"it is read by {list(SMOOTHED_LOSS_TYPES)}). For conservative DPO (label smoothing on the sigmoid "
                "loss, its meaning in tisdpo before) use loss_type='cdpo'.",
                UserWarning,
                stacklevel=5,
            )
        if self.use_weighting and self.sft_only:
            raise ValueError("`use_weighting` (WPO) weights preference pairs; loss_type='sft' alone has none")
        loss_terms(kwargs["loss_type"], kwargs["loss_weights"], label_smoothing=kwargs["label_smoothing"],
                   discopop_tau=self.discopop_tau, kl=self.kl, use_weighting=self.use_weighting)

    def loss_terms(self) -> tuple[tuple[str, float], ...]:
        """`((loss type, weight), ...)` of the objective: `loss_type` with `loss_weights` (1 each by default), plus
        `("sft", rpo_alpha)` for the deprecated `rpo_alpha`."""
        weights = self.loss_weights if self.loss_weights is not None else [1.0] * len(self.loss_type)
        terms = [(name, float(w)) for name, w in zip(self.loss_type, weights, strict=True)]
        if self.rpo_alpha is not None:
            terms.append(("sft", float(self.rpo_alpha)))
        return tuple(terms)

    @property
    def sft_only(self) -> bool:
        """True when every loss term is 'sft': SFT on the chosen responses, trained without a reference model."""
        return all(name == "sft" for name, _ in self.loss_terms())

    def pair_loss_kwargs(self) -> dict[str, Any]:
        """The loss options of `tisdpo_kernels.fused_tis_dpo_loss` (`loss_type`, `loss_weights`, `label_smoothing`,
        `discopop_tau`, `ld_alpha`, `use_weighting`); `label_smoothing` is 0 when no loss type reads it."""
        terms = self.loss_terms()
        names = [name for name, _ in terms]
        smoothed = any(name in SMOOTHED_LOSS_TYPES for name in names)
        return dict(loss_type=names, loss_weights=[w for _, w in terms],
                    label_smoothing=self.label_smoothing if smoothed else 0.0, discopop_tau=self.discopop_tau,
                    ld_alpha=self.ld_alpha, use_weighting=self.use_weighting)

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
