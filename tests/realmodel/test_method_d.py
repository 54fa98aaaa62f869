"""Method D on the real SmolLM2-135M-Instruct (marker `realmodel`): `train_contrastive_models(..., "D")` trains
`pi_plus` (DPO) and `pi_minus` (reverse DPO) from the model for two steps each on three Anthropic-HH-style pairs of
tests/assets/tiny_hh.jsonl (implicit prompts, the real BPE tokenizer's boundaries, V = 49152, the tied head), then
`estimate_token_weights(..., method="D")` gives `r_t = log pi_plus(y_t) - log pi_minus(y_t)` on every response
token (`docs/design.md §1.5`).

Checked: the two runs are DPO and reverse DPO (their first steps' gradients are opposite, so the same norm; the
reverse trainer's loss on the pairs is the forward trainer's on the swapped pairs, and equals
`mean(softplus(beta * margin))` from a float64 truth); after training pi_plus's implicit reward margin on every
training pair is positive and pi_minus's negative; both models differ from the start model in every parameter and
from each other; the estimated weights equal the float64 truth `log pi_plus - log pi_minus` from each model's own
decoder hidden states and head weight, on every chosen and rejected token (rejected columns hold `-r_t`).

Tolerances: a float32 log-prob through the head (a D-term dot product, a V-term log-sum-exp) is held to
`eps_floor(float32, D + V)` relative to the largest |log-prob| (as in test_smollm2.py); `r_t` is a difference of
two such (twice that), and must also stay within twice the error of the models' own float32 logits route. A
sequence's log-prob sums ~N token log-probs: `eps_floor(float32, N * (D + V))` relative.
"""

from __future__ import annotations

import copy
import json
import os
import time

import datasets
import pytest
import torch

from tests.tolerance import eps_floor
from tisdpo import TISDPOConfig, TISDPOTrainer
from tisdpo.contrastive import contrastive_configs, train_contrastive_models
from tisdpo.data import IGNORE_INDEX, PreferenceCollator, tokenize_row
from tisdpo.weights import estimate_token_weights

from .test_smollm2 import _logprobs_three_ways

pytestmark = pytest.mark.realmodel

ASSET = os.path.join(os.path.dirname(__file__), "..", "assets", "tiny_hh.jsonl")
PAIRS = (6, 11, 3)  # the three shortest pairs of the asset (128 to 191 characters)
BETA = 0.1
STEPS = 2


def _rows():
    with open(ASSET) as f:
        lines = f.read().splitlines()
    return [json.loads(lines[i]) for i in PAIRS]


def _base_config(tmp_path):
    return TISDPOConfig(
        output_dir=str(tmp_path / "contrastive"), max_steps=STEPS, per_device_train_batch_size=len(PAIRS),
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, beta=BETA,
        max_length=None, activation_checkpointing=False, seed=0, data_seed=0, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, use_cpu=True, ref_logps_cache_dir=str(tmp_path / "ref_cache"))


def _sequence_logps(truth, batch):
    """Per-row sums `[2B]` of the token values `truth` (the response positions of `batch`, row-major)."""
    keep = batch["labels"] != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    return torch.zeros(keep.shape[0], dtype=truth.dtype).index_add(0, rows, truth)


@pytest.fixture(scope="module")
def method_d(smollm2_fp32, smollm2_tokenizer, tmp_path_factory):
    """`(pi_plus, pi_minus, base config, the dataset, log histories)` of one method-D run."""
    tmp_path = tmp_path_factory.mktemp("method_d")
    base = _base_config(tmp_path)
    ds = datasets.Dataset.from_list(_rows())
    histories = []
    original_train = TISDPOTrainer.train

    def train(self, *args, **kwargs):  # keeps each run's log history
        out = original_train(self, *args, **kwargs)
        histories.append(self.state.log_history)
        return out

    start = time.perf_counter()
    TISDPOTrainer.train = train
    try:
        pi_plus, pi_minus = train_contrastive_models(copy.deepcopy(smollm2_fp32).requires_grad_(True), ds, "D",
                                                     base, processing_class=smollm2_tokenizer, save=False)
    finally:
        TISDPOTrainer.train = original_train
    print(f"\nmethod D: two runs of {STEPS} steps in {time.perf_counter() - start:.1f} s")
    return pi_plus, pi_minus, base, ds, histories


def test_runs_are_dpo_and_reverse_dpo(method_d, smollm2_fp32, smollm2_tokenizer):
    """Both first steps start at policy == reference (loss log 2) with opposite gradients (the same norm); after
    training pi_plus's implicit reward margin is positive on every pair and pi_minus's negative; the reverse
    trainer's loss is the forward trainer's on the swapped pairs and `mean(softplus(beta * margin))`."""
    pi_plus, pi_minus, base, ds, histories = method_d
    tok = smollm2_tokenizer
    steps = [[entry for entry in history if "loss" in entry and "grad_norm" in entry] for history in histories]
    assert [len(s) for s in steps] == [STEPS, STEPS]
    for run in steps:
        assert run[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)
    # one float32 norm of the same magnitudes in the same order: a few ulps at most
    assert steps[1][0]["grad_norm"] == pytest.approx(steps[0][0]["grad_norm"], rel=1e-6)

    feats = [tokenize_row(row, tok) for row in ds]
    batch = PreferenceCollator(tok.pad_token_id)(feats)
    V, D = smollm2_fp32.lm_head.weight.shape
    n_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    seq_tol = eps_floor(torch.float32, n_tokens * (D + V))
    ref_seq = _sequence_logps(_logprobs_three_ways(smollm2_fp32, batch)[2], batch)
    margins = {}
    for name, model in (("pi_plus", pi_plus), ("pi_minus", pi_minus)):
        seq = _sequence_logps(_logprobs_three_ways(model, batch)[2], batch) - ref_seq
        chosen, rejected = seq.chunk(2)
        margins[name] = BETA * (chosen - rejected)
        print(f"{name}: implicit reward margins {margins[name].tolist()}")
    assert (margins["pi_plus"] > 0).all() and (margins["pi_minus"] < 0).all()

    plus_args, minus_args = contrastive_configs(base, "D")
    swapped = ds.map(lambda r: {"chosen": r["rejected"], "rejected": r["chosen"]})
    losses = []
    for args, data in ((minus_args, ds), (plus_args, swapped)):
        trainer = TISDPOTrainer(pi_minus, ref_model=copy.deepcopy(smollm2_fp32), args=args, train_dataset=data,
                                processing_class=tok)
        trainer_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ds))])
        with torch.no_grad():
            losses.append(trainer.compute_loss(pi_minus, trainer_batch).item())
    assert losses[0] == losses[1]  # the same tokens in the same layout
    truth = torch.nn.functional.softplus(margins["pi_minus"]).mean().item()
    scale = max(ref_seq.abs().max().item(), 1.0)
    print(f"reverse-DPO loss of pi_minus {losses[0]:.9g}, float64 truth {truth:.9g}")
    assert abs(losses[0] - truth) <= 4 * BETA * seq_tol * scale and losses[0] < 0.6931471805599453


def test_models_differ_from_the_start_and_each_other(method_d, smollm2_fp32):
    """Every parameter of both trained models moved (AdamW moves each entry with a gradient), the two models
    differ, and nothing is a toy: the real vocabulary with the head tied to the embedding."""
    pi_plus, pi_minus, *_ = method_d
    start = dict(smollm2_fp32.named_parameters())
    plus, minus = dict(pi_plus.named_parameters()), dict(pi_minus.named_parameters())
    assert set(plus) == set(minus) == set(start)
    for name, p0 in start.items():
        assert not torch.equal(plus[name], p0) and not torch.equal(minus[name], p0), name
        assert not torch.equal(plus[name], minus[name]), name
    for model in (pi_plus, pi_minus):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert tuple(model.lm_head.weight.shape) == (49152, 576)


def test_weights_equal_log_pi_plus_minus_log_pi_minus(method_d, smollm2_fp32, smollm2_tokenizer, tmp_path):
    """`estimate_token_weights(..., method="D")`: one weight per response token of the real tokenizer's
    tokenisation, chosen `r_t` and rejected `-r_t`, equal to the float64 truth from each model's own decoder hidden
    states and head weight (see the module docstring for the bound), and far from zero (the models differ)."""
    pi_plus, pi_minus, _, ds, _ = method_d
    tok = smollm2_tokenizer
    start = time.perf_counter()
    out = estimate_token_weights(ds, pi_plus, pi_minus, tok, method="D", cache_dir=str(tmp_path), progress=False)
    print(f"\nestimate_token_weights: {time.perf_counter() - start:.1f} s")
    feats = [tokenize_row(row, tok) for row in ds]
    for i, f in enumerate(feats):
        for side in ("chosen", "rejected"):
            assert len(out[i][f"{side}_weights"]) == len(f[f"{side}_input_ids"]), (i, side)
    # the collated order of the response positions: every chosen response, then every rejected one
    estimated = torch.tensor([w for i in range(len(feats)) for w in out[i]["chosen_weights"]]
                             + [-w for i in range(len(feats)) for w in out[i]["rejected_weights"]], dtype=torch.float32)
    batch = PreferenceCollator(tok.pad_token_id)(feats)
    _, own_plus, truth_plus = _logprobs_three_ways(pi_plus, batch)
    _, own_minus, truth_minus = _logprobs_three_ways(pi_minus, batch)
    truth, own = truth_plus - truth_minus, own_plus - own_minus
    assert estimated.shape == truth.shape
    V, D = smollm2_fp32.lm_head.weight.shape
    scale = max(truth_plus.abs().max().item(), truth_minus.abs().max().item())
    floor = 2 * eps_floor(torch.float32, D + V) * scale
    err, own_err = (estimated.double() - truth).abs().max().item(), (own.double() - truth).abs().max().item()
    print(f"r_t over {truth.numel()} tokens: |r| max {truth.abs().max().item():.3g}, error {err:.2e}, the models' "
          f"own logits {own_err:.2e}, floor {floor:.2e}")
    assert err <= 2 * own_err + floor
    assert truth.abs().max().item() > 20 * floor  # a wrong token, model or sign would exceed the bound
