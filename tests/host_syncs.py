"""Host synchronisations counted on a CPU, for the samplers' "at most one per denoising step" (issue 23).

On a GPU, reading a device tensor's values on the host (``.cpu()``, ``.tolist()``, ``.item()``, ``bool(t)``,
``nonzero``, a boolean-mask index, ...) makes the host wait for the device. On a CPU every tensor is a host tensor,
so :class:`HostSyncs` keeps the distinction itself: a tensor is on the *host* when a factory made it without a
``device`` (``torch.tensor(list)``, a draw from a CPU generator), when ``.cpu()`` brought it over, or when it was
computed from host tensors alone; everything else is on the *device*. Reading a device tensor counts as one sync;
reading a host tensor is free. ``.to(device)`` sends a host tensor to the device. The model's own forward is left
out (``pause_in``): the CUDA tests cover it on a GPU.

An approximation, stricter than CUDA's sync debug mode in one way: code that makes a tensor for the device without
naming the device (``torch.zeros(n)`` later mixed with device tensors) is read as host code, so reading it later is
not counted. It is looser in another: ``.to("cpu")`` is not counted (the samplers bring values over with ``.cpu()``).
"""

from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor

# Reading values on the host: a synchronisation when the tensor is on the device.
READS = {Tensor.tolist, Tensor.item, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__,
         Tensor.numpy, Tensor.nonzero, torch.nonzero, Tensor.masked_select, torch.masked_select, Tensor.unique,
         torch.unique, Tensor.bincount, torch.bincount, Tensor.argwhere, torch.argwhere}
TRANSFERS = {Tensor.cpu}
INDEXING = {Tensor.__getitem__, Tensor.__setitem__}
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.randint, torch.rand, torch.randn, torch.randperm, torch.linspace}


def _tensors(value):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _caller() -> str:
    """The first frame in retrofit's code: where a counted read happened."""
    frame = sys._getframe(2)
    while frame is not None and "/retrofit/" not in frame.f_code.co_filename.replace("\\", "/"):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"


class HostSyncs(TorchFunctionMode):
    """``with HostSyncs() as syncs: ...``; ``syncs.seen``: one ``"function at file:line"`` per counted read."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self._host: dict[int, weakref.ref] = {}
        self._paused = 0

    def is_host(self, t: Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark(self, value) -> None:
        for t in _tensors(value):
            self._host[id(t)] = weakref.ref(t)

    @contextmanager
    def pause_in(self, module: torch.nn.Module):
        """Leave ``module``'s forward uncounted (its outputs are device tensors)."""
        def enter(*_):
            self._paused += 1

        def leave(*_):
            self._paused -= 1

        handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self._paused:
            return result
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        on_device = [t for t in inputs if not self.is_host(t)]
        if func in READS and on_device:
            self.seen.append(f"{func.__name__} at {_caller()}")
        elif func in TRANSFERS and on_device:
            self.seen.append(f"{func.__name__} at {_caller()}")
            result = result.clone() if result is args[0] else result  # a copy, as from a GPU
        elif func in INDEXING and any(t.dtype == torch.bool for t in _tensors(args[1:2])) and on_device:
            self.seen.append(f"boolean-mask {func.__name__} at {_caller()}")
        if func in TRANSFERS:
            self._mark(result)
        elif func is Tensor.to and ("device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])):
            if result is args[0] and self.is_host(result):
                result = result.clone()  # sent to the device: a new tensor there
        elif func in FACTORIES and not inputs:
            if kwargs.get("device") is None:
                self._mark(result)
        elif inputs and not on_device:  # computed from host tensors alone
            self._mark(result)
        return result
