"""Kernel tests: on a machine without CUDA the Triton kernels run on CPU tensors through the
interpreter, which must be switched on before any kernel module is imported (the ``@triton.jit``
decorator picks interpreted or compiled at import time). With CUDA the same tests run compiled on
the GPU, and the ``gpu``-marked ones add bf16 and larger shapes."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _early = sorted(name for name in sys.modules if name.startswith("tisdpo_kernels.ops."))
    if _early:
        from triton.runtime.interpreter import InterpretedFunction

        from tisdpo_kernels.ops import linear_logprobs

        if not isinstance(linear_logprobs._linear_fwd_kernel, InterpretedFunction):
            raise pytest.UsageError(
                f"{_early} were imported before tests/kernels/conftest.py set TRITON_INTERPRET=1, so their "
                "kernels are compiled for a GPU that is not here; run with TRITON_INTERPRET=1 in the environment"
            )


@pytest.fixture
def device():
    """Where the kernels run: CUDA when present, else CPU tensors under the Triton interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
