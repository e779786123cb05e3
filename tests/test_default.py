"""The embedded default (configs/default.yaml, scripts/run_default.sh): the checked-in base model
is what the config expects, small enough to ship, and the recipe is the README's."""

import json

import torch
from conftest import REPO


def test_default_config_fine_tunes_the_checked_in_base():
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from pogdiff_dist.config import load_config
    from pogdiff_dist.models import UNET_PRESETS
    from pogdiff_dist.runtime import absolute_paths

    cfg = absolute_paths(load_config(REPO / "configs" / "default.yaml"), cwd=REPO)
    base = REPO / "assets" / "digits-base"
    assert cfg.model.init_unet == str(base / "unet") and cfg.data.dataset == "digits-it2i:M"
    # the README's recipe: the swept PoGDiff settings with balanced sampling
    import yaml

    swept = yaml.safe_load((REPO / "benchmarks" / "results" / "sweep-pogdiff-faces" / "best_config.yaml").read_text())
    assert cfg.loss.method == "pogdiff" and cfg.data.sampling == swept["data"]["sampling"] == "balanced"
    for key in ("a1", "a2", "a3", "den_temperature"):
        assert abs(getattr(cfg.loss, key) - swept["loss"][key]) <= 0.01 * swept["loss"][key], key
    for key in ("k", "neighbor_grad", "psi_den_source", "psi_cap"):
        assert getattr(cfg.loss, key) == swept["loss"][key], key
    assert sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) <= 10 * 2**20

    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        names = f.keys()  # a safetensors handle is not iterable
        assert {f.get_slice(k).get_dtype() for k in names} == {"F16"}
    unet = UNet2DConditionModel.from_pretrained(str(base / "unet"))
    preset = UNET_PRESETS[cfg.model.unet]
    assert tuple(unet.config.block_out_channels) == preset["block_out_channels"]
    assert unet.config.sample_size == cfg.data.resolution and unet.config.in_channels == cfg.data.channels
    assert sum(p.numel() for p in unet.parameters()) == 1_972_641

    made = json.loads((base / "made_by.json").read_text())
    assert made["script"] == "benchmarks/make_default_base.py" and made["settings"]["model.unet"] == cfg.model.unet
    assert made["settings"]["data.resolution"] == cfg.data.resolution and made["settings"]["optim.max_steps"] > 0
    assert torch.isfinite(next(unet.parameters())).all()
