"""The GPU path's numerics, checked on the CPU with the code a GPU run executes (one plain
process, DeepSpeed engines, the synthetic prepared dataset):

- the EMA is the closed-form average of the fp32 master-weight history (not a copy of the
  last weights), survives a checkpoint and resume, and covers only what trains (LoRA);
- the export holds the fp32 master weights, not the bf16 compute copy, and a LoRA merge
  keeps the base weights at full precision;
- bf16 gradients accumulate and reduce in fp32;
- no device-to-host sync happens inside a training step that does not log (counted);
- a non-finite loss skips its update on the device, is counted at the next log line and,
  with ``train.on_nonfinite=raise``, stops the run naming its samples.
"""

import pytest
import torch
from conftest import synthetic_cfg


def _trainer(synthetic, tmp_path, **overrides):
    from pogdiff_dist.train.engine import init_single_process
    from pogdiff_dist.train.local import LocalCheckpoints
    from pogdiff_dist.train.trainer import Trainer

    init_single_process("cpu")
    cfg = synthetic_cfg(**{"optim.lr": 1e-2, "optim.warmup_steps": 1, "train.checkpoint_every": 1000,
                           "train.log_every": 3, **overrides})
    return Trainer(cfg, synthetic, "cpu", 0, 1, report=LocalCheckpoints(tmp_path / "ckpt"), run_dir=tmp_path / "run")


class MasterHistory:
    """The fp32 master weights after every optimiser step (wraps Engine.backward_step)."""

    def __init__(self, trainer):
        self.engine, self.history = trainer.engine, [trainer.engine.master_state_dict(ema=False)]
        step = self.engine.backward_step

        def recording(loss):
            out = step(loss)
            if out.boundary:
                self.history.append(self.engine.master_state_dict(ema=False))
            return out

        self.engine.backward_step = recording


def closed_form_ema(history: list[dict], decay: float, warmup: bool = False, power: float = 2 / 3,
                    after: int = 0) -> dict:
    """EMA_N = sum_k c_k w_k with c_k = (1 - d_k) prod_{j > k} d_j, d_n diffusers' schedule
    (s = n - after - 1: d = 0 for s <= 0, else min(decay, (1 + s) / (10 + s)) or with warm-up
    min(decay, 1 - (1 + s) ** -power)); w_0 (the initial weights) weighs prod_j d_j."""
    n = len(history) - 1

    def d(step):
        s = step - after - 1
        if s <= 0:
            return 0.0
        return min(decay, 1 - (1 + s) ** -power if warmup else (1 + s) / (10 + s))

    decays = [d(k) for k in range(1, n + 1)]
    coef = [1.0] * (n + 1)
    for k in range(n + 1):
        tail = 1.0
        for j in range(max(k, 1), n + 1):
            tail *= decays[j - 1] if j > k else 1.0
        coef[k] = tail * (1 - decays[k - 1]) if k >= 1 else tail
    assert abs(sum(coef) - 1) < 1e-12
    return {name: sum(c * w[name].double() for c, w in zip(coef, history)).float() for name in history[0]}


@pytest.mark.parametrize("zero_stage,warmup", [(2, False), (3, True)])
def test_ema_is_the_closed_form_average_of_the_master_history(synthetic, tmp_path, zero_stage, warmup):
    from pogdiff_dist.train.local import read_local

    tr = _trainer(synthetic, tmp_path, **{"optim.max_steps": 6, "train.ema": True, "train.ema_decay": 0.9,
                                           "train.ema_warmup": warmup, "train.zero_stage": zero_stage})
    record = MasterHistory(tr)
    tr.fit(read_local(), final_checkpoint=False)
    assert len(record.history) == 7 and tr.engine.ema.optimization_step == 6
    exported = tr.engine.master_state_dict(ema=True)
    want = closed_form_ema(record.history, 0.9, warmup=warmup)
    last = record.history[-1]
    worst = max((exported[k] - want[k]).abs().max().item() for k in want)
    moved = max((last[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-6, worst
    assert moved > 1e-3, moved  # the average is not the last weights
    # the export on disk is the EMA
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "run" / "model" / "unet"))
    on_disk = dict(unet.named_parameters())
    assert max((on_disk[k] - exported[k]).abs().max().item() for k in exported) == 0.0


def test_ema_survives_checkpoint_and_resume(synthetic, tmp_path):
    from pogdiff_dist.train.local import train_local

    cfg = synthetic_cfg(**{"optim.lr": 1e-2, "optim.warmup_steps": 1, "train.ema": True, "train.ema_decay": 0.8,
                           "train.checkpoint_every": 3, "train.log_every": 3})
    whole, _ = train_local(cfg.with_overrides({"optim.max_steps": 6}), synthetic, tmp_path / "whole")
    train_local(cfg.with_overrides({"optim.max_steps": 3}), synthetic, tmp_path / "split")
    resumed, _ = train_local(cfg.with_overrides({"optim.max_steps": 6}), synthetic, tmp_path / "split", resume=True)
    a, b = whole.engine.master_state_dict(ema=True), resumed.engine.master_state_dict(ema=True)
    assert resumed.engine.ema.optimization_step == 6
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_lora_ema_is_of_the_adapter_alone_and_the_merge_keeps_fp32_base_weights(synthetic, tmp_path):
    """bf16 ZeRO-2 with a rank-4 LoRA: the EMA and the optimiser hold the adapter only; the
    merged export's base weights are the fp32 base read from disk (W_merged - scale B A == W_base
    to fp32 rounding), not its bf16 rounding."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from pogdiff_dist.train.local import read_local

    base_dir = tmp_path / "base"
    torch.manual_seed(1)
    from pogdiff_dist.models import ModelSpec, build_unet

    cfg0 = synthetic_cfg()
    build_unet(cfg0.model, ModelSpec(1, 16, 384)).save_pretrained(str(base_dir))
    tr = _trainer(synthetic, tmp_path, **{"optim.max_steps": 3, "train.ema": True, "train.ema_decay": 0.5,
                                           "train.precision": "bf16", "model.lora_rank": 4,
                                           "model.init_unet": str(base_dir)})
    adapter = sum(p.numel() for _, p in tr.engine.trainable())
    assert all("lora" in n for n, _ in tr.engine.trainable())
    ema_numel = sum(s.numel() for s in tr.engine.ema.model.shadow_params)
    assert adapter <= ema_numel < adapter + 64  # ZeRO pads its flat partition to an alignment, nothing more
    tr.fit(read_local(), final_checkpoint=False)
    base = UNet2DConditionModel.from_pretrained(str(base_dir))
    merged = UNet2DConditionModel.from_pretrained(str(tmp_path / "run" / "model" / "unet"))
    lora = load_file(str(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    name = next(k for k in lora if k.endswith("to_q.lora.down.weight"))  # diffusers' format: down = A, up = B
    module = name.removeprefix("unet.").removesuffix(".lora.down.weight")
    a, b = lora[name].float(), lora[name.replace("lora.down", "lora.up")].float()
    w_base = dict(base.named_parameters())[f"{module}.weight"].detach()
    w_merged = dict(merged.named_parameters())[f"{module}.weight"].detach()
    delta = b @ a  # scale 1: lora_alpha defaults to the rank
    assert delta.abs().max() > 0  # the adapter trained
    torch.testing.assert_close(w_merged - delta, w_base, rtol=0, atol=1e-6)
    rounded = w_base.to(torch.bfloat16).float()
    assert (rounded != w_base).any() and (w_merged - delta - rounded).abs().max() > 1e-5


def test_bf16_run_exports_the_fp32_masters_not_the_bf16_weights(synthetic, tmp_path):
    from diffusers import UNet2DConditionModel

    from pogdiff_dist.train.local import read_local

    tr = _trainer(synthetic, tmp_path, **{"optim.max_steps": 3, "train.precision": "bf16"})
    tr.fit(read_local(), final_checkpoint=False)
    masters = tr.engine.master_state_dict(ema=False)
    live = {n: p.detach() for n, p in tr.engine.module.named_parameters()}
    assert all(live[n].dtype == torch.bfloat16 for n in masters)
    exported = dict(UNet2DConditionModel.from_pretrained(str(tmp_path / "run" / "model" / "unet")).named_parameters())
    for n, w in masters.items():
        assert torch.equal(exported[n].detach(), w), n
    # the masters carry precision the bf16 copy has lost
    lost = sum(int((w != live[n].float()).sum()) for n, w in masters.items())
    assert lost > 0.5 * sum(w.numel() for w in masters.values())


def test_bf16_gradients_accumulate_and_reduce_in_fp32(synthetic, tmp_path):
    from pogdiff_dist.train.engine import deepspeed_config

    cfg = synthetic_cfg(**{"train.precision": "bf16", "optim.grad_accum": 4, "train.zero_stage": 2})
    ds_cfg = deepspeed_config(cfg.optim, cfg.train, world_size=8, device_type="cuda")
    assert ds_cfg["data_types"] == {"grad_accum_dtype": "fp32"} and ds_cfg["communication_data_type"] == "fp32"
    assert ds_cfg["bf16"] == {"enabled": True} and ds_cfg["optimizer"]["params"]["fused"] is True
    tr = _trainer(synthetic, tmp_path, **{"train.precision": "bf16", "optim.grad_accum": 4})
    assert tr.engine.ds.get_data_types() == (torch.bfloat16, torch.float32)
    assert tr.engine.ds.communication_data_type == torch.float32
    zero = tr.engine.ds.optimizer
    assert zero.gradient_accumulation_dtype == torch.float32 and zero._use_compact_grad_partition_buffer(0)
    with pytest.raises(ValueError, match="bf16 needs train.zero_stage >= 1"):
        synthetic_cfg(**{"train.precision": "bf16", "train.zero_stage": 0})


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_no_host_sync_inside_a_step_that_does_not_log(synthetic, tmp_path, grad_accum):
    """PoGDiff (the method with the most host-side decisions) with caption dropout, bf16
    ZeRO-2 and the text cache on: every device-to-host read of the training loop is counted
    per micro-step. Micro-steps that are not optimiser steps must have none at all; optimiser
    steps that do not log have none of this project's, only DeepSpeed's ZeRO step reading its
    gradient-overflow verdict (its own, fixed count per step)."""
    from pogdiff_dist.syncs import HostSyncCounter
    from pogdiff_dist.train.local import read_local

    tr = _trainer(synthetic, tmp_path, **{"optim.max_steps": 6, "optim.grad_accum": grad_accum,
                                           "train.log_every": 3, "train.precision": "bf16",
                                           "train.caption_dropout": 0.3, "loss.use_psi_den": False})
    per_call = []
    train_step = tr._train_step

    def counted(host, idle=False):
        before = tr.state.step
        with HostSyncCounter(tr.device) as c:
            stepped = train_step(host, idle)
        per_call.append((before + 1 if stepped else None, c.events))
        return stepped

    tr._train_step = counted
    tr.fit(read_local(), final_checkpoint=False)
    assert tr.state.step == 6 and len(per_call) == 6 * grad_accum
    logging = {3, 6}
    micro = [events for step, events in per_call if step is None]
    quiet = [events for step, events in per_call if step is not None and step not in logging]
    assert len(micro) == 6 * (grad_accum - 1) and len(quiet) == 4
    assert all(not events for events in micro), micro
    ours = [e for events in quiet for e in events if e.library != "deepspeed"]
    assert not ours, ours
    deepspeed = {len(events) for events in quiet}
    assert len(deepspeed) == 1 and deepspeed.pop() <= 3, [[e.where for e in ev] for ev in quiet]
    loud = [events for step, events in per_call if step in logging]
    assert all(any(e.library == "pogdiff_dist" for e in events) for events in loud)  # the window's read counts


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_nonfinite_loss_skips_its_update_on_the_device_and_is_counted_at_the_log(synthetic, tmp_path, zero_stage):
    """Step 4's loss is made NaN: its update is not applied (the masters after step 4 equal
    those after step 3, while steps 3 and 5 move them) by the fused optimiser's found_inf
    (ZeRO-0) or DeepSpeed's own gradient check (ZeRO-2), and the next log line counts it."""
    from pogdiff_dist.train.local import read_local

    tr = _trainer(synthetic, tmp_path, **{"optim.max_steps": 6, "train.log_every": 3, "train.zero_stage": zero_stage})
    record = MasterHistory(tr)
    stepper, calls = tr.stepper, []

    class Poisoned:
        def __getattr__(self, name):
            return getattr(stepper, name)

        def __call__(self, *args, **kwargs):
            loss, stats = stepper(*args, **kwargs)
            calls.append(1)
            return (loss * float("nan") if len(calls) == 4 else loss), stats

    tr.stepper = Poisoned()
    tr.fit(read_local(), final_checkpoint=False)
    h = record.history
    moved = [any(not torch.equal(h[i][k], h[i - 1][k]) for k in h[0]) for i in range(1, 7)]
    assert moved[2] and not moved[3] and moved[4] and moved[5], moved  # steps 3, 5, 6 moved; step 4 did not
    assert all(torch.isfinite(w).all() for w in h[6].values())
    assert tr.state.nonfinite == 1 and tr.state.nonfinite_run == 0 and tr.state.last["nonfinite_skipped"] == 1


def test_a_nonfinite_loss_with_on_nonfinite_raise_names_its_samples(synthetic, tmp_path):
    from pogdiff_dist.train.local import read_local

    tr = _trainer(synthetic, tmp_path, **{"optim.max_steps": 4, "train.log_every": 2, "train.on_nonfinite": "raise"})
    stepper = tr.stepper
    seen = []

    class Poisoned:
        def __getattr__(self, name):
            return getattr(stepper, name)

        def __call__(self, unet, batch, *args, **kwargs):
            loss, stats = stepper(unet, batch, *args, **kwargs)
            seen.append(batch.index.tolist())
            return loss * float("nan"), stats

    tr.stepper = Poisoned()
    with pytest.raises(FloatingPointError) as raised:
        tr.fit(read_local(), final_checkpoint=False)
    # read at the first log line (step 2), naming step 1's samples
    assert tr.state.step == 2
    assert str(raised.value) == (f"non-finite loss at step 1 on this rank (samples {seen[0]}); "
                                 f"stopping: train.on_nonfinite=raise")
