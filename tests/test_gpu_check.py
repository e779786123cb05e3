"""scripts/gpu_check.sh end to end on CPU (--device cpu --tiny): the GPU acceptance script's
code paths (SD-layout dir from configs, shards written on the spot, the Trainer without Ray
for four methods timed in windows, FLOP counting, one checkpoint + resume, diffusers export,
DDIM sample); and the arithmetic of its disk plan and timing windows."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # benchmarks/ is not a package: on the path above


def test_disk_plan_arithmetic():
    params = {"unet": 10, "text_encoder": 3, "vae": 2}
    plan = gpu_check.disk_plan(params, "bf16", ema=True, samples=2, latent=(4, 2, 2), text=(3, 4))
    # bf16 module 2 + fp32 master 4 + Adam's two fp32 moments 8 + fp32 EMA 4 = 18 bytes per UNet parameter
    assert plan["checkpoint_bytes"] == 10 * 18
    assert plan["layout_bytes"] == plan["export_bytes"] == 4 * 15  # UNet, text encoder and VAE in fp32
    assert plan["shard_bytes"] == 2 * (4 * 16 + 2 * 12)  # fp32 latents, fp16 caption states
    assert plan["stages"] == {"timed_runs": 60 + 88 * 2, "checkpoint": 60 + 176 + 180, "export": 60 + 176 + 60}
    assert (plan["peak_stage"], plan["peak_bytes"]) == ("checkpoint", 416)
    fp32 = gpu_check.disk_plan(params, "fp32", ema=False, samples=2, latent=(4, 2, 2), text=(3, 4))
    assert fp32["checkpoint_bytes"] == 10 * (4 + 4 + 8)


def test_full_size_sd15_disk_plan_is_under_20_gb():
    """SD v1.5's real parameter counts (its configs, built on the meta device): the one
    checkpoint (15.47 GB) next to the layout (4.26 GB) is the peak, under 20 GB."""
    counts = gpu_check.param_counts(tiny=False)
    assert counts == {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    plan = gpu_check.disk_plan(counts, "bf16", ema=True, samples=64, latent=(4, 64, 64), text=(77, 768))
    assert plan["checkpoint_bytes"] == 18 * 859_520_964
    assert plan["peak_stage"] == "checkpoint" and plan["peak_bytes"] < gpu_check.SD15_DISK_PEAK_MAX


def test_windows_are_timed_between_logs():
    clock = gpu_check.WindowClock()
    for step, t in [(2, 10.0), (4, 10.8), (6, 11.4), (7, 11.9)]:  # logs at every 2nd step and at max_steps
        clock.marks.append((step, t))
    assert clock.window_step_seconds(window=2, start=2) == pytest.approx([0.4, 0.3])  # 7 closes no whole window
    assert clock.window_step_seconds(window=2, start=3) == pytest.approx([0.3])
    assert gpu_check.timed_windows(steps=7, warmup=2, window=2) == 2
    assert gpu_check.timed_windows(steps=20, warmup=4, window=4) == 4
    assert gpu_check.timed_windows(steps=4, warmup=1, window=4) == 0


def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--tiny",
                           "--precision", "fp32", "--steps", "6", "--warmup", "2", "--window", "2", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    c = r["checks"]
    assert c["passed"] is True and r["completed"] == ["prepared", *gpu_check.METHODS, "resume_and_export"]
    # one checkpoint (step 3), deleted once the resumed Trainer loaded it; steps 4-5 retrained identically
    assert c["checkpoint_steps"] == [3] and c["resumed_from_step"] == [3] and c["checkpoints_left"] == []
    assert c["resumed_steps_compared"] == [4, 5] and c["resume_loss_max_abs_diff"] < 1e-6
    # the disk plan's arithmetic against what was written (fp32 module + master + Adam + EMA: 20 B/param)
    assert abs(c["checkpoint_bytes_measured"] / c["checkpoint_bytes_planned"] - 1) < 0.05
    assert abs(c["export_bytes_measured"] / c["export_bytes_planned"] - 1) < 0.05
    assert c["sd15_disk_peak_under_20gb"] is True and r["disk_plan_sd15"]["peak_stage"] == "checkpoint"
    assert r["latent"] == [4, 16, 16] and r["text"] == [77, 32] and r["zero_stage"] == 2
    m = r["methods"]
    assert set(m) == set(gpu_check.METHODS)
    for row in m.values():  # windows of 2 steps from step 2: (2, 4] and (4, 6]
        assert row["timed_windows"] == 2 and row["timed_steps"] == 4 and row["images_per_s"] > 0
        assert row["attention"] == ["AttnProcessor2_0"] and row["mfu"] is None
    # every sample ran the y' pass, so the FLOPs are the method's: stop adds a forward, full doubles the step
    assert all(f == 0.0 for f in m["stop"]["psi_zero_frac"] + m["full"]["psi_zero_frac"])
    assert 1.25 < m["stop"]["flops_per_step"] / m["vanilla"]["flops_per_step"] < 1.45
    assert 1.9 < m["full"]["flops_per_step"] / m["vanilla"]["flops_per_step"] < 2.15
    # LoRA: the adapter alone is trained and in the optimiser (Adam: two fp32 moments per parameter)
    lora, full = m["full_lora8"], m["full"]
    assert lora["trainable_params"] < 0.3 * full["trainable_params"]
    for row in (lora, full):
        assert abs(row["optimizer_state_mib"] * 2**20 - 8 * row["trainable_params"]) < 0.05 * 8 * row["trainable_params"]
    assert r["lora_over_full_optimizer_state"] == lora["optimizer_state_mib"] / full["optimizer_state_mib"]
    assert r["stop_over_vanilla_step_time"] > 0 and r["full_over_vanilla_step_time"] > 0
    assert r["peak_tflops"] is None and r["peak_card"] is None  # no MFU without a known card
    assert (tmp_path / "work" / "resume" / "model" / "model_index.json").is_file()
