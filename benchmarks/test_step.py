"""Whole-model training step: the longest preference pair that fits one GPU, our loss vs the naive one.

A decoder of the Llama-3.2-1B shape (random init, bf16, gradient checkpointing, SDPA attention) runs
forward+backward on one pair (chosen + rejected, no padding) at growing lengths, with the loss
computed the way our trainer computes it (decoder hidden states, never the LM head's logits, into
``fused_tis_dpo_loss``) and the way TRL and the official code do (``model(...).logits`` in fp32,
``log_softmax``, gather). An out-of-memory is recorded as ``OOM`` for that length and the longer
ones are not tried. No optimizer step (the same for both). GPU only; the smoke run uses a tiny
model on the CPU so the code path stays tested.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .env import bench_device
from .harness import BenchCase, smoke_mode
from .memory import cuda_peak_extra_bytes, is_out_of_memory
from .providers import BETA, IGNORE_INDEX
from .shapes import Case, Head

MODEL_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)  # Llama-3.2-1B shape
MODEL_SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
GPU_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)  # tokens per sequence; the response is 7/8 of it
SMOKE_LENGTHS = (64,)
LOSSES = ("tisdpo", "naive")

_oom_at: dict[str, int] = {}  # loss -> shortest length that ran out of memory


def _full_size(device: torch.device, config: pytest.Config) -> bool:
    return device.type == "cuda" and not smoke_mode(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "length" in metafunc.fixturenames:
        lengths = GPU_LENGTHS if _full_size(bench_device(), metafunc.config) else SMOKE_LENGTHS
        cases = [(loss, length) for loss in LOSSES for length in lengths]
        metafunc.parametrize(("loss", "length"), cases, ids=[f"{lo}-2x{le}" for lo, le in cases])


@pytest.fixture(scope="module")
def model(device, pytestconfig):
    if device.type != "cuda" and not smoke_mode(pytestconfig):
        pytest.skip("the whole-model step benchmark needs a GPU (on CPU it runs only in smoke mode)")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = MODEL_1B if _full_size(device, pytestconfig) else MODEL_SMOKE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**cfg, max_position_embeddings=max(GPU_LENGTHS), attn_implementation="sdpa")
    torch.manual_seed(0)
    net = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    # transformers >= 5.2x renamed gradient_checkpointing_enable (the GPU image may carry an older one)
    enable_checkpointing = getattr(net, "activation_checkpointing_enable", None) or net.gradient_checkpointing_enable
    enable_checkpointing()
    net.config.use_cache = False
    net.train()
    return net


def _batch(model, length, device):
    """One pair of ``length`` tokens each (prompt 1/8), labels shifted, ref log-probs and weights."""
    gen = torch.Generator(device=device).manual_seed(length)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, length), generator=gen, device=device)
    labels = ids[:, 1:].clone()
    labels[:, : length // 8] = IGNORE_INDEX
    ref_logps = torch.where(labels != IGNORE_INDEX, -torch.rand(labels.shape, generator=gen, device=device) * 12, 0.0)
    weights = torch.where(labels != IGNORE_INDEX,
                          0.7 + 0.6 * torch.rand(labels.shape, generator=gen, device=device), 0.0)
    return ids, labels, ref_logps, weights


def _loss_fn(model, loss, ids, labels, ref_logps, weights):
    if loss == "tisdpo":
        from tisdpo_kernels import fused_tis_dpo_loss

        def run():
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
            return fused_tis_dpo_loss(hidden, model.lm_head.weight, labels, ref_logps=ref_logps,
                                      token_weights=weights, beta=BETA)[0]

        return run

    mask = labels != IGNORE_INDEX

    def run():
        logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
        token_logp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        m = (weights * (token_logp - ref_logps) * mask).sum(-1)
        return -F.logsigmoid(BETA * (m[0] - m[1]))

    return run


def test_training_step(benchmark, model, loss, length, device, rounds, run_log):
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    size = f"{n_params / 1e9:.1f}B" if n_params >= 1e8 else f"{n_params / 1e6:.2g}M"
    head = Head(f"llama-{size}", cfg.hidden_size, cfg.vocab_size, "whole-model step")
    case = Case(head, length, "random", model.dtype)
    bench_case = BenchCase(f"step_{loss}", "step", case)
    # whole-model FLOPs: 6 x tokens x parameters (attention's O(T^2) term not counted)
    info = {**bench_case.info(), "flops": 6 * case.num_response_tokens * n_params}
    if _oom_at.get(loss, length + 1) <= length:
        run_log.not_run.append({**info, "status": "OOM", "reason": f"OOM at {_oom_at[loss]} tokens already"})
        pytest.skip(f"{loss} already ran out of memory at {_oom_at[loss]} tokens per sequence")
    benchmark.group = f"step/{head.name}"
    benchmark.extra_info.update(info)
    ids, labels, ref_logps, weights = _batch(model, length, device)
    run = _loss_fn(model, loss, ids, labels, ref_logps, weights)

    def step():
        run().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def setup():
        model.zero_grad(set_to_none=True)

    num_rounds, warmup = min(rounds[0], 3), min(rounds[1], 1)  # a whole-model step is long: fewer rounds
    oom = None
    try:
        peak = cuda_peak_extra_bytes(step, setup) if device.type == "cuda" else None
        benchmark.pedantic(step, setup=setup, rounds=num_rounds, warmup_rounds=warmup, iterations=1)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is turned into a result
        if not is_out_of_memory(exc):
            raise
        oom = str(exc).splitlines()[0]  # keep only the message: the traceback holds the step's tensors
    model.zero_grad(set_to_none=True)
    if oom is not None:
        _oom_at[loss] = length
        run_log.not_run.append({**info, "status": "OOM", "reason": oom})
        pytest.skip(f"OOM: {oom}")
    benchmark.extra_info["peak_memory_bytes"] = peak
