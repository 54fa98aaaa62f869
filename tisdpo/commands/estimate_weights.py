"""`tisdpo estimate-weights`: per-token rewards of a preference dataset written as weight columns
(`tisdpo.weights.estimate_token_weights`), optionally turned into final weights
(`tisdpo.response_weights.transform_token_weights`).

Under `torchrun --nproc_per_node N -m tisdpo estimate-weights ...` (or `accelerate launch -m tisdpo ...`) every
process loads the models on its own GPU and computes its share of the shards; rank 0 writes the output, identical
to one process's."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed

from ..data import load_preference_dataset, save_dataset
from ..formats import TOKENIZATION_MODES, TRUNCATION_MODES
from ..modeling import load_causal_lm
from ..pretrained import load_tokenizer
from ..response_weights import WEIGHT_TRANSFORMS, transform_token_weights
from ..validation import check_data_source, check_model_path
from ..weights import (
    DEFAULT_SYSTEM_PROMPTS,
    METHODS,
    TRUNCATION_DEFAULTS,
    TRUNCATION_OPTIONS,
    estimate_token_weights,
)
from .arguments import auto_bool, optional_int, parse_with_yaml


def main(argv: Sequence[str] | None = None) -> int:
    """Estimate per-token rewards log pi_plus - log pi_minus of a preference dataset (methods P, S, D)."""

    parser = argparse.ArgumentParser(
        prog="tisdpo estimate-weights",
        description="Per-token rewards r_t = log pi_plus(y_t) - log pi_minus(y_t) written as chosen_weights (r_t) "
        "and rejected_weights (-r_t) columns. Method S: --plus-model SFT on chosen, --minus-model SFT on rejected; "
        "D: --plus-model DPO, --minus-model reverse DPO; P: one --plus-model with a good and a bad system prompt.",
    )
    parser.add_argument("--config", default=None, help="YAML file with any of these options (flags override it)")
    parser.add_argument("--dataset", required=True,
                        help="preference data: hub name, JSON/JSONL/CSV/Parquet file or save_to_disk directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-samples", type=int, default=None, help="only the first N pairs")
    parser.add_argument("--method", choices=METHODS, default="D")
    parser.add_argument("--plus-model", required=True, help="pi_plus (method P: the only model)")
    parser.add_argument("--minus-model", default=None, help="pi_minus (methods S and D)")
    parser.add_argument("--tokenizer", default=None, help="the training tokenizer (default: --plus-model's)")
    parser.add_argument("--good-system-prompt", default=DEFAULT_SYSTEM_PROMPTS[0], help="method P")
    parser.add_argument("--bad-system-prompt", default=DEFAULT_SYSTEM_PROMPTS[1], help="method P")
    parser.add_argument("--output", required=True,
                        help="output: a .jsonl/.parquet file or a directory (datasets.save_to_disk)")
    parser.add_argument("--transform", choices=WEIGHT_TRANSFORMS, default=None,
                        help="write final weights T(x) instead of the rewards (then train with "
                        "weight_transform=origin); needed for rank_based, binary and random")
    parser.add_argument("--transform-kwargs", type=json.loads, default=None, help="JSON object")
    parser.add_argument("--eos-weight", type=float, default=None,
                        help="with --transform: the weight of each response's last token (upstream: 0)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--padding-free", choices=("auto", "true", "false"), default="auto",
                        help="pack the sequences of a batch without padding (auto: with flash/flex attention)")
    for name in TRUNCATION_OPTIONS[:3]:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=optional_int,
                            default=TRUNCATION_DEFAULTS[name],
                            help=f"the trainer's `{name}` (TISDPOConfig; default %(default)s; None: no limit)")
    parser.add_argument("--truncation-mode", choices=TRUNCATION_MODES,
                        default=TRUNCATION_DEFAULTS["truncation_mode"],
                        help="the trainer's `truncation_mode` (TISDPOConfig; default %(default)s)")
    parser.add_argument("--tokenization", choices=TOKENIZATION_MODES, default="separate",
                        help="prompt/response boundary convention: the one training uses (TISDPOConfig.tokenization)")
    parser.add_argument("--prefix-sharing", choices=("auto", "true", "false"), default="auto",
                        help="one [prompt | chosen | rejected] row per pair, the prompt run once (auto: with flex "
                        "attention)")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--cache-dir", default=None, help="shard cache (default ~/.cache/tisdpo/token_weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--device-map", type=_device_map, default=None,
                        help="spread each model over the visible GPUs (and CPU) for models too large for one GPU: "
                        "transformers' device_map (auto, balanced, sequential or a JSON object); one process, "
                        "replaces --device")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on CUDA, else float32)")
    parser.add_argument("--no-progress", action="store_true")
    args = parse_with_yaml(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.method == "P" and args.minus_model is not None:
        parser.error("--method P uses one model (--plus-model); drop --minus-model")
    if args.method != "P" and args.minus_model is None:
        parser.error(f"--method {args.method} needs --minus-model")
    if args.eos_weight is not None and args.transform is None:
        parser.error("--eos-weight needs --transform")

    for value, option, kind in ((args.plus_model, "--plus-model", "model"),
                                (args.minus_model, "--minus-model", "model"),
                                (args.tokenizer, "--tokenizer", "tokenizer")):
        check_model_path(value, option, kind)
    check_data_source(args.dataset, "--dataset")
    if args.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--device-map spreads one process's models over the GPUs: run it without torchrun")
    rank, device = _start_processes(args.device)
    dataset = load_preference_dataset(args.dataset, split=args.split)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    tokenizer = load_tokenizer(args.tokenizer or args.plus_model)
    load = {"device": device, "dtype": args.dtype, "device_map": args.device_map}
    pi_plus = load_causal_lm(args.plus_model, **load)
    pi_minus = None if args.minus_model is None else load_causal_lm(args.minus_model, **load)
    if args.device_map is not None:
        device = None  # the batches go where pi_plus's first layer is
    result = estimate_token_weights(
        dataset, pi_plus, pi_minus, tokenizer, method=args.method,
        system_prompts=(args.good_system_prompt, args.bad_system_prompt), batch_size=args.batch_size,
        shard_size=args.shard_size, cache_dir=args.cache_dir, device=device, progress=not args.no_progress,
        padding_free=auto_bool(args.padding_free),
        prefix_sharing=auto_bool(args.prefix_sharing),
        tokenization=args.tokenization,
        **{name: getattr(args, name) for name in TRUNCATION_OPTIONS},
    )
    if rank == 0:  # several processes: rank 0 writes the output
        if args.transform is not None:
            result = transform_token_weights(result, args.transform, args.transform_kwargs,
                                             eos_weight=args.eos_weight)
        print(save_dataset(result, args.output))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _device_map(value: str):
    """`--device-map`: a strategy name or a JSON object (module name -> device)."""
    if value.lstrip().startswith("{"):
        return json.loads(value)
    return value


def _start_processes(device: str) -> tuple[int, str]:
    """Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1 in the environment): a gloo process group (the
    ranks exchange only the shard list and barriers; a week's timeout, as one rank's share may take hours) and
    this rank's GPU (`cuda` -> `cuda:LOCAL_RANK`). Returns (rank, device); (0, device) for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, device
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.distributed.get_rank(), device
