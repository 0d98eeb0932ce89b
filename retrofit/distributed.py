"""Running under a launcher (``accelerate launch``, ``torchrun``): one process per device, every rank computes,
rank 0 alone talks (progress, tables) and writes (checkpoints, metrics, results).

The launcher's environment says where a process stands (``RANK``, ``WORLD_SIZE``), so the command line can be
quiet on other ranks before any process group exists; the group itself is accelerate's, started by the first
:class:`accelerate.Accelerator` (gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def sharded(accelerator) -> bool:
    """Whether accelerate shards the model across the ranks (its FSDP plugin)."""
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.FSDP


def require_fsdp2(accelerator) -> None:
    """Refuse FSDP version 1: it flattens a unit's weights into one parameter, which cannot train the routers
    alone beside frozen weights; version 2 shards every weight on its own."""
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        from retrofit.errors import RetrofitError

        raise RetrofitError("retrofit needs FSDP version 2, since FSDP version 1 cannot train the routers alone "
                            "beside frozen weights; set fsdp_version: 2 in the accelerate config (accelerate launch "
                            "--fsdp_version 2)")


def load_device(accelerator, device):
    """Where this rank loads the model: its device, or under FSDP the CPU, whence each rank's slices move to its
    device when accelerate shards the model."""
    return "cpu" if sharded(accelerator) else device


def reads_checkpoint(accelerator) -> bool:
    """Whether this rank reads the checkpoint's weights: every rank does, except under FSDP with the plugin's
    ``cpu_ram_efficient_loading`` (accelerate's default), where rank 0 alone reads them and sends every rank its
    shards, so the host holds one copy of the weights instead of one per process."""
    return not (sharded(accelerator) and accelerator.state.fsdp_plugin.cpu_ram_efficient_loading
                and not accelerator.is_main_process)
