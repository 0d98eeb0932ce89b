"""Whole tensors out of FSDP's sharded parameters and optimizer state, and back into them.

Under FSDP2 (accelerate's plugin) every parameter is a ``DTensor`` holding one slice per rank. Checkpoints and
the exported model hold whole tensors, exactly as one process writes them, so that a run resumes with any
number of processes and the output is the same model however it was trained. Gathering is a collective: every
rank calls these functions, in the same order; rank 0 alone then writes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a sharded one (a collective); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def whole_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``model``, whole, in fp32 on the CPU."""
    return {name: whole(p.detach()).float().cpu() for name, p in model.named_parameters() if p.requires_grad}


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor (Adam's moments) made whole, on the CPU."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    state["state"] = {index: {key: value.full_tensor().cpu() if isinstance(value, DTensor) else value
                              for key, value in per_param.items()}
                      for index, per_param in state["state"].items()}
    return state


def copy_whole_into(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, into this rank's slice of it when it is sharded."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            param.to_local().copy_(_shard_like(tensor, param).to_local())
        else:
            param.copy_(tensor)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of whole state: slice the moments of sharded parameters like the parameters."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                    state[key] = _shard_like(value, param)


def _shard_like(tensor: torch.Tensor, like: DTensor) -> DTensor:
    # Every rank holds the whole tensor (each read the same file), so each keeps its slice: no communication.
    return distribute_tensor(tensor.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)
