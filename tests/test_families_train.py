"""SDXL, SD3 and Flux-class models through the project's own training path, on tiny random
models built from configs (pogdiff_dist/families/tiny.py; nothing downloaded): shards with the
family's caption states and pooled vector -> every method for a few steps (DeepSpeed, one
process) -> checkpoint -> resume -> export as the family's pipeline -> stock diffusers loads
and samples it; the LoRA export loaded onto the base with the pipeline's ``load_lora_weights``
gives the merged export's images."""

import numpy as np
import pytest
import torch
from conftest import synthetic_cfg

FAMILIES = ("sdxl", "sd3", "flux")
METHODS = ("vanilla", "pogdiff", "cbdm", "t2h", "diffrop")
LENGTH = 12  # the T5 token limit of the tiny SD3 / Flux runs (model.max_length)


@pytest.fixture(scope="module")
def family_data(tmp_path_factory):
    """family -> (tiny pretrained dir, prepared dir): 16 synthetic samples of the family's latent
    layout (4 x 8 x 8 or 16 x 8 x 8), captions encoded by the family's own encoders."""
    from pogdiff_dist.data.synthetic import build_synthetic_prepared
    from pogdiff_dist.families.spec import get_family
    from pogdiff_dist.families.tiny import build_tiny

    out = {}
    for name in FAMILIES:
        root = tmp_path_factory.mktemp(name)
        tiny = build_tiny(name, root / "model")
        channels = get_family(name).latent_channels
        build_synthetic_prepared(root / "prepared", [6, 6, 2, 2], (channels, 8, 8), tiny, tiny, max_length=LENGTH,
                                 k_max=4, samples_per_shard=8, vae_dir=tiny / "vae")
        out[name] = (tiny, root / "prepared")
    return out


def _cfg(tiny, **overrides):
    return synthetic_cfg(**{"model.pretrained": str(tiny), "model.max_length": LENGTH, "optim.lr": 1e-3,
                            "optim.warmup_steps": 1, "train.checkpoint_every": 1000, "loss.den_temperature": 1.0,
                            "loss.use_psi_den": False, **overrides})


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_trains_every_family(family_data, tmp_path, family, method):
    from pogdiff_dist.train.engine import init_single_process
    from pogdiff_dist.train.local import LocalCheckpoints, read_local
    from pogdiff_dist.train.trainer import Trainer

    tiny, prepared = family_data[family]
    init_single_process("cpu")
    tr = Trainer(_cfg(tiny, **{"loss.method": method, "optim.max_steps": 2, "train.log_every": 2}), prepared, "cpu",
                 0, 1, report=LocalCheckpoints(tmp_path), run_dir=None)
    assert tr.stepper.family.name == family and tr.stepper.flow == (family != "sdxl")
    tr.fit(read_local(), final_checkpoint=False)
    last = tr.state.last
    assert tr.state.step == 2 and np.isfinite(last["loss"]) and last["loss_denoise"] > 0
    if method in ("pogdiff", "cbdm", "diffrop"):
        assert last["loss_pog"] != 0, last  # the method's own term acted


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_run_resumes_exports_the_family_pipeline_and_its_adapter(family_data, tmp_path, family):
    from diffusers import DiffusionPipeline

    from pogdiff_dist.families.pipeline import FamilyPipeline
    from pogdiff_dist.families.spec import get_family
    from pogdiff_dist.pipeline import load_pipeline
    from pogdiff_dist.train.local import train_local

    tiny, prepared = family_data[family]
    cfg = _cfg(tiny, **{"model.lora_rank": 4, "optim.lr": 5e-2, "train.checkpoint_every": 2, "train.log_every": 1,
                        "train.sample_steps": 2})
    train_local(cfg.with_overrides({"optim.max_steps": 2}), prepared, tmp_path / "run")
    resumed, _ = train_local(cfg.with_overrides({"optim.max_steps": 3}), prepared, tmp_path / "run", resume=True)
    assert resumed.state.step == 3

    model_dir = tmp_path / "run" / "model"
    merged = DiffusionPipeline.from_pretrained(str(model_dir))
    assert type(merged).__name__ == get_family(family).pipeline_class  # the stock pipeline loads the export
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0

    def sample(pipe):
        return pipe(["An image of Person A."], num_inference_steps=2, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0))

    merged_images = sample(load_pipeline(model_dir))
    assert merged_images.shape == (1, 16, 16, 3) and merged_images.std() > 0
    base = DiffusionPipeline.from_pretrained(str(tiny))
    base.load_lora_weights(str(tmp_path / "run" / "lora"))  # the adapter onto the base, as any user would
    on_base = sample(FamilyPipeline(base, get_family(family), 16))
    assert np.abs(on_base.astype(int) - merged_images.astype(int)).max() <= 2  # uint8 rounding of the same image
    # and the adapter changed the model: the merged denoiser's weights are not the base's
    denoiser = get_family(family).denoiser
    trained = dict(getattr(merged, denoiser).named_parameters())
    untouched = dict(getattr(DiffusionPipeline.from_pretrained(str(tiny)), denoiser).named_parameters())
    assert max((trained[k] - untouched[k]).abs().max().item() for k in untouched) > 1e-4


def test_a_setting_that_does_not_apply_to_the_family_is_named(family_data):
    from pogdiff_dist.train.engine import init_single_process
    from pogdiff_dist.train.local import LocalCheckpoints
    from pogdiff_dist.train.trainer import Trainer

    init_single_process("cpu")
    tiny, prepared = family_data["sd3"]
    with pytest.raises(ValueError, match=r"loss.snr_gamma does not apply to a flow-matching model \(sd3\)"):
        Trainer(_cfg(tiny, **{"loss.snr_gamma": 5.0}), prepared, "cpu", 0, 1, report=LocalCheckpoints("/tmp/x"))
    tiny, prepared = family_data["sdxl"]
    with pytest.raises(ValueError, match=r"loss.timestep_sampling does not apply to a DDPM model \(sdxl\)"):
        Trainer(_cfg(tiny, **{"loss.timestep_sampling": "uniform"}), prepared, "cpu", 0, 1,
                report=LocalCheckpoints("/tmp/x"))


@pytest.mark.integration
def test_flux_prepares_on_ray_trains_on_two_workers_exports_and_evaluates(ray_local, tmp_path):
    """The whole job for a Flux-class directory: Ray Data encodes Digits-IT2I S with the family's
    CLIP + T5 and its VAE (shift factor), two DeepSpeed workers train PoGDiff on the packed
    latents, rank 0 exports a FluxPipeline, and the evaluation generates from it and scores."""
    from conftest import REPO
    from diffusers import DiffusionPipeline

    from pogdiff_dist.config import load_config
    from pogdiff_dist.data.shards import Manifest
    from pogdiff_dist.evaluation.evaluate import resolve_source, run_evaluate
    from pogdiff_dist.families.tiny import build_tiny
    from pogdiff_dist.train.driver import run_train

    tiny = build_tiny("flux", tmp_path / "flux")
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "model.pretrained": str(tiny), "model.max_length": LENGTH, "data.channels": 3, "optim.max_steps": 2,
        "train.name": "flux", "train.validate_every": 0, "train.sample_steps": 2,
        "prepare.out_dir": str(tmp_path / "prepared"), "train.storage_path": str(tmp_path / "runs"),
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "eval.num_images": 2, "eval.steps": 2})
    out = run_train(cfg)
    m = Manifest.load(cfg.prepare.out_dir)
    assert (m.family, m.latent_shape, m.pooled_dim) == ("flux", [16, 8, 8], 16)
    assert m.text_shape == [LENGTH, 48]  # T5's states at model.max_length tokens
    assert out.metrics["final_step"] == 2 and np.isfinite(out.metrics["final_loss"])
    assert type(DiffusionPipeline.from_pretrained(str(out.model_dir))).__name__ == "FluxPipeline"
    ev = run_evaluate(resolve_source(str(out.model_dir), None, out.run_id, out.tracking_uri, None),
                      tmp_path / "eval", cfg.eval, ray_cfg=cfg.ray)
    assert 0 <= ev.results["summary"]["accuracy_all"] <= 1


def test_bf16_validation_grids_sample_the_live_denoiser_with_the_fp32_encoders(family_data, tmp_path):
    """SD3 in bf16 (ZeRO-2): the validation grid runs the stock pipeline around the live bf16
    transformer and the trainer's fp32 encoders (under autocast) and logs an image per grid."""
    from pogdiff_dist.train.engine import init_single_process
    from pogdiff_dist.train.local import LocalCheckpoints, read_local
    from pogdiff_dist.train.trainer import Trainer

    class Images:
        def __init__(self):
            self.images = []

        def log(self, step, metrics):
            pass

        def log_image(self, step, key, image):
            self.images.append((step, key, image.size))

    tiny, prepared = family_data["sd3"]
    init_single_process("cpu")
    tracker = Images()
    tr = Trainer(_cfg(tiny, **{"train.precision": "bf16", "optim.max_steps": 3, "train.validate_every": 1,
                               "train.validate_images": 2, "train.validate_steps": 2}), prepared, "cpu", 0, 1,
                 report=LocalCheckpoints(tmp_path), tracker=tracker, run_dir=None)
    assert next(tr.engine.module.parameters()).dtype == torch.bfloat16
    assert next(iter(tr.text.models.values())).dtype == torch.float32
    tr.fit(read_local(), final_checkpoint=False)
    assert [(s, k) for s, k, _ in tracker.images] == [(1, "val/samples"), (2, "val/samples")]
