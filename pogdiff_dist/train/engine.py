"""DeepSpeed: config generation, engine, EMA, checkpoint save/load, weight export.

The only module that imports deepspeed. The DeepSpeed dict is generated from the typed
config here and nowhere else (batch, accumulation, clipping, optimiser, schedule,
ZeRO stage, precision).
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import deepspeed
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

EMA_FILE = "ema.safetensors"
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
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if torch.device(device).type == "cuda" else "gloo",
                               auto_mpi_discovery=False)


def deepspeed_config(optim, train, world_size: int, device_type: str = "cpu") -> dict:
    """The DeepSpeed config for a run.

    The optimiser is torch's AdamW (``torch_adam``): on CPU it avoids JIT-building
    DeepSpeed's fused_adam (a minute and 2 GB), on CUDA it runs torch's fused kernel
    (``fused``; DeepSpeed passes the remaining params through to ``torch.optim.AdamW``).
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
            "weight_decay": optim.weight_decay, "torch_adam": True,
            **({"fused": True} if device_type == "cuda" else {})}},
        "scheduler": scheduler,
        # DeepSpeed overlaps ZeRO-2's gradient reduce-scatter with backward only when asked
        # (it defaults on for ZeRO-3 alone); on CPU/gloo there is nothing to overlap with.
        "zero_optimization": {"stage": train.zero_stage,
                              **({"overlap_comm": True} if device_type == "cuda" and train.zero_stage == 2 else {})},
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Engine:
    """A DeepSpeed engine around the UNet, plus an optional EMA of its weights.

    Only the trainable parameters reach DeepSpeed's optimiser and the EMA (with LoRA: the
    adapter; the frozen base is left alone). The EMA keeps full-size shadow weights on every
    rank; under ZeRO-3 the live parameters are gathered around each EMA update so the
    average is of the real weights, not of the local shards.
    """

    def __init__(self, unet: torch.nn.Module, cfg, world_size: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.config = deepspeed_config(cfg.optim, cfg.train, world_size, device.type)
        trainable = [p for p in unet.parameters() if p.requires_grad]
        if device.type == "cpu":
            check_op_build_lock()  # deepspeed.initialize builds the op on a CPU worker
        self.ds, _, _, _ = deepspeed.initialize(model=unet, model_parameters=trainable, config=self.config)
        placed = next(self.ds.module.parameters()).device
        if placed.type != device.type or (device.index is not None and placed.index != device.index):
            raise RuntimeError(f"DeepSpeed placed the UNet on {placed} but this worker's device is {device}: "
                               f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} does not match the device")
        self.zero_stage = cfg.train.zero_stage
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.ema = None
        if cfg.train.ema:
            with self.gathered():
                self.ema = EMAModel([p.detach().float() for _, p in self.trainable()], decay=cfg.train.ema_decay)

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
        inner = getattr(self.ds.optimizer, "optimizer", None)
        for opt in (self.ds.optimizer, inner):
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

    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward and (at an accumulation boundary) optimiser + schedule step.
        Returns True when an optimiser step happened."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.backward(loss)
        self.ds.step()
        if boundary and self.ema is not None:
            with self.gathered():
                self.ema.step([p.detach().float() for _, p in self.trainable()])
        return boundary

    def save(self, directory: str | Path, tag: str, client_state: dict) -> None:
        """Every rank must call this (each writes its ZeRO partition)."""
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=client_state)
        if self.ema is not None and self.ds.global_rank == 0:
            names = [n for n, _ in self.trainable()]
            save_file({n: s.contiguous() for n, s in zip(names, self.ema.shadow_params)}, str(Path(directory) / EMA_FILE),
                      metadata={"optimization_step": str(self.ema.optimization_step)})

    def load(self, directory: str | Path) -> dict:
        _, client_state = self.ds.load_checkpoint(str(directory), load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if client_state is None:
            raise ValueError(f"no DeepSpeed checkpoint found in {directory}")
        ema_path = Path(directory) / EMA_FILE
        if self.ema is not None:
            if not ema_path.is_file():
                raise ValueError(f"train.ema is on but checkpoint {directory} holds no {EMA_FILE}")
            shadow = load_file(str(ema_path))
            self.ema.shadow_params = [shadow[n].to(p.device) for n, p in self.trainable()]
            from safetensors import safe_open

            with safe_open(str(ema_path), "pt") as f:
                self.ema.optimization_step = int(f.metadata()["optimization_step"])
        return client_state

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights for export (EMA weights if enabled). Every rank calls; rank 0 gets them."""
        with self.gathered():
            if self.ds.global_rank != 0:
                return None
            state = {k: v.detach().float().clone() for k, v in self.module.state_dict().items()}
        if self.ema is not None:
            for (name, _), shadow in zip(self.trainable(), self.ema.shadow_params):
                state[name] = shadow.detach().float().clone()
        return state

