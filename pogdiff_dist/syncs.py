"""Device-to-host synchronisations: where the host must wait for the device.

A training step that reads a device value on the host (``.item()``, ``.tolist()``, a
boolean mask's ``nonzero``, a copy to the CPU, ``if tensor:``) stalls the host until the
device has finished everything queued before it, so the host cannot run ahead and the GPU
idles between steps. :class:`HostSyncCounter` counts those reads while a block runs.

On a CUDA device a sync is an op reading a CUDA tensor. On a CPU-only machine every tensor
is a CPU tensor, so the counter needs to know which code works on host data by design:
functions decorated with :func:`host_side` (the data pipeline's collation, the step's
host-side draws, the one host-to-device copy). Their reads are not syncs (they never see a
device tensor: their inputs are numpy or CPU tensors made from it); everything else that
reads a tensor on the host is counted, attributed to the innermost library or project frame.
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_SIDE: set = set()  # code objects of functions that work on host data


def host_side(fn):
    """Mark ``fn`` as working on host data only (numpy, or CPU tensors it made from numpy):
    what it reads is not a device sync. A no-op at run time."""
    HOST_SIDE.add(fn.__code__)
    return fn


# ops that make the host wait for the device: a scalar read, a data-dependent output size
_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default,
             torch.ops.aten.unique_consecutive.default}
# tensor methods that copy to the host (on CUDA each waits for the device)
_HOST_READS = {"tolist", "numpy", "cpu", "item", "__bool__", "__float__", "__int__", "__index__"}


@dataclass
class SyncEvent:
    op: str
    where: str  # innermost frame outside torch: "package/module.py:line (function)"
    library: str  # "pogdiff_dist", "deepspeed", "diffusers", ...


@dataclass
class HostSyncCounter:
    """Context manager counting device-to-host syncs (see the module docstring).

    ``device``: the training device. On CUDA only ops on CUDA tensors count; on CPU every
    read outside :func:`host_side` code does. ``events`` lists them; :meth:`by_library`
    groups them (e.g. DeepSpeed's ZeRO optimiser reads its overflow flag at each step)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    events: list[SyncEvent] = field(default_factory=list)

    def __post_init__(self):
        self.device = torch.device(self.device)
        self._reading = 0
        self._modes = (_FunctionReads(self), _DispatchReads(self))

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False

    def by_library(self) -> Counter:
        return Counter(e.library for e in self.events)

    def _counts(self, tensors) -> bool:
        if self.device.type == "cuda":
            return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in tensors)
        return any(isinstance(t, torch.Tensor) for t in tensors)

    def _record(self, op: str) -> None:
        frame = sys._getframe()
        while frame is not None:
            if frame.f_code in HOST_SIDE:
                return
            frame = frame.f_back
        where, library = "?", "?"
        for f in reversed(traceback.extract_stack()):
            name = f.filename.replace("\\", "/")
            if "/torch/" in name or name.endswith("/syncs.py"):
                continue
            if "site-packages/" in name:
                short = name.split("site-packages/")[-1]
                library = short.split("/")[0]
            elif "/pogdiff_dist/" in name:
                short, library = "pogdiff_dist/" + name.split("/pogdiff_dist/")[-1], "pogdiff_dist"
            else:
                short, library = name, "caller"
            where = f"{short}:{f.lineno} ({f.name})"
            break
        self.events.append(SyncEvent(op, where, library))


class _FunctionReads(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "to" and _targets_host(args[1:], kwargs, self.counter.device)
        if (name in _HOST_READS or to_host) and args and self.counter._counts(args[:1]):
            self.counter._record(f"Tensor.{name}")
            self.counter._reading += 1  # the read's own scalar op below is the same sync
            try:
                return func(*args, **kwargs)
            finally:
                self.counter._reading -= 1
        return func(*args, **kwargs)


class _DispatchReads(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
        if (func in _SYNC_OPS or bool_index) and not self.counter._reading and self.counter._counts(args[:1]):
            self.counter._record(str(func))
        return func(*args, **kwargs)


def _targets_host(args, kwargs, device: torch.device) -> bool:
    """``Tensor.to(...)`` copying to the host. On a CPU training device every ``.to(<device>)``
    names the CPU (DeepSpeed's ``.to(current_device_name())`` too), so there ``.to`` is not
    counted; host reads are ``.cpu()``, ``.numpy()``, ``.tolist()``, ``.item()`` and the scalar ops."""
    target = kwargs.get("device", args[0] if args else None)
    if device.type == "cpu":
        return False
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"
