"""Test-only: keep accelerate's FSDP configs sharded on CPU (imported at interpreter start when this folder is on
PYTHONPATH and TISDPO_TEST_SHARD_ON_CPU=1; the launch tests put it there for `accelerate launch` and its workers).

accelerate sets `DistributedType.FSDP` only on accelerator devices: on CPU (`MULTI_CPU`, gloo) an FSDP config
quietly runs as DDP. This lifts that one gate: after `AcceleratorState` is set up on CPU with an FSDP plugin, the
state becomes FSDP with that plugin, exactly what its GPU branch does (`accelerate/state.py`,
`AcceleratorState.__init__`). Nothing else changes; the tests check that every parameter really is a DTensor.
"""

import os

if os.environ.get("TISDPO_TEST_SHARD_ON_CPU") == "1":
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    _init = AcceleratorState.__init__

    def _init_sharded_on_cpu(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None,
                             fsdp_plugin=None, *args, **kwargs):
        first = "_mixed_precision" not in AcceleratorState._shared_state  # the state's first set-up
        _init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
        if first and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = _init_sharded_on_cpu
