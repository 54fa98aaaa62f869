"""A TRL DPOTrainer user switching the import: arguments, config fields, data and the silent differences from TRL
(tisdpo/trainer.py, tisdpo/config.py, tisdpo/data.py, tisdpo/trl_compat.py, tisdpo/offload.py, tisdpo/model_card.py).
"""

import functools
import logging
import os
import warnings

import datasets
import pytest
import torch

import tisdpo.config
import tisdpo.data
import tisdpo.offload
import tisdpo.trainer
from tests.trainer.tiny import dataset_of, hh_records, no_checkpointing, synthetic_pairs, tiny_llama
from tisdpo import TISDPOConfig, TISDPOTrainer
from tisdpo.data import tokenize_row
from tisdpo.offload import offload_activations

BOUNDARY = {"prompt": "Name 1 fru", "chosen": "it: apple", "rejected": "it: rock"}  # BPE merges "fruit" across


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def trl_collator(features):
    """A collator written for TRL: reads `prompt_ids` / `chosen_ids` / `rejected_ids`, returns TRL's layout
    (input_ids, attention_mask, completion_mask; [2B, T], chosen rows first, right-padded with 0)."""
    rows, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for f in features:
            rows.append(list(f["prompt_ids"]) + list(f[key]))
            masks.append([0] * len(f["prompt_ids"]) + [1] * len(f[key]))
    width = max(map(len, rows))
    pad = [[0] * (width - len(r)) for r in rows]
    return {
        "input_ids": torch.tensor([r + p for r, p in zip(rows, pad, strict=True)]),
        "attention_mask": torch.tensor([[1] * len(r) + p for r, p in zip(rows, pad, strict=True)]),
        "completion_mask": torch.tensor([m + p for m, p in zip(masks, pad, strict=True)]),
    }


# ---------------------------------------------------------------------------------------------------------------
# the user script
# ---------------------------------------------------------------------------------------------------------------

# TRL DPOConfig fields of the trainer side: honoured (a value) or rejected (ValueError naming the field)
HONOURED = dict(
    sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=1, activation_offloading=True,
    pad_to_multiple_of=8, trust_remote_code=False, router_aux_loss_coef=0.001, f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5, generate_during_eval=False, tokenization="joint", gradient_checkpointing=False,
    truncation_mode="keep_start", max_length=1024, padding_free=False, precompute_ref_log_probs=False,
    precompute_ref_batch_size=None, dataset_num_proc=None, disable_dropout=True, model_init_kwargs=None,
    # the loss side's fields, as a TRL script sets them
    beta=0.1, loss_type=["sigmoid"], loss_weights=[1.0], label_smoothing=0.0, ld_alpha=None, use_weighting=False,
    discopop_tau=0.05,
)
REJECTED = [
    (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
    (dict(f_divergence_type="alpha_divergence"), "f_divergence_type"),
    (dict(generate_during_eval=True), "generate_during_eval"),
    (dict(sync_ref_model=True, precompute_ref_log_probs=True), "sync_ref_model"),
    (dict(ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha"),
    (dict(ref_model_sync_steps=0), "ref_model_sync_steps"),
    (dict(pad_to_multiple_of=0), "pad_to_multiple_of"),
    (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
    (dict(tokenization="merged"), "tokenization"),
]


@pytest.mark.parametrize("kwargs, field", REJECTED)
def test_unsupported_trl_fields_are_rejected_by_name(quick_args, kwargs, field):
    with pytest.raises(ValueError, match=field):
        TISDPOConfig(**quick_args, **kwargs)


def test_exo_pair_with_label_smoothing_trains(tok, quick_args):
    """TRL's loss_type='exo_pair' with its epsilon (label_smoothing > 0, 1e-3 in the EXO paper) is accepted and
    trains (with label_smoothing=0 it is refused: its loss would be infinite)."""
    with pytest.raises(ValueError, match="label_smoothing"):
        TISDPOConfig(**quick_args, loss_type="exo_pair")
    args = TISDPOConfig(**dict(quick_args, max_steps=1), loss_type="exo_pair", label_smoothing=1e-3)
    assert args.pair_loss_kwargs()["label_smoothing"] == 1e-3
    trainer = TISDPOTrainer(tiny_llama(len(tok)), args=args, train_dataset=dataset_of(synthetic_pairs(3)),
                            processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 1 and torch.isfinite(torch.tensor(logged[0]["loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_trl_style_script_runs(tok, quick_args):
    """Every trainer argument and config field of a TRL script: a custom TRL collator, compute_metrics, an
    (optimizer, scheduler) pair, the deprecated pad_token; train, evaluate, save (with a model card)."""
    quick_args.pop(next(iter(no_checkpointing())))  # the script says `gradient_checkpointing`, TRL's name
    quick_args.update(max_steps=2, per_device_train_batch_size=2, eval_strategy="no")
    with pytest.warns(FutureWarning, match="pad_token"):
        args = TISDPOConfig(**quick_args, **HONOURED, pad_token="<pad>")
    model = tiny_llama(len(tok))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        acc = prediction.predictions["rewards/accuracies"]
        return {"weighted_accuracy": float((acc * prediction.label_ids).sum() / prediction.label_ids.sum())}

    ds = dataset_of(synthetic_pairs(6))
    trainer = TISDPOTrainer(model=model, ref_model=None, args=args, data_collator=trl_collator, train_dataset=ds,
                            eval_dataset={"a": ds, "b": ds}, processing_class=tok, compute_metrics=compute_metrics,
                            callbacks=None, optimizers=(optimizer, scheduler), quantization_config=None,
                            peft_config=None)
    assert trainer.optimizer is optimizer and trainer.lr_scheduler is scheduler
    trainer.train()
    assert trainer.state.global_step == 2
    metrics = trainer.evaluate()
    assert {"eval_a_weighted_accuracy", "eval_b_weighted_accuracy"} <= set(metrics)
    assert seen and seen[0].predictions["rewards/chosen"].shape == (2,)  # 6 pairs: 2 eval batches of 3
    assert seen[0].label_ids.tolist() == [3, 3]
    trainer.save_model()
    assert os.path.isfile(os.path.join(args.output_dir, "README.md"))
    with pytest.raises(ValueError, match="quantization_config"):
        TISDPOTrainer(model=tiny_llama(len(tok)), args=TISDPOConfig(**quick_args), train_dataset=ds,
                      processing_class=tok, quantization_config=object())


def test_trl_collator_batch_equals_ours(tok, quick_args):
    """A batch in TRL's layout (completion_mask) gives the loss and gradients of our collator's batch (float64)."""
    policy, ref = tiny_llama(len(tok), seed=0).double(), tiny_llama(len(tok), seed=1).double()
    trainer = TISDPOTrainer(policy, ref_model=ref, args=TISDPOConfig(**quick_args),
                            train_dataset=dataset_of(hh_records()[:4]), processing_class=tok)
    feats = [trainer.train_dataset[i] for i in range(4)]
    results = []
    for collate in (trainer.data_collator, tisdpo.trainer.TRLFeatureAliases(trl_collator)):
        policy.zero_grad()
        loss = trainer.compute_loss(policy, collate(feats))
        loss.backward()
        results.append((loss, _grads(policy)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)  # same sums, same order
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-10, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# silent differences: defaults
# ---------------------------------------------------------------------------------------------------------------


def test_defaults_are_trls(tmp_path):
    config = TISDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert (config.learning_rate, config.logging_steps) == (1e-6, 10)
    assert (config.truncation_mode, config.max_length, config.max_prompt_length) == ("keep_start", 1024, None)
    assert config.bf16 is False and config._bf16_off_on_cpu  # ours on CPU, logged by the trainer
    assert config.activation_checkpointing if hasattr(config, "activation_checkpointing") else True


def test_bf16_default_on_a_bf16_cuda_device_is_trls(tmp_path, monkeypatch):
    """bf16=None resolves like TRL (on unless fp16) on a CUDA device with bfloat16 (TrainingArguments' own device
    checks are not part of this: the resolution happens before them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    resolved = {}

    def stop(self):
        resolved.update(bf16=self.bf16)
        raise RuntimeError("stop before the device checks")

    monkeypatch.setattr(tisdpo.config.TrainingArguments, "__post_init__", stop)
    for fp16, want in ((False, True), (True, False)):
        with pytest.raises(RuntimeError, match="stop"):
            TISDPOConfig(output_dir=str(tmp_path), report_to="none", fp16=fp16)
        assert resolved["bf16"] is want


def test_gradient_checkpointing_names_without_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        default = TISDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        old_name = TISDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                gradient_checkpointing=False, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert default.gradient_checkpointing is True and old_name.gradient_checkpointing is False
    if hasattr(old_name, "activation_checkpointing"):
        assert old_name.activation_checkpointing is False
        assert old_name.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_keep_start_and_no_prompt_limit_by_default(tok, quick_args):
    """TRL's truncation: a 600-token prompt is kept whole (no max_prompt_length), and with max_length=64 a pair
    keeps its first 64 tokens (prompt first, then the responses' starts)."""
    long_prompt = " ".join(["word"] * 600)
    ds = dataset_of([{"prompt": long_prompt, "chosen": " apple", "rejected": " rock"}])
    n_prompt = len(tokenize_row(ds[0], tok)["prompt_input_ids"])
    assert n_prompt >= 600
    trainer = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**dict(quick_args, max_length=None)),
                            train_dataset=ds, processing_class=tok)
    assert len(trainer.train_dataset[0]["prompt_input_ids"]) == n_prompt
    prompt = " ".join(["word"] * 40)
    row = dict(prompt=prompt, chosen=" " + " ".join(["apple"] * 60), rejected=" " + " ".join(["rock"] * 60))
    full = tokenize_row(row, tok)
    n_p = len(full["prompt_input_ids"])
    trainer = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**dict(quick_args, max_length=n_p + 20)),
                            train_dataset=dataset_of([row]), processing_class=tok)
    assert trainer.train_dataset[0]["prompt_input_ids"] == full["prompt_input_ids"]
    assert trainer.train_dataset[0]["chosen_input_ids"] == full["chosen_input_ids"][:20]


def test_differences_from_trl_are_logged_once(tok, quick_args, caplog):
    with caplog.at_level(logging.WARNING, logger="tisdpo.trainer"):
        trainer = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**dict(quick_args, max_steps=2)),
                                train_dataset=dataset_of(synthetic_pairs(4)), processing_class=tok)
        trainer.train()
    assert caplog.text.count("differ from TRL") == 1
    assert "tokenization='separate'" in caplog.text and "bf16=False on CPU" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# tokenisation
# ---------------------------------------------------------------------------------------------------------------


def test_joint_tokenization_is_trls_and_reaches_weight_estimation(tok, tmp_path):
    """tokenization='joint' equals a transcription of TRL 1.16's rule (prompt and prompt+response tokenised, the
    prompt is their common prefix with both responses, each response what follows it, the EOS text appended
    first); 'separate' differs on this boundary-merging pair; estimate_token_weights writes one weight per token of
    the convention it is given."""
    from tisdpo.weights import estimate_token_weights

    prompt_ids = tok(BOUNDARY["prompt"])["input_ids"]
    chosen_full = tok(BOUNDARY["prompt"] + BOUNDARY["chosen"] + tok.eos_token)["input_ids"]
    rejected_full = tok(BOUNDARY["prompt"] + BOUNDARY["rejected"] + tok.eos_token)["input_ids"]
    n_prompt = min(_common_prefix(prompt_ids, chosen_full), _common_prefix(prompt_ids, rejected_full))
    assert n_prompt < len(prompt_ids)  # the merge across the boundary this pair is made for
    joint = tokenize_row(BOUNDARY, tok, tokenization="joint")
    separate = tokenize_row(BOUNDARY, tok)
    assert joint["prompt_input_ids"] == prompt_ids[:n_prompt] and joint["chosen_input_ids"] == chosen_full[n_prompt:]
    assert joint["rejected_input_ids"] == rejected_full[n_prompt:]
    assert joint["chosen_input_ids"] != separate["chosen_input_ids"]
    ds = dataset_of([BOUNDARY, *synthetic_pairs(2)])
    model = tiny_llama(len(tok))
    for mode, want in (("joint", joint), ("separate", separate)):
        out = estimate_token_weights(ds, model, tiny_llama(len(tok), seed=1), tok, method="S", tokenization=mode,
                                     cache_dir=str(tmp_path / mode), progress=False)
        assert len(out[0]["chosen_weights"]) == len(want["chosen_input_ids"])
        trainer_args = TISDPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", tokenization=mode)
        trainer = TISDPOTrainer(model, args=trainer_args, train_dataset=out, processing_class=tok)
        assert trainer.train_dataset[0]["chosen_weights"] == pytest.approx(out[0]["chosen_weights"])


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# pairs whose prompt/response boundary merges in a BPE tokenizer: a word split across it, a prompt ending in a space
# (TRL's older rule dropped the first response word there), a merge on one side only; then plain, implicit-prompt
# and conversational rows
JOINT_ROWS = [
    BOUNDARY,
    {"prompt": "answer: ", "chosen": "grape kind plum", "rejected": "rock kind slate"},
    {"prompt": "Name 2 fruits: ", "chosen": "apple and pear", "rejected": " rock"},
    {"prompt": "Name 1 fruit", "chosen": "s: plum", "rejected": ": rock"},
    *synthetic_pairs(3),
    *hh_records()[:2],
    {"prompt": [{"role": "user", "content": "Name 1 fruit"}],
     "chosen": [{"role": "assistant", "content": "apple"}], "rejected": [{"role": "assistant", "content": "rock"}]},
]


@pytest.mark.parametrize("add_bos", [False, True], ids=["no-bos", "bos"])
def test_joint_tokenization_equals_trls_own(add_bos):
    """tokenization='joint' gives the ids of TRL 1.16's own DPOTrainer tokenisation on every row, including those
    whose boundary merges (the prompt loses its last tokens, no response text is lost); 'separate' keeps the
    prompt's own tokens there."""
    from tests.trainer.tiny import build_tokenizer
    from tests.trl_reference import trl_tokenized

    tok = build_tokenizer(add_bos=add_bos)
    kinds = {}  # a TRL dataset holds one kind of row: explicit prompt, implicit prompt, conversational
    for row in JOINT_ROWS:
        kinds.setdefault(("prompt" in row, isinstance(row["chosen"], list)), []).append(dict(row))
    rows = [row for group in kinds.values() for row in group]
    want = [ids for group in kinds.values() for ids in trl_tokenized(group, tok)]
    for i, (row, trl) in enumerate(zip(rows, want, strict=True)):
        ours = tokenize_row(row, tok, tokenization="joint")
        assert (ours["prompt_input_ids"], ours["chosen_input_ids"], ours["rejected_input_ids"]) == (
            trl["prompt_ids"], trl["chosen_ids"], trl["rejected_ids"]), (i, row)
    space = tokenize_row(JOINT_ROWS[1], tok, tokenization="joint")
    assert tok.decode(space["chosen_input_ids"]).startswith(" grape")  # the first response word is kept
    separate = tokenize_row(JOINT_ROWS[1], tok)
    assert separate["prompt_input_ids"] == tok(JOINT_ROWS[1]["prompt"])["input_ids"]
    assert len(space["prompt_input_ids"]) < len(separate["prompt_input_ids"])


def test_prompt_ending_in_a_space_warns(tok, caplog, monkeypatch):
    monkeypatch.setattr(tisdpo.data, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="tisdpo.data"):
        tokenize_row({"prompt": "Name 1 fruit:", "chosen": " apple", "rejected": " rock"}, tok)
        assert "ends in a space" not in caplog.text
        tokenize_row({"prompt": "Name 1 fruit: ", "chosen": "apple", "rejected": "rock"}, tok)
    assert "ends in a space" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


def test_iterable_dataset_with_weights_trains(tok, quick_args):
    """A streaming dataset is tokenised on the fly, weights included: its batches equal the map-style ones."""
    g = torch.Generator().manual_seed(0)
    records = []
    for r in synthetic_pairs(6):
        row = tokenize_row(r, tok)
        records.append(dict(r, chosen_weights=torch.rand(len(row["chosen_input_ids"]), generator=g).tolist(),
                            rejected_weights=torch.rand(len(row["rejected_input_ids"]), generator=g).tolist()))
    ds = dataset_of(records)
    quick_args.update(max_steps=2, per_device_train_batch_size=3)
    stream = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args),
                           train_dataset=ds.to_iterable_dataset(), processing_class=tok)
    assert isinstance(stream.train_dataset, datasets.IterableDataset)
    batch = next(iter(stream.get_train_dataloader()))
    mapped = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args), train_dataset=ds,
                           processing_class=tok)
    want = mapped.data_collator([mapped.train_dataset[i] for i in range(3)])
    assert set(batch) == set(want)
    for key in want:
        assert torch.equal(batch[key], want[key]), key
    stream.train()
    assert stream.state.global_step == 2
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args, precompute_ref_log_probs=True),
                      train_dataset=ds.to_iterable_dataset(), processing_class=tok)


def test_trl_tokenized_columns_are_accepted(tok, quick_args):
    rows = [tokenize_row(r, tok) for r in synthetic_pairs(3)]
    trl_rows = [{"prompt_ids": r["prompt_input_ids"], "chosen_ids": r["chosen_input_ids"],
                 "rejected_ids": r["rejected_input_ids"]} for r in rows]
    trainer = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args), train_dataset=dataset_of(trl_rows),
                            processing_class=tok)
    assert [trainer.train_dataset[i] for i in range(3)] == rows


def test_pad_to_multiple_of_keeps_the_loss(tok, quick_args):
    policy, ref = tiny_llama(len(tok), seed=0).double(), tiny_llama(len(tok), seed=1).double()
    ds = dataset_of(hh_records()[:3])
    losses = []
    for padding_free in (False, True):
        for multiple in (None, 64):
            args = TISDPOConfig(**quick_args, padding_free=padding_free, pad_to_multiple_of=multiple)
            trainer = TISDPOTrainer(policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
            if multiple:
                assert batch["input_ids"].shape[-1] % multiple == 0
            losses.append(trainer.compute_loss(policy, batch))
    for loss in losses[1:]:  # float64; padding changes only the summation order
        torch.testing.assert_close(loss, losses[0], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# reference model, PEFT, saving
# ---------------------------------------------------------------------------------------------------------------


def test_reference_is_built_lazily_from_the_initial_policy(tok, quick_args):
    policy = tiny_llama(len(tok)).double()
    ds = dataset_of(hh_records()[:3])
    trainer = TISDPOTrainer(policy, args=TISDPOConfig(**quick_args), train_dataset=ds, processing_class=tok)
    assert trainer.ref_model is None  # no second model in memory at construction
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    loss = trainer.compute_loss(policy, batch)
    assert trainer.ref_model is not None and trainer.ref_model is not policy
    torch.testing.assert_close(loss, torch.tensor(0.6931471805599453, dtype=torch.float64), rtol=1e-12, atol=0)
    changed = TISDPOTrainer(policy, args=TISDPOConfig(**quick_args), train_dataset=ds, processing_class=tok)
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="ref_model"):
        changed.compute_loss(policy, batch)
    precomputed = TISDPOTrainer(policy, args=TISDPOConfig(**quick_args, precompute_ref_log_probs=True),
                                train_dataset=ds, processing_class=tok)
    assert precomputed.ref_model is None and precomputed._build_ref is None


def test_building_the_reference_says_so_once_with_its_time(tok, quick_args, caplog):
    """The lazy copy (a checksum of every weight, then a deep copy: seconds for a real model, paid once before the
    first step) is announced by a log line and its time, at train() start, and not again."""
    trainer = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args, max_steps=2),
                            train_dataset=dataset_of(hh_records()[:3]), processing_class=tok)
    with caplog.at_level(logging.INFO, logger="tisdpo.trainer"):
        trainer.train()
    announced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Building the reference model")]
    params = sum(p.numel() for p in trainer.model.parameters()) / 1e6
    assert announced == [f"Building the reference model ({params:.1f}M parameters): a frozen copy of the initial "
                         "policy, its weights checked unchanged since TISDPOTrainer(...), once, before the first step."]
    assert sum("Reference model built in" in r.getMessage() for r in caplog.records) == 1


def test_lora_initialisation_depends_on_args_seed_only(tok, quick_args):
    peft = pytest.importorskip("peft")
    weights = []
    for global_seed in (1, 2):
        model = tiny_llama(len(tok))  # (seeds the global RNG itself)
        torch.manual_seed(global_seed)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")
        trainer = TISDPOTrainer(model, args=TISDPOConfig(**quick_args),
                                train_dataset=dataset_of(synthetic_pairs(2)), processing_class=tok, peft_config=lora)
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n})
    assert weights[0] and all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_save_model_writes_a_model_card(tok, quick_args):
    trainer = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args),
                            train_dataset=dataset_of(synthetic_pairs(2)), processing_class=tok)
    trainer.save_model()
    with open(os.path.join(quick_args["output_dir"], "README.md")) as f:
        card = f.read()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "- tisdpo" in card and "- dpo" in card
    assert "arxiv.org/abs/2410.04350" in card and "arxiv.org/abs/2305.18290" in card


def test_sync_ref_model_mixes_policy_into_reference(tok, quick_args):
    """TR-DPO: after each step (sync_steps=1) ref = alpha * policy + (1 - alpha) * previous ref."""
    quick_args.update(max_steps=1, optim="sgd", learning_rate=0.5)
    ref = tiny_llama(len(tok), seed=1)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    args = TISDPOConfig(**quick_args, sync_ref_model=True, ref_model_mixup_alpha=0.25, ref_model_sync_steps=1)
    trainer = TISDPOTrainer(tiny_llama(len(tok), seed=0), ref_model=ref, args=args,
                            train_dataset=dataset_of(synthetic_pairs(3)), processing_class=tok)
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    for name, param in ref.named_parameters():
        torch.testing.assert_close(param, 0.25 * policy[name].detach() + 0.75 * before[name], msg=name)
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="sync_ref_model"):
        TISDPOTrainer(tiny_llama(len(tok)), args=args, train_dataset=dataset_of(synthetic_pairs(2)),
                      processing_class=tok, peft_config=peft.LoraConfig(r=2, target_modules=["q_proj"]))


def test_router_aux_loss_is_added_for_moe_models(tok, quick_args):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)  # float32: the expert matmul (grouped_mm) has no float64 kernel
    ds = dataset_of(synthetic_pairs(3))
    losses = {}
    for coef in (0.0, 0.5):
        trainer = TISDPOTrainer(model, ref_model=tiny_llama(len(tok)),
                                args=TISDPOConfig(**quick_args, router_aux_loss_coef=coef), train_dataset=ds,
                                processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        losses[coef] = trainer.compute_loss(model, batch, return_outputs=True)
    with torch.no_grad():
        aux = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=True).aux_loss
    assert "aux_loss" not in losses[0.0][1] and aux > 0
    # float32 sums of a handful of terms: a few eps
    torch.testing.assert_close(losses[0.5][0], losses[0.0][0] + 0.5 * aux, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses[0.5][1]["aux_loss"], aux, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# activation offloading
# ---------------------------------------------------------------------------------------------------------------


def test_offload_hooks_are_exact_and_clean_up(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(128, 64, requires_grad=True)

    def loss_and_grads(context):
        x.grad, layer.weight.grad = None, None
        with context:
            loss = torch.tanh(layer(torch.relu(layer(x)))).pow(2).sum()
        loss.backward()
        return loss.detach(), x.grad.clone(), layer.weight.grad.clone()

    plain = loss_and_grads(torch.enable_grad())
    offloaded = loss_and_grads(offload_activations(min_bytes=1, spill_dir=str(tmp_path)))
    for a, b in zip(plain, offloaded, strict=True):
        assert torch.equal(a, b)
    assert os.listdir(tmp_path) == []  # every spill file removed once the graph is gone


def test_activation_offloading_in_the_trainer(tok, quick_args, monkeypatch):
    """activation_offloading=True spills the policy's saved activations during compute_loss and gives the same
    loss and gradients."""
    loads = []
    original = tisdpo.offload._Spilled.load
    monkeypatch.setattr(tisdpo.offload._Spilled, "load", lambda self: loads.append(1) or original(self))
    monkeypatch.setattr(tisdpo.trainer, "offload_activations", functools.partial(offload_activations, min_bytes=1))
    policy, ref = tiny_llama(len(tok), seed=0).double(), tiny_llama(len(tok), seed=1).double()
    ds = dataset_of(hh_records()[:3])
    results = []
    for offload in (False, True):
        trainer = TISDPOTrainer(policy, ref_model=ref, args=TISDPOConfig(**quick_args, activation_offloading=offload),
                                train_dataset=ds, processing_class=tok)
        policy.zero_grad()
        policy.train()
        loss = trainer.compute_loss(policy, trainer.data_collator([trainer.train_dataset[i] for i in range(3)]))
        loss.backward()
        results.append((loss.detach(), _grads(policy)))
        assert bool(loads) is offload
    # float64; a restored activation is contiguous where the original may not have been, so BLAS may sum the
    # backward's products in another order: float64 rounding only
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-10, atol=1e-14, msg=name)
