"""Evaluation of a model that FSDP shards across the ranks (accelerate's plugin): one that does not fit one device.

lm-eval hands every rank its own requests, so ranks run different numbers of forwards; but under FSDP every
forward is a collective (each layer gathers its weights from all ranks). :class:`LockstepModel` keeps the ranks
in step, as torch's ``Join`` does for DDP: before each forward a rank says whether it has work; a rank that has
finished its share keeps joining the others' forwards with a one-token forward (no routing statistics) until
every rank has finished.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def shard_for_eval(accelerator, model) -> "LockstepModel":
    """``model`` sharded in place by accelerate's FSDP2 code (its wrap policy, and rank 0's weights sent to every
    rank with ``cpu_ram_efficient_loading``), behind a :class:`LockstepModel`."""
    from accelerate.utils import fsdp2_prepare_model

    from retrofit.distributed import require_fsdp2

    require_fsdp2(accelerator)
    return LockstepModel(fsdp2_prepare_model(accelerator, model), accelerator.device)


class LockstepModel:
    """The sharded model, called like it (every other attribute is the model's own)."""

    def __init__(self, model, device: torch.device):
        self._model, self._device = model, device

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        self._anyone_busy(True)
        return self._model(*args, **kwargs)

    def finish(self) -> None:
        """Join the other ranks' forwards until all have finished their share (a collective: every rank calls it
        once it is done)."""
        filler = torch.tensor([[self._model.config.mask_token_id]], device=self._device)
        while self._anyone_busy(False):
            with torch.no_grad(), self._model.routing_stats_paused():
                self._model(input_ids=filler)

    def _anyone_busy(self, busy: bool) -> bool:
        flag = torch.tensor([int(busy)], device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
