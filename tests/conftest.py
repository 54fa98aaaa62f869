"""Shared fixtures: a fixed seed for every test, and the `gpu` marker's skip rule."""

import pytest
import torch

# PyTorch's CPU `exp` (MKL's vector maths, split across threads) has been seen to return ~1e-4 relative error on
# one thread's half of the first large call after a matmul in a fresh process (about 1 process in 10, 2 threads,
# torch 2.13 + MKL 2024.2; later calls are exact to fp32 rounding). One small matmul + logsumexp at start-up takes
# that first call, so the float64-truth bounds of the first test that streams a softmax are not met by chance.
torch.logsumexp(torch.randn(64, 64) @ torch.randn(64, 256), dim=-1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
