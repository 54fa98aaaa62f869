"""`tisdpo train --config run.yaml [--field value ...]`: one `TISDPOTrainer` run.

Everything the user names (models, tokenizer, data, checkpoint to resume from) is checked before any model is
loaded; a problem is an `InputError` (`tisdpo: error: ...`, exit status 2). The run holds `output_dir`'s lock
(`tisdpo.run_safety`: one writer per output_dir); SIGTERM / SIGINT save a checkpoint at the next step boundary and
exit 0 with the command to resume.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

from ..data import load_preference_dataset
from ..pretrained import load_tokenizer
from ..run_safety import (
    RESUME_HINT,
    CheckpointError,
    disk_full,
    disk_full_message,
    output_dir_lock,
    resolve_resume_from_checkpoint,
)
from ..trainer import TISDPOTrainer
from ..validation import InputError, check_preference_data, hub_unreachable
from .arguments import check_train_inputs, parse_train_args

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """Train with TISDPOTrainer (`tisdpo train --config run.yaml [--field value ...]`)."""
    train_args, config = parse_train_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # everything the user named is checked here, before any model is loaded
    check_train_inputs(train_args, config)
    with output_dir_lock(config.output_dir):
        return _train(train_args, config, argv)


def _train(train_args, config, argv: list[str]) -> int:
    resume = resolve_resume_from_checkpoint(config.resume_from_checkpoint, config.output_dir)
    load_kwargs = {"name": train_args.dataset_config} if train_args.dataset_config else {}
    try:
        train_set = load_preference_dataset(train_args.dataset_name, split=train_args.dataset_train_split,
                                            **load_kwargs)
    except ConnectionError as err:  # a hub dataset while the hub cannot be reached
        raise hub_unreachable(train_args.dataset_name, "--dataset_name", str(err).splitlines()[0]) from err
    if train_args.max_train_samples is not None:
        train_set = train_set.select(range(min(train_args.max_train_samples, len(train_set))))
    check_preference_data(train_set, train_args.dataset_name)
    eval_set = None
    if train_args.dataset_test_split:
        eval_set = load_preference_dataset(train_args.dataset_name, split=train_args.dataset_test_split, **load_kwargs)
        check_preference_data(eval_set, f"{train_args.dataset_name} [{train_args.dataset_test_split}]")
    try:
        tokenizer = None
        if train_args.tokenizer_name_or_path:
            tokenizer = load_tokenizer(train_args.tokenizer_name_or_path)
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
    except OSError as err:  # transformers: "We couldn't connect to 'https://huggingface.co' ..."
        hub_ids = [(f"--{o}", v) for o in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path")
                   if (v := getattr(train_args, o)) and not os.path.isdir(v)]
        if "couldn't connect" not in str(err) or not hub_ids:
            raise
        option, value = hub_ids[0]
        raise hub_unreachable(value, option, str(err).splitlines()[0]) from err
    if resume is not None:
        logger.info("Resuming from %s.", resume)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.preemption.signal_name is not None:
        if not trainer.is_world_process_zero():
            return 0
        print(f"tisdpo: stopped by {trainer.preemption.signal_name} after step {trainer.state.global_step}; "
              f"checkpoint saved in {config.output_dir}. Resume with: tisdpo train {_resume_command(argv)}",
              file=sys.stderr)
        return 0
    try:
        trainer.save_model(config.output_dir)
        trainer.save_state()
    except (OSError, RuntimeError) as err:
        if not disk_full(err, config.output_dir):
            raise
        raise CheckpointError(disk_full_message(err, config.output_dir, "the final model")) from err
    if eval_set is not None:
        trainer.evaluate()
    return 0


def _resume_command(argv: list[str]) -> str:
    """`argv` with its `--resume_from_checkpoint` value replaced by `true`."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--resume_from_checkpoint="):
            skip = False
            continue
        if arg == "--resume_from_checkpoint":
            skip = True
            continue
        kept.append(shlex.quote(arg))
    return " ".join([*kept, RESUME_HINT])
