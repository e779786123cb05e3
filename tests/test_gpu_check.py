"""scripts/gpu_check.sh end to end on CPU (--device cpu --tiny): the GPU acceptance script's
code paths (SD-layout dir from configs, shards written on the spot, the Trainer without Ray
for three methods, FLOP counting, checkpoint + resume, diffusers export, DDIM sample)."""

import json
import subprocess

from conftest import REPO


def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--tiny",
                           "--precision", "fp32", "--steps", "4", "--warmup", "1", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["checks"]["passed"] is True and r["checks"]["resumed_from_step"] == [3]
    assert r["checks"]["checkpoints"] == ["checkpoint_000003", "checkpoint_000005"]
    assert r["latent"] == [4, 16, 16] and r["text"] == [77, 32] and r["zero_stage"] == 2
    m = r["methods"]
    assert set(m) == {"vanilla", "stop", "full", "full_lora8"}
    for row in m.values():
        assert row["timed_steps"] == 2 and row["images_per_s"] > 0 and row["attention"] == ["AttnProcessor2_0"]
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
    assert r["peak_tflops"] is None and m["vanilla"]["mfu"] is None  # no MFU without a known card
    assert (tmp_path / "work" / "resume" / "model" / "model_index.json").is_file()
