"""Smoke test of `python -m benchmarks.trl_step` (what CI runs): both implementations, a tiny Llama and tokenizer
saved to a directory (the real model's run is minutes on a CPU), 24-token responses, 2 steps at lr 1e-3 (a visible
update); the losses agree, the record has every field and the exact response length.

Tolerance 1e-5 relative: float32 (eps 1.2e-7) losses over 2 x 24 tokens, and at step 2 after one AdamW update from
gradients summed in different orders by the two trainers; the real model's step-2 losses differ by ~3e-6.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .memory import REPO_ROOT
from .trl_step import RESULT_FIELDS, TEXT_PATH

pytest.importorskip("trl", reason="the benchmark compares against TRL's DPOTrainer")
TOKENS = 24
RTOL = 1e-5  # see the module docstring


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT_PATH.read_text()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _run(impl: str, model_dir, out) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.trl_step", "--impl", impl, "--model", str(model_dir),
                           "--response-tokens", str(TOKENS), "--steps", "2", "--device", "cpu", "--lr", "1e-3", "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{impl} step 2:" in proc.stdout
    return json.loads(out.read_text())


def test_both_implementations_run_and_agree(tiny_model_dir, tmp_path):
    ours, trl = (_run(impl, tiny_model_dir, tmp_path / f"{impl}.json") for impl in ("tisdpo", "trl"))
    for record in (ours, trl):
        assert list(record) == list(RESULT_FIELDS)
        assert record["response_tokens"] == TOKENS and record["steps"] == 2 and record["device"] == "cpu"
        for key in ("step_seconds", "losses", "step_start_rss_bytes", "peak_rss_bytes", "peak_above_fixed_bytes",
                    "step_extra_bytes"):
            assert len(record[key]) == 2, key
        assert all(s > 0 for s in record["step_seconds"]) and record["fixed_rss_bytes"] > 0
        assert all(p >= s for p, s in zip(record["peak_rss_bytes"], record["step_start_rss_bytes"]))
        assert record["process_peak_rss_bytes"] >= max(record["peak_rss_bytes"])
        assert record["versions"]["trl"] and record["machine"]["cores"] >= 1
        assert record["command"].startswith("python -m benchmarks.trl_step --impl ")
    assert ours["prompt_tokens"] == trl["prompt_tokens"]
    assert ours["losses"][0] == pytest.approx(math.log(2), rel=RTOL)  # the policy is its own reference at step 1
    assert ours["losses"] == pytest.approx(trl["losses"], rel=RTOL)
    assert ours["losses"][1] != pytest.approx(ours["losses"][0], rel=1e-3)  # step 2 saw the update
