"""Tokenisation, truncation, formats and collation of preference data (tisdpo/data.py)."""

import logging

import pytest
import torch

from tests.trainer.tiny import HH_PATH, build_tokenizer, dataset_of, hh_records, synthetic_pairs
from tisdpo.data import (
    IGNORE_INDEX,
    PreferenceCollator,
    apply_chat_template,
    extract_prompt,
    load_preference_dataset,
    prepare_preference_dataset,
    tokenize_row,
)


def test_extract_prompt_hh_text():
    chosen = "\n\nHuman: Why?\n\nAssistant: Because light scatters."
    rejected = "\n\nHuman: Why?\n\nAssistant: Because."
    prompt, c, r = extract_prompt(chosen, rejected)
    # the texts diverge inside the word "Because" / "Because." -> back to the word start, space goes with the answer
    assert prompt == "\n\nHuman: Why?\n\nAssistant:"
    assert (c, r) == (" Because light scatters.", " Because.")
    assert prompt + c == chosen and prompt + r == rejected


def test_extract_prompt_messages():
    user = {"role": "user", "content": "hi"}
    chosen = [user, {"role": "assistant", "content": "hello"}]
    rejected = [user, {"role": "assistant", "content": "go away"}]
    assert extract_prompt(chosen, rejected) == ([user], chosen[1:], rejected[1:])
    with pytest.raises(TypeError, match="chosen"):
        extract_prompt("text", rejected)


def test_tokenize_plain_keeps_the_tokenizers_bos_and_adds_eos(tok):
    """BOS as TRL: what the tokenizer adds by itself. A GPT-2-style tokenizer (BOS defined, not added) gets none,
    a Llama-style one keeps its BOS; every plain-text response ends in EOS."""
    example = {"prompt": "Name 1 fruit:", "chosen": " apple", "rejected": " rock"}
    row = tokenize_row(example, tok)
    assert tok.bos_token_id is not None and tok.bos_token_id not in row["prompt_input_ids"]
    assert row["prompt_input_ids"] == tok("Name 1 fruit:", add_special_tokens=False)["input_ids"]
    assert row["chosen_input_ids"] == tok(" apple", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["rejected_input_ids"][-1] == tok.eos_token_id
    llama_style = build_tokenizer(add_bos=True)
    row = tokenize_row(example, llama_style)
    assert row["prompt_input_ids"] == [llama_style.bos_token_id] + tok("Name 1 fruit:", add_special_tokens=False)[
        "input_ids"]
    assert row["prompt_input_ids"].count(llama_style.bos_token_id) == 1


def test_tokenize_implicit_prompt_equals_explicit(tok):
    record = hh_records()[1]
    prompt, chosen, rejected = extract_prompt(record["chosen"], record["rejected"])
    implicit = tokenize_row(record, tok)
    explicit = tokenize_row({"prompt": prompt, "chosen": chosen, "rejected": rejected}, tok)
    assert implicit == explicit
    assert tok.decode(implicit["prompt_input_ids"][1:]).endswith("Assistant:")


def test_tokenize_conversational_uses_chat_template(tok):
    example = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Plaid."}],
    }
    texts = apply_chat_template(example, tok)
    assert texts["prompt"] == "<bos><|system|>Be brief.<|end|><|user|>Sky colour?<|end|><|assistant|>"
    assert texts["chosen"] == "Blue.<|end|>"
    row = tokenize_row(example, tok)
    assert row["prompt_input_ids"] == tok(texts["prompt"], add_special_tokens=False)["input_ids"]
    assert row["prompt_input_ids"].count(tok.bos_token_id) == 1  # the template's BOS, none added on top
    assert row["chosen_input_ids"][-1] == tok.convert_tokens_to_ids("<|end|>")
    # implicit conversational: the shared leading messages become the prompt
    implicit = {"chosen": example["prompt"] + example["chosen"], "rejected": example["prompt"] + example["rejected"]}
    assert tokenize_row(implicit, tok) == row


def test_truncation_keep_end_cuts_prompt_start_first(tok):
    example = {"prompt": " ".join(["word"] * 20), "chosen": " apple pear", "rejected": " rock"}
    full = tokenize_row(example, tok)
    n_c = len(full["chosen_input_ids"])
    row = tokenize_row(example, tok, max_length=n_c + 3)
    assert row["prompt_input_ids"] == full["prompt_input_ids"][-3:]
    assert row["chosen_input_ids"] == full["chosen_input_ids"]
    # prompt shrinks to one token, then responses lose their ends
    row = tokenize_row(example, tok, max_length=3)
    assert row["prompt_input_ids"] == full["prompt_input_ids"][-1:]
    assert row["chosen_input_ids"] == full["chosen_input_ids"][:2]


def test_truncation_keep_start_and_drop(tok):
    example = {"prompt": " ".join(["word"] * 20), "chosen": " apple pear", "rejected": " rock"}
    full = tokenize_row(example, tok)
    n_p = len(full["prompt_input_ids"])
    row = tokenize_row(example, tok, max_length=n_p + 1, truncation_mode="keep_start")
    assert row["prompt_input_ids"] == full["prompt_input_ids"]
    assert row["chosen_input_ids"] == full["chosen_input_ids"][:1]
    assert tokenize_row(example, tok, max_length=n_p, truncation_mode="keep_start") is None
    row = tokenize_row(example, tok, max_prompt_length=2, truncation_mode="keep_start")
    assert row["prompt_input_ids"] == full["prompt_input_ids"][:2]


def test_weights_follow_truncation_and_length_is_checked(tok):
    example = {"prompt": "Name 2 fruits:", "chosen": " apple and pear", "rejected": " rock"}
    full = tokenize_row(example, tok)
    n_c, n_r = len(full["chosen_input_ids"]), len(full["rejected_input_ids"])
    example["chosen_weights"] = [0.1 * (i + 1) for i in range(n_c)]
    example["rejected_weights"] = [-0.5] * n_r
    row = tokenize_row(example, tok, max_completion_length=2)
    assert row["chosen_weights"] == pytest.approx([0.1, 0.2])
    assert row["rejected_weights"] == [-0.5] * min(2, n_r)
    bad = dict(example, chosen_weights=[1.0] * (n_c + 1))
    with pytest.raises(ValueError, match="chosen_weights"):
        tokenize_row(bad, tok)


def test_prepare_drops_and_logs(tok, caplog):
    records = synthetic_pairs(6)
    records[2]["prompt"] = " ".join(["long"] * 40)
    ds = dataset_of(records)
    with caplog.at_level(logging.WARNING, logger="tisdpo.data"):
        out = prepare_preference_dataset(ds, tok, max_length=20, truncation_mode="keep_start")
    assert len(out) == 5
    assert "Dropped 1 of 6 train pairs" in caplog.text
    assert set(out.column_names) == {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}


def test_prepare_reverse_swaps_with_weights(tok):
    records = synthetic_pairs(3)
    for r in records:
        row = tokenize_row(r, tok)
        r["chosen_weights"] = [1.0] * len(row["chosen_input_ids"])
        r["rejected_weights"] = [2.0] * len(row["rejected_input_ids"])
        r["id"] = 7
    forward = prepare_preference_dataset(dataset_of(records), tok)
    reverse = prepare_preference_dataset(dataset_of(records), tok, reverse_preferences=True)
    assert "id" not in forward.column_names
    assert reverse["chosen_input_ids"] == forward["rejected_input_ids"]
    assert reverse["chosen_weights"] == forward["rejected_weights"]
    assert reverse["rejected_weights"][0][0] == 1.0


def test_load_preference_dataset_jsonl():
    ds = load_preference_dataset(HH_PATH)
    assert len(ds) == len(hh_records()) and ds.column_names == ["chosen", "rejected"]
    with pytest.raises(ValueError, match="extension"):
        load_preference_dataset(__file__)


def _features(tok, n=3, weights=True):
    feats = []
    for i, r in enumerate(synthetic_pairs(n)):
        row = tokenize_row(r, tok)
        if weights:
            row["chosen_weights"] = [float(i + j) for j in range(len(row["chosen_input_ids"]))]
            row["rejected_weights"] = [-float(i + j) for j in range(len(row["rejected_input_ids"]))]
        feats.append(row)
    return feats


def test_collator_padded_layout(tok):
    feats = _features(tok)
    batch = PreferenceCollator(pad_token_id=tok.pad_token_id)(feats)
    n = 2 * len(feats)
    sides = ("chosen_input_ids", "rejected_input_ids")
    lengths = [len(f["prompt_input_ids"]) + len(f[k]) for k in sides for f in feats]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["token_weights"].shape == (n, width)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["cu_seqlens"].tolist() == [k * width for k in range(n + 1)]
    for k, f in enumerate(feats):
        p = len(f["prompt_input_ids"])
        rows = ((k, "chosen_input_ids", "chosen_weights"), (k + len(feats), "rejected_input_ids", "rejected_weights"))
        for row, key, wkey in rows:
            labels = batch["labels"][row]
            # shifted: label at t is the token at t + 1, only over the response
            valid = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
            assert valid == list(range(p - 1, p - 1 + len(f[key])))
            assert labels[valid].tolist() == batch["input_ids"][row, [t + 1 for t in valid]].tolist() == f[key]
            assert batch["token_weights"][row, valid].tolist() == f[wkey]
            assert batch["token_weights"][row].abs().sum() == pytest.approx(sum(abs(w) for w in f[wkey]))


def test_collator_packed_matches_padded(tok):
    feats = _features(tok)
    padded = PreferenceCollator(pad_token_id=tok.pad_token_id)(feats)
    packed = PreferenceCollator(pad_token_id=tok.pad_token_id, padding_free=True)(feats)
    keep = padded["attention_mask"].bool()
    assert packed["input_ids"].shape == (1, int(keep.sum()))
    for key in ("input_ids", "labels", "token_weights"):
        assert torch.equal(packed[key][0], padded[key][keep])
    lengths = keep.sum(1)
    assert packed["cu_seqlens"].tolist() == [0] + lengths.cumsum(0).tolist()
    assert packed["cu_seqlens"].dtype == torch.int32
    expected_pos = torch.cat([torch.arange(int(n)) for n in lengths])
    assert torch.equal(packed["position_ids"][0], expected_pos)


def test_collator_rejects_mixed_weights(tok):
    feats = _features(tok, n=2)
    del feats[1]["chosen_weights"], feats[1]["rejected_weights"]
    with pytest.raises(ValueError, match="every pair"):
        PreferenceCollator(pad_token_id=0)(feats)
