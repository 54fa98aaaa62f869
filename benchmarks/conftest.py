"""pytest wiring of the benchmarks: the case matrix, run settings and what goes into the JSON.

- Smoke mode (tiny shapes, every provider once) when ``TISDPO_BENCH_SMOKE=1`` or when run with
  ``--benchmark-disable`` — what CI runs, so the suite cannot rot.
- ``--benchmark-json=PATH`` output carries, under ``"tisdpo"``: the device, its bf16 peak, library
  versions, the exact command, and the cases that did not run (``OOM`` or unavailable, with why).
"""

from __future__ import annotations

import gc
import shlex

import pytest
import torch

from .env import bench_device, bf16_peak_tflops, device_name, device_slug, library_versions
from .harness import ROUNDS, RUN_LOG, RunLog, bench_cases, smoke_mode


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_case" in metafunc.fixturenames:
        cases = bench_cases(metafunc.config)
        metafunc.parametrize("bench_case", cases, ids=[c.id for c in cases])



@pytest.fixture(scope="session")
def run_log() -> RunLog:
    return RUN_LOG


@pytest.fixture(scope="session")
def device():
    return bench_device()


@pytest.fixture(scope="session")
def rounds(device, pytestconfig) -> tuple[int, int]:
    """``(rounds, warmup_rounds)`` of ``benchmark.pedantic``."""
    return (1, 0) if smoke_mode(pytestconfig) else ROUNDS[device.type]


@pytest.fixture(autouse=True)
def _seed_and_release():
    """Seed every benchmark; afterwards hand its GPU memory back so the next one starts clean."""
    torch.manual_seed(0)
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    device = bench_device()
    name = device_name(device)
    output_json["tisdpo"] = {
        "device": name,
        "device_slug": device_slug(device),
        "bf16_peak_tflops": bf16_peak_tflops(name),
        "versions": library_versions(),
        "command": shlex.join(["pytest", *config.invocation_params.args]),
        "smoke": smoke_mode(config),
        "rounds": (1, 0) if smoke_mode(config) else ROUNDS[device.type],
        "not_run": RUN_LOG.not_run,
    }
