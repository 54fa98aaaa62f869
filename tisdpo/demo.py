"""``tisdpo demo``: the whole TIS-DPO pipeline on a synthetic task, on CPU, in minutes, nothing downloaded.

The task: a prompt ``"question w1 w2 w3 answer"`` and two responses of filler words sprinkled with key
words. The true reward of a response is ``#good key words - #bad key words`` (``true_reward``); the
response with the higher reward is the chosen one. Only the key tokens matter, so good token weights
must single them out. The pipeline:

1. build a word-level tokenizer and a tiny Llama model from a config (``build_tokenizer``,
   ``build_model``);
2. SFT it on the chosen responses (the reference model of everything below);
3. make the contrastive pair by method D: DPO (``pi_plus``) and reverse DPO (``pi_minus``, chosen and
   rejected swapped), both from the SFT model;
4. estimate token weights ``r_t = log pi_plus - log pi_minus`` (``tisdpo.weights.estimate_token_weights``)
   and score them: the AUC of the weight columns separating the key tokens that decided each preference
   (good key words in chosen responses, bad ones in rejected responses) from all other response tokens
   (``key_token_auc``);
5. train DPO and TIS-DPO from the SFT model for the same steps on the same batches;
6. print a table: key-token AUC, reward accuracy on held-out pairs, and the true reward of responses
   sampled from each model; write the weight visualisation (HTML + PNG).

Every training run is a ``TISDPOTrainer`` run (``train_run``); the contrastive pair comes from
``tisdpo.contrastive.train_contrastive_models``. On a GPU the same code runs there, faster.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .config import TISDPOConfig
from .contrastive import train_contrastive_models
from .data import PreferenceCollator, tokenize_row
from .modeling import token_logps
from .response_weights import PER_RESPONSE_TRANSFORMS, transform_token_weights
from .trainer import TISDPOTrainer
from .visualize import render_html, render_png
from .weights import estimate_token_weights

GOOD_WORDS = ("kind", "honest", "safe", "clear", "helpful", "gentle")
BAD_WORDS = ("rude", "false", "unsafe", "vague", "toxic", "cruel")
FILLER_WORDS = (
    "the", "a", "cat", "dog", "tree", "sun", "blue", "red", "runs", "sits", "big", "small", "river", "book",
    "house", "green", "cold", "warm", "light", "road", "bird", "fish", "stone", "cloud", "rain", "wind", "door",
    "chair", "apple", "bread", "milk", "paper", "clock", "lamp", "hill", "sea", "moon", "star", "leaf", "grass",
)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
PROMPT_START, PROMPT_END = "question", "answer"


# ----------------------------------------------------------------------------------------------
# task, tokenizer, model
# ----------------------------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the demo's words (split on whitespace), with ``<s>``, ``</s>``, ``<pad>``; like
    Llama's it puts ``<s>`` in front of an encoding with special tokens (the prompt, in training and sampling)."""
    words = SPECIAL_TOKENS + (PROMPT_START, PROMPT_END) + GOOD_WORDS + BAD_WORDS + FILLER_WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", words.index("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")


def build_model(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A tiny randomly initialised Llama (float32) for ``tokenizer``'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def true_reward(response: str) -> int:
    """The synthetic task's reward: ``#good key words - #bad key words`` of a response."""
    words = response.split()
    return sum(w in GOOD_WORDS for w in words) - sum(w in BAD_WORDS for w in words)


def _response(rng: random.Random, key_prob: float) -> str:
    words = []
    for _ in range(rng.randint(5, 9)):
        if rng.random() < key_prob:
            words.append(rng.choice(GOOD_WORDS if rng.random() < 0.5 else BAD_WORDS))
        else:
            words.append(rng.choice(FILLER_WORDS))
    return " " + " ".join(words)


def make_prompt(rng: random.Random) -> str:
    return " ".join([PROMPT_START, *rng.sample(FILLER_WORDS, 3), PROMPT_END])


def make_preference_dataset(num_pairs: int, *, seed: int = 0, key_prob: float = 0.3) -> datasets.Dataset:
    """``num_pairs`` synthetic pairs ``{"prompt", "chosen", "rejected"}``: two random responses per prompt,
    the one with the higher ``true_reward`` chosen (ties are redrawn)."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    while len(rows["prompt"]) < num_pairs:
        a, b = _response(rng, key_prob), _response(rng, key_prob)
        if true_reward(a) == true_reward(b):
            continue
        chosen, rejected = (a, b) if true_reward(a) > true_reward(b) else (b, a)
        rows["prompt"].append(make_prompt(rng))
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
    return datasets.Dataset.from_dict(rows)


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U; ties count half)."""
    s = torch.tensor(scores, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auc needs both classes, got {n_pos} positives and {n_neg} negatives")
    ordered = torch.sort(s).values
    ranks = (torch.searchsorted(ordered, s, right=False) + torch.searchsorted(ordered, s, right=True) + 1) / 2
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def key_token_auc(dataset: datasets.Dataset, tokenizer) -> float:
    """AUC of the weight columns (chosen: ``r_t``, rejected: ``-r_t``) separating the tokens that decided
    each preference -- good key words in chosen responses, bad key words in rejected ones -- from every
    other response token (filler words, the other side's key words, EOS)."""
    good = set(tokenizer.convert_tokens_to_ids(list(GOOD_WORDS)))
    bad = set(tokenizer.convert_tokens_to_ids(list(BAD_WORDS)))
    scores, labels = [], []
    for example in dataset:
        row = tokenize_row(example, tokenizer)
        for ids, weights, keys in ((row["chosen_input_ids"], row["chosen_weights"], good),
                                   (row["rejected_input_ids"], row["rejected_weights"], bad)):
            scores.extend(weights)
            labels.extend(i in keys for i in ids)
    return auc(scores, labels)


# ----------------------------------------------------------------------------------------------
# training (TISDPOTrainer) and evaluation
# ----------------------------------------------------------------------------------------------


def train_run(model, dataset: datasets.Dataset, tokenizer, *, output_dir: str, loss_type: str, steps: int,
              learning_rate: float, batch_size: int = 16, beta: float = 0.1, reverse_preferences: bool = False,
              weight_transform: str = "origin", transform_kwargs: dict | None = None, seed: int = 0,
              progress: bool = False, ref_model=None, callbacks: Sequence | None = None, **config):
    """Train ``model`` in place with ``TISDPOTrainer`` for ``steps`` optimiser steps; returns the trainer's
    log history.

    ``loss_type="sft"`` is SFT on the chosen responses; ``"sigmoid"`` is DPO against a frozen copy of the
    model as it is now, and TIS-DPO when ``dataset`` has weight columns (``weight_transform`` applied by the
    trainer). The learning rate is constant and the batches are drawn from ``seed``, so two runs with the
    same arguments see the same batches in the same order. ``ref_model``: the frozen reference, when it is
    not to be copied from ``model``; ``callbacks``: ``transformers.TrainerCallback``s of the run; ``config``:
    further ``TISDPOConfig`` fields (``logging_steps=1``).
    """
    args = _config(output_dir, loss_type, steps, learning_rate, batch_size=batch_size, beta=beta,
                   reverse_preferences=reverse_preferences, weight_transform=weight_transform,
                   transform_kwargs=transform_kwargs, seed=seed, progress=progress, **config)
    trainer = TISDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=list(callbacks or ()))
    with _quiet(progress):
        trainer.train()
    model.eval()
    return trainer.state.log_history


def _config(output_dir, loss_type, steps, learning_rate, *, batch_size=16, beta=0.1, reverse_preferences=False,
            weight_transform="origin", transform_kwargs=None, seed=0, progress=False, **config) -> TISDPOConfig:
    fields = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, loss_type=loss_type, beta=beta,
        reverse_preferences=reverse_preferences, weight_transform=weight_transform,
        weight_transform_kwargs=transform_kwargs or None, max_length=None, max_prompt_length=None,
        activation_checkpointing=False, seed=seed, data_seed=seed, report_to=[], save_strategy="no",
        logging_steps=max(1, steps // 4), disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
    )
    return TISDPOConfig(**{**fields, **config})


def _quiet(progress: bool):
    """Without progress output, swallow what the Trainer prints (its log dicts go to stdout); the demo
    prints its own summary."""
    return contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO())


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def reward_margins(model, ref_model, dataset: datasets.Dataset, tokenizer, batch_size: int = 64) -> torch.Tensor:
    """Per pair, the implicit DPO reward of the chosen response minus that of the rejected one, without
    ``beta``: ``sum_t (log pi - log pi_ref)`` (unweighted) of each response; float32 ``[len(dataset)]`` on the CPU."""
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    rows = [tokenize_row({k: ex[k] for k in ("prompt", "chosen", "rejected")}, tokenizer) for ex in dataset]
    margins = []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(_device(model)) for k, v in collate(rows[start:start + batch_size]).items()}
        logratio = (token_logps(model, batch) - token_logps(ref_model, batch)).sum(1)
        b = logratio.shape[0] // 2
        margins.append((logratio[:b] - logratio[b:]).float().cpu())
    return torch.cat(margins)


def reward_accuracy(model, ref_model, dataset: datasets.Dataset, tokenizer, batch_size: int = 64) -> float:
    """Fraction of pairs whose implicit DPO reward ``sum_t (log pi - log pi_ref)`` (unweighted) is higher
    for the chosen response than for the rejected one (``reward_margins > 0``)."""
    margins = reward_margins(model, ref_model, dataset, tokenizer, batch_size)
    return int((margins > 0).sum()) / len(margins)


@torch.no_grad()
def sampled_true_reward(model, tokenizer, prompts: Sequence[str], *, samples_per_prompt: int = 4,
                        max_new_tokens: int = 12, seed: int = 0) -> float:
    """Mean ``true_reward`` of responses sampled (temperature 1) from ``model`` for ``prompts``."""
    torch.manual_seed(seed)
    ids = torch.tensor([tokenizer(p)["input_ids"] for p in prompts for _ in range(samples_per_prompt)],
                       device=_device(model))
    # (the prompts share one length, so no padding is needed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                         temperature=1.0, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return sum(true_reward(t) for t in texts) / len(texts)


# ----------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """Sizes of one demo run (the defaults take about a minute on one CPU core)."""

    train_pairs: int = 512
    eval_pairs: int = 256
    sft_steps: int = 150
    contrastive_steps: int = 150
    policy_steps: int = 40
    batch_size: int = 16
    sft_learning_rate: float = 3e-3
    dpo_learning_rate: float = 1e-3
    beta: float = 0.1
    weight_transform: str = "rank_based"
    transform_kwargs: dict = field(default_factory=dict)
    hidden_size: int = 64
    num_layers: int = 2
    eval_prompts: int = 64
    seed: int = 0
    output_dir: str = "tisdpo-demo"
    visualize_pairs: int = 6
    # CPU threads for torch during the demo (None: leave as is). The model is tiny: one thread is as fast
    # as several on an idle machine and much faster on a busy one.
    cpu_threads: int | None = 1


@dataclass
class DemoResult:
    key_token_auc: float
    reward_accuracy: dict  # run name -> accuracy on held-out pairs
    true_reward: dict  # run name -> mean true reward of sampled responses
    seconds: float
    files: list


def _copy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    clone = LlamaForCausalLM(model.config)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    return clone


def run_demo(config: DemoConfig | None = None, *, progress: bool = True, log=print) -> DemoResult:
    """Run the whole pipeline (module docstring); returns the numbers of the table it prints."""
    cfg = config or DemoConfig()
    with demo_environment(cfg.cpu_threads, progress):
        return _run_demo(cfg, progress, log)


@contextlib.contextmanager
def demo_environment(cpu_threads: int | None, progress: bool):
    """Within: torch uses ``cpu_threads`` CPU threads (None: as many as now) and, without ``progress``, the
    ``datasets`` progress bars are off; both restored on the way out."""
    threads, bars = torch.get_num_threads(), datasets.is_progress_bar_enabled()
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            datasets.enable_progress_bars()


def weights_for_trainer(weighted: datasets.Dataset, transform: str, transform_kwargs: dict | None):
    """``(dataset, weight_transform, weight_transform_kwargs)`` to train TIS-DPO with: the trainer applies
    elementwise transforms itself; a per-response one (``PER_RESPONSE_TRANSFORMS``) is applied here, to the
    weight columns, and the trainer gets ``"origin"``."""
    if transform in PER_RESPONSE_TRANSFORMS:
        return transform_token_weights(weighted, transform, transform_kwargs or None), "origin", None
    return weighted, transform, transform_kwargs or None


def _run_demo(cfg: DemoConfig, progress: bool, log) -> DemoResult:
    start = time.perf_counter()
    os.makedirs(cfg.output_dir, exist_ok=True)
    tokenizer = build_tokenizer()
    train = make_preference_dataset(cfg.train_pairs, seed=cfg.seed)
    held_out = make_preference_dataset(cfg.eval_pairs, seed=cfg.seed + 1)
    eval_prompts = [make_prompt(random.Random(cfg.seed + 2 + i)) for i in range(cfg.eval_prompts)]
    runs_dir = os.path.join(cfg.output_dir, "runs")
    common = {"batch_size": cfg.batch_size, "beta": cfg.beta, "seed": cfg.seed, "progress": progress}

    def step(msg):
        log(f"[{time.perf_counter() - start:6.1f}s] {msg}")

    step(f"task: {len(train)} training pairs, {len(held_out)} held-out pairs; reward = #good - #bad key words")
    sft = build_model(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed)
    train_run(sft, train, tokenizer, output_dir=os.path.join(runs_dir, "sft"), loss_type="sft",
              steps=cfg.sft_steps, learning_rate=cfg.sft_learning_rate, **common)
    step(f"SFT on the chosen responses: {cfg.sft_steps} steps")

    base = _config(os.path.join(runs_dir, "contrastive"), "sigmoid", cfg.contrastive_steps, cfg.dpo_learning_rate,
                   **common)
    with _quiet(progress):
        pi_plus, pi_minus = train_contrastive_models(sft, train, "D", base, processing_class=tokenizer, save=False)
    step(f"contrastive pair (method D): DPO and reverse DPO from the SFT model, {cfg.contrastive_steps} steps each")

    weighted = estimate_token_weights(train, pi_plus, pi_minus, tokenizer, method="D", batch_size=64,
                                      cache_dir=os.path.join(cfg.output_dir, "weights_cache"), progress=progress)
    weighted.save_to_disk(os.path.join(cfg.output_dir, "train_with_weights"))
    key_auc = key_token_auc(weighted, tokenizer)
    step(f"token weights r_t = log pi_plus - log pi_minus estimated; key-token AUC = {key_auc:.3f}")

    tis_data, transform, transform_kwargs = weights_for_trainer(weighted, cfg.weight_transform, cfg.transform_kwargs)
    policies = {}
    for name, data in (("DPO", train), ("TIS-DPO", tis_data)):
        policies[name] = _copy(sft)
        train_run(policies[name], data, tokenizer, output_dir=os.path.join(runs_dir, name.lower()),
                  loss_type="sigmoid", steps=cfg.policy_steps, learning_rate=cfg.dpo_learning_rate,
                  weight_transform=transform, transform_kwargs=transform_kwargs, **common)
    step(f"DPO and TIS-DPO (weight_transform={cfg.weight_transform}) from the SFT model, {cfg.policy_steps} "
         "steps each on the same batches")

    accuracy = {name: reward_accuracy(m, sft, held_out, tokenizer) for name, m in policies.items()}
    reward = {name: sampled_true_reward(m, tokenizer, eval_prompts, seed=cfg.seed)
              for name, m in {"SFT (reference)": sft, **policies}.items()}
    shown = weighted.select(range(min(cfg.visualize_pairs, len(weighted))))
    options = {"transform": cfg.weight_transform, "transform_kwargs": cfg.transform_kwargs or None}
    files = [render_html(shown, tokenizer, os.path.join(cfg.output_dir, "weights.html"), **options),
             render_png(shown, tokenizer, os.path.join(cfg.output_dir, "weights.png"), **options)]
    result = DemoResult(key_auc, accuracy, reward, time.perf_counter() - start, files)
    log(format_table(result, cfg))
    return result


def table_lines(header: Sequence[str], rows: Sequence[Sequence[str]], first_width: int = 18) -> list[str]:
    """A plain-text table: the first column left-aligned in ``first_width`` characters, every other one
    right-aligned in one character more than its widest cell (header included), one space apart."""
    widths = [first_width] + [1 + max(len(r[c]) for r in [header, *rows]) for c in range(1, len(header))]
    return [" ".join(f"{cell:<{w}}" if c == 0 else f"{cell:>{w}}" for c, (cell, w) in enumerate(zip(row, widths)))
            for row in [header, *rows]]


def format_table(result: DemoResult, cfg: DemoConfig) -> str:
    lines = [
        "",
        f"token weights (method D): AUC of weights separating the deciding key tokens = {result.key_token_auc:.3f}",
        "",
    ]
    rows = []
    for name, reward in result.true_reward.items():
        acc = result.reward_accuracy.get(name)
        rows.append([name, "-" if acc is None else f"{acc:.3f}", f"{reward:.3f}"])
    lines += table_lines(["model", "reward accuracy (held-out)", "true reward (sampled)"], rows)
    lines += ["", f"same data, steps ({cfg.policy_steps}) and seed for DPO and TIS-DPO; "
              f"weights: {cfg.weight_transform}; {result.seconds:.0f} s",
              "visualisation: " + ", ".join(result.files)]
    return "\n".join(lines)


# a smaller run (about 20 s on one CPU core); its key-token AUC is checked in tests/weights/test_demo.py
QUICK = {"train_pairs": 192, "eval_pairs": 128, "sft_steps": 60, "contrastive_steps": 60, "policy_steps": 20,
         "eval_prompts": 32}
