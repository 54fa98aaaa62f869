"""Peer test against TRL's own ``DPOTrainer`` (optional: skipped when ``trl`` is not importable).

One batch of TRL's collator, a tiny float64 Llama policy and reference: TRL's ``compute_loss`` for each of its loss
types (and a weighted combination with ``ld_alpha`` and WPO) against ``fused_tis_dpo_loss`` on the same tokens
(hidden states of the same models, labels = TRL's completion tokens), loss and every parameter gradient.

Tolerance 1e-5 relative: TRL's fused LM head computes the log-probabilities in float32 chunks even for a float64
model (its losses agree with a float32 evaluation, ~1e-7 relative), and the per-sequence sums and parameter
gradients accumulate that over ~20 tokens and 2 layers; errors seen are <= 2e-6.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.tiny import dataset_of, synthetic_pairs, tiny_llama
from tisdpo_kernels import fused_tis_dpo_loss
from tisdpo_kernels.objectives import SMOOTHED_LOSS_TYPES

from ..test_objectives import TRL_LOSS_TYPES

trl = pytest.importorskip("trl", reason="optional peer test: `trl` is not installed")

RTOL = 1e-5  # see the module docstring
BETA = 0.3


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
    policy, ref = tiny_llama(len(tok), seed=0).double(), tiny_llama(len(tok), seed=1).double()
    args = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, report_to="none", bf16=False,
                         gradient_checkpointing=False, per_device_train_batch_size=4, beta=BETA, use_weighting=True,
                         discopop_tau=0.4)
    trainer = trl.DPOTrainer(policy, ref_model=ref, args=args, train_dataset=dataset_of(synthetic_pairs(4)),
                             processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    return trainer, policy, ref, batch


def _trl_step(trainer, policy, batch, loss_types, loss_weights, label_smoothing, ld_alpha, use_weighting):
    trainer.loss_types, trainer.loss_weights = loss_types, loss_weights
    trainer.label_smoothing, trainer.ld_alpha, trainer.use_weighting = label_smoothing, ld_alpha, use_weighting
    policy.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def _our_step(policy, ref, batch, **options):
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    policy.zero_grad()
    hidden = policy.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    with torch.no_grad():
        ref_hidden = ref.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    labels = ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)
    loss, _ = fused_tis_dpo_loss(hidden, policy.lm_head.weight, labels, ref_hidden=ref_hidden,
                                 ref_weight=ref.lm_head.weight, beta=BETA, discopop_tau=0.4, backend="torch",
                                 **options)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def _compare(trl_result, ours):
    (loss_t, grads_t), (loss_o, grads_o) = trl_result, ours
    print(f"loss trl {loss_t.item():.10g} ours {loss_o.item():.10g}")
    torch.testing.assert_close(loss_o, loss_t.to(loss_o.dtype), rtol=RTOL, atol=0)
    assert set(grads_o) == set(grads_t)
    for name, g in grads_t.items():
        torch.testing.assert_close(grads_o[name], g, rtol=RTOL, atol=RTOL * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_each_loss_type_equals_trl_dpo_trainer(setup, loss_type):
    trainer, policy, ref, batch = setup
    eps = 0.1 if loss_type in SMOOTHED_LOSS_TYPES else 0.0
    trl_result = _trl_step(trainer, policy, batch, [loss_type], [1.0], eps, None, False)
    _compare(trl_result, _our_step(policy, ref, batch, loss_type=[loss_type], label_smoothing=eps))


@pytest.mark.parametrize("types,weights,ld_alpha,use_weighting", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.4, False),  # MPO with LD-DPO
    # TRL 1.16 cannot combine 'sft' with WPO (an in-place product on its expanded sft loss raises), so no 'sft' here
    (["sigmoid", "sigmoid_norm", "apo_zero"], [0.8, 0.5, 0.3], 0.4, True),
])
def test_weighted_combination_with_ld_alpha_and_wpo_equals_trl_dpo_trainer(setup, types, weights, ld_alpha,
                                                                           use_weighting):
    trainer, policy, ref, batch = setup
    trl_result = _trl_step(trainer, policy, batch, types, weights, 0.0, ld_alpha, use_weighting)
    _compare(trl_result, _our_step(policy, ref, batch, loss_type=types, loss_weights=weights, ld_alpha=ld_alpha,
                                   use_weighting=use_weighting))


TOKEN_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens")


def _head_with_ties(policy, batch):
    """Make the policy's two most frequent chosen completion tokens tie for the argmax on many positions: both
    LM-head rows become the same row pointing along the mean last hidden state (so `mean_token_accuracy` is
    neither 0 nor 1 and a label tied with an earlier index does not count, in TRL's kernel as in ours)."""
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    half = ids.shape[0] // 2
    labels = ids[:half, 1:][completion[:half, 1:].bool()]
    first, second = torch.bincount(labels).topk(2).indices.tolist()
    with torch.no_grad():
        h = policy.model(input_ids=ids, attention_mask=mask).last_hidden_state
        direction = h[completion.bool()].mean(0)
        row = policy.lm_head.weight[first] + 4 * direction / direction.norm() ** 2
        policy.lm_head.weight[first] = row
        policy.lm_head.weight[second] = row
    return first, second


def test_token_metrics_equal_trl_dpo_trainer(tok, quick_args, tmp_path):
    """TISDPOTrainer logs TRL's `entropy`, `logits/chosen`, `logits/rejected`, `mean_token_accuracy` and
    `num_tokens` with the values TRL's DPOTrainer logs for the same batch and models (two training micro-batches
    then `log`, so the averaging over micro-batches and the running token count are TRL's too), on a head where
    two tokens tie for the argmax. Tolerance `RTOL` (TRL's fused head is float32, ours float64 here)."""
    from tisdpo import TISDPOConfig, TISDPOTrainer

    policy, ref = tiny_llama(len(tok), seed=2).double(), tiny_llama(len(tok), seed=3).double()
    data = dataset_of(synthetic_pairs(4))
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False,
                         gradient_checkpointing=False, per_device_train_batch_size=4, beta=BETA)
    theirs = trl.DPOTrainer(policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
    smaller = theirs.data_collator([theirs.train_dataset[i] for i in range(2)])
    _head_with_ties(policy, batch)
    ours = TISDPOTrainer(policy, ref_model=ref, args=TISDPOConfig(**quick_args, beta=BETA), train_dataset=data,
                         processing_class=tok)
    policy.train()
    logged = {}
    for name, trainer in (("trl", theirs), ("ours", ours)):
        for b in (batch, smaller):
            trainer.compute_loss(trainer.model, dict(b))
        trainer.log({"loss": 0.0})
        logged[name] = trainer.state.log_history[-1]
    print({name: {k: logs[k] for k in TOKEN_METRICS} for name, logs in logged.items()})
    assert 0 < logged["trl"]["mean_token_accuracy"] < 1
    assert logged["ours"]["num_tokens"] == logged["trl"]["num_tokens"] == int(batch["attention_mask"].sum()
                                                                              + smaller["attention_mask"].sum())
    for key in TOKEN_METRICS:
        assert logged["ours"][key] == pytest.approx(logged["trl"][key], rel=RTOL, abs=RTOL), key
