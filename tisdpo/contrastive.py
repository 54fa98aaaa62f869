"""Making the contrastive model pair ``pi_plus`` / ``pi_minus`` whose log-prob difference gives token weights.

TIS-DPO scores each response token by ``r_t = log pi_plus(y_t) - log pi_minus(y_t)`` (`docs/design.md §1.5`). Three
ways to get the pair; two need training, and both are runs of the ordinary trainer:

Method S (SFT on chosen vs SFT on rejected)::

    tisdpo train --config base.yaml --loss_type sft --output_dir out/plus
    tisdpo train --config base.yaml --loss_type sft --reverse_preferences true --output_dir out/minus

Method D (forward DPO vs reverse DPO; the paper's best)::

    tisdpo train --config base.yaml --loss_type sigmoid --output_dir out/plus
    tisdpo train --config base.yaml --loss_type sigmoid --reverse_preferences true --output_dir out/minus

(``reverse_preferences`` swaps chosen and rejected, so the second run learns to prefer the rejected
responses.) Method P needs no training: one model scores the responses under a "good" and a "bad"
system prompt (``tisdpo estimate-weights --method P``).

``tisdpo contrastive --method S|D`` runs both trainings of a method with the same base settings (any
``tisdpo train`` option or YAML field) and writes ``<output_dir>/plus`` and ``<output_dir>/minus``; then

    tisdpo estimate-weights --method D --plus-model out/plus --minus-model out/minus \\
        --dataset data.jsonl --output weighted/

adds the weight columns, and ``tisdpo train --dataset_name weighted/ --weight_transform ...`` trains
TIS-DPO. The Python form is ``train_contrastive_models``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os

from torch import nn

from .config import TISDPOConfig
from .run_safety import CheckpointError
from .trainer import TISDPOTrainer

logger = logging.getLogger(__name__)

# method -> loss_type of both runs (the minus run also sets reverse_preferences=True)
CONTRASTIVE_LOSS_TYPES = {"S": "sft", "D": "sigmoid"}


def contrastive_configs(args: TISDPOConfig, method: str) -> tuple[TISDPOConfig, TISDPOConfig]:
    """The two training configurations of ``method`` (``"S"`` or ``"D"``) derived from ``args``.

    Both keep every setting of ``args`` but ``loss_type`` (``["sft"]`` for S, ``["sigmoid"]`` for D, without
    ``loss_weights`` / ``rpo_alpha``; S also without ``kl`` and ``use_weighting``),
    ``reverse_preferences`` (False for ``pi_plus``, True for ``pi_minus``) and ``output_dir``
    (``<args.output_dir>/plus`` and ``/minus``). Token-weight settings do not apply: contrastive models
    are trained without weight columns.
    """
    if method not in CONTRASTIVE_LOSS_TYPES:
        raise ValueError(f"method must be one of {sorted(CONTRASTIVE_LOSS_TYPES)} (method P needs no training), "
                         f"got {method!r}")
    if not isinstance(args, TISDPOConfig):
        raise TypeError(f"args must be a TISDPOConfig, got {type(args).__name__}")
    loss_type = CONTRASTIVE_LOSS_TYPES[method]
    kl, use_weighting = (None, False) if loss_type == "sft" else (args.kl, args.use_weighting)
    return tuple(
        dataclasses.replace(args, output_dir=os.path.join(args.output_dir, side), loss_type=[loss_type],
                            loss_weights=None, rpo_alpha=None, use_weighting=use_weighting,
                            reverse_preferences=reverse, kl=kl)
        for side, reverse in (("plus", False), ("minus", True))
    )


def train_contrastive_models(
    model,
    train_dataset,
    method: str,
    args: TISDPOConfig,
    *,
    processing_class=None,
    ref_model=None,
    save: bool = True,
):
    """Train ``pi_plus`` and ``pi_minus`` for ``method`` ``"S"`` or ``"D"`` with ``TISDPOTrainer``.

    Args:
        model: the starting point of both runs (usually the SFT model): a name/path, or a
            ``PreTrainedModel`` that is copied for each run (it is not modified).
        train_dataset: preference pairs in any format the trainer reads. Weight columns, if any, are
            dropped: the contrastive models are plain SFT/DPO models.
        args: base ``TISDPOConfig``; see ``contrastive_configs`` for what each run changes.
        processing_class: the tokenizer. ref_model: DPO's reference (method D; default: a frozen copy of
            ``model``).
        save: save each model (and the tokenizer) to its run's ``output_dir``.
    Returns:
        ``(pi_plus, pi_minus)``, the trained models (in eval mode).
    """
    plus_args, minus_args = contrastive_configs(args, method)
    if method == "S" and ref_model is not None:
        raise ValueError("method 'S' (SFT) uses no reference model; do not pass ref_model")
    weight_columns = [c for c in ("chosen_weights", "rejected_weights") if c in train_dataset.column_names]
    if weight_columns:
        train_dataset = train_dataset.remove_columns(weight_columns)
    trained = []
    for k, (side, run_args) in enumerate((("pi_plus", plus_args), ("pi_minus", minus_args)), start=1):
        loss_type = run_args.loss_type if isinstance(run_args.loss_type, str) else ",".join(run_args.loss_type)
        logger.info("Method %s, training %d of 2: %s (loss_type=%s, reverse_preferences=%s) -> %s", method, k, side,
                    loss_type, run_args.reverse_preferences, run_args.output_dir)
        start = copy.deepcopy(model) if isinstance(model, nn.Module) else model
        trainer = TISDPOTrainer(model=start, ref_model=ref_model, args=run_args, train_dataset=train_dataset,
                                processing_class=processing_class)
        trainer.train()
        if trainer.preemption.signal_name is not None:  # do not go on to the other model, nor save this one
            raise CheckpointError(f"stopped by {trainer.preemption.signal_name} during the {side} training (step "
                                  f"{trainer.state.global_step}, checkpoint in {run_args.output_dir}); the "
                                  "contrastive pair does not resume: run it again")
        if save:
            trainer.save_model(run_args.output_dir)
        trained.append(trainer.model.eval())
    return trained[0], trained[1]
