"""Forward+backward of the TIS-DPO loss for every provider, variant and case (see ``conftest``).

Each benchmark stores in ``extra_info``: the case (head, tokens, logits regime, dtype), the FLOP count,
the peak extra memory of one step (``benchmarks.memory``) and the mean entropy of the policy softmax.
Median time, TFLOP/s and ratios to ours are derived by ``python -m benchmarks.report``.
"""

from __future__ import annotations

import pytest
import torch

from .memory import OutOfMemory, cpu_peak_extra_bytes, cuda_peak_extra_bytes, is_out_of_memory
from .providers import PROVIDERS, make_inputs


def _prepare(bench_case, device):
    """``(inputs, step, peak_bytes, None)``, or ``(None, None, None, message)`` when out of memory.

    The out-of-memory exception is reduced to its message inside the ``except`` block so that its
    traceback (and the tensors its frames hold) is released before the caller frees the cache.
    """
    provider = PROVIDERS[bench_case.provider]
    try:
        inputs = make_inputs(bench_case.case, bench_case.variant, device)
        step = provider.step(inputs, bench_case.variant)
        if device.type == "cuda":
            peak = cuda_peak_extra_bytes(step, inputs.zero_grad)
        else:
            peak = cpu_peak_extra_bytes(bench_case.provider, bench_case.variant, bench_case.case)
    except OutOfMemory as exc:
        message = str(exc)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is turned into a result
        if not is_out_of_memory(exc):
            raise
        message = str(exc).splitlines()[0]
    else:
        return inputs, step, peak, None
    return None, None, None, message


def test_loss_forward_backward(benchmark, bench_case, device, rounds, run_log):
    reason = PROVIDERS[bench_case.provider].unavailable(device)
    if reason:
        run_log.record(bench_case, "unavailable", reason)
        pytest.skip(reason)
    benchmark.group = bench_case.group
    benchmark.extra_info.update(bench_case.info())
    inputs, step, peak, oom = _prepare(bench_case, device)
    if oom is not None:
        run_log.record(bench_case, "OOM", oom)
        pytest.skip(f"OOM: {oom}")
    benchmark.extra_info.update(peak_memory_bytes=peak, entropy_nats=round(inputs.entropy, 3))

    def timed():
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def setup():
        inputs.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()

    num_rounds, warmup = rounds
    benchmark.pedantic(timed, setup=setup, rounds=num_rounds, warmup_rounds=warmup, iterations=1)
    assert torch.isfinite(inputs.hidden.grad).all() and torch.isfinite(inputs.weight.grad).all()
