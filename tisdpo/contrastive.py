"""Making the contrastive model pair ``pi_plus`` / ``pi_minus`` whose log-prob difference gives token weights.

TIS-DPO scores each response token by ``r_t = log pi_plus(y_t) - log pi_minus(y_t)`` (DESIGN §1). Three
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
from collections.abc import Sequence

from torch import nn

from .config import TISDPOConfig
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
        if save:
            trainer.save_model(run_args.output_dir)
        trained.append(trainer.model.eval())
    return trained[0], trained[1]


def main(argv: Sequence[str] | None = None) -> int:
    """Train the contrastive pair pi_plus / pi_minus for token weights (method S or D)."""
    from .cli import parse_train_args
    from .data import load_preference_dataset
    from .validation import check_data_source, check_model_path, check_preference_data

    argv = list(argv or [])
    if "--method" not in argv or argv.index("--method") + 1 >= len(argv):
        print("usage: tisdpo contrastive --method S|D [tisdpo train options, e.g. --config base.yaml]\n\n"
              + __doc__)
        return 0 if any(a in ("-h", "--help") for a in argv) else 2
    i = argv.index("--method")
    method, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    if method not in CONTRASTIVE_LOSS_TYPES:
        print(f"tisdpo contrastive: --method must be S or D, got {method!r}")
        return 2
    train_args, config = parse_train_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for option in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path"):
        check_model_path(getattr(train_args, option), f"--{option}")
    check_data_source(train_args.dataset_name, "--dataset_name")
    dataset = load_preference_dataset(train_args.dataset_name, split=train_args.dataset_train_split)
    if train_args.max_train_samples is not None:
        dataset = dataset.select(range(min(train_args.max_train_samples, len(dataset))))
    check_preference_data(dataset, train_args.dataset_name)
    tokenizer = None
    if train_args.tokenizer_name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(train_args.tokenizer_name_or_path)
    ref = train_args.ref_model_name_or_path if method == "D" else None
    train_contrastive_models(train_args.model_name_or_path, dataset, method, config, processing_class=tokenizer,
                             ref_model=ref)
    plus, minus = (os.path.join(config.output_dir, side) for side in ("plus", "minus"))
    print(f"pi_plus: {plus}\npi_minus: {minus}\nnext: tisdpo estimate-weights --method {method} --plus-model {plus} "
          f"--minus-model {minus} --dataset {train_args.dataset_name} --output <weighted dataset>")
    return 0


CLI_COMMANDS = {"contrastive": main}

if __name__ == "__main__":
    raise SystemExit(main())
