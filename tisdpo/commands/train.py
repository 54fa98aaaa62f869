"""`tisdpo train --config run.yaml [--field value ...]`: one `TISDPOTrainer` run.

Everything the user names (models, tokenizer, data, checkpoint to resume from) is checked before any model is
loaded; a problem is an `InputError` (`tisdpo: error: ...`, exit status 2).
"""

from __future__ import annotations

import logging

from ..data import load_preference_dataset
from ..pretrained import load_tokenizer
from ..trainer import TISDPOTrainer
from ..validation import (
    InputError,
    check_data_source,
    check_model_path,
    check_preference_data,
    resolve_resume_from_checkpoint,
)
from .arguments import parse_train_args

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """Train with TISDPOTrainer (`tisdpo train --config run.yaml [--field value ...]`)."""
    train_args, config = parse_train_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # everything the user named is checked here, before any model is loaded
    for option in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path"):
        check_model_path(getattr(train_args, option), f"--{option}")
    check_data_source(train_args.dataset_name, "--dataset_name")
    resume = resolve_resume_from_checkpoint(config.resume_from_checkpoint, config.output_dir)
    load_kwargs = {"name": train_args.dataset_config} if train_args.dataset_config else {}
    train_set = load_preference_dataset(train_args.dataset_name, split=train_args.dataset_train_split, **load_kwargs)
    if train_args.max_train_samples is not None:
        train_set = train_set.select(range(min(train_args.max_train_samples, len(train_set))))
    check_preference_data(train_set, train_args.dataset_name)
    eval_set = None
    if train_args.dataset_test_split:
        eval_set = load_preference_dataset(train_args.dataset_name, split=train_args.dataset_test_split, **load_kwargs)
        check_preference_data(eval_set, f"{train_args.dataset_name} [{train_args.dataset_test_split}]")
    tokenizer = None
    if train_args.tokenizer_name_or_path:
        tokenizer = load_tokenizer(train_args.tokenizer_name_or_path)
    try:
        trainer = TISDPOTrainer(
            model=train_args.model_name_or_path,
            ref_model=train_args.ref_model_name_or_path,
            args=config,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
        )
    except InputError as err:  # a row the tokenisation rejected: name the file too
        raise InputError(f"{train_args.dataset_name}: {err}") from err
    if resume is not None:
        logger.info("Resuming from %s.", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    trainer.save_state()
    if eval_set is not None:
        trainer.evaluate()
    return 0
