"""Tiny, locally built models, tokenizers and preference data for the trainer tests (no hub downloads).

Importable from subprocesses (the 2-process test) as `tests.trainer.tiny` with the repository root on sys.path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
HH_PATH = os.path.join(ASSETS, "tiny_hh.jsonl")
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_FRUITS = ["apple", "pear", "plum", "grape", "melon", "lemon", "peach", "cherry"]
_STONES = ["rock", "brick", "stone", "pebble", "gravel", "slate", "flint", "marble"]


def hh_records() -> list[dict]:
    """The HH-RLHF-style implicit-prompt pairs of tests/assets/tiny_hh.jsonl."""
    with open(HH_PATH) as f:
        return [json.loads(line) for line in f]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Explicit-prompt pairs with a learnable preference: the chosen answer names fruits, the rejected one stones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = 1 + i % 3
        prompt = f"Name {k} fruit{'s' if k > 1 else ''}, item {i}:"
        chosen = " " + " and ".join(rng.sample(_FRUITS, k))
        rejected = " " + " and ".join(rng.sample(_STONES, 1 + (i + 1) % 3))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the test texts, with BOS/EOS/PAD, role tokens and a chat template."""
    corpus = []
    for record in hh_records():
        corpus += [record["chosen"], record["rejected"]]
    for record in synthetic_pairs(64):
        corpus += [record["prompt"] + record["chosen"], record["rejected"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>", *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=ROLE_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, 4 heads, 2 KV heads, untied head unless `tie_word_embeddings=True`) with random
    weights from a fixed seed, in float32."""
    import torch

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **{"tie_word_embeddings": False, **overrides},
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.float()


def no_checkpointing() -> dict:
    """TrainingArguments keyword turning activation checkpointing off, under its name in this transformers version
    (`activation_checkpointing` in 5.x, `gradient_checkpointing` before)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def dataset_of(records: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(records)
