"""TISDPOTrainer on tiny CPU models: oracle equality, layouts, reference modes, resume, DDP and learning."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.trainer.tiny import dataset_of, hh_records, no_checkpointing, synthetic_pairs, tiny_llama
from tisdpo import TISDPOConfig, TISDPOTrainer
from tisdpo.data import REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS, PreferenceCollator, tokenize_row
from tisdpo_kernels.reference import reference_tis_dpo_loss
from tisdpo_kernels.transforms import apply_weight_transform

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _with_weights(records, tok, seed=0):
    """Attach random per-token weight columns (raw transform arguments, as `tisdpo.weights` writes them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in records:
        row = tokenize_row(r, tok)
        out.append(dict(
            r,
            chosen_weights=(2 * torch.randn(len(row["chosen_input_ids"]), generator=g)).tolist(),
            rejected_weights=(2 * torch.randn(len(row["rejected_input_ids"]), generator=g)).tolist(),
        ))
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _decoder_hidden(model, batch):
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


ORACLE_CASES = {
    "tisdpo-weights-padded": dict(weight_transform="threshold_and_scale", label_smoothing=0.1),
    "tisdpo-exp-clamp-packed": dict(weight_transform="exp_clamp", weight_transform_kwargs={"k": 0.5, "mu": 0.7},
                                    padding_free=True),
    "tdpo2-packed": dict(kl="tdpo2", padding_free=True),
    "tisdpo-kl-ipo": dict(kl="tisdpo", loss_type="ipo", alpha=0.3),
    "mpo-ld-wpo-packed": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], ld_alpha=0.5,
                              use_weighting=True, weight_transform="threshold", padding_free=True),
    "rpo-alpha-robust": dict(loss_type="robust", label_smoothing=0.2, rpo_alpha=0.5),
    "exo-pair": dict(loss_type="exo_pair", label_smoothing=1e-3),
}


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_step_matches_reference_loss(tok, quick_args, case):
    """compute_loss + backward (float64) equals tisdpo_kernels.reference on materialised logits: loss, metrics and
    the gradient of every parameter; the LM head module only ever sees zero positions."""
    options = ORACLE_CASES[case]
    policy, ref = tiny_llama(len(tok), seed=0).double(), tiny_llama(len(tok), seed=1).double()
    records = _with_weights(hh_records()[:5], tok)
    args = TISDPOConfig(**quick_args, beta=0.3, **options)
    trainer = TISDPOTrainer(policy, ref_model=ref, args=args, train_dataset=dataset_of(records), processing_class=tok)
    feats = [trainer.train_dataset[i] for i in (4, 0, 2)]
    head_widths = []
    # the model's own head call sees zero positions ([rows, 0, D]); the second call is the fused loss run as the
    # head's forward (tisdpo.distributed.head_forward) on the flattened [tokens, D] rows, returning (loss, metrics)
    policy.lm_head.register_forward_hook(
        lambda module, inp, out: head_widths.append(inp[0].shape[1] if inp[0].dim() == 3 else type(out).__name__))

    loss, metrics = trainer.compute_loss(trainer.model, trainer.data_collator(feats), return_outputs=True)
    loss.backward()
    got = _grads(policy)
    assert head_widths == [0, "tuple"]
    policy.zero_grad()

    batch = PreferenceCollator(tok.pad_token_id)(feats)
    tensors = dict(ref_hidden=_decoder_hidden(ref, batch).detach(), ref_weight=ref.lm_head.weight.detach())
    want_loss, want_metrics = reference_tis_dpo_loss(
        _decoder_hidden(policy, batch), policy.lm_head.weight, batch["labels"],
        token_weights=apply_weight_transform(batch["token_weights"].double(), args.weight_transform,
                                             **(args.weight_transform_kwargs or {})),
        beta=0.3, alpha=args.alpha, kl=args.kl, **args.pair_loss_kwargs(), **tensors, token_stats=True,
    )
    want_loss.backward()
    want = _grads(policy)
    print(f"{case}: loss {loss.item():.12g} vs {want_loss.item():.12g}")
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    assert {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"} <= set(want_metrics)
    for name in want_metrics:
        torch.testing.assert_close(metrics[name], want_metrics[name], rtol=1e-9, atol=1e-12, msg=name)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-12, msg=name)


def test_sft_reverse_matches_reference(tok, quick_args):
    """loss_type='sft' with reverse_preferences=True is the NLL of the (original) rejected responses averaged over
    their tokens (TRL's 'sft'), times its weight."""
    policy = tiny_llama(len(tok), seed=0).double()
    records = synthetic_pairs(4)
    args = TISDPOConfig(**quick_args, loss_type=["sft"], loss_weights=[2.0], reverse_preferences=True,
                        padding_free=True)
    trainer = TISDPOTrainer(policy, args=args, train_dataset=dataset_of(records), processing_class=tok)
    assert trainer.ref_model is None
    feats = [trainer.train_dataset[i] for i in range(4)]
    assert [f["chosen_input_ids"] for f in feats] == [tokenize_row(r, tok)["rejected_input_ids"] for r in records]
    loss, metrics = trainer.compute_loss(policy, trainer.data_collator(feats), return_outputs=True)
    loss.backward()
    got = _grads(policy)
    policy.zero_grad()

    batch = PreferenceCollator(tok.pad_token_id)(feats)
    chosen = {k: v[:4] for k, v in batch.items() if k != "cu_seqlens"}
    logits = policy(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"]).logits
    logps = torch.log_softmax(logits, -1).gather(-1, chosen["labels"].clamp(min=0)[..., None])[..., 0]
    mask = chosen["labels"] != -100
    want_loss = -2.0 * (logps * mask).sum() / mask.sum()
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["logps/chosen"], (logps * mask).sum(1).mean().detach(), rtol=1e-10,
                               atol=1e-12)
    for name, grad in _grads(policy).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded(tok, quick_args, attn):
    """Packed (position_ids, no mask) and padded batches give the same loss, metrics and gradients. Float64, so
    the only differences are summation order: tolerance 1e-9 relative."""
    policy = tiny_llama(len(tok), seed=0, attn_implementation=attn).double()
    ref = tiny_llama(len(tok), seed=1, attn_implementation=attn).double()
    ds = dataset_of(_with_weights(hh_records()[:6], tok, seed=3))
    results = []
    for padding_free in (False, True):
        args = TISDPOConfig(**quick_args, padding_free=padding_free, weight_transform="threshold")
        trainer = TISDPOTrainer(policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
        assert trainer.padding_free is padding_free
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
        assert ("position_ids" in batch) is padding_free
        policy.zero_grad()
        loss, metrics = trainer.compute_loss(policy, batch, return_outputs=True)
        loss.backward()
        results.append((loss, metrics, _grads(policy)))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-9, atol=1e-12)
    for name in metrics_a:
        torch.testing.assert_close(metrics_a[name], metrics_b[name], rtol=1e-9, atol=1e-9, msg=name)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-8, atol=1e-12, msg=name)


def test_token_metrics_off_skips_only_the_per_token_metrics(tok, quick_args):
    """`token_metrics=False`: the step's loss, gradients and other metrics are the same (exactly: the statistics
    are a side output of the same pass), TRL's four per-token metrics are absent, and a short run still logs
    `num_tokens`."""
    policy, ref = tiny_llama(len(tok), seed=0).double(), tiny_llama(len(tok), seed=1).double()
    ds = dataset_of(hh_records()[:4])
    results = []
    for token_metrics in (True, False):
        args = TISDPOConfig(**quick_args, token_metrics=token_metrics, max_steps=1)
        trainer = TISDPOTrainer(policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        policy.zero_grad()
        loss, metrics = trainer.compute_loss(policy, batch, return_outputs=True)
        loss.backward()
        results.append((loss, metrics, _grads(policy), trainer))
    (loss_on, metrics_on, grads_on, _), (loss_off, metrics_off, grads_off, trainer_off) = results
    per_token = {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}
    assert per_token <= set(metrics_on) and not per_token & set(metrics_off)
    assert torch.equal(loss_on, loss_off)
    for name in metrics_off:
        assert torch.equal(metrics_on[name], metrics_off[name]), name
    for name in grads_on:
        assert torch.equal(grads_on[name], grads_off[name]), name
    trainer_off.train()
    logged = trainer_off.state.log_history[0]
    assert logged["num_tokens"] > 0 and not per_token & set(logged)


def test_weight_columns_reach_the_batch_and_conversational_data(tok, quick_args):
    """With remove_unused_columns=True (the default) the weight columns survive into the collated batch; a
    conversational dataset trains through the chat template."""
    user = [{"role": "user", "content": "Name a fruit."}]
    records = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": f" {f}"}],
         "rejected": [{"role": "assistant", "content": f" {s}"}]}
        for f, s in (("apple", "rock"), ("pear and plum", "brick"), ("melon", "slate and flint"))
    ]
    args = TISDPOConfig(**quick_args)
    assert args.remove_unused_columns
    trainer = TISDPOTrainer(tiny_llama(len(tok)), args=args, train_dataset=dataset_of(_with_weights(records, tok)),
                            processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["token_weights"].shape == batch["labels"].shape
    assert torch.equal(batch["token_weights"] != 0, batch["labels"] != -100)  # randn weights are never exactly 0
    assert (batch["input_ids"][:, 1] == tok.convert_tokens_to_ids("<|user|>")).all()
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)


def test_model_without_logits_to_keep_is_rejected(tok, quick_args):
    from transformers import LlamaForCausalLM

    class NoLogitsToKeep(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model = NoLogitsToKeep(tiny_llama(len(tok)).config)
    with pytest.raises(TypeError, match="logits_to_keep"):
        TISDPOTrainer(model, args=TISDPOConfig(**quick_args), train_dataset=dataset_of(synthetic_pairs(2)),
                      processing_class=tok)


def test_padding_free_auto_and_unsupported(tok, quick_args):
    ds = dataset_of(synthetic_pairs(3))
    trainer = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args), train_dataset=ds,
                            processing_class=tok)
    assert trainer.padding_free is False  # sdpa: a dense [N, N] mask would cost more than padding
    model = tiny_llama(len(tok))
    model.config._attn_implementation = "some_custom_kernel"
    with pytest.raises(ValueError, match="padding_free"):
        TISDPOTrainer(model, args=TISDPOConfig(**quick_args, padding_free=True), train_dataset=ds,
                      processing_class=tok)


def test_precomputed_reference_matches_on_the_fly_and_is_cached(tok, quick_args, monkeypatch):
    policy, ref = tiny_llama(len(tok), seed=0).double(), tiny_llama(len(tok), seed=1).double()
    ds = dataset_of(hh_records()[:7])
    on_the_fly = TISDPOTrainer(policy, ref_model=ref, args=TISDPOConfig(**quick_args), train_dataset=ds,
                               processing_class=tok)
    pre_args = TISDPOConfig(**quick_args, precompute_ref_log_probs=True, precompute_ref_batch_size=4)
    pre = TISDPOTrainer(policy, ref_model=ref, args=pre_args, train_dataset=ds, processing_class=tok)
    assert pre.ref_model is None and REF_CHOSEN_LOGPS in pre.train_dataset.column_names
    for row in (0, 6):
        assert len(pre.train_dataset[row][REF_REJECTED_LOGPS]) == len(pre.train_dataset[row]["rejected_input_ids"])
    rows = [5, 1, 3]
    loss_a, m_a = on_the_fly.compute_loss(policy, on_the_fly.data_collator([on_the_fly.train_dataset[i] for i in rows]),
                                          return_outputs=True)
    loss_b, m_b = pre.compute_loss(policy, pre.data_collator([pre.train_dataset[i] for i in rows]),
                                   return_outputs=True)
    assert loss_a.item() != pytest.approx(0.6931471805599453)  # policy != reference: a non-trivial comparison
    # the cache stores float32 log-probs: tolerance of float32 rounding of sums of ~30 values
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m_a["rewards/margins"], m_b["rewards/margins"], rtol=1e-5, atol=1e-6)
    cached = os.listdir(quick_args["ref_logps_cache_dir"])
    assert len(cached) == 1 and cached[0].endswith(".npz")

    def fail(*_args, **_kwargs):
        raise AssertionError("reference log-probs recomputed although cached")

    monkeypatch.setattr(TISDPOTrainer, "_compute_ref_logps", fail)
    again = TISDPOTrainer(policy, ref_model=ref, args=pre_args, train_dataset=ds, processing_class=tok)
    assert again.train_dataset[REF_CHOSEN_LOGPS] == pre.train_dataset[REF_CHOSEN_LOGPS]
    # a different reference model must not hit the cache
    with pytest.raises(AssertionError, match="recomputed"):
        TISDPOTrainer(policy, ref_model=tiny_llama(len(tok), seed=2).double(), args=pre_args, train_dataset=ds,
                      processing_class=tok)


def test_peft_reference_is_the_adapter_free_base(tok, quick_args):
    """With a LoRA adapter and no ref_model, the reference is the base model with the adapter disabled: after a few
    steps (non-zero adapter) the loss equals the oracle with that reference, on the fly and precomputed."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ds = dataset_of(hh_records()[:6])
    quick_args.update(max_steps=2, learning_rate=2e-2)
    trainer = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args), train_dataset=ds,
                            processing_class=tok, peft_config=lora)
    assert trainer.ref_model is None
    trainer.train()
    model = trainer.model
    feats = [trainer.train_dataset[i] for i in (0, 3, 5)]
    loss = trainer.compute_loss(model, trainer.data_collator(feats))

    batch = PreferenceCollator(tok.pad_token_id)(feats)
    base = model.get_base_model()
    with torch.no_grad(), model.disable_adapter():
        ref_hidden = _decoder_hidden(base, batch)
    with torch.no_grad():
        want, _ = reference_tis_dpo_loss(_decoder_hidden(base, batch), base.lm_head.weight, batch["labels"],
                                         ref_hidden=ref_hidden, ref_weight=base.lm_head.weight)
    assert loss.item() != pytest.approx(0.6931471805599453, abs=1e-4)  # the adapter moved the policy
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)

    pre = TISDPOTrainer(model, args=TISDPOConfig(**quick_args, precompute_ref_log_probs=True), train_dataset=ds,
                        processing_class=tok)
    pre_loss = pre.compute_loss(model, pre.data_collator([pre.train_dataset[i] for i in (0, 3, 5)]))
    torch.testing.assert_close(pre_loss.detach(), want, rtol=1e-5, atol=1e-6)


def test_resume_from_checkpoint_equals_uninterrupted(tok, quick_args):
    """6 steps (AdamW, linear schedule, crossing an epoch boundary) straight through vs. resumed at step 3."""
    ds = dataset_of(_with_weights(synthetic_pairs(10), tok))
    quick_args.update(save_strategy="steps", save_steps=3, max_steps=6, learning_rate=5e-3,
                      weight_transform="threshold_and_scale")
    full = TISDPOTrainer(tiny_llama(len(tok), seed=0), ref_model=tiny_llama(len(tok), seed=1),
                         args=TISDPOConfig(**quick_args), train_dataset=ds, processing_class=tok)
    full.train()
    checkpoint = os.path.join(quick_args["output_dir"], "checkpoint-3")
    assert os.path.isdir(checkpoint)
    resumed = TISDPOTrainer(tiny_llama(len(tok), seed=5), ref_model=tiny_llama(len(tok), seed=1),
                            args=TISDPOConfig(**dict(quick_args, output_dir=quick_args["output_dir"] + "-resumed")),
                            train_dataset=ds, processing_class=tok)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 6
    full_losses = [e["loss"] for e in full.state.log_history if "loss" in e]
    resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert resumed_losses[-3:] == pytest.approx(full_losses[-3:], rel=1e-6)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_two_process_run_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) x 2 pairs each gives the same per-step losses, metrics (TRL's per-token
    ones and `num_tokens` included) and final weights
    as 1 process x 4 pairs: steps 2 and 3 only match if the first gradients were averaged across processes. The
    2-process run precomputes its reference log-probs (main process first, the other reads the cache) while the
    1-process run computes them on the fly: equal up to the cache's float32 rounding."""
    from tests.trainer.ddp_run import run

    single, single_state = run(str(tmp_path / "single"), per_device_batch=4)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "tests.trainer.ddp_run", str(tmp_path / "ddp"), "2", "precompute"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "ddp" / "log_history.json") as f:
        result = json.load(f)
    assert result["world_size"] == 2
    assert len(os.listdir(tmp_path / "ddp" / "ref_cache")) == 1
    double = result["history"]
    assert len(single) == len(double) == 3
    for a, b in zip(single, double, strict=True):
        print(f"step {a['step']}: 1 process {a['loss']:.8f}, 2 processes {b['loss']:.8f}")
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        # the per-token metrics are the sum of the processes' sums over the sum of their counts (TRL's), not a mean
        # of the processes' means: equal to one process's although the two halves hold different token counts
        for name in ("rewards/margins", "rewards/accuracies", "logps/chosen", "entropy", "logits/chosen",
                     "logits/rejected", "mean_token_accuracy"):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), name
        assert b["num_tokens"] == a["num_tokens"]
    assert single[2]["loss"] != pytest.approx(single[0]["loss"], rel=1e-3)  # the weights did move
    from safetensors.torch import load_file

    ddp_state = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    for name, value in single_state.items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_matches_large_batch(tmp_path):
    """2 micro-batches of 2 pairs accumulated = 1 batch of 4 pairs: same logged losses and final weights (the loss
    is a mean over pairs, so the Trainer's 1/accumulation scaling is the right one)."""
    from tests.trainer.ddp_run import run

    big, big_state = run(str(tmp_path / "big"), per_device_batch=4)
    small, small_state = run(str(tmp_path / "accumulated"), per_device_batch=2, gradient_accumulation_steps=2)
    assert [e["loss"] for e in small] == pytest.approx([e["loss"] for e in big], rel=1e-5)
    for name, value in big_state.items():
        torch.testing.assert_close(small_state[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_training_learns_preferences(tok, quick_args, caplog):
    """~50 steps of DPO (activation checkpointing on, the default) on synthetic pairs raise the training
    accuracy and margin; evaluation on the training pairs logs `eval_`-prefixed metrics."""
    for name in no_checkpointing():
        quick_args.pop(name)
    ds = dataset_of(synthetic_pairs(24))
    quick_args.update(max_steps=48, learning_rate=3e-3, per_device_train_batch_size=4, lr_scheduler_type="constant",
                      beta=0.5, logging_steps=6)
    args = TISDPOConfig(**quick_args)
    assert args.gradient_checkpointing is True
    trainer = TISDPOTrainer(tiny_llama(len(tok)), args=args, train_dataset=ds, processing_class=tok)
    with caplog.at_level("INFO", logger="tisdpo.trainer"):
        trainer.train()
    assert getattr(trainer.model, "is_activation_checkpointing", None) or trainer.model.is_gradient_checkpointing
    assert caplog.text.count("DPO (no chosen_weights/rejected_weights columns)") == 1
    logs = [e for e in trainer.state.log_history if "loss" in e]
    first, last = logs[0], logs[-1]
    print([(e["step"], round(e["rewards/accuracies"], 3), round(e["rewards/margins"], 3)) for e in logs])
    # the policy starts as its own reference (rewards 0, accuracy 0 at step 1); the first entry averages steps 1-6
    assert first["rewards/accuracies"] < 0.95 and last["rewards/accuracies"] == 1.0
    assert last["rewards/margins"] > first["rewards/margins"] + 1.0
    assert last["loss"] < 0.5 * first["loss"]
    assert last["tokens_per_second"] > 0
    metrics = trainer.evaluate(eval_dataset=ds)  # untokenised: tokenised on the way in
    assert metrics["eval_rewards/accuracies"] >= 0.9 and metrics["eval_rewards/margins"] > 1.0
    assert {"eval_loss", "eval_logps/chosen", "eval_logps/rejected"} <= set(metrics)


def test_liger_patches_replace_norm_mlp_rope_only(tok, quick_args, monkeypatch):
    """The Liger patch swaps RMSNorm, SwiGLU and RoPE for its kernels and leaves the causal-LM forward (and so the
    LM head / cross-entropy) alone; the trainer applies it on CUDA only."""
    pytest.importorskip("liger_kernel")
    import transformers.models.llama.modeling_llama as modeling_llama

    from tisdpo.trainer import _apply_liger_patches

    # Liger also patches the module (RoPE, and the RMSNorm / MLP classes that later models would be built from):
    # restore every attribute of modeling_llama after the test
    for name, value in list(vars(modeling_llama).items()):
        if not name.startswith("__"):
            monkeypatch.setattr(modeling_llama, name, value)
    cpu_trainer = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args),
                                train_dataset=dataset_of(synthetic_pairs(2)), processing_class=tok)
    assert cpu_trainer.args.liger_model_patches
    assert cpu_trainer.model.model.norm.forward.__qualname__ == "LlamaRMSNorm.forward"

    model = tiny_llama(len(tok))
    causal_lm_forward = type(model).forward
    _apply_liger_patches(model)
    assert model.model.norm.forward.__qualname__.startswith("Liger")
    assert model.model.layers[0].mlp.forward.__qualname__.startswith("Liger")
    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    assert model.forward.__func__ is causal_lm_forward
