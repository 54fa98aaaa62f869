"""Triton kernels of the fused TIS-DPO loss, one kernel family per module.

- ``linear_logprobs``: LM head + log-softmax + label gather, forward and backward (``triton_linear_logprobs``).
- ``linear_kl``: policy and reference heads side by side, per-token KL (``triton_linear_kl``).
- ``linear_split``: the same two ops one vocabulary split at a time, cuBLAS GEMMs + fused Triton
  elementwise passes, an atomic-free backward (``split_linear_logprobs``, ``split_linear_kl``;
  ``backend="split"``, the ``"auto"`` choice on CUDA from D=512).
- ``pair_loss``: per-sequence sums with the token-weight transform fused in (``triton_sequence_sums``).
- ``_common``: what the head backends share (input checks, ``RefHead`` / ``ForwardStats``, the token-KL codes,
  the autograd Functions around a backend's launchers); plain torch, no Triton import.
- ``_jit``: the Triton device functions the kernel families share (64-bit offsets).
- ``_config``: tile shapes per (V, D) bucket, the split path's scratch cap.

Which backend runs which of these, and what ``backend="auto"`` picks, is ``tisdpo_kernels.backends``' table.

Importing a module compiles nothing; kernels are built on first launch. On CPU tensors they need
``TRITON_INTERPRET=1`` set before this package is imported.
"""
