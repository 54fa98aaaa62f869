"""`tisdpo visualize`: token weights of preference pairs as an HTML page and a PNG figure (`tisdpo.visualize`)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from .. import visualize
from ..data import load_preference_dataset
from ..formats import WEIGHT_COLUMNS
from ..pretrained import load_tokenizer
from ..response_weights import WEIGHT_TRANSFORMS
from ..validation import InputError, check_data_source, check_model_path, check_weight_columns
from ..visualize import render_html, render_png


def main(argv: Sequence[str] | None = None) -> int:
    """Draw token weights of preference pairs as an HTML page and a PNG figure."""
    parser = argparse.ArgumentParser(prog="tisdpo visualize", description=visualize.__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True,
                        help="dataset with weight columns (save_to_disk directory, JSON/JSONL/Parquet file, hub name)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tokenizer", required=True, help="tokenizer name or path (the training tokenizer)")
    parser.add_argument("--output-dir", default=".")
    parser.add_argument("--transform", default="origin", choices=WEIGHT_TRANSFORMS)
    parser.add_argument("--transform-kwargs", type=json.loads, default=None, help="JSON object")
    parser.add_argument("--eos-weight", type=float, default=None)
    parser.add_argument("--num-pairs", type=int, default=8)
    args = parser.parse_args(argv)
    check_data_source(args.dataset, "--dataset")
    check_model_path(args.tokenizer, "--tokenizer", "tokenizer")
    dataset = load_preference_dataset(args.dataset, split=args.split)
    missing = [c for c in WEIGHT_COLUMNS if c not in dataset.column_names]
    if missing:
        raise InputError(f"{args.dataset}: no {' or '.join(f'`{c}`' for c in missing)} column (columns: "
                         f"{', '.join(dataset.column_names)}); estimate weights first (tisdpo estimate-weights)")
    check_weight_columns(dataset, args.dataset, null_rows=True)
    tokenizer = load_tokenizer(args.tokenizer)
    options = {"transform": args.transform, "transform_kwargs": args.transform_kwargs, "eos_weight": args.eos_weight,
               "max_pairs": args.num_pairs}
    for out in (render_html(dataset, tokenizer, os.path.join(args.output_dir, "weights.html"), **options),
                render_png(dataset, tokenizer, os.path.join(args.output_dir, "weights.png"), **options)):
        print(out)
    return 0
