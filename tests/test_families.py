"""The model-family interface without models: detection from model_index.json, component
lists, Flux's latent packing and position ids against FluxPipeline's own, VAE scaling / shift
round trips, SDXL's time ids, the denoiser's timestep input, and Conditioning's row algebra."""

import json

import pytest
import torch
from diffusers import FluxPipeline

from pogdiff_dist.families import (
    FAMILIES,
    Conditioning,
    check_components,
    detect_family,
    get_family,
    model_timestep,
    sdxl_time_ids,
)
from pogdiff_dist.families.denoiser import model_config
from pogdiff_dist.families.latents import (
    from_latents,
    latent_image_ids,
    pack_latents,
    text_ids,
    to_latents,
    unpack_latents,
    vae_factors,
    vae_scale_factor,
)


def _index(tmp_path, class_name):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
    return tmp_path


@pytest.mark.parametrize("class_name,family", [("StableDiffusionPipeline", "sd"), ("StableDiffusionXLPipeline", "sdxl"),
                                               ("StableDiffusion3Pipeline", "sd3"), ("FluxPipeline", "flux")])
def test_detect_family_from_model_index(tmp_path, class_name, family):
    found = detect_family(_index(tmp_path, class_name))
    assert found is FAMILIES[family] and found.pipeline_class == class_name


def test_unknown_pipeline_class_names_class_and_file(tmp_path):
    _index(tmp_path, "KandinskyPipeline")
    with pytest.raises(ValueError, match=r"model_index\.json: _class_name 'KandinskyPipeline' is not a supported") as e:
        detect_family(tmp_path)
    assert str(tmp_path / "model_index.json") in str(e.value)
    with pytest.raises(ValueError, match="no model_index.json"):
        detect_family(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown model family 'sd4'"):
        get_family("sd4")


def test_components_per_family_and_missing_ones_named(tmp_path):
    assert FAMILIES["sd"].components == ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    assert FAMILIES["sdxl"].components == ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                           "scheduler")
    assert FAMILIES["sd3"].components == ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                          "tokenizer_2", "text_encoder_3", "tokenizer_3", "scheduler")
    assert FAMILIES["flux"].components == ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                           "tokenizer_2", "scheduler")
    for c in FAMILIES["flux"].components:
        if c != "text_encoder_2":
            (tmp_path / c).mkdir()
    with pytest.raises(ValueError, match=r"missing component folder\(s\) \['text_encoder_2'\] of a FluxPipeline"):
        check_components(FAMILIES["flux"], tmp_path)
    (tmp_path / "text_encoder_2").mkdir()
    assert check_components(FAMILIES["flux"], tmp_path) == tmp_path


def test_token_limits_and_override():
    assert [e.max_length for e in FAMILIES["sd3"].encoders] == [77, 77, 256]
    assert [e.max_length for e in FAMILIES["flux"].encoders] == [77, 512]
    schnell = FAMILIES["flux"].with_max_length("text_encoder_2", 256)
    assert [e.max_length for e in schnell.encoders] == [77, 256] and FAMILIES["flux"].encoders[1].max_length == 512
    with pytest.raises(ValueError, match="no encoder 'text_encoder_3'"):
        FAMILIES["flux"].with_max_length("text_encoder_3", 10)


def test_objectives_and_timestep_input():
    assert {n: f.objective for n, f in FAMILIES.items()} == {"sd": "ddpm", "sdxl": "ddpm", "sd3": "flow", "flux": "flow"}
    t = torch.tensor([0, 999])
    assert torch.equal(model_timestep(FAMILIES["sdxl"], t), t)
    s = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(model_timestep(FAMILIES["sd3"], s), s * 1000)  # SD3's transformer takes 1000 s
    torch.testing.assert_close(model_timestep(FAMILIES["flux"], s), s)  # Flux's multiplies by 1000 itself


def test_model_config_looks_through_a_wrapper():
    from types import SimpleNamespace

    model = SimpleNamespace(config={"guidance_embeds": True})
    engine = SimpleNamespace(config={"train_batch_size": 8}, module=model)  # DeepSpeed's: a config of its own
    assert model_config(model) == {"guidance_embeds": True}
    assert model_config(engine) == {"guidance_embeds": True}


# ----------------------------------------------------------------------------- latents


@pytest.mark.parametrize("h,w", [(8, 8), (4, 12), (16, 6)])
def test_flux_packing_matches_the_pipeline_and_round_trips(h, w):
    x = torch.randn(3, 16, h, w, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert packed.shape == (3, (h // 2) * (w // 2), 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 16, h, w))
    assert torch.equal(unpack_latents(packed, h, w), x)
    vsf = 8  # the pipeline's unpack takes pixel sizes
    assert torch.equal(FluxPipeline._unpack_latents(packed, h * vsf, w * vsf, vsf), x)
    ids = latent_image_ids(h, w)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(3, h // 2, w // 2, "cpu", torch.float32))
    # token k of the packing is the 2 x 2 patch at (row, col) = ids[k, 1:]
    k = len(ids) - 1
    r, c = int(ids[k, 1]), int(ids[k, 2])
    torch.testing.assert_close(packed[:, k].view(3, 16, 2, 2), x[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2])
    assert torch.equal(text_ids(5), torch.zeros(5, 3))


def test_packing_needs_even_sizes():
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(torch.zeros(1, 16, 7, 8))
    with pytest.raises(ValueError, match="do not fit"):
        unpack_latents(torch.zeros(1, 16, 64), 8, 10)


@pytest.mark.parametrize("scale,shift", [(0.18215, None), (1.5305, 0.0609), (0.3611, 0.1159)])
def test_vae_scaling_and_shift_round_trip(scale, shift):
    cfg = {"scaling_factor": scale, "shift_factor": shift, "block_out_channels": [128, 256, 512, 512]}
    sc, sh = vae_factors(cfg)
    assert (sc, sh) == (scale, shift or 0.0) and vae_scale_factor(cfg) == 8
    z = torch.randn(2, 16, 4, 4)
    lat = to_latents(z, sc, sh)
    torch.testing.assert_close(lat, (z - (shift or 0.0)) * scale)  # the training scripts' encode
    torch.testing.assert_close(from_latents(lat, sc, sh), z)  # the pipelines' decode: lat / scale + shift


def test_sdxl_time_ids():
    ids = sdxl_time_ids(3, (1024, 768), (16, 32), (512, 512))
    assert ids.shape == (3, 6) and ids[0].tolist() == [1024, 768, 16, 32, 512, 512]
    assert sdxl_time_ids(1, (64, 48))[0].tolist() == [64, 48, 0, 0, 64, 48]  # uncropped, not resized


# ----------------------------------------------------------------------------- conditioning


def test_conditioning_rows_concatenate_and_zero():
    a = Conditioning(torch.randn(3, 5, 4), torch.randn(3, 2))
    b = Conditioning(torch.randn(2, 5, 4), torch.randn(2, 2))
    both = a.cat(b[torch.tensor([1, 0])])
    assert len(both) == 5 and torch.equal(both.hidden[3], b.hidden[1]) and torch.equal(both.pooled[4], b.pooled[0])
    assert torch.equal(both[1:2].hidden, a.hidden[1:2])
    z = a.zeros_like()
    assert not z.hidden.any() and not z.pooled.any()
    assert a.to(dtype=torch.bfloat16).pooled.dtype == torch.bfloat16
    assert Conditioning(torch.zeros(1, 2, 3)).cat(Conditioning(torch.ones(1, 2, 3))).pooled is None
    with pytest.raises(ValueError, match="with and without pooled"):
        a.cat(Conditioning(torch.zeros(1, 5, 4)))
