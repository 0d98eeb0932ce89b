"""`python -m retrofit` under accelerate's FSDP on CPU processes (gloo), for the tests.

accelerate turns FSDP on only for accelerator devices: its ``AcceleratorState`` sets ``DistributedType.FSDP``
inside the branch for GPUs, NPUs and the like, so a launch with ``--use_fsdp`` on a machine without any becomes
plain MULTI_CPU (DDP). This lifts exactly that condition; everything after it (the plugin read from the
launcher's flags, ``fully_shard`` with its wrap policy, the sharded parameters, the gradient reduce-scatter) is
accelerate's and torch's FSDP2 code, as it runs on a GPU node.
"""

import runpy

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
runpy.run_module("retrofit", run_name="__main__", alter_sys=True)
