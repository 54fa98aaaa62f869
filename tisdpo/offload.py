"""Activation offloading: keep the tensors a forward pass saves for its backward off the compute device.

`offload_activations()` is a context manager of PyTorch saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`,
the mechanism of `torch.autograd.graph.save_on_cpu`, TRL's and torchtune's `OffloadActivations`). Every tensor that
autograd saves inside the context (layer inputs, attention and MLP intermediates, the hidden rows the fused loss
keeps) is moved away when it is saved and brought back when the backward needs it:

* from an accelerator (CUDA, ...): to pinned host memory, copied back to the device on use;
* from CPU: to a spill file in a temporary directory (the page cache, backed by disk), read back on use. A CPU run
  has no faster memory to free, so this trades step time for resident memory; on CPU it pays for long sequences
  without activation checkpointing, where saved activations dominate the peak.

Parameters (and other leaf tensors that require grad) and tensors under `min_bytes` stay where they are: moving a
parameter would only add a copy. Peak memory of a long-sequence CPU step with and without:
`python -m benchmarks.offload` (figures in its docstring).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import torch

DEFAULT_MIN_BYTES = 1 << 20


class _Spilled:
    """One saved CPU tensor written to `path`; the file is removed when autograd drops the packed value."""

    def __init__(self, tensor: torch.Tensor, directory: str):
        self.shape, self.dtype = tensor.shape, tensor.dtype
        data = tensor.detach().contiguous()
        self.nbytes = data.numel() * data.element_size()
        fd, self.path = tempfile.mkstemp(dir=directory, prefix="tisdpo-offload-", suffix=".act")
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))

    def load(self) -> torch.Tensor:
        raw = torch.from_file(self.path, shared=False, size=self.nbytes, dtype=torch.uint8)
        return raw.view(self.dtype).reshape(self.shape)

    def __del__(self):
        with contextlib.suppress(OSError):
            os.remove(self.path)


def _keeps_in_place(tensor: torch.Tensor, min_bytes: int) -> bool:
    if isinstance(tensor, torch.nn.Parameter) or (tensor.is_leaf and tensor.requires_grad):
        return True
    return tensor.numel() * tensor.element_size() < min_bytes or tensor.layout != torch.strided


@contextlib.contextmanager
def offload_activations(min_bytes: int = DEFAULT_MIN_BYTES, spill_dir: str | None = None) -> Iterator[None]:
    """Saved-tensor hooks moving activations of at least `min_bytes` off their device (see the module docstring).

    Wrap the forward (and loss) of a training step; the backward may run outside the context. `spill_dir`: where
    CPU tensors are spilled (default: the system's temporary directory); each file is removed as soon as autograd
    drops the tensor (after the backward, or with the graph).
    """
    directory = spill_dir or tempfile.gettempdir()
    pin = torch.cuda.is_available()

    def pack(tensor: torch.Tensor):
        if _keeps_in_place(tensor, min_bytes):
            return tensor
        if tensor.device.type == "cpu":
            return _Spilled(tensor, directory)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, _Spilled):
            return packed.load()
        device, host = packed
        return host.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


__all__ = ["DEFAULT_MIN_BYTES", "offload_activations"]
