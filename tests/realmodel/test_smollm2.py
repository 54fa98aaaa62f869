"""The real SmolLM2-135M-Instruct end to end (marker `realmodel`): getting and caching it (tisdpo/pretrained.py),
fused log-probs through its tied head against its own logits (tisdpo/modeling.py), and its BPE tokenizer at the
prompt/response boundary in both tokenisation modes against TRL 1.16's own ids (tisdpo/data.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.tolerance import assert_close_to_truth, eps_floor, rel_err
from tests.trl_reference import trl_tokenized
from tisdpo import cli
from tisdpo.data import IGNORE_INDEX, PreferenceCollator, apply_chat_template, tokenize_row
from tisdpo.modeling import load_causal_lm, token_logps
from tisdpo.pretrained import fetch_model, gguf_path, load_tokenizer, pretrained_source
from tisdpo.validation import check_model_path

pytestmark = pytest.mark.realmodel

# rows of every kind, several of whose prompt/response boundaries merge in a BPE tokenizer
PLAIN = [
    {"prompt": "The answer: ", "chosen": "grape kind plum", "rejected": "rock kind slate"},  # prompt ends in a space
    {"prompt": "Name a fru", "chosen": "it: apple", "rejected": "it: a rock"},  # a word split across the boundary
    {"prompt": "Question: what is 2 + 2?\nAnswer:", "chosen": " 4", "rejected": " 5, surely"},
    {"prompt": "Say hello in French: ", "chosen": "Bonjour!", "rejected": " Hola."},  # one side merges
]
IMPLICIT = [
    {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for eight minutes.",
     "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Throw it at the wall."},
]
CHAT = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "The capital of France is Paris."}],
     "rejected": [{"role": "assistant", "content": "I will not tell you."}]},
    {"prompt": [{"role": "system", "content": "You are brief."},
                {"role": "user", "content": "How can I stay healthy?"}],
     "chosen": [{"role": "assistant", "content": "Sleep well, eat vegetables and walk every day."}],
     "rejected": [{"role": "assistant", "content": "Skip sleep and eat sweets."}]},
]


# ----------------------------------------------------------------------------------------------------------------
# getting the model
# ----------------------------------------------------------------------------------------------------------------


def test_fetch_model_writes_once_and_reuses(smollm2_dir, capsys):
    """The cached directory is a plain bf16 Llama (no GGUF quantizer left in its config) with the tokenizer and
    chat template; a second fetch (function or command) reuses it and says so."""
    lines = []
    assert fetch_model("smollm2", progress=lines.append) == smollm2_dir
    assert len(lines) == 1 and "using the converted model" in lines[0]
    assert cli.main(["fetch-model", "smollm2", "--output", smollm2_dir]) == 0
    assert capsys.readouterr().out.strip() == smollm2_dir
    config = json.load(open(os.path.join(smollm2_dir, "config.json")))
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (config["architectures"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"],
            config["tie_word_embeddings"]) == (["LlamaForCausalLM"], 30, 576, 49152, True)
    assert os.path.isfile(os.path.join(smollm2_dir, "tokenizer.json"))


def test_model_shape_and_tied_head(smollm2_fp32):
    model = smollm2_fp32
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tuple(model.lm_head.weight.shape) == (49152, 576)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_gguf_paths_are_model_paths(smollm2_fp32, smollm2_tokenizer):
    """A `.gguf` file is accepted where a model or tokenizer path is: `load_causal_lm` gives a plain, trainable
    model (no GGUF quantizer left) whose weights round to the converted directory's bf16 weights exactly, and its
    tokenizer equals the converted one."""
    from transformers.trainer_utils import validate_quantization_for_training

    path = gguf_path("smollm2")
    model = load_causal_lm(path, device="cpu", dtype="float32")
    validate_quantization_for_training(model)  # raises for a GGUF-quantized model ("purely quantized")
    assert getattr(model.config, "quantization_config", None) is None
    converted = dict(smollm2_fp32.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param.to(torch.bfloat16).float(), converted[name]), name
    del model
    check_model_path(path, "--model_name_or_path")
    assert pretrained_source(path) == (os.path.dirname(path), {"gguf_file": os.path.basename(path)})
    from_gguf = load_tokenizer(path)
    text = "Hello world! The answer: grape kind plum.\n<|im_start|>assistant\n"
    assert from_gguf(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
    assert from_gguf.apply_chat_template(CHAT[1]["prompt"], tokenize=False) == \
        smollm2_tokenizer.apply_chat_template(CHAT[1]["prompt"], tokenize=False)


# ----------------------------------------------------------------------------------------------------------------
# fused log-probs through the tied head
# ----------------------------------------------------------------------------------------------------------------


def _logprobs_three_ways(model, batch):
    """At the response positions of a collated batch: ours (`token_logps`), the model's own (its logits from its
    own forward, then a float32 log-softmax) and a float64 truth from that forward's decoder hidden states and the
    head weight. `use_cache=False` as the trainer's route passes it: with a cache, transformers does not treat
    packed `position_ids` as separate sequences."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    labels = batch["labels"]
    keep = labels != IGNORE_INDEX
    captured = []
    handle = model.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
    try:
        with torch.no_grad():
            ours = token_logps(model, batch)
            logits = model(**inputs, use_cache=False).logits
    finally:
        handle.remove()
    assert ours.dtype == torch.float32 and ours.shape == labels.shape and logits.dtype == model.dtype
    hidden = captured[-1][keep].double()
    target = labels[keep][:, None]
    truth = torch.log_softmax(hidden @ model.lm_head.weight.double().T, -1).gather(-1, target)[:, 0]
    own = torch.log_softmax(logits[keep].float(), -1).gather(-1, target)[:, 0]
    return ours[keep], own, truth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_logprobs_equal_the_models_own(smollm2_fp32, smollm2_tokenizer, dtype):
    """`token_logps` (decoder hidden states -> `tisdpo_kernels.fused_linear_logprobs` through the tied head,
    V=49152, padded and packed batches) against the model's own logits-based log-probs and a float64 truth from the
    same hidden states and head weight: our error stays within twice the model's own (the same dtype's logits, then
    float32 log-softmax) plus `eps_floor(float32, D + V)` (the result is float32; the sums run over the hidden size
    D for a logit and over V for the log-sum-exp), and the two differ by no more than their errors allow."""
    model = smollm2_fp32 if dtype == torch.float32 else smollm2_fp32.to(torch.bfloat16)
    try:
        tok = smollm2_tokenizer
        feats = [tokenize_row(row, tok) for row in PLAIN[:2] + CHAT[:1]]
        V, D = model.lm_head.weight.shape
        floor = eps_floor(torch.float32, D + V)
        for layout in ("padded", "packed"):
            batch = PreferenceCollator(tok.pad_token_id, padding_free=layout == "packed")(feats)
            ours, own, truth = _logprobs_three_ways(model, batch)
            assert ours.numel() == sum(len(f["chosen_input_ids"]) + len(f["rejected_input_ids"]) for f in feats)
            assert_close_to_truth(f"{dtype} {layout}", ours, own, truth, reduction=D + V)
            gap, own_err = rel_err(ours, own) * own.abs().max() / truth.abs().max(), rel_err(own, truth)
            assert gap <= 3 * own_err + floor, (layout, gap, own_err)
    finally:
        if dtype != torch.float32:
            smollm2_fp32.to(torch.float32)


def test_token_statistics_on_the_real_head(smollm2_fp32, smollm2_tokenizer):
    """TRL's per-token metrics from our passes over the real head (V=49152, logits up to ~30 in size) against a
    float64 truth from the same hidden states: the entropy of the torch backend and of the split backend's CPU
    path within twice the error of torch's own float32 entropy on materialised logits plus `eps_floor(float32,
    D + V)` (a logit sums over D, the entropy over V), is-top-1 equal to the float64 argmax, the mean logit
    within the same floor. A toy head (small logits) hides what this checks: the entropy `lse - sum p z` cancels
    two terms of size max|z|, so a sloppy reduction over V shows only at real logit sizes."""
    from tisdpo_kernels.chunked import chunked_linear_logprobs
    from tisdpo_kernels.ops._common import mean_logits
    from tisdpo_kernels.ops.linear_split import split_linear_logprobs

    tok, model = smollm2_tokenizer, smollm2_fp32
    feats = [tokenize_row(row, tok) for row in PLAIN[:2] + CHAT]
    batch = PreferenceCollator(tok.pad_token_id)(feats)
    keep = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False).last_hidden_state[keep]
    labels, weight = batch["labels"][keep], model.lm_head.weight
    V, D = weight.shape
    z = hidden.double() @ weight.double().T
    logp = torch.log_softmax(z, -1)
    truth = -(logp.exp() * logp).sum(-1)
    z32 = hidden @ weight.T
    own = -(torch.softmax(z32, -1) * torch.log_softmax(z32, -1)).sum(-1)
    assert z.abs().max() > 20  # real logit sizes: what the module docstring says a toy hides
    with torch.no_grad():
        paths = {"torch": chunked_linear_logprobs(hidden, weight, labels, token_stats=True),
                 "split (CPU)": split_linear_logprobs(hidden, weight, labels, token_stats=True, elementwise="torch")}
    for name, (_, entropy, top1) in paths.items():
        print(f"{name}: entropy error {rel_err(entropy, truth):.2e} (torch's own fp32 {rel_err(own, truth):.2e})")
        assert_close_to_truth(f"{name} entropy", entropy, own, truth, reduction=D + V)
        assert torch.equal(top1, z.argmax(-1) == labels), name
    mean_truth = z.mean(-1)
    assert rel_err(mean_logits(hidden, weight, None), mean_truth) <= eps_floor(torch.float32, D + V)


# ----------------------------------------------------------------------------------------------------------------
# the tokenizer at the prompt/response boundary
# ----------------------------------------------------------------------------------------------------------------


def _texts(row, tok):
    """`(prompt, chosen, rejected)` texts as tokenised: the chat template's rendering, else the plain texts with
    the EOS text appended to the responses."""
    if isinstance(row["chosen"], list):
        out = apply_chat_template(row, tok)
        return out["prompt"], out["chosen"], out["rejected"]
    if "prompt" not in row:
        from tisdpo.formats import extract_prompt

        return extract_prompt(row["chosen"], row["rejected"])[0], *[
            r + tok.eos_token for r in extract_prompt(row["chosen"], row["rejected"])[1:]]
    return row["prompt"], row["chosen"] + tok.eos_token, row["rejected"] + tok.eos_token


def test_joint_tokenization_equals_trls_own_ids(smollm2_tokenizer):
    """tokenization='joint' gives TRL 1.16's ids (its own DPOTrainer tokenisation) on every row, those whose
    boundary merges included."""
    tok = smollm2_tokenizer
    for group in (PLAIN, IMPLICIT, CHAT):  # a TRL dataset holds one kind of row
        for row, trl in zip(group, trl_tokenized([dict(r) for r in group], tok), strict=True):
            ours = tokenize_row(row, tok, tokenization="joint")
            assert (ours["prompt_input_ids"], ours["chosen_input_ids"], ours["rejected_input_ids"]) == (
                trl["prompt_ids"], trl["chosen_ids"], trl["rejected_ids"]), row


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_boundary_keeps_every_character(smollm2_tokenizer, mode):
    """In both modes prompt + response decodes to the text it was made from (nothing dropped or doubled at the
    boundary). 'separate': the prompt's and the responses' own tokens. 'joint': where the boundary merges (a prompt
    ending in a space, a word split across it) the merged token opens the response and the prompt is shorter."""
    tok = smollm2_tokenizer
    for row in PLAIN + IMPLICIT + CHAT:
        prompt, chosen, rejected = _texts(row, tok)
        ids = tokenize_row(row, tok, tokenization=mode)
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            assert tok.decode(ids["prompt_input_ids"] + ids[f"{side}_input_ids"]) == prompt + text, (mode, row)
        if mode == "separate":
            assert ids["prompt_input_ids"] == tok(prompt, add_special_tokens=not isinstance(row["chosen"], list))[
                "input_ids"]
            assert tok.decode(ids["chosen_input_ids"]) == chosen
    space, split = (tokenize_row(row, tok, tokenization=mode) for row in PLAIN[:2])
    first = tok.convert_ids_to_tokens(space["chosen_input_ids"][:1])[0]
    if mode == "joint":
        assert first == "Ġgrape" and tok.decode(space["prompt_input_ids"]) == "The answer:"
        assert tok.decode(split["chosen_input_ids"]).startswith(" fruit")
    else:
        assert not first.startswith("Ġ")  # the response's own first token: no space in front
        assert tok.decode(space["prompt_input_ids"]) == "The answer: "
    for row in CHAT:  # the chat template ends the prompt on a token boundary: both modes agree
        assert tokenize_row(row, tok, tokenization="joint") == tokenize_row(row, tok)


# ----------------------------------------------------------------------------------------------------------------
# method P through the chat template
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_method_p_through_the_chat_template(smollm2_fp32, smollm2_tokenizer, tmp_path, mode):
    """Method P on dialogues: each response scored under the harmless and the harmful system prompt
    (`DEFAULT_SYSTEM_PROMPTS`, rendered by SmolLM2's chat template in place of its default system message) gives
    one finite weight per response token of the trainer's tokenisation, and the two prompts give different
    log-probs (weights not all 0)."""
    import datasets

    from tisdpo.weights import DEFAULT_SYSTEM_PROMPTS, estimate_token_weights, with_system_prompt

    tok = smollm2_tokenizer
    good, bad = DEFAULT_SYSTEM_PROMPTS
    rendered = tok.apply_chat_template(with_system_prompt(CHAT[0], good)["prompt"], tokenize=False)
    assert rendered.startswith(f"<|im_start|>system\n{good}<|im_end|>\n") and "SmolLM" not in rendered
    out = estimate_token_weights(datasets.Dataset.from_list([dict(r) for r in CHAT]), smollm2_fp32, None, tok,
                                 method="P", tokenization=mode, cache_dir=str(tmp_path), progress=False)
    for i, row in enumerate(CHAT):
        ids = tokenize_row(row, tok, tokenization=mode)
        for side in ("chosen", "rejected"):
            weights = torch.tensor(out[i][f"{side}_weights"])
            assert weights.shape == (len(ids[f"{side}_input_ids"]),), (i, side)
            assert torch.isfinite(weights).all() and weights.abs().max() > 1e-3, (i, side, weights)
