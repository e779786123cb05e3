"""DeepSpeed: config generation, engine, EMA, checkpoint save/load, weight export.

The only module that imports deepspeed. The DeepSpeed dict is generated from the typed
config here and nowhere else (batch, accumulation, clipping, optimiser, schedule,
ZeRO stage, precision).
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import save_file

from pogdiff_dist.output import without_harmless_prints


@contextlib.contextmanager
def _accelerator_named():
    """DeepSpeed picks its accelerator once, when it is imported, and where it finds none it
    warns in every CPU process (the driver too, which only imports it): "Setting accelerator
    to CPU. If you have GPU or other accelerator, we were unable to detect it." Where torch
    sees no CUDA device the CPU is named for that import (``DS_ACCELERATOR``, DeepSpeed's own
    override): the choice its detection makes, without the guess. A process with a GPU, or
    with ``DS_ACCELERATOR`` set, keeps DeepSpeed's choice; the environment is restored after,
    so no process started later (a local Ray cluster's workers) inherits the setting."""
    named = "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available()
    if named:
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        yield
    finally:
        if named:
            os.environ.pop("DS_ACCELERATOR", None)


with _accelerator_named():
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

EMA_FILE = "ema_rank{rank}.safetensors"  # each rank's EMA of its own master partitions
SHM_OP = "deepspeed_shm_comm"  # JIT-built by DeepSpeed's CPU backend on first use (~25 s)
LOCK_STALE_S = 120.0  # a build lock this long without any file of the build changing is stale


def check_op_build_lock(name: str = SHM_OP, stale_after_s: float = LOCK_STALE_S, poll_s: float = 2.0) -> None:
    """Wait while another process builds DeepSpeed's ``name`` op; fail, naming the lock file,
    when its build lock is held with no progress for ``stale_after_s``.

    torch's extension builder waits on ``<TORCH_EXTENSIONS_DIR>/<name>/lock`` forever and says
    nothing, so a first run interrupted mid-build (Ctrl-C) would hang every later run on the
    machine. Progress = the newest modification time of anything in the build folder."""
    import time

    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    while lock.exists():
        try:
            newest = max(f.stat().st_mtime for f in lock.parent.iterdir())
        except (FileNotFoundError, ValueError):  # the build finished between the two looks
            continue
        idle = time.time() - newest
        if idle > stale_after_s:
            raise RuntimeError(
                f"DeepSpeed's {name} op build lock {lock} is held but nothing in {lock.parent} has changed for "
                f"{idle:.0f}s: a build was interrupted (e.g. Ctrl-C during a first run) and left its lock, and "
                f"every DeepSpeed start on this machine would wait on it forever. If no other run here is "
                f"building it, remove the lock (rm {lock}) and start again; scripts/install.sh builds the op "
                f"ahead of time.")
        time.sleep(poll_s)


def init_single_process(device: torch.device | str) -> None:
    """A world of one outside Ray (tests, scripts/gpu_check.sh): the env DeepSpeed reads
    (without it DeepSpeed looks for mpi4py) and the process group it joins."""
    if torch.distributed.is_initialized():
        return
    if torch.device(device).type == "cpu":
        check_op_build_lock()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # set, not defaulted: a process that inherited another's MASTER_PORT (a test's subprocess, a
    # script started from a training process) would otherwise bind that process's port
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    with without_harmless_prints():  # DeepSpeed's CPU backend prints that it loaded its shm op
        deepspeed.init_distributed(dist_backend="nccl" if torch.device(device).type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)


def deepspeed_config(optim, train, world_size: int, device_type: str = "cpu") -> dict:
    """The DeepSpeed config for a run.

    The optimiser is torch's fused AdamW (``torch_adam`` + ``fused``; DeepSpeed passes the
    remaining params through to ``torch.optim.AdamW``): on CPU it avoids JIT-building
    DeepSpeed's fused_adam (a minute and 2 GB), on CUDA it is torch's fused kernel, and on
    both it honours ``found_inf``, which :class:`Engine` uses to skip a non-finite step on the
    device instead of reading a flag on the host.

    Under bf16, gradients accumulate over micro-batches and are reduced across ranks in fp32
    (``data_types.grad_accum_dtype`` and ``communication_data_type``; DeepSpeed otherwise uses
    the model's dtype for both), and the optimiser updates fp32 master weights.
    """
    if optim.schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": optim.max_steps, "warmup_num_steps": max(1, optim.warmup_steps),
            "warmup_min_ratio": 0.0, "cos_min_ratio": 0.01, "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": optim.lr, "warmup_num_steps": max(1, optim.warmup_steps),
            "warmup_type": "linear"}}
    return {
        "train_micro_batch_size_per_gpu": optim.batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": optim.batch_size * optim.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
            "weight_decay": optim.weight_decay, "torch_adam": True, "fused": True}},
        "scheduler": scheduler,
        # DeepSpeed overlaps ZeRO-2's gradient reduce-scatter with backward only when asked
        # (it defaults on for ZeRO-3 alone); on CPU/gloo there is nothing to overlap with.
        "zero_optimization": {"stage": train.zero_stage,
                              **({"overlap_comm": True} if device_type == "cuda" and train.zero_stage == 2 else {})},
        "bf16": {"enabled": train.precision == "bf16"},
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def master_weights(ds) -> list[torch.Tensor]:
    """The fp32 tensors the optimiser updates on this rank: ZeRO's flat partitions of the
    master weights (stage 3: ``fp32_partitioned_groups_flat``, which its inner optimiser holds
    only during a step; stages 1-2: ``single_partition_of_fp32_groups``; DeepSpeed's bf16
    optimiser: ``fp32_groups_flat_partition``), or the parameters themselves (an fp32 run
    without ZeRO). Each requires grad (they are the inner optimiser's params)."""
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        found = getattr(ds.optimizer, name, None)
        if found:
            return list(found)
    masters = [p for group in inner_optimizer(ds).param_groups for p in group["params"]]
    assert masters, f"no master weights found in {type(ds.optimizer).__name__}"
    return masters


def inner_optimizer(ds) -> torch.optim.Optimizer:
    """The torch optimiser DeepSpeed calls at each step (inside ZeRO's wrapper, if any)."""
    return getattr(ds.optimizer, "optimizer", ds.optimizer)


class MasterEMA:
    """An exponential moving average of the fp32 master weights, on each rank's own partition.

    It averages exactly what the optimiser updates (ZeRO's flat fp32 partitions, see
    :func:`master_weights`): no gather per step, no bf16 rounding, 1 / world of the
    weights' memory per rank; with LoRA only the adapter trains, so only the adapter is
    averaged. The update and decay schedule are diffusers' ``EMAModel`` (``step``/``get_decay``),
    given tensors that require grad: its ``step`` silently *copies* any parameter that does
    not (``s_param.copy_(param)``), which would make the "average" the last weights.
    :meth:`swapped` puts the averages into the master partitions for a moment, so DeepSpeed's
    own gather of the full fp32 weights (``safe_get_full_fp32_param``) reads the EMA.
    """

    def __init__(self, masters: list[torch.Tensor], decay: float, warmup: bool = False, power: float = 2 / 3,
                 update_after_step: int = 0):
        not_trained = [i for i, m in enumerate(masters) if not m.requires_grad]
        assert masters and not not_trained, f"master tensors {not_trained} do not require grad: EMAModel.step would copy them"
        self.masters = masters
        self.model = EMAModel(masters, decay=decay, use_ema_warmup=warmup, power=power,
                              update_after_step=update_after_step, foreach=True)

    def step(self) -> None:
        self.model.step(self.masters)

    @property
    def optimization_step(self) -> int:
        return self.model.optimization_step

    @contextlib.contextmanager
    def swapped(self):
        """The EMA in the master tensors for the duration, the live weights back afterwards."""
        live = [m.detach().clone() for m in self.masters]
        with torch.no_grad():
            for m, s in zip(self.masters, self.model.shadow_params):
                m.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for m, w in zip(self.masters, live):
                    m.copy_(w)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {f"master{i}": s.detach().contiguous() for i, s in enumerate(self.model.shadow_params)}
        return tensors, {"optimization_step": str(self.model.optimization_step)}

    def load(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> None:
        shadow = [tensors.get(f"master{i}") for i in range(len(self.masters))]
        if any(s is None or s.shape != m.shape for s, m in zip(shadow, self.masters)) or len(tensors) != len(shadow):
            raise ValueError(f"{where} holds an EMA of other master partitions ({len(tensors)} tensors for "
                             f"{len(self.masters)}): written with another world size, ZeRO stage or model?")
        self.model.shadow_params = [s.to(m.device, m.dtype) for s, m in zip(shadow, self.masters)]
        self.model.optimization_step = int(metadata["optimization_step"])


@dataclass
class StepOutcome:
    """What one micro-step did. ``skipped`` is a device flag (1.0: the optimiser step was not
    applied because a loss on some rank was non-finite), read with the log window, never here;
    ``overflow`` is DeepSpeed's own verdict on the gradients (a host bool its ZeRO optimisers
    already computed at the step)."""

    boundary: bool
    skipped: torch.Tensor | None = None
    overflow: bool = False


class Engine:
    """A DeepSpeed engine around the denoiser, plus an optional EMA of its fp32 master weights.

    Only the trainable parameters reach DeepSpeed's optimiser and the EMA (with LoRA: the
    adapter; the frozen base is left alone). The exported weights are the fp32 masters
    (or their EMA), gathered with DeepSpeed's own ``safe_get_full_fp32_param``, never the
    module's compute-dtype copy.

    Non-finite losses never reach the host inside a step: each micro-step's
    ``~isfinite(loss)`` accumulates on the device, is max-reduced across ranks at the
    accumulation boundary (enqueued, not waited for) and handed to the fused AdamW as
    ``found_inf``, which skips the update on the device (torch's mechanism for GradScaler).
    DeepSpeed's ZeRO optimisers additionally refuse a step whose gradient norm is not finite.
    """

    def __init__(self, unet: torch.nn.Module, optim_cfg, train_cfg, world_size: int,
                 device: torch.device | str = "cpu"):
        device = torch.device(device)
        t = train_cfg
        assert not (t.precision == "bf16" and t.zero_stage == 0), "TrainConfig refuses bf16 without ZeRO"
        self.config = deepspeed_config(optim_cfg, t, world_size, device.type)
        trainable = [p for p in unet.parameters() if p.requires_grad]
        if device.type == "cpu":
            check_op_build_lock()  # deepspeed.initialize builds the op on a CPU worker
        with without_harmless_prints():  # DeepSpeed's CPU backend prints that it loaded its shm op
            self.ds, _, _, _ = deepspeed.initialize(model=unet, model_parameters=trainable, config=self.config)
        placed = next(self.ds.module.parameters()).device
        if placed.type != device.type or (device.index is not None and placed.index != device.index):
            raise RuntimeError(f"DeepSpeed placed the UNet on {placed} but this worker's device is {device}: "
                               f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} does not match the device")
        self.device, self.world = device, world_size
        self.zero_stage = t.zero_stage
        self.dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
        self.inner = inner_optimizer(self.ds)
        self._nonfinite = torch.zeros((), device=device)  # this optimiser step's micro-batches: any non-finite loss
        self.ema = (MasterEMA(master_weights(self.ds), t.ema_decay, t.ema_warmup, t.ema_power, t.ema_update_after_step)
                    if t.ema else None)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of what trains: everything, or the LoRA adapter alone."""
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def optimizer_state_bytes(self) -> int:
        """Bytes of this rank's optimiser state: Adam's two moments (not ZeRO's fp32 master
        weights under bf16), each tensor once (a ZeRO optimiser's ``state`` is its inner one's)."""
        seen: dict[int, int] = {}
        for opt in (self.ds.optimizer, self.inner):
            for state in getattr(opt, "state", {}).values() if opt is not None else ():
                for v in state.values():
                    if torch.is_tensor(v):
                        seen[id(v)] = v.numel() * v.element_size()
        return sum(seen.values())

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    @property
    def global_step(self) -> int:
        return self.ds.global_steps

    @property
    def lr(self) -> float:
        """The learning rate the next step uses (the optimiser's, which the schedule sets; asking
        the schedule itself before its first step only draws a DeepSpeed warning)."""
        return float(self.ds.optimizer.param_groups[0]["lr"])

    def gathered(self):
        """Full parameters on every rank for the duration (a no-op below ZeRO-3)."""
        if self.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def backward_step(self, loss: torch.Tensor) -> StepOutcome:
        """Backward and (at an accumulation boundary) the optimiser + schedule step, without
        reading anything on the host (see the class docstring)."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        self._nonfinite = torch.maximum(self._nonfinite, (~torch.isfinite(loss.detach())).float())
        if not boundary:
            self.ds.backward(loss)
            self.ds.step()
            return StepOutcome(boundary=False)
        skipped = self._nonfinite
        if self.world > 1:  # every rank must skip together: enqueued on the device, not waited for
            deepspeed.comm.all_reduce(skipped, op=deepspeed.comm.ReduceOp.MAX)
        self.inner.found_inf = skipped  # torch's fused AdamW skips params and moments where found_inf != 0
        self.ds.backward(loss)
        self.ds.step()
        self._nonfinite = torch.zeros((), device=self.device)
        overflow = bool(getattr(self.ds.optimizer, "overflow", False))  # a host bool DeepSpeed already holds
        if self.ema is not None and not overflow:
            self.ema.step()
        return StepOutcome(boundary=True, skipped=skipped, overflow=overflow)

    def save(self, directory: str | Path, tag: str, client_state: dict) -> None:
        """Every rank must call this (each writes its ZeRO partition and its EMA partition)."""
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=client_state)
        if self.ema is not None:
            tensors, metadata = self.ema.state()
            save_file(tensors, str(Path(directory) / EMA_FILE.format(rank=self.ds.global_rank)), metadata=metadata)

    def load(self, directory: str | Path) -> dict:
        _, client_state = self.ds.load_checkpoint(str(directory), load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if client_state is None:
            raise ValueError(f"no DeepSpeed checkpoint found in {directory}")
        if self.ema is not None:
            path = Path(directory) / EMA_FILE.format(rank=self.ds.global_rank)
            if not path.is_file():
                raise ValueError(f"train.ema is on but checkpoint {directory} holds no {path.name}")
            with safe_open(str(path), "pt") as f:
                self.ema.load({k: f.get_tensor(k) for k in f.keys()}, f.metadata(), str(path))  # noqa: SIM118
        return client_state

    def master_state_dict(self, ema: bool = True) -> dict[str, torch.Tensor] | None:
        """The trainable parameters' fp32 master weights by name (their EMA when ``ema`` and
        ``train.ema``), on rank 0's CPU; None on other ranks. Every rank calls: DeepSpeed's
        ``safe_get_full_fp32_param`` gathers each parameter from the ranks' partitions."""
        use_ema = ema and self.ema is not None
        out = {}
        with self.ema.swapped() if use_ema else contextlib.nullcontext():
            for name, p in self.trainable():
                full = safe_get_full_fp32_param(p)
                if full is None:  # no ZeRO optimiser: the parameter is its own fp32 master
                    full = p.detach()
                if self.ds.global_rank == 0:
                    out[name] = full.detach().float().cpu().clone()
        return out if self.ds.global_rank == 0 else None
