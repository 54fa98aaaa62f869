"""The benchmark matrix and the record of benchmarks that produced no timing (used by ``conftest``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from .env import bench_device
from .providers import PROVIDERS
from .shapes import VARIANTS, Case, case_info, cases_for, flop_count

# Timing rounds per benchmark (after warm-up rounds that absorb torch.compile / autotuning).
ROUNDS = {"cuda": (10, 2), "cpu": (3, 1)}


@dataclass(frozen=True)
class BenchCase:
    """One benchmark: a provider computing a loss variant on a case."""

    provider: str
    variant: str
    case: Case

    @property
    def id(self) -> str:
        return f"{self.provider}-{self.variant}-{self.case.id}"

    @property
    def group(self) -> str:
        return f"{self.variant}/{self.case.id}"

    def info(self) -> dict:
        ours = self.provider in PROVIDERS and PROVIDERS[self.provider].ours or self.provider == "step_tisdpo"
        return {"provider": self.provider, "variant": self.variant, "ours": ours,
                **case_info(self.case), "flops": flop_count(self.case, self.variant)}


def smoke_mode(config: pytest.Config) -> bool:
    return os.environ.get("TISDPO_BENCH_SMOKE") == "1" or bool(config.getoption("benchmark_disable", False))


def bench_cases(config: pytest.Config) -> list[BenchCase]:
    device = bench_device()
    return [BenchCase(name, variant, case)
            for case in cases_for(device.type, smoke_mode(config))
            for variant in VARIANTS
            for name, provider in PROVIDERS.items() if variant in provider.variants]


class RunLog:
    """Benchmarks that produced no timing (out of memory, provider unavailable), for the JSON."""

    def __init__(self) -> None:
        self.not_run: list[dict] = []

    def record(self, bench_case: BenchCase, status: str, reason: str) -> None:
        self.not_run.append({**bench_case.info(), "status": status, "reason": reason})


RUN_LOG = RunLog()


