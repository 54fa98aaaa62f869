"""One training step of `TISDPOTrainer` against TRL 1.16's own `trl.DPOTrainer` on the real SmolLM2-135M-Instruct
(marker `realmodel`): the same pairs (TRL's tokenisation: ours `tokenization="joint"`), float32, the same
hyper-parameters (beta, learning rate, AdamW, constant schedule without warm-up, TRL's default gradient clipping at
norm 1, dropout off, no activation checkpointing) and one batch holding the whole dataset. Compared: the step's
loss, the metrics both log (rewards/*, logps/*, grad_norm), every parameter's (clipped) gradient as the optimizer
sees it, and every parameter after the step.

The reference is the start model with a seeded multiplicative perturbation, so that the step's log-ratios, rewards
and loss are not the trivial ones of policy == reference (rewards 0, loss log 2). Both trainers get their own
copies of the same policy and reference (TRL patches its models' `forward` with its fused LM head).

Tolerances (float32 throughout):
- log-probs, rewards, loss: the decoder's forward is the same code on the same padded `[2B, T]` batch in both, so
  the hidden states agree to float32 rounding; the head differs (TRL: its chunked fused LM head in float32,
  `trl/kernels/chunked_logprob.py`; ours: `tisdpo_kernels.fused_linear_logprobs`): each token's log-prob is a
  D-term dot product and a V-term log-sum-exp, and a sequence log-prob sums ~N of them, so the bound is
  `eps_floor(float32, N * (D + V))` relative to the largest |value| (rewards: relative to the sequence log-probs
  they are differences of, times beta).
- gradients: the backward runs through 30 layers from the two heads' float32 softmax gradients; the bound is
  `eps_floor(float32, N * (D + V) * layers)` relative to each tensor's largest |entry|, i.e. ~8 eps sqrt(K).
- the update: AdamW's first step is `-lr * g / (|g| + eps_adam)` (bias correction makes m and v exactly g and
  g^2), nearly `-lr * sign(g)`; so where |g| is above `GRAD_FLOOR` (which is far above both eps_adam and the
  gradient difference bound) both updates are `-lr` times the same sign up to `eps_adam / GRAD_FLOOR` and the
  float32 rounding of `p - update` (one ulp of |p|); below the floor a tiny gradient difference may change
  `g / (|g| + eps_adam)` by O(1), and there only |update| <= lr is checked (and the gradients were compared).
"""

from __future__ import annotations

import copy
import time

import datasets
import pytest
import torch
from transformers import TrainerCallback

from tests.tolerance import eps_floor
from tests.trainer.tiny import no_checkpointing
from tisdpo import TISDPOConfig, TISDPOTrainer
from tisdpo.data import tokenize_row

trl = pytest.importorskip("trl", reason="TRL's DPOTrainer is the peer of this test")

pytestmark = pytest.mark.realmodel

BETA = 0.1
LR = 1e-5
ADAM_EPS = 1e-8  # TrainingArguments' default adam_epsilon, used by both
GRAD_FLOOR = 1e-6  # above it AdamW's first update is -lr * sign(g) within ADAM_EPS / GRAD_FLOOR = 1e-2
PERTURB = 0.05  # relative size of the reference's perturbation
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")

PAIRS = {
    "plain": [
        {"prompt": "Question: what is 2 + 2?\nAnswer:", "chosen": " 4, of course.", "rejected": " 5, surely"},
        # the prompt's last token merges into the responses' first (TRL's rule: tokenization="joint")
        {"prompt": "The answer: ", "chosen": "grape kind plum", "rejected": "rock kind slate"},
    ],
    "chat": [
        {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
         "chosen": [{"role": "assistant", "content": "The capital of France is Paris."}],
         "rejected": [{"role": "assistant", "content": "I will not tell you."}]},
        {"prompt": [{"role": "system", "content": "You are brief."},
                    {"role": "user", "content": "How can I stay healthy?"}],
         "chosen": [{"role": "assistant", "content": "Sleep well and walk every day."}],
         "rejected": [{"role": "assistant", "content": "Skip sleep and eat sweets."}]},
    ],
}


class _CaptureGradients(TrainerCallback):
    """Keeps every parameter's gradient as the optimizer will see it (after clipping), by name. The tensors
    themselves, not copies (0.5 GB saved): AdamW reads them and the Trainer then drops them (`zero_grad` sets
    them to None); the test checks they still hold the clipped gradient (norm 1)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}


def _perturbed(model, seed):
    """A copy of `model` with every parameter multiplied by `1 + PERTURB * N(0, 1)` (seeded)."""
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(1 + PERTURB * torch.randn(p.shape, generator=g))
    return ref


def _common(tmp_path, name, pairs):
    return dict(output_dir=str(tmp_path / name), use_cpu=True, report_to="none", disable_tqdm=True,
                save_strategy="no", logging_steps=1, max_steps=1, per_device_train_batch_size=pairs, seed=0,
                data_seed=0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                adam_epsilon=ADAM_EPS, beta=BETA, bf16=False, max_length=None, disable_dropout=True,
                dataloader_num_workers=0)


def _one_step(trainer):
    """Runs `trainer` for its one step: `(logged metrics, clipped gradients, parameters after)`."""
    capture = _CaptureGradients()
    trainer.add_callback(capture)
    start = time.perf_counter()
    trainer.train()
    print(f"{type(trainer).__name__}: one step in {time.perf_counter() - start:.1f} s")
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    after = {n: p.detach() for n, p in trainer.model.named_parameters()}
    return logged, capture.grads, after


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_one_step_equals_trl_dpo_trainer(smollm2_fp32, smollm2_tokenizer, tmp_path, kind):
    rows = PAIRS[kind]
    tok = smollm2_tokenizer
    before = dict(smollm2_fp32.named_parameters())  # the shared fixture, never trained
    ref = _perturbed(smollm2_fp32, seed=1)
    ds = datasets.Dataset.from_list([dict(r) for r in rows])

    trl_args = trl.DPOConfig(**_common(tmp_path, "trl", len(rows)), gradient_checkpointing=False)
    trl_trainer = trl.DPOTrainer(copy.deepcopy(smollm2_fp32).requires_grad_(True), ref_model=copy.deepcopy(ref),
                                 args=trl_args, train_dataset=ds, processing_class=tok)
    trl_log, trl_grads, trl_after = _one_step(trl_trainer)
    del trl_trainer

    our_args = TISDPOConfig(**_common(tmp_path, "ours", len(rows)), tokenization="joint", **no_checkpointing(),
                            ref_logps_cache_dir=str(tmp_path / "ref_cache"))
    ours = TISDPOTrainer(copy.deepcopy(smollm2_fp32).requires_grad_(True), ref_model=ref, args=our_args,
                         train_dataset=ds, processing_class=tok)
    assert ours.padding_free is False  # sdpa: the same padded [2B, T] layout as TRL's
    our_log, our_grads, our_after = _one_step(ours)
    del ours

    feats = [tokenize_row(r, tok, tokenization="joint") for r in rows]
    n_tokens = sum(len(f["chosen_input_ids"]) + len(f["rejected_input_ids"]) for f in feats)
    V, D = smollm2_fp32.lm_head.weight.shape
    layers = smollm2_fp32.config.num_hidden_layers
    logp_tol = eps_floor(torch.float32, n_tokens * (D + V))
    grad_tol = eps_floor(torch.float32, n_tokens * (D + V) * layers)
    print(f"{kind}: {len(rows)} pairs, {n_tokens} response tokens; tolerances logp {logp_tol:.2e} "
          f"grad {grad_tol:.2e}")

    # the step's loss and metrics
    logp_scale = max(abs(trl_log["logps/chosen"]), abs(trl_log["logps/rejected"]))
    for name in ("loss", "grad_norm", *METRICS):
        print(f"  {name:20s} trl {trl_log[name]: .9g}  ours {our_log[name]: .9g}")
    assert trl_log["loss"] != pytest.approx(0.6931471805599453, abs=1e-3)  # not the trivial policy == reference step
    for name in ("logps/chosen", "logps/rejected"):
        assert abs(our_log[name] - trl_log[name]) <= logp_tol * logp_scale, name
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(our_log[name] - trl_log[name]) <= 2 * BETA * logp_tol * logp_scale, name
    assert our_log["rewards/accuracies"] == trl_log["rewards/accuracies"]
    # d loss / d margin <= 1, the margin is beta x (4 sequence log-probs)
    assert abs(our_log["loss"] - trl_log["loss"]) <= 4 * BETA * logp_tol * logp_scale
    assert abs(our_log["grad_norm"] - trl_log["grad_norm"]) <= grad_tol * trl_log["grad_norm"]
    # TRL's per-token metrics of the policy, from both fused heads' passes over the vocabulary (float32): each
    # side's entropy and mean logit is within eps_floor(float32, D + V) of a float64 truth relative to its size
    # (tests/realmodel/test_smollm2.py::test_token_statistics_on_the_real_head checks ours), so they differ by at
    # most twice that (sizes below 1 nat or logit unit count as 1); the token accuracy is an argmax, which a
    # near-tie (two logits within the heads' rounding) may flip on one chosen token; num_tokens counts the same
    # attention mask
    n_chosen = sum(len(f["chosen_input_ids"]) for f in feats)
    stat_floor = eps_floor(torch.float32, D + V)
    for name in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens"):
        print(f"  {name:20s} trl {trl_log[name]: .9g}  ours {our_log[name]: .9g}")
    for name in ("entropy", "logits/chosen", "logits/rejected"):
        assert abs(our_log[name] - trl_log[name]) <= 2 * stat_floor * max(abs(trl_log[name]), 1.0), name
    assert abs(our_log["mean_token_accuracy"] - trl_log["mean_token_accuracy"]) <= 1 / n_chosen + 1e-9
    assert 0 < trl_log["mean_token_accuracy"] < 1 and trl_log["entropy"] > 0
    assert our_log["num_tokens"] == trl_log["num_tokens"]

    # gradients the optimizer saw, and the parameters after the step
    assert set(our_grads) == set(trl_grads) == set(before)
    for grads, logged in ((trl_grads, trl_log), (our_grads, our_log)):  # clipped to norm 1 (max_grad_norm=1)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        assert logged["grad_norm"] > 1 and norm.item() == pytest.approx(1.0, rel=1e-4)
    worst_grad, worst_update, checked, total = 0.0, 0.0, 0, 0
    for name, g_trl in trl_grads.items():
        err = ((our_grads[name] - g_trl).abs().max() / g_trl.abs().max()).item()
        worst_grad = max(worst_grad, err)
        assert err <= grad_tol, (name, err)
        p0, a_trl, a_ours = before[name], trl_after[name], our_after[name]
        update_trl, update_ours = a_trl - p0, a_ours - p0
        ulp = torch.finfo(torch.float32).eps * p0.abs() + torch.finfo(torch.float32).tiny
        assert (update_trl.abs() <= LR + ulp).all() and (update_ours.abs() <= LR + ulp).all(), name
        above = (g_trl.abs() > GRAD_FLOOR) & (our_grads[name].abs() > GRAD_FLOOR)
        diff = (a_ours - a_trl).abs()[above]
        bound = (2 * LR * ADAM_EPS / GRAD_FLOOR + 2 * ulp)[above]
        assert (diff <= bound).all(), (name, (diff - bound).max().item())
        if above.any():
            worst_update = max(worst_update, (diff / LR).max().item())
        checked, total = checked + int(above.sum()), total + above.numel()
    print(f"  worst gradient error {worst_grad:.2e} (bound {grad_tol:.2e}); updates compared on {checked}/{total} "
          f"entries with |g| > {GRAD_FLOOR:g}, worst |difference| / lr {worst_update:.2e}")
    assert checked > total // 2
