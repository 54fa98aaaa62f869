"""Scale-out pieces of the trainer: the LM head called as a module, the frozen reference under the same engine.

Sharding engines act on module calls. FSDP2 unshards a module's parameters in its pre-forward hook (and again
before its backward) and reduce-scatters their gradients after its backward; DeepSpeed ZeRO-3 gathers a module's
parameters when its forward runs and partitions and reduces their gradients in its backward hooks. Reading
`lm_head.weight` outside any forward gets the shard (an FSDP2 DTensor, an empty ZeRO-3 placeholder). So the fused
loss gets the head weight from `head_forward(head, fn, hidden)`: under DeepSpeed (and DDP) it calls
`head(hidden)` with the module's forward temporarily replaced by `fn(head.weight, head.bias, hidden)`, so every
hook the engine put on the head fires around it, as for any layer; under FSDP2 it unshards the head's group
(`FSDPModule.unshard`) when the decoder's forward left it resharded, and the group's own post-backward
reduce-scatters the gradient. Tied input/output embeddings share one parameter, owned by one FSDP2 group
(accelerate puts the embedding, the final norm and the head in one) or one
ZeRO-3 parameter: both uses accumulate into one gradient and the optimizer steps it once.

The reference model is frozen: it is sharded by the same engine (`prepare_reference`: FSDP2 with every unit
resharded after its forward; a ZeRO-3 inference engine) and its head weight is gathered as a plain tensor for the
step (`full_frozen`), or its log-probs are precomputed (`precompute_ref_log_probs`).

Tested on CPU with 2 gloo processes: FSDP2 `fully_shard` applied directly and DeepSpeed ZeRO-3 with its CPU
accelerator (tests/trainer/test_distributed.py), the cp gradient (tests/trainer/test_context_parallel.py), and the
README's `accelerate launch` commands with the shipped configs (tests/trainer/test_launch.py).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import nn


def _is_sharded(t: torch.Tensor) -> bool:
    """An FSDP2 / tensor-parallel DTensor, or a ZeRO-3 parameter whose data is not gathered here."""
    if hasattr(t, "full_tensor"):
        return True
    return hasattr(t, "ds_id") and tuple(t.shape) != tuple(getattr(t, "ds_shape", t.shape))


def _fsdp2_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2
        return False
    return isinstance(module, FSDPModule)


def head_forward(head: nn.Module, fn: Callable, hidden: torch.Tensor):
    """`fn(weight, bias, hidden)` with the LM head's whole weight and bias, the engine's gradient reduction
    included. Returns what `fn` returns.

    - FSDP2 (`head` under `fully_shard`, alone or in a group such as accelerate's [final norm, head]): the step
      is inside the group's forward-backward pass, so its hooks are not run a second time (a second pre-forward of
      a multi-module group never completes and crashes its backward, seen with torch 2.13). If the group was
      resharded after the decoder's forward, `head.unshard()` gathers it; the group's post-backward (or the
      root's final callback) reduce-scatters the head's gradient and reshards, as for the model's own head call.
    - Otherwise (DeepSpeed ZeRO-3, DDP, one process, a model dispatched with `device_map`) `head(hidden)` runs
      with the module's forward temporarily replaced by `fn`, so every hook on the head fires around it: ZeRO-3
      gathers the weight, partitions and reduces its gradient; accelerate's dispatch hook moves `hidden` to the
      head's device and loads an offloaded weight. Only `hidden` goes through the call (floating forward inputs
      may be cast by an engine's mixed-precision policy; the reference log-probs and token weights that `fn`
      closes over must not be).
    """
    if _fsdp2_module(head):
        if _is_sharded(head.weight):
            head.unshard()
        return fn(head.weight, getattr(head, "bias", None), hidden)

    def forward(rows):
        weight, bias = head.weight, getattr(head, "bias", None)
        if _is_sharded(weight):
            raise RuntimeError(
                f"the LM head weight is still sharded inside the head's forward ({type(weight).__name__} of shape "
                f"{tuple(weight.shape)}): the head belongs to an FSDP2 group that is resharded and whose hooks are "
                "not on the head. Apply fully_shard to the LM head (alone, or with the final norm as accelerate "
                "does), or leave the root module's reshard_after_forward at its default."
            )
        return fn(weight, bias, rows)

    # a model dispatched by accelerate (`device_map`: layers over several devices, or offloaded) has its forward
    # wrapped by a hook that moves the inputs to the weight's device (and loads an offloaded weight): the hook's
    # wrapper calls `_old_forward`, which is the one to replace then
    name = "_old_forward" if hasattr(head, "_hf_hook") and "_old_forward" in head.__dict__ else "forward"
    previous = head.__dict__.get(name)
    setattr(head, name, forward)
    try:
        return head(hidden)
    finally:
        if previous is None:
            delattr(head, name)
        else:
            setattr(head, name, previous)


def full_frozen(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole value of a frozen, possibly sharded tensor, detached: an FSDP2 DTensor all-gathered, a ZeRO-3
    parameter gathered and copied, anything else as it is."""
    if t is None:
        return None
    if hasattr(t, "full_tensor"):
        with torch.no_grad():
            return t.full_tensor()
    if hasattr(t, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.detach().clone()
    return t.detach()


def gathered_parameters(params: list[torch.Tensor], modifier_rank: int | None = None):
    """A context in which DeepSpeed ZeRO-3 parameters hold their whole values (a collective: every rank enters
    it); with `modifier_rank`, that rank's changes are broadcast and kept on exit. A no-op for other tensors."""
    zero3 = [p for p in params if hasattr(p, "ds_id")]
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero3, modifier_rank=modifier_rank)


def layer_classes(model: nn.Module, names: list[str] | None = None) -> tuple[type, ...]:
    """The module classes named in `names` (default: the model's `_no_split_modules`, e.g. the decoder layer)."""
    names = list(names or getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(f"none of the layer classes {names} occurs in {type(model).__name__}: name the decoder "
                         "layer class to shard (fsdp_transformer_layer_cls_to_wrap)")
    return tuple(found)


def shard_frozen(model: nn.Module, classes: tuple[type, ...], **fsdp_kwargs) -> nn.Module:
    """FSDP2 for a frozen model: `fully_shard` on every module of `classes` and on the root, each resharded after
    its forward (nothing runs backward through it, so nothing is gathered twice). `fsdp_kwargs` (mesh,
    mp_policy, offload_policy) go to `fully_shard`."""
    from torch.distributed.fsdp import fully_shard

    model.requires_grad_(False).eval()
    for module in list(model.modules()):
        if isinstance(module, classes):
            fully_shard(module, reshard_after_forward=True, **fsdp_kwargs)
    fully_shard(model, reshard_after_forward=True, **fsdp_kwargs)
    return model


def deepspeed_frozen(model: nn.Module, config: dict) -> nn.Module:
    """A DeepSpeed inference engine for a frozen model from the training config: ZeRO-3 stays ZeRO-3 (parameters
    partitioned, gathered per module call), any other stage becomes 0 (a replicated copy); no optimizer."""
    import deepspeed

    config = copy.deepcopy(config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if zero["stage"] == 3 and hidden:
        for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size",
                                                                       int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    model.requires_grad_(False).eval()
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def prepare_reference(accelerator, model: nn.Module) -> nn.Module:
    """The frozen reference model under the policy's engine: FSDP2-sharded (`shard_frozen`, with the plugin's
    layer classes, mesh and mixed precision), a DeepSpeed engine (`deepspeed_frozen`), or, for DDP and single
    processes, a replicated copy on the device (`accelerator.prepare_model(evaluation_mode=True)`)."""
    from accelerate.utils import DistributedType

    if getattr(accelerator, "is_fsdp2", False):
        plugin = accelerator.state.fsdp_plugin
        kwargs = {"offload_policy": plugin.cpu_offload} if plugin.cpu_offload is not None else {}
        if plugin.mixed_precision_policy is not None:
            kwargs["mp_policy"] = plugin.mixed_precision_policy
        mesh = getattr(accelerator, "torch_device_mesh", None)
        if mesh is not None:
            kwargs["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
        model = model.to(accelerator.device)
        return shard_frozen(model, layer_classes(model, plugin.transformer_cls_names_to_wrap), **kwargs)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return deepspeed_frozen(model, accelerator.state.deepspeed_plugin.deepspeed_config)
    return accelerator.prepare_model(model, evaluation_mode=True)


def context_parallel_group(accelerator):
    """The process group of the `cp` dimension of accelerate's parallelism config, or None without one."""
    config = getattr(accelerator, "parallelism_config", None)
    if config is None or not getattr(config, "cp_enabled", False):
        return None
    return accelerator.torch_device_mesh["cp"].get_group()


class _SumOverGroup(torch.autograd.Function):
    """Identity forward; backward times `factor` (the context-parallel group's size)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, factor: int) -> torch.Tensor:
        ctx.factor = factor
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def context_parallel_loss(loss: torch.Tensor, group) -> torch.Tensor:
    """`loss` (a scalar, the global loss every rank of the context-parallel `group` returns) with its value
    unchanged and its gradient multiplied by the group's size.

    Each rank's parameters get only their rows' share of the gradient, and the shares must be summed over the
    group; FSDP2 under accelerate's parallelism config averages gradients over the flattened data x context mesh,
    which divides by `cp` once too often (`docs/design.md §5`). The factor puts it back, so gradients, `grad_norm`
    and clipping equal one process's on the same pairs."""
    import torch.distributed as dist

    size = dist.get_world_size(group)
    return _SumOverGroup.apply(loss, size) if size > 1 else loss


__all__ = ["context_parallel_group", "context_parallel_loss", "deepspeed_frozen", "full_frozen", "gathered_parameters",
           "head_forward", "layer_classes", "prepare_reference", "shard_frozen"]
