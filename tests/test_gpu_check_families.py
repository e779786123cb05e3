"""scripts/gpu_check.sh --family sdxl|sd3|flux: the real-size layouts' configs (checked against
the published parameter counts, on the meta device), the LoRA size the disk plan uses (against
peft), the full-size disk plans on the GPU machine's 64 GB, and the check end to end on CPU with
each family's tiny pipeline (--device cpu --tiny)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import family_layouts  # benchmarks/ is not a package: on the path above
import gpu_check

FAMILIES = ("sdxl", "sd3", "flux")
GPU_MACHINE_DISK = 64e9


@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_denoisers_have_the_published_parameter_counts(family):
    counts = family_layouts.layout_param_counts(family, tiny=False)
    denoiser = counts["unet"] if family == "sdxl" else counts["transformer"]
    assert denoiser == family_layouts.DENOISER_PARAMS[family]
    # the VAE of each model's vae/config.json (SD3 and Flux: 16 latent channels, no quant convs)
    assert counts["vae"] == (83_653_863 if family == "sdxl" else 83_819_683)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_parameter_count_is_what_peft_trains(family):
    from peft import LoraConfig

    from pogdiff_dist.families.spec import get_family
    from pogdiff_dist.families.tiny import BUILDERS

    spec = get_family(family)
    net = getattr(BUILDERS[family](), spec.denoiser)
    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(spec.lora_targets)))
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trained == family_layouts.lora_params(family, tiny=True, rank=4) > 0


def test_full_size_disk_plans_on_the_gpu_machine():
    """bf16 layouts, one checkpoint (ZeRO-2 bf16 + EMA) and an fp32 export: SDXL and SD3 full
    fine-tuning fit 64 GB; Flux with a rank-16 LoRA times its methods, but its fp32 export
    (about 49 GB) next to the layout does not fit, so the check says it did not run that stage."""
    plans = {}
    for family in FAMILIES:
        counts = family_layouts.layout_param_counts(family, tiny=False)
        rank = gpu_check.FAMILY_LORA[family]
        plans[family] = gpu_check.disk_plan(
            counts, "bf16", ema=True, samples=sum(gpu_check.COUNTS), latent=family_layouts.LATENT[family],
            text=(589, 4096), trainable=family_layouts.lora_params(family, False, rank) if rank else None,
            layout_bytes_per_param=2)
    assert plans["sdxl"]["peak_bytes"] < GPU_MACHINE_DISK and plans["sd3"]["peak_bytes"] < GPU_MACHINE_DISK
    flux = plans["flux"]
    assert flux["stages"]["timed_runs"] < GPU_MACHINE_DISK < flux["peak_bytes"] and flux["peak_stage"] == "export"
    # the LoRA run's checkpoint: the bf16 module, and masters + moments + EMA of the adapter only
    assert flux["checkpoint_bytes"] == 2 * family_layouts.DENOISER_PARAMS["flux"] + \
        16 * family_layouts.lora_params("flux", False, 16)


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_family_gpu_check_runs_on_cpu(tmp_path, family):
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--family", family, "--device", "cpu",
                           "--tiny", "--precision", "fp32", "--steps", "4", "--warmup", "2", "--window", "2",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    c, m = r["checks"], r["methods"]
    lora = gpu_check.FAMILY_LORA[family]
    assert r["family"] == family and r["lora_rank"] == lora and c["passed"] is True
    assert r["completed"] == ["prepared", *m, "resume_and_export"]
    assert set(m) == ({"vanilla", "stop", "full"} if lora else set(gpu_check.METHODS))
    from pogdiff_dist.families.spec import get_family

    assert c["export_loads_with_diffusers"] == get_family(family).pipeline_class
    assert c["checkpoint_steps"] == [3] and c["resumed_from_step"] == [3] and c["resume_loss_max_abs_diff"] < 1e-6
    assert r["latent"] == list(family_layouts.TINY_LATENT[family]) and c["sample_shape"][1] == 2 * r["latent"][1]
    denoiser_params = c["export_unet_params"]
    if lora:  # every method trains the adapter alone
        assert {row["trainable_params"] for row in m.values()} == {family_layouts.lora_params(family, True, lora)}
    else:
        assert m["full"]["trainable_params"] == denoiser_params
        assert m["full_lora8"]["trainable_params"] == family_layouts.lora_params(family, True, 8)
    for row in m.values():
        assert row["timed_windows"] == 1 and row["images_per_s"] > 0 and row["mfu"] is None
    # the y' pass costs FLOPs: stop adds a no-grad forward (and y' encoding), full a second graph
    flops = {k: row["flops_per_step"] for k, row in m.items()}
    assert flops["vanilla"] < flops["stop"] < flops["full"]
    assert torch.isfinite(torch.tensor(m["full"]["loss"])).all()
