"""Prefix-shared pairs (tisdpo/prefix.py): the layout, its masks, and that a training step, the reference
precompute and the weight estimation give what the unshared layout gives.

Tolerance of the float32 comparisons: both layouts compute the same sums over the same tokens, but attention runs
over differently sized key sets (one [prompt | chosen | rejected] row instead of two sequences) and the BLAS
blocks its reductions differently, so results differ by float32 rounding only. Each tensor is compared by its
largest difference relative to its largest entry, bounded by `tests.tolerance.eps_floor(float32, tokens)`:
eps + 8 eps sqrt(tokens of the unshared step), the random-walk rounding of float32 sums over every token (the
weight gradients sum over all of them). The float64 case shows that loss and metrics agree to 1e-12 once float32
rounding is out of the way.
"""

import pytest
import torch

from tests.tolerance import eps_floor
from tests.trainer.test_trainer import _grads, _with_weights
from tests.trainer.tiny import dataset_of, hh_records, synthetic_pairs, tiny_llama
from tisdpo import TISDPOConfig, TISDPOTrainer
from tisdpo.data import REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS, PreferenceCollator, prepare_preference_dataset
from tisdpo.prefix import (
    PREFIX_DOC_IDS,
    PREFIX_PARTS,
    PrefixSharedCollator,
    block_mask,
    check_attention,
    dense_mask,
    prefix_model_inputs,
)
from tisdpo_kernels import fused_linear_logprobs


def _max_rel(a, b, scale=None):
    """Largest |a - b| relative to the largest |b| (or to `scale`, for a difference of larger terms)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    scale = b.abs().max() if scale is None else torch.as_tensor(scale).double().abs()
    return ((a - b).abs().max() / scale.clamp(min=1e-30)).item()


def _chat_records():
    """Implicit-prompt multi-turn dialogues (message lists sharing their first turns)."""
    turns = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi, how can I help?"},
             {"role": "user", "content": "Name a fruit."}]
    return [{"chosen": turns + [{"role": "assistant", "content": f" {good}"}],
             "rejected": turns + [{"role": "assistant", "content": f" {bad}"}]}
            for good, bad in (("apple", "rock"), ("pear and plum", "brick"), ("melon", "slate and flint"))]


def test_layout_by_hand():
    """One pair, prompt [5, 6, 7], chosen [8, 9], rejected [10, 11, 12], padded next to a longer pair."""
    feats = [{"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10, 11, 12],
              "chosen_weights": [0.5, 0.6], "rejected_weights": [0.7, 0.8, 0.9]},
             {"prompt_input_ids": [3, 4, 5, 6], "chosen_input_ids": [1, 2, 3], "rejected_input_ids": [4, 5],
              "chosen_weights": [1.0, 1.1, 1.2], "rejected_weights": [1.3, 1.4]}]
    b = PrefixSharedCollator(pad_token_id=0)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 0], [3, 4, 5, 6, 1, 2, 3, 4, 5]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 0]  # rejected restarts after the prompt
    assert b[PREFIX_PARTS][0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, -1]
    assert b[PREFIX_DOC_IDS].tolist() == [[0] * 8 + [-1], [1] * 9]
    assert b["attention_mask"].tolist() == [[1] * 8 + [0], [1] * 9]
    # chosen of pair 0 from rows 2, 3; chosen of pair 1 from 9+3.. ; rejected of pair 0 from 2 (shared), 5, 6
    assert b["row_index"].tolist() == [2, 3, 12, 13, 14, 2, 5, 6, 12, 16]
    assert b["labels"].tolist() == [8, 9, 1, 2, 3, 10, 11, 12, 4, 5]
    assert b["cu_seqlens"].tolist() == [0, 2, 5, 8, 10]
    torch.testing.assert_close(b["token_weights"], torch.tensor([0.5, 0.6, 1.0, 1.1, 1.2, 0.7, 0.8, 0.9, 1.3, 1.4]))
    packed = PrefixSharedCollator(pad_token_id=0, padding_free=True)(feats)
    assert packed["input_ids"].shape == (1, 17) and "attention_mask" not in packed
    assert packed["row_index"].tolist() == [2, 3, 11, 12, 13, 2, 5, 6, 11, 15]
    allowed = dense_mask(b[PREFIX_DOC_IDS], b[PREFIX_PARTS])[0, 0].int()
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # chosen: prompt + earlier chosen
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 0],  # rejected: prompt + earlier rejected, never chosen
        [1, 1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1],  # padding: itself only
    ]
    with pytest.raises(ValueError, match="rejected_weights"):
        PrefixSharedCollator(0)([dict(feats[0], rejected_weights=[1.0])])
    with pytest.raises(ValueError, match="empty"):
        PrefixSharedCollator(0)([dict(feats[0], chosen_input_ids=[])])


def test_block_mask_equals_dense_mask():
    """FlexAttention with the block mask (its unfused CPU forward) equals sdpa with the dense boolean mask, for two
    pairs packed in one row of awkward length (not a multiple of the 128-token block)."""
    tok_feats = [{"prompt_input_ids": list(range(1, 90)), "chosen_input_ids": list(range(40)),
                  "rejected_input_ids": list(range(70))},
                 {"prompt_input_ids": list(range(3)), "chosen_input_ids": [1], "rejected_input_ids": [2, 3]}]
    b = PrefixSharedCollator(0, padding_free=True)(tok_feats)
    doc, parts = b[PREFIX_DOC_IDS], b[PREFIX_PARTS]
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, doc.shape[1], 8, generator=g) for _ in range(3))
    with pytest.warns(UserWarning, match="torch.compile"):
        flex = flex_attention(q, k, v, block_mask=block_mask(doc, parts))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc, parts))
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-6)  # float32 rounding of two attention kernels


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_free", [False, True])
def test_hidden_states_equal_unshared(tok, attn, padding_free):
    """float64: the hidden state a response row reads in the shared layout equals the one of its own unshared
    sequence (mask, positions and row_index all right), for every response token of every pair."""
    model = tiny_llama(len(tok), seed=0, attn_implementation=attn).double()
    ds = prepare_preference_dataset(dataset_of(hh_records()[:5]), tok)
    feats = [ds[i] for i in range(5)]
    plain = PreferenceCollator(tok.pad_token_id, padding_free=padding_free)(feats)
    shared = PrefixSharedCollator(tok.pad_token_id, padding_free=padding_free)(feats)
    assert shared["input_ids"].numel() < plain["input_ids"].numel()
    with torch.no_grad():
        inputs = {k: plain[k] for k in ("input_ids", "attention_mask", "position_ids") if k in plain}
        h_plain = model.model(**inputs, use_cache=False)  # with a cache transformers ignores packed position_ids
        h_shared = model.model(**prefix_model_inputs(shared, attn, torch.float64), use_cache=False)
    d = h_plain.last_hidden_state.shape[-1]
    want = h_plain.last_hidden_state.reshape(-1, d)[plain["labels"].reshape(-1) != -100]
    got = h_shared.last_hidden_state.reshape(-1, d)[shared["row_index"]]
    assert torch.equal(shared["labels"], plain["labels"].reshape(-1)[plain["labels"].reshape(-1) != -100])
    # transformers' eager attention takes its softmax in float32 even for float64 models: float32 rounding there
    tol = 1e-12 if attn == "sdpa" else 2e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


STEP_CASES = {
    "padded-sdpa-dpo": dict(data="hh"),
    "packed-sdpa-tisdpo-weights": dict(data="hh", weights=True, kl="tisdpo", padding_free=True,
                                       weight_transform="threshold_and_scale"),
    "padded-eager-tdpo1-weights": dict(data="hh", weights=True, kl="tdpo1", attn="eager"),
    "packed-eager-tdpo2-weights": dict(data="hh", weights=True, kl="tdpo2", attn="eager", padding_free=True,
                                       weight_transform="exp_clamp"),
    "keep_start-padded-weights": dict(data="hh", weights=True, max_length=20, max_prompt_length=12,
                                      truncation_mode="keep_start", weight_transform="threshold"),
    "keep_end-packed-tisdpo": dict(data="hh", kl="tisdpo", max_length=20, truncation_mode="keep_end",
                                   padding_free=True),
    "chat-multiturn-packed-ipo": dict(data="chat", weights=True, padding_free=True, loss_type="ipo"),
    "packed-rpo-ld-dpo-weights": dict(data="hh", weights=True, padding_free=True, loss_type=["sigmoid", "sft"],
                                      loss_weights=[1.0, 0.5], ld_alpha=0.5),
    "padded-sigmoid-norm-wpo": dict(data="synthetic", loss_type="sigmoid_norm", use_weighting=True),
    "float64-padded-tdpo2-weights": dict(data="synthetic", weights=True, kl="tdpo2", dtype=torch.float64),
}


def _records(name):
    return {"hh": lambda: hh_records()[:6], "chat": _chat_records, "synthetic": lambda: synthetic_pairs(6)}[name]()


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_equals_unshared(tok, quick_args, case):
    """compute_loss + backward with prefix_sharing=True equals prefix_sharing=False: loss, every metric (TRL's
    per-token ones and the `num_tokens` count included) and the gradient of every parameter (float32 bound:
    module docstring; float64: see below)."""
    _check_step(tok, quick_args, case, STEP_CASES[case])


@pytest.mark.gpu
@pytest.mark.parametrize("padding_free", [False, True])
def test_flex_step_equals_unshared_on_cuda(tok, quick_args, padding_free):
    """On CUDA with flex_attention (the block mask, FlexAttention's backward): as test_step_equals_unshared."""
    _check_step(tok, dict(quick_args, use_cpu=False), f"flex-cuda-packed={padding_free}",
                dict(data="hh", weights=True, kl="tisdpo", attn="flex_attention", device="cuda",
                     padding_free=padding_free, weight_transform="threshold_and_scale"))


def _check_step(tok, quick_args, case, options):
    options = dict(options)
    data, weights = options.pop("data"), options.pop("weights", False)
    attn, dtype = options.pop("attn", "sdpa"), options.pop("dtype", torch.float32)
    device = options.pop("device", "cpu")
    policy = tiny_llama(len(tok), seed=0, attn_implementation=attn).to(device, dtype)
    ref = tiny_llama(len(tok), seed=1, attn_implementation=attn).to(device, dtype)
    records = _records(data)
    ds = dataset_of(_with_weights(records, tok) if weights else records)
    results = []
    for sharing in (False, True):
        args = TISDPOConfig(**quick_args, prefix_sharing=sharing, beta=0.3, **options)
        trainer = TISDPOTrainer(policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
        assert trainer.prefix_sharing is sharing
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
        batch = {k: v.to(device) for k, v in batch.items()}
        assert ("row_index" in batch) is sharing
        policy.zero_grad()
        loss, metrics = trainer.compute_loss(policy, batch, return_outputs=True)
        loss.backward()
        num_tokens = trainer._metrics["train" if policy.training else "eval"]["num_tokens"]
        results.append((loss.detach(), metrics, _grads(policy), batch["input_ids"].numel(), num_tokens))
    (loss_a, metrics_a, grads_a, tokens_a, counted_a), (loss_b, metrics_b, grads_b, tokens_b, counted_b) = results
    assert tokens_b < tokens_a
    assert counted_a == counted_b  # TRL's num_tokens: a shared prompt counts once per sequence
    assert set(metrics_a) == set(metrics_b) and set(grads_a) == set(grads_b)
    errs = {"loss": _max_rel(loss_b, loss_a)}
    # a margin is a difference of two rewards: its rounding is relative to the rewards' size
    rewards = max(metrics_a["rewards/chosen"].abs(), metrics_a["rewards/rejected"].abs())
    errs.update({name: _max_rel(metrics_b[name], metrics_a[name], rewards if name == "rewards/margins" else None)
                 for name in metrics_a})
    errs.update({name: _max_rel(grads_b[name], grads_a[name]) for name in grads_a})
    worst = max(errs, key=errs.get)
    print(f"{case}: tokens {tokens_a} -> {tokens_b}; worst {worst} {errs[worst]:.2e}")
    if dtype == torch.float64:
        # values agree to float64 rounding; gradients pass through Llama's RMSNorm, which computes in float32 even
        # for float64 models, and a shared prompt token's gradient arrives there as one sum instead of two parts
        assert max(v for k, v in errs.items() if k not in grads_a) <= 1e-12, errs
        assert max(errs[k] for k in grads_a) <= 1e-6, errs
    else:
        assert max(errs.values()) <= eps_floor(torch.float32, tokens_a), errs
    assert torch.equal(metrics_a["rewards/accuracies"], metrics_b["rewards/accuracies"])


def test_precomputed_reference_equals_unshared(tok, quick_args, tmp_path):
    """The reference precompute in the shared layout stores the same per-token log-probs (float32 cache), and a
    step on them gives the unshared step's loss."""
    policy, ref = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    ds = dataset_of(hh_records()[:7])
    trainers = []
    for sharing in (False, True):
        args = TISDPOConfig(**dict(quick_args, ref_logps_cache_dir=str(tmp_path / f"cache-{sharing}")),
                            precompute_ref_log_probs=True, precompute_ref_batch_size=3, prefix_sharing=sharing,
                            padding_free=sharing)
        trainers.append(TISDPOTrainer(policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok))
    plain, shared = trainers
    tokens = sum(len(r[k]) for r in plain.train_dataset for k in ("prompt_input_ids", "chosen_input_ids",
                                                                   "rejected_input_ids"))
    bound = eps_floor(torch.float32, tokens)  # module docstring, over every token of the set
    for column in (REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS):
        for a, b in zip(plain.train_dataset[column], shared.train_dataset[column], strict=True):
            assert len(a) == len(b)
            assert _max_rel(b, a) <= bound, column
    rows = [5, 1, 3]
    losses = [t.compute_loss(policy, t.data_collator([t.train_dataset[i] for i in rows])) for t in trainers]
    assert _max_rel(losses[1].detach(), losses[0].detach()) <= bound


@pytest.mark.parametrize("method", ["D", "P"])
def test_estimated_weights_equal_unshared(tok, tmp_path, method):
    """estimate_token_weights with prefix_sharing=True writes the columns of the unshared run (method D: two
    models; P: one model under two system prompts), batches of 3 pairs, padded."""
    import tisdpo.weights as W

    plus, minus = tiny_llama(len(tok), seed=3), tiny_llama(len(tok), seed=4)
    ds = dataset_of(hh_records()[:5])
    outs = [W.estimate_token_weights(ds, plus, minus if method == "D" else None, tok, method=method, batch_size=3,
                                     cache_dir=str(tmp_path / f"c{sharing}"), progress=False, padding_free=False,
                                     prefix_sharing=sharing)
            for sharing in (False, True)]
    tokens = prepare_preference_dataset(ds, tok, max_length=None, max_prompt_length=None)
    bound = eps_floor(torch.float32, sum(len(r[k]) for r in tokens for k in ("prompt_input_ids", "chosen_input_ids",
                                                                             "rejected_input_ids")))
    for column in ("chosen_weights", "rejected_weights"):
        for a, b in zip(outs[0][column], outs[1][column], strict=True):
            assert len(a) == len(b)
            # the columns are differences of two log-probs: bound relative to the log-probs' size (~6), not to r
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= bound * 6, column


def test_linear_logprobs_of_a_shared_batch_match_the_unshared_batch(tok):
    """tisdpo.modeling.token_logps on a shared batch = fused_linear_logprobs on the unshared one (float64)."""
    from tisdpo.modeling import token_logps

    model = tiny_llama(len(tok), seed=2).double()
    ds = prepare_preference_dataset(dataset_of(synthetic_pairs(4)), tok)
    feats = [ds[i] for i in range(4)]
    plain = PreferenceCollator(tok.pad_token_id)(feats)
    shared = PrefixSharedCollator(tok.pad_token_id, padding_free=True)(feats)
    with torch.no_grad():
        got = token_logps(model, shared)
        hidden = model.model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).last_hidden_state
        want = fused_linear_logprobs(hidden, model.lm_head.weight, plain["labels"])
    torch.testing.assert_close(got, want[plain["labels"] != -100], rtol=1e-12, atol=1e-12)


def test_config_cli_and_attention_checks(tok, quick_args, caplog):
    from tisdpo.commands.arguments import parse_train_args

    assert TISDPOConfig(**quick_args).prefix_sharing is None
    with pytest.raises(ValueError, match="prefix_sharing"):
        TISDPOConfig(**quick_args, prefix_sharing=True, loss_type="sft")
    _, config = parse_train_args(["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o",
                                  "--prefix_sharing"])
    assert config.prefix_sharing is True
    ds = dataset_of(synthetic_pairs(3))
    with caplog.at_level("INFO", logger="tisdpo.trainer"):
        on = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args, prefix_sharing=True),
                           train_dataset=ds, processing_class=tok)
    assert on.prefix_sharing and "attention: sdpa with a dense 4-D boolean mask" in caplog.text
    auto = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args), train_dataset=ds,
                         processing_class=tok)
    assert auto.prefix_sharing is False  # None: only with flex_attention
    flex = tiny_llama(len(tok), attn_implementation="flex_attention")
    assert TISDPOTrainer(flex, args=TISDPOConfig(**quick_args), train_dataset=ds,
                         processing_class=tok).prefix_sharing is True
    flash = tiny_llama(len(tok))
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="prefix sharing needs an attention implementation.*flash_attention_2"):
        TISDPOTrainer(flash, args=TISDPOConfig(**quick_args, prefix_sharing=True), train_dataset=ds,
                      processing_class=tok)
    with pytest.raises(ValueError, match="ref_model"):
        TISDPOTrainer(tiny_llama(len(tok)), ref_model=flash, args=TISDPOConfig(**quick_args, prefix_sharing=True),
                      train_dataset=ds, processing_class=tok)
    assert check_attention("flex_attention") == "FlexAttention with a block mask"
