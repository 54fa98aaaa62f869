"""`tisdpo contrastive --method S|D [tisdpo train options]`: both trainings of a contrastive pair
(`tisdpo.contrastive.train_contrastive_models`), written to `<output_dir>/plus` and `<output_dir>/minus`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from .. import contrastive
from ..contrastive import CONTRASTIVE_LOSS_TYPES, train_contrastive_models
from ..data import load_preference_dataset
from ..pretrained import load_tokenizer
from ..run_safety import output_dir_lock
from ..validation import check_preference_data
from .arguments import check_train_inputs, parse_train_args


def main(argv: Sequence[str] | None = None) -> int:
    """Train the contrastive pair pi_plus / pi_minus for token weights (method S or D)."""
    argv = list(argv or [])
    if "--method" not in argv or argv.index("--method") + 1 >= len(argv):
        print("usage: tisdpo contrastive --method S|D [tisdpo train options, e.g. --config base.yaml]\n\n"
              + contrastive.__doc__)
        return 0 if any(a in ("-h", "--help") for a in argv) else 2
    i = argv.index("--method")
    method, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    if method not in CONTRASTIVE_LOSS_TYPES:
        print(f"tisdpo contrastive: --method must be S or D, got {method!r}")
        return 2
    train_args, config = parse_train_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_train_inputs(train_args, config)
    with output_dir_lock(config.output_dir):
        return _train(train_args, config, method)


def _train(train_args, config, method: str) -> int:
    dataset = load_preference_dataset(train_args.dataset_name, split=train_args.dataset_train_split)
    if train_args.max_train_samples is not None:
        dataset = dataset.select(range(min(train_args.max_train_samples, len(dataset))))
    check_preference_data(dataset, train_args.dataset_name)
    tokenizer = None
    if train_args.tokenizer_name_or_path:
        tokenizer = load_tokenizer(train_args.tokenizer_name_or_path)
    ref = train_args.ref_model_name_or_path if method == "D" else None
    train_contrastive_models(train_args.model_name_or_path, dataset, method, config, processing_class=tokenizer,
                             ref_model=ref)
    plus, minus = (os.path.join(config.output_dir, side) for side in ("plus", "minus"))
    print(f"pi_plus: {plus}\npi_minus: {minus}\nnext: tisdpo estimate-weights --method {method} --plus-model {plus} "
          f"--minus-model {minus} --dataset {train_args.dataset_name} --output <weighted dataset>")
    return 0
