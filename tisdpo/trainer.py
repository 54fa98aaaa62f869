"""`TISDPOTrainer`: TIS-DPO / DPO / TDPO / SFT training on `transformers.Trainer`.

One step: the collator lays out the B chosen and B rejected sequences (padded `[2B, T]` or packed `[1, N]`), the
model runs with its LM head applied to zero positions (`logits_to_keep` = an empty index, so no logits exist)
while a forward hook on the decoder body keeps the last hidden states, and
`tisdpo_kernels.fused_tis_dpo_loss(hidden, lm_head.weight, labels, ...)` turns the response rows into the loss
and its metrics without materialising `[tokens, vocab]` logits. The decoder call goes through the wrapped model
(DDP, FSDP2, DeepSpeed as prepared by accelerate) and the loss gets the whole head weight from
`tisdpo.distributed.head_forward` (a ZeRO-3 gather through the head module's forward, an FSDP2 unshard of the
head's group), with the engine reducing its gradient as for any layer. That route (hidden states, then the head's
call) is `tisdpo.modeling`'s, shared with the weight estimator (`docs/design.md §6`).

Reference log-probs come from (in this order of precedence): precomputed per-token values cached on disk
(`precompute_ref_log_probs=True`), an explicit frozen `ref_model`, the PEFT base model with its adapter disabled,
or a frozen copy of the initial policy, built lazily (when first needed, at the latest when `train()` starts) so that
no second model sits in memory before then. `loss_type="sft"` needs none.

TRL `DPOTrainer` compatibility: the constructor takes TRL's arguments (`data_collator`, `compute_metrics`,
`optimizers`, `quantization_config`, `peft_config`) with their meaning, `train_dataset` may be a
`datasets.IterableDataset` (with `max_steps`), and `TISDPOConfig` carries TRL's `DPOConfig` fields (see
`tisdpo.config`). `save_model` writes a model card (`README.md`, `tisdpo.model_card`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import time
from collections import defaultdict
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import PartialState
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, Trainer, TrainingArguments, set_seed

from tisdpo_kernels import fused_tis_dpo_loss
from tisdpo_kernels.loss import TOKEN_STAT_COUNTS
from tisdpo_kernels.transforms import apply_weight_transform

from .config import TISDPOConfig
from .data import IGNORE_INDEX, PreferenceCollator, prepare_preference_dataset, split_responses
from .distributed import context_parallel_group, context_parallel_loss, full_frozen, head_forward, prepare_reference
from .formats import (
    CHOSEN_IDS,
    CHOSEN_WEIGHTS,
    PROMPT_IDS,
    REF_CHOSEN_LOGPS,
    REF_REJECTED_LOGPS,
    REJECTED_IDS,
    TOKENIZED_COLUMNS,
)
from .model_card import write_model_card
from .modeling import (
    EFFICIENT_PACKING_ATTENTION,
    PACKING_ATTENTION,
    attn_implementation,
    check_architecture,
    dataset_fingerprint,
    decoder_hidden_states,
    is_peft_model,
    label_logprobs_fn,
    lm_head,
    model_fingerprint,
    packing_supported,
    token_logps,
)
from .offload import offload_activations
from .prefix import PREFIX_PARTS, PROMPT, PrefixSharedCollator, check_attention
from .pretrained import load_pretrained_model, load_tokenizer
from .response_weights import PER_RESPONSE_TRANSFORMS, transform_token_weights, warn_if_weightless
from .run_safety import PreemptionCallback, resolve_resume_from_checkpoint, save_complete_checkpoint
from .trl_compat import SyncRefModelCallback, TRLFeatureAliases, check_syncable, normalize_batch

logger = logging.getLogger(__name__)

_REF_CACHE_VERSION = "tisdpo-ref-logps-v1"


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _apply_liger_patches(model: nn.Module) -> None:
    """Liger-Kernel's RMSNorm, SwiGLU and RoPE kernels for supported architectures (CUDA only; never its losses)."""
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError:
        logger.warning("liger_model_patches=True but liger-kernel is not installed; running the stock modules.")
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        logger.info("Liger-Kernel has no patches for model type %r; running the stock modules.", model_type)
        return
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


def _local_cu_seqlens(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Row boundaries of this rank's slice of a padded batch under context parallelism (the Trainer shards
    input_ids, attention_mask and labels along the sequence); packed batches cannot be split that way."""
    if inputs["labels"].shape[0] == 1:  # packed [1, N]; a padded batch has 2B >= 2 rows
        raise ValueError("context parallelism needs padded batches: set padding_free=False")
    if "row_index" in inputs:
        raise ValueError("context parallelism with prefix_sharing is not supported: set prefix_sharing=False")
    for key in ("token_weights", "ref_logps"):
        if key in inputs and inputs[key].shape != inputs["labels"].shape:
            raise ValueError(
                f"context parallelism: the Trainer splits input_ids, attention_mask and labels along the sequence "
                f"but not `{key}` ({tuple(inputs[key].shape)} vs labels {tuple(inputs['labels'].shape)}); run it "
                "without weight columns and with an on-the-fly reference (precompute_ref_log_probs=False)"
            )
    rows, width = inputs["labels"].shape
    return torch.arange(rows + 1, dtype=torch.int32, device=inputs["labels"].device) * width


def _trl_token_count(inputs: dict[str, torch.Tensor], tokens):
    """The batch's tokens as TRL's `DPOTrainer` counts them for `num_tokens` (`attention_mask.sum()` of its
    `[2B, T]` layout), from `tokens`, those the decoder ran: every token of the 2B sequences, prompts included,
    padding not; a prompt shared by a pair (`prefix_sharing`) ran once but counts twice, once per sequence."""
    if PREFIX_PARTS in inputs:
        return tokens + (inputs[PREFIX_PARTS] == PROMPT).sum()
    return tokens


def _resolve_prefix_sharing(args: TISDPOConfig, model: nn.Module, ref_model: nn.Module | None) -> bool:
    """`args.prefix_sharing` resolved (None: on with flex_attention, where the block mask makes it pay), checked
    against the attention implementations of both models; logs which attention path runs."""
    attn = attn_implementation(model)
    enabled = args.prefix_sharing if args.prefix_sharing is not None else (
        attn == "flex_attention" and not args.sft_only)
    if not enabled:
        return False
    how = check_attention(attn, "model")
    if ref_model is not None:
        check_attention(attn_implementation(ref_model), "ref_model")
    logger.info("Prefix sharing: one [prompt | chosen | rejected] row per pair, the prompt run once; attention: %s.",
                how)
    return True


def _chosen_half(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The chosen sequences of a collated batch (the first B of 2B), in the same layout."""
    cu = inputs["cu_seqlens"]
    pairs = (cu.numel() - 1) // 2
    if "position_ids" in inputs:  # packed: the chosen sequences are the first cu[B] tokens
        end = int(cu[pairs])
        chosen = {k: inputs[k][:, :end] for k in ("input_ids", "position_ids", "labels")}
    else:
        chosen = {k: inputs[k][:pairs] for k in ("input_ids", "attention_mask", "labels")}
    chosen["cu_seqlens"] = cu[: pairs + 1]
    return chosen


def _tokenize(dataset: datasets.Dataset, name: str, tokenizer, args: TISDPOConfig) -> datasets.Dataset:
    """Tokenised `dataset`; a per-response `weight_transform` turns its weight columns into final weights here."""
    if isinstance(dataset, datasets.IterableDataset) and args.precompute_ref_log_probs and not args.sft_only:
        raise ValueError(
            f"`precompute_ref_log_probs=True` needs a map-style `{name}_dataset` (a datasets.Dataset); an "
            "IterableDataset is read once, lazily. Set precompute_ref_log_probs=False."
        )
    tokenized = prepare_preference_dataset(
        dataset,
        tokenizer,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
        truncation_mode=args.truncation_mode,
        reverse_preferences=args.reverse_preferences,
        num_proc=args.dataset_num_proc,
        name=name,
        tokenization=args.tokenization,
    )
    if args.weight_transform in PER_RESPONSE_TRANSFORMS and CHOSEN_WEIGHTS in tokenized.column_names:
        tokenized = transform_token_weights(tokenized, args.weight_transform, args.weight_transform_kwargs,
                                            num_proc=args.dataset_num_proc)
    warn_if_weightless(tokenized, name, args.weight_transform, args.weight_transform_kwargs)
    return tokenized


def _is_moe(model: nn.Module) -> bool:
    """A Mixture-of-Experts model whose forward can return a load-balancing `aux_loss` (`output_router_logits`)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "output_router_logits", None) is not None


def _trl_differences(args: TISDPOConfig, model_id: str | None) -> list[str]:
    """The choices of this run that differ from TRL's DPOTrainer on purpose (logged once at construction)."""
    notes = []
    if args.tokenization == "separate":
        notes.append("tokenization='separate' (prompt and responses tokenised on their own, the tokens a model sees at "
                     "inference; TRL tokenises them jointly: set tokenization='joint' to reproduce a TRL run)")
    if getattr(args, "_bf16_off_on_cpu", False):
        notes.append("bf16=False on CPU (TRL: True; bfloat16 autocast is slower on most CPUs)")
    if model_id is not None and "dtype" not in (args.model_init_kwargs or {}) and "torch_dtype" not in (
            args.model_init_kwargs or {}):
        dtype = args.resolved_model_init_kwargs("model")["dtype"]
        notes.append(f"`{model_id}` loaded in {str(dtype).removeprefix('torch.')} (TRL: float32 everywhere)")
    return notes


def _map_datasets(dataset, name: str, func):
    """Apply `func(dataset, name)` to a dataset, to each value of a dict of datasets (`eval[key]`), or pass None."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {key: func(ds, f"{name}[{key}]") for key, ds in dataset.items()}
    return func(dataset, name)


class TISDPOTrainer(Trainer):
    """Preference optimisation (TIS-DPO, DPO, IPO, hinge, TDPO) and SFT with the fused, logits-free loss.

    The arguments are TRL `DPOTrainer`'s, in its order, with the same meaning.

    Args:
        model: a `PreTrainedModel` with an output embedding (LM head), or a hub name / local path (a `.gguf` file
            included, dequantized on load) loaded with `args.model_init_kwargs` (bfloat16 on a CUDA device with bf16
            support unless a dtype is given).
        ref_model: the frozen reference model (or its name/path); default: a frozen copy of the initial `model`
            (reloaded from its name/path if it was given as one), built when first needed; or, with PEFT, the
            base model with the adapter disabled. Unused with `loss_type="sft"`.
        args: `TISDPOConfig`.
        data_collator: turns a list of tokenised rows into a batch; default `PreferenceCollator`. Each row has our
            columns (`prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`, weight and reference columns)
            and TRL's `prompt_ids` / `chosen_ids` / `rejected_ids`. The batch is either ours (`PreferenceCollator`'s
            layout) or TRL's (`input_ids`, `attention_mask`, `completion_mask`, `[2B, T]`, chosen rows first).
        train_dataset / eval_dataset: `datasets.Dataset` or `datasets.IterableDataset` (streaming, tokenised on
            the fly; needs `max_steps`) in a TRL preference format (see `tisdpo.data`), optionally with
            `chosen_weights` / `rejected_weights` columns, or already tokenised (ours or TRL's columns);
            `eval_dataset` may be a dict of them.
        processing_class: the tokenizer; default the model's own (`tisdpo.pretrained.load_tokenizer`).
        compute_metrics: `EvalPrediction -> dict` called after evaluation. The fused head builds no logits, so
            what it gets is, per evaluation batch, the batch's metrics: `predictions` is a dict of float arrays
            `[batches]` (`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`,
            `logps/chosen`, `logps/rejected`, ..., each the mean over the batch's pairs; `entropy`, `logits/chosen`,
            `logits/rejected`, `mean_token_accuracy`, each the mean over the batch's response tokens counted in
            `tokens/chosen`, `tokens/rejected`) and `label_ids` an int array `[batches]` of the batch's pair counts
            (to weight the means).
        callbacks: extra `TrainerCallback`s.
        optimizers: `(optimizer, lr_scheduler)`, either may be None (then built from `args`), as in `Trainer`.
        quantization_config: e.g. a `BitsAndBytesConfig`, used when `model` (and a reference model loaded by name)
            is given as a name/path; with `peft_config` this is QLoRA. An error with an instantiated model.
        peft_config: a `peft.PeftConfig` to wrap `model` with (needs `peft`); its adapter is initialised after
            `set_seed(args.seed)`, so two builds with the same seed start from the same adapter.
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: str | PreTrainedModel | None = None,
        args: TISDPOConfig | None = None,
        data_collator=None,
        train_dataset: datasets.Dataset | datasets.IterableDataset | None = None,
        eval_dataset: datasets.Dataset | datasets.IterableDataset | dict | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = TISDPOConfig(output_dir=f"{os.path.basename(str(name).rstrip('/')) or 'model'}-TISDPO")
        elif not isinstance(args, TISDPOConfig):
            if isinstance(args, TrainingArguments):
                raise TypeError("`args` must be a TISDPOConfig (a TrainingArguments subclass), got TrainingArguments")
            raise TypeError(f"`args` must be a TISDPOConfig, got {type(args).__name__}")

        model_id = model if isinstance(model, str) else None
        init_kwargs = args.resolved_model_init_kwargs("model")
        init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        if quantization_config is not None:
            if model_id is None:
                raise ValueError(
                    "`quantization_config` applies when the model is loaded from a name or path; `model` is already "
                    "instantiated: pass its name/path, or quantize it yourself and omit `quantization_config`"
                )
            if "quantization_config" in init_kwargs:
                raise ValueError("`quantization_config` is given both as an argument and in `args.model_init_kwargs`")
            init_kwargs["quantization_config"] = quantization_config
        if isinstance(model, str):
            model = load_pretrained_model(model, **init_kwargs)
        elif not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a model name/path or a PreTrainedModel, got {type(model).__name__}")
        elif args.model_init_kwargs:
            logger.warning("`model_init_kwargs` is ignored: `model` is already instantiated.")
        if processing_class is None:
            processing_class = load_tokenizer(model_id or model.config._name_or_path,
                                              trust_remote_code=args.trust_remote_code)
        if args.pad_token is not None:  # TRL's deprecated field (the config warned): its meaning, the pad token
            if args.pad_token not in processing_class.get_vocab():
                raise ValueError(f"`pad_token` {args.pad_token!r} is not in the tokenizer's vocabulary")
            processing_class.pad_token = args.pad_token
        if getattr(processing_class, "pad_token_id", None) is None:
            if processing_class.eos_token_id is None:
                raise ValueError("`processing_class` has neither a pad nor an EOS token to pad with")
            processing_class.pad_token = processing_class.eos_token

        if peft_config is not None:
            try:
                from peft import get_peft_model
            except ImportError as err:
                raise ImportError("`peft_config` needs the `peft` package (pip install peft)") from err
            set_seed(args.seed)  # the adapter's initialisation depends on args.seed only, as in TRL
            model = get_peft_model(model, peft_config)
        check_architecture(model, "model")

        needs_ref = not args.sft_only
        if isinstance(ref_model, str):
            ref_kwargs = args.resolved_model_init_kwargs("ref_model")
            ref_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            ref_model = load_pretrained_model(ref_model, **ref_kwargs)
        if not needs_ref and ref_model is not None:
            raise ValueError("loss_type='sft' uses no reference model; do not pass `ref_model`")
        if args.sync_ref_model and is_peft_model(model):
            raise ValueError(
                "`sync_ref_model=True` is not supported with PEFT: the reference is the base model with the adapter "
                "disabled, there is no separate reference model to update. Set sync_ref_model=False."
            )
        # the frozen copy of the initial policy, when one is needed: built lazily (`_ensure_ref_model`)
        self._build_ref = None
        if needs_ref and ref_model is None and not is_peft_model(model) and not args.precompute_ref_log_probs:
            self._build_ref = self._ref_builder(model, model_id, init_kwargs)
        if ref_model is not None:
            self._setup_ref_model(ref_model, model)

        for m in (model, ref_model):
            if m is not None:
                self._prepare_module(m, args)

        attn = attn_implementation(model)
        if args.padding_free and not packing_supported(attn):
            raise ValueError(
                f"padding_free=True needs an attention implementation that handles packed position_ids exactly "
                f"({PACKING_ATTENTION}); the model uses {attn!r}"
            )
        self.padding_free = args.padding_free if args.padding_free is not None else attn in EFFICIENT_PACKING_ATTENTION
        self.prefix_sharing = _resolve_prefix_sharing(args, model, ref_model)

        def tokenize(dataset, name):
            return _tokenize(dataset, name, processing_class, args)

        with PartialState().main_process_first():
            train_dataset = _map_datasets(train_dataset, "train", tokenize)
            eval_dataset = _map_datasets(eval_dataset, "eval", tokenize)

        if isinstance(train_dataset, datasets.IterableDataset) and args.accelerator_config.dispatch_batches:
            logger.warning("An IterableDataset is read by every process: `dispatch_batches` is set to False.")
        if isinstance(train_dataset, datasets.IterableDataset):
            args.accelerator_config.dispatch_batches = False
        if self.prefix_sharing:
            if args.pad_to_multiple_of is not None:
                raise ValueError("`pad_to_multiple_of` is not supported with prefix sharing; set it to None")
            self._preference_collator = PrefixSharedCollator(pad_token_id=processing_class.pad_token_id,
                                                             padding_free=self.padding_free)
        else:
            self._preference_collator = PreferenceCollator(pad_token_id=processing_class.pad_token_id,
                                                           padding_free=self.padding_free,
                                                           pad_to_multiple_of=args.pad_to_multiple_of)
        collator = self._preference_collator if data_collator is None else TRLFeatureAliases(data_collator)
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # the loss is a mean over pairs; the Trainer must not rescale it by a token count
        self.model_accepts_loss_kwargs = False
        self.ref_model = None
        if ref_model is not None and not args.precompute_ref_log_probs:
            self.ref_model = prepare_reference(self.accelerator, ref_model)
        self._aux_loss_enabled = _is_moe(model) and args.router_aux_loss_coef != 0.0
        self._model_id = model_id or getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if args.sync_ref_model and needs_ref:
            self.add_callback(SyncRefModelCallback(
                lambda: self.accelerator.unwrap_model(self.model),
                lambda: self.accelerator.unwrap_model(self._ensure_ref_model()),
                args.ref_model_mixup_alpha, args.ref_model_sync_steps,
            ))
        self.preemption = PreemptionCallback()  # SIGTERM/SIGINT: checkpoint at the next step boundary, stop
        self.add_callback(self.preemption)
        differences = _trl_differences(args, model_id)
        if differences:
            logger.warning("Choices that differ from TRL's DPOTrainer: %s.", "; ".join(differences))

        self._metrics: dict[str, defaultdict[str, list[float]]] = {m: defaultdict(list) for m in ("train", "eval")}
        self._total_train_tokens = 0  # TRL's `num_tokens`: this run's training tokens, all processes
        self._tokens_since_log = 0.0
        self._last_log_time = time.perf_counter()
        self._announced_objective = False
        self._announced_weighted: bool | None = None
        if args.precompute_ref_log_probs and needs_ref:
            source = self._precompute_source(ref_model, model)

            def add_ref(ds, name):
                return self._with_ref_logps(ds, source, name)

            self.train_dataset = _map_datasets(self.train_dataset, "train", add_ref)
            self.eval_dataset = _map_datasets(self.eval_dataset, "eval", add_ref)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, with the `tokens_per_second` clock started here rather than at construction, and the lazy
        reference model built first (before a checkpoint to resume from replaces the policy's weights). SIGTERM or
        SIGINT during it saves a checkpoint at the next step boundary and stops (`self.preemption.signal_name`).
        `resume_from_checkpoint=True` takes the newest complete checkpoint of `output_dir`, skipping (with a log
        line) interrupted or damaged ones; a path must be a complete checkpoint (`tisdpo.run_safety`)."""
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            resume_from_checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        self._ensure_ref_model()
        self._tokens_since_log, self._last_log_time = 0.0, time.perf_counter()
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.preemption.uninstall()

    # ------------------------------------------------------------------------------------------------------------
    # reference model
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _prepare_module(module: nn.Module, args: TISDPOConfig) -> None:
        if args.disable_dropout:
            _disable_dropout(module)
        if args.liger_model_patches and torch.cuda.is_available() and not args.use_cpu:
            _apply_liger_patches(module)

    @staticmethod
    def _setup_ref_model(ref_model: nn.Module, model: nn.Module) -> None:
        check_architecture(ref_model, "ref_model")
        ref_model.requires_grad_(False).eval()
        if ref_model.get_output_embeddings().weight.shape[0] != model.get_output_embeddings().weight.shape[0]:
            raise ValueError("`ref_model` and `model` have LM heads of different vocabulary sizes")

    def _ref_builder(self, model: nn.Module, model_id: str | None, init_kwargs: dict[str, Any]):
        """A function building the frozen reference: `model_id` reloaded (TRL's way: also right for a quantized
        model), else a deep copy of `model`, refused if its weights changed since construction."""
        if model_id is not None:
            def reload_checkpoint():
                """the policy's checkpoint loaded again"""
                return load_pretrained_model(model_id, **init_kwargs)

            return reload_checkpoint
        initial = model_fingerprint(model, include_config=False)

        def copy_initial_policy():
            """a frozen copy of the initial policy, its weights checked unchanged since TISDPOTrainer(...)"""
            policy = self.accelerator.unwrap_model(self.model)
            if model_fingerprint(policy, include_config=False) != initial:
                raise RuntimeError(
                    "the policy's weights changed between TISDPOTrainer(...) and the first step needing the reference "
                    "model, which is built lazily as a copy of the initial policy; pass `ref_model=` explicitly"
                )
            return copy.deepcopy(policy)

        return copy_initial_policy

    def _ensure_ref_model(self) -> nn.Module | None:
        """The reference model, built now if it is the lazy copy of the initial policy and not built yet."""
        if self.ref_model is None and self._build_ref is not None:
            policy = self.accelerator.unwrap_model(self.model)
            count = sum(p.numel() for p in policy.parameters())
            logger.info("Building the reference model (%.1fM parameters): %s, once, before the first step.",
                        count / 1e6, self._build_ref.__doc__)
            start = time.perf_counter()
            ref_model = self._build_ref()
            logger.info("Reference model built in %.1f s.", time.perf_counter() - start)
            self._build_ref = None
            self._setup_ref_model(ref_model, self.accelerator.unwrap_model(self.model))
            self._prepare_module(ref_model, self.args)
            if self.args.sync_ref_model:
                check_syncable(self.accelerator.unwrap_model(self.model), ref_model)
            self.ref_model = prepare_reference(self.accelerator, ref_model)
        return self.ref_model

    # ------------------------------------------------------------------------------------------------------------
    # columns
    # ------------------------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        # the collator reads the tokenised columns, not the model's forward arguments
        if self._signature_columns is None:
            self._signature_columns = list(TOKENIZED_COLUMNS)

    # ------------------------------------------------------------------------------------------------------------
    # forward passes
    # ------------------------------------------------------------------------------------------------------------

    def _hidden_states(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                       router_aux: bool = False) -> torch.Tensor:
        """Last hidden states `[rows, T, D]` of `model` (possibly wrapped), with the LM head applied to no position
        (`tisdpo.modeling.decoder_hidden_states`). `router_aux`: also keep the model's MoE load-balancing loss in
        `self._aux_loss`."""
        hidden, aux_loss = decoder_hidden_states(model, inputs, self.accelerator.unwrap_model(model), router_aux)
        if router_aux:
            self._aux_loss = aux_loss
        return hidden

    def _ref_hidden_states(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, nn.Module]:
        """Reference hidden states and the reference LM head, without grad."""
        self._ensure_ref_model()
        with torch.no_grad():
            if self.ref_model is not None:
                head = lm_head(self.accelerator.unwrap_model(self.ref_model))
                return self._hidden_states(self.ref_model, inputs), head
            policy = self.accelerator.unwrap_model(self.model)
            if not is_peft_model(policy):
                raise ValueError(
                    "this batch has no reference log-probs and the trainer has no reference model (data prepared "
                    "without precompute_ref_log_probs?)"
                )
            with policy.disable_adapter():
                return self._hidden_states(policy, inputs), lm_head(policy)

    # ------------------------------------------------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Scalar loss of one micro-batch (mean over its pairs); stores the metrics for `log`. With
        `activation_offloading`, the activations saved for the backward leave the device (`tisdpo.offload`); with an
        MoE model, `router_aux_loss_coef` times its load-balancing loss is added (metric `aux_loss`)."""
        mode = "train" if model.training else "eval"
        inputs = normalize_batch(inputs)
        offload = self.args.activation_offloading and model.training and torch.is_grad_enabled()
        self._aux_loss = None
        with offload_activations() if offload else contextlib.nullcontext():
            if self.args.sft_only:
                inputs = _chosen_half(inputs)
                loss, metrics = self._sft_loss(model, inputs)
            else:
                loss, metrics = self._preference_loss(model, inputs)
        if self._aux_loss is not None:
            metrics = dict(metrics, aux_loss=self._aux_loss.detach())
            loss = loss + self.args.router_aux_loss_coef * self._aux_loss.to(loss.dtype)
        tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
        self._store_metrics(metrics, mode, tokens, _trl_token_count(inputs, tokens))
        return (loss, metrics) if return_outputs else loss

    def _preference_loss(self, model, inputs):
        args = self.args
        if not self._announced_objective:
            weighted = "token_weights" in inputs
            logger.info(
                "Training objective: %s (loss_type=%s, kl=%s)%s.",
                "TIS-DPO with per-token weights" if weighted else "DPO (no chosen_weights/rejected_weights columns)",
                args.loss_type, args.kl, f", weight_transform={args.weight_transform}" if weighted else "",
            )
            self._announced_objective, self._announced_weighted = True, weighted
        hidden = self._hidden_states(model, inputs, router_aux=self._aux_loss_enabled)
        head = lm_head(self.accelerator.unwrap_model(model))
        dim = hidden.shape[-1]
        tensors: dict[str, Any] = {}
        if "ref_logps" in inputs:
            tensors["ref_logps"] = inputs["ref_logps"].reshape(-1)
        else:
            ref_hidden, ref_head = self._ref_hidden_states(inputs)
            # frozen: the whole (gathered) weight for this step, no hooks needed for its gradient; in the dtype its
            # hidden states have (FSDP2 mixed precision computes in bfloat16, the shards stay float32)
            ref_weight, ref_bias = (None if t is None else t.to(ref_hidden.dtype)
                                    for t in (full_frozen(ref_head.weight), full_frozen(ref_head.bias)))
            tensors.update(ref_hidden=ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight=ref_weight,
                           ref_bias=ref_bias)
        if "token_weights" in inputs:
            # the transform runs in the loss's compute precision (float64 for float64 models, float32 otherwise)
            compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            raw = inputs["token_weights"].reshape(-1).to(compute_dtype)
            if args.weight_transform in PER_RESPONSE_TRANSFORMS:  # applied to the columns at tokenisation
                tensors["token_weights"] = raw
            else:
                tensors["token_weights"] = apply_weight_transform(
                    raw, args.weight_transform, **(args.weight_transform_kwargs or {})
                )
        group = context_parallel_group(self.accelerator)
        cu_seqlens = inputs["cu_seqlens"]
        if group is not None:
            cu_seqlens = _local_cu_seqlens(inputs)

        def loss(weight, bias, rows):
            return fused_tis_dpo_loss(
                rows,
                weight,
                inputs["labels"].reshape(-1),
                bias=bias,
                cu_seqlens=cu_seqlens,
                row_index=inputs.get("row_index"),
                beta=args.beta,
                alpha=args.alpha,
                kl=args.kl,
                ignore_index=IGNORE_INDEX,
                backend=args.loss_backend,
                chunk_size=args.loss_chunk_size,
                group=group,
                token_stats=args.token_metrics,
                **args.pair_loss_kwargs(),
                **tensors,
            )

        value, metrics = head_forward(head, loss, hidden.reshape(-1, dim))
        if group is not None:  # the ranks' gradient shares are summed over the group, not averaged
            value = context_parallel_loss(value, group)
        return value, metrics

    def _sft_loss(self, model, chosen):
        """Negative log-likelihood of the chosen responses averaged over all their tokens (TRL's 'sft'), times the
        sum of the 'sft' weights."""
        if context_parallel_group(self.accelerator) is not None:  # each rank would average only its own tokens
            raise ValueError("loss_type='sft' alone under context parallelism is not supported (its token mean is "
                             "not summed over the cp group): add a preference loss type, or run without cp")
        cu = chosen["cu_seqlens"]
        pairs = cu.numel() - 1
        hidden = self._hidden_states(model, chosen, router_aux=self._aux_loss_enabled)
        head = lm_head(self.accelerator.unwrap_model(model))
        labels = chosen["labels"].reshape(-1)
        logps = head_forward(head, label_logprobs_fn(labels, self.args.loss_backend, self.args.loss_chunk_size),
                             hidden.reshape(-1, hidden.shape[-1]))
        lengths = (cu[1:] - cu[:-1]).to(device=logps.device, dtype=torch.long)
        seq_ids = torch.arange(pairs, device=logps.device).repeat_interleave(lengths)
        sums = torch.zeros(pairs, dtype=logps.dtype, device=logps.device).index_add(0, seq_ids, logps)
        nll = -sums.sum() / (labels != IGNORE_INDEX).sum()
        loss = sum(weight for _, weight in self.args.loss_terms()) * nll
        return loss, {"logps/chosen": sums.detach().mean(), "nll/chosen_per_token": nll.detach()}

    # ------------------------------------------------------------------------------------------------------------
    # evaluation and logging
    # ------------------------------------------------------------------------------------------------------------

    def get_eval_dataloader(self, eval_dataset=None):
        """As `Trainer.get_eval_dataloader`; an untokenised `eval_dataset` passed to `evaluate` is tokenised first."""
        if isinstance(eval_dataset, datasets.Dataset) and PROMPT_IDS not in eval_dataset.column_names:
            if self.args.precompute_ref_log_probs and not self.args.sft_only:
                raise ValueError(
                    "with precompute_ref_log_probs=True, pass evaluation data to TISDPOTrainer(eval_dataset=...): its "
                    "reference log-probs are computed at construction, before the policy changes"
                )
            with self.accelerator.main_process_first():
                eval_dataset = _tokenize(eval_dataset, "eval", self.processing_class, self.args)
        return super().get_eval_dataloader(eval_dataset)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss of an evaluation batch (metrics are stored for `log`); no logits are produced. Unless only the loss
        is asked for (no `compute_metrics`), also `(predictions, label_ids)` for `compute_metrics`: the batch's
        metrics (dict of `[1]` tensors) and its pair count (`[1]`); see the class docstring."""
        inputs = self._prepare_inputs(inputs)
        pairs = (normalize_batch(inputs)["cu_seqlens"].numel() - 1) // 2
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        predictions = {name: value.detach().float().reshape(1) for name, value in sorted(metrics.items())}
        return loss.detach(), predictions, torch.tensor([pairs], device=loss.device)

    def _store_metrics(self, metrics: dict[str, torch.Tensor], mode: str, tokens, trl_tokens) -> None:
        """One micro-batch's metrics, gathered over the processes: a per-pair metric as the mean of the
        processes' values, a per-token one (`TOKEN_STAT_COUNTS`) as TRL does, the sum of the processes' sums over
        the sum of their token counts (0 over none). `tokens`: the tokens the decoder ran (`tokens_per_second`);
        `trl_tokens`: the batch's tokens as TRL counts them, added up into `num_tokens` in training (the running
        total is logged in evaluation too, as TRL does)."""
        counts = {n: metrics[n] for n in ("tokens/chosen", "tokens/rejected") if n in metrics}
        names = sorted(n for n in metrics if n not in counts)
        device = self.accelerator.device
        values = torch.stack([metrics[n].detach().float().to(device) for n in names])
        weights = torch.stack([sum(counts[c] for c in TOKEN_STAT_COUNTS[n]).float().to(device)
                               if n in TOKEN_STAT_COUNTS and counts else torch.ones((), device=device)
                               for n in names])
        token_counts = torch.stack([torch.as_tensor(t, dtype=torch.float32, device=device).reshape(())
                                    for t in (tokens, trl_tokens)])
        local = torch.cat([values * weights, weights, token_counts])
        gathered = self.accelerator.gather(local.unsqueeze(0)).sum(0)  # [2 names + 2], summed over processes
        k = len(names)
        sums, totals = gathered[:k], gathered[k:2 * k]
        means = torch.where(totals > 0, sums / totals.clamp(min=1e-30), torch.zeros_like(sums)).tolist()
        for name, value in zip(names, means, strict=True):
            self._metrics[mode][name].append(value)
        if mode == "train":
            self._tokens_since_log += float(gathered[2 * k])
            self._total_train_tokens += int(gathered[2 * k + 1])
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the averaged step metrics (TRL's names; `eval_` prefixed in evaluation), `tokens_per_second` and,
        on CUDA, `memory/max_allocated_gb`."""
        mode = "train" if "loss" in logs else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            if values:
                logs[f"{prefix}{name}"] = sum(values) / len(values)
        self._metrics[mode].clear()
        if mode == "train":
            now = time.perf_counter()
            if self._tokens_since_log:
                logs["tokens_per_second"] = self._tokens_since_log / max(now - self._last_log_time, 1e-9)
            self._tokens_since_log, self._last_log_time = 0.0, now
            if torch.cuda.is_available() and self.accelerator.device.type == "cuda":
                logs["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------------------
    # saving
    # ------------------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus a model card `README.md` (tags, objective, citations) in `output_dir`. Under
        FSDP with a sharded state dict type, a save asked for by the user (not a checkpoint's) writes the whole
        model too (`_save_gathered_fsdp_model`)."""
        if not _internal_call and self._fsdp_saves_no_full_model():
            self._save_gathered_fsdp_model(output_dir or self.args.output_dir)
        else:
            super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.create_model_card_file(output_dir or self.args.output_dir)

    def _fsdp_saves_no_full_model(self) -> bool:
        """FSDP with `SHARDED_STATE_DICT` (the shipped config's), where `Trainer.save_model` writes no weights."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        return plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type)

    def _save_gathered_fsdp_model(self, output_dir: str) -> None:
        """The whole model, gathered from its FSDP shards (`accelerator.get_state_dict`: a collective, every rank
        calls it; the full tensors land on the CPU of the main process), written by the main process with
        `save_pretrained` so that `from_pretrained(output_dir)` loads it. Checkpoints stay sharded."""
        state_dict = self.accelerator.get_state_dict(self.model)
        self._save(output_dir, state_dict=state_dict)

    def _save_checkpoint(self, model, trial):
        if self.args.should_save:  # as TRL: the run's output_dir holds the card of the latest checkpoint
            self.create_model_card_file(self.args.output_dir)
        # complete only at the end (a marker), rotation after it, a full disk said in words
        save_complete_checkpoint(self, super()._save_checkpoint, model, trial)

    def create_model_card_file(self, output_dir: str) -> str:
        """Write this run's model card to `output_dir/README.md` (see `tisdpo.model_card`); returns its path."""
        args = self.args
        if args.sft_only:
            objective = "SFT"
        elif args.kl in ("tdpo1", "tdpo2"):
            objective = "TDPO"
        else:
            objective = "TIS-DPO" if self._announced_weighted else "DPO"
        return write_model_card(
            output_dir, base_model=self._model_id, objective=objective, loss_type=args.loss_type, beta=args.beta,
            kl=args.kl, weighted=self._announced_weighted, model_name=os.path.basename(os.path.normpath(output_dir)),
        )

    # ------------------------------------------------------------------------------------------------------------
    # precomputed reference log-probs
    # ------------------------------------------------------------------------------------------------------------

    def _ref_cache_path(self, dataset: datasets.Dataset, source: nn.Module) -> str:
        root = self.args.ref_logps_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "tisdpo", "ref_logps")
        source = self.accelerator.unwrap_model(source)  # a ZeRO-3 engine: the model's own names and config
        # a PEFT policy serves as reference with its adapter disabled: only its frozen base weights matter
        adapter_off = is_peft_model(source)
        key = hashlib.sha256(
            f"{_REF_CACHE_VERSION}|{dataset_fingerprint(dataset)}|{model_fingerprint(source, adapter_off)}|"
            f"adapter_disabled={adapter_off}".encode()
        ).hexdigest()[:32]
        return os.path.join(root, f"{key}.npz")

    def _zero3(self) -> bool:
        return self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def _precompute_source(self, ref_model: nn.Module | None, model: nn.Module) -> nn.Module:
        """The model that precomputes the reference log-probs: `ref_model` on the device, or the policy. Under
        DeepSpeed ZeRO-3 (parameters partitioned when the model is loaded) `ref_model` runs as a ZeRO-3 inference
        engine (`prepare_reference`); the policy's engine does not exist yet, so it cannot be the source."""
        if not self._zero3():
            return ref_model.to(self.accelerator.device) if ref_model is not None else model
        if ref_model is None:
            raise ValueError(
                "precompute_ref_log_probs=True under DeepSpeed ZeRO-3 needs an explicit `ref_model` "
                "(--ref_model_name_or_path): it runs as a ZeRO-3 inference engine; the policy's engine is built only "
                "when training starts. Pass the reference model, or set precompute_ref_log_probs=False."
            )
        return prepare_reference(self.accelerator, ref_model)

    def _with_ref_logps(self, dataset: datasets.Dataset, source: nn.Module, name: str) -> datasets.Dataset:
        """`dataset` with per-token reference log-prob columns, from the disk cache or computed (main process
        first; the others then read the cache). Under ZeRO-3 every forward is a collective: all processes compute
        together and the main process writes the cache."""
        with contextlib.nullcontext() if self._zero3() else self.accelerator.main_process_first():
            path = self._ref_cache_path(dataset, source)
            if os.path.exists(path):
                logger.info("Reusing cached reference log-probs for the %s set: %s", name, path)
                with np.load(path) as cached:
                    arrays = {k: cached[k] for k in cached.files}
            else:
                arrays = self._compute_ref_logps(dataset, source, name)
                if self.accelerator.is_main_process:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    tmp = f"{path}.{os.getpid()}.tmp.npz"
                    np.savez(tmp, **arrays)
                    os.replace(tmp, path)
                    logger.info("Cached reference log-probs for the %s set: %s", name, path)
        for column in (REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS):
            values, lengths = arrays[f"{column}.values"], arrays[f"{column}.lengths"]
            if len(lengths) != len(dataset):
                raise ValueError(f"reference cache {path} has {len(lengths)} rows, the {name} set {len(dataset)}")
            rows = np.split(values, np.cumsum(lengths)[:-1])
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
            dataset = dataset.add_column(column, [r.tolist() for r in rows])
        return dataset

    @torch.no_grad()
    def _compute_ref_logps(self, dataset: datasets.Dataset, source: nn.Module, name: str) -> dict[str, np.ndarray]:
        """Per-token reference log-probs of every chosen and rejected response: flat values + lengths per row."""
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        columns = [c for c in (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS) if c in dataset.column_names]
        loader = torch.utils.data.DataLoader(
            dataset.select_columns(columns), batch_size=batch_size, shuffle=False, collate_fn=self._preference_collator
        )
        device = self.accelerator.device
        was_training = source.training
        source.eval()
        adapter_off = source.disable_adapter() if is_peft_model(source) else contextlib.nullcontext()
        out: dict[str, list] = {c: [] for c in (REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS)}
        logger.info("Precomputing reference log-probs for %d %s pairs (%d per batch) on %s.", len(dataset), name,
                    batch_size, device)
        progress = tqdm(loader, desc=f"Reference log-probs ({name})", unit="batch",
                        disable=self.args.disable_tqdm or not self.accelerator.is_local_main_process)
        try:
            with adapter_off:
                for batch in progress:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    logps = token_logps(source, batch, self.args.loss_backend, self.args.loss_chunk_size,
                                        self.accelerator.unwrap_model(source))
                    sequences = split_responses(logps, batch["labels"], batch["cu_seqlens"])
                    pairs = len(sequences) // 2
                    for s, values in enumerate(sequences):
                        out[REF_CHOSEN_LOGPS if s < pairs else REF_REJECTED_LOGPS].append(values.numpy())
        finally:
            source.train(was_training)
        logger.info("Computed reference log-probs for %d %s pairs.", len(dataset), name)
        arrays = {}
        for column, rows in out.items():
            arrays[f"{column}.values"] = np.concatenate(rows).astype(np.float32)
            arrays[f"{column}.lengths"] = np.array([len(r) for r in rows], dtype=np.int64)
        return arrays


__all__ = ["TISDPOTrainer"]
