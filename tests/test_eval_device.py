"""Where evaluation computes, checked on the CPU with the inputs a GPU run gives it: generation
in the run's compute dtype and TF32 setting, scoring on the actor's device, references streamed
(never all decoded at once, never handed back to the driver)."""

import json
import weakref

import numpy as np
import pytest
import torch

from pogdiff_dist.evaluation import generate as G

NAMES = ["Ione Vasquez", "Pavel Marsh", "Ruth Okafor"]  # no bundled dataset's names: the nearest centroid judges
COUNTS = [20, 14, 2]
LATENT = [4, 8, 8]  # the tiny VAE below decodes it to 3 x 16 x 16


# ---- generation: device, dtype, TF32 -----------------------------------------------------------

def test_generation_decisions_for_a_gpu_run(tmp_path):
    assert G.task_device(1.0) == "cuda" and G.task_device(0) == "cpu"
    assert G.generation_dtype("cuda", "bf16") is torch.bfloat16
    assert G.generation_dtype(torch.device("cuda", 0), "fp32") is torch.float32
    assert G.generation_dtype("cpu", "bf16") is torch.float32  # fp32 on the CPU whatever the precision
    assert G.generation_tf32("cuda", True) is True and G.generation_tf32("cuda:0", False) is False
    assert G.generation_tf32("cpu", True) is False
    # the run folder's config.yaml says how it trained; an unknown run gets the training defaults
    (tmp_path / "config.yaml").write_text("train:\n  precision: bf16\n  allow_tf32: false\n  use_gpu: true\n")
    assert G.run_precision(tmp_path) == G.RunPrecision("bf16", False)
    assert G.run_precision(tmp_path / "nothing") == G.run_precision(None) == G.RunPrecision("fp32", True)


class _FakePipe:
    """Records the TF32 flags in force while it samples."""

    def __init__(self):
        self.flags = []

    def __call__(self, prompts, num_inference_steps, guidance_scale, num_images_per_prompt, generator):
        self.flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return np.zeros((num_images_per_prompt, 8, 8, 3), np.uint8)


@pytest.mark.parametrize(("gpus", "run", "device", "dtype", "tf32"), [
    (1.0, G.RunPrecision("bf16", True), "cuda", torch.bfloat16, True),
    (1.0, G.RunPrecision("fp32", False), "cuda", torch.float32, False),
    (1.0, G.RunPrecision("fp32", True), "cuda", torch.float32, True),
    (0.0, G.RunPrecision("bf16", True), "cpu", torch.float32, False),
])
def test_generation_actor_loads_the_pipeline_as_the_run_computed(monkeypatch, gpus, run, device, dtype, tf32):
    """The actor, built as Ray builds it, asks for its pipeline on the device of its GPU count in
    the run's dtype, and samples with the run's TF32 (restored afterwards)."""
    from pogdiff_dist.config import EvalConfig

    loads, pipe = [], _FakePipe()
    monkeypatch.setattr(G, "load_pipeline", lambda model_dir, dev, lora_dir, dtype: loads.append((dev, dtype)) or pipe)
    threads, before = torch.get_num_threads(), (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        actor = G.IdentityGenerator("model", EvalConfig(num_images=2, steps=1).to_dict(), 1, gpus, None, run)
        name, images, _ = actor.generate("Ione Vasquez")
    finally:
        torch.set_num_threads(threads)
    assert loads == [(device, dtype)] and name == "Ione Vasquez" and images.shape == (2, 8, 8, 3)
    assert pipe.flags == [(tf32, tf32)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_bf16_pipeline_keeps_the_sampler_in_fp32(tmp_path):
    """A Stable Diffusion layout loaded in bf16 (what a bf16 run's GPU actor loads) samples: the
    UNet and VAE weights are bf16, the DDIM state and the guided noise prediction fp32, and the
    images stay close to the fp32 pipeline's from the same seed (same initial noise)."""
    from conftest import make_tiny_sd

    from pogdiff_dist.config import EvalConfig

    model = make_tiny_sd(tmp_path / "sd")
    cfg = EvalConfig(num_images=2, steps=3)
    pipe32 = G.load_pipeline(model, "cpu")
    pipe16 = G.load_pipeline(model, "cpu", dtype=G.generation_dtype("cuda", "bf16"))
    assert pipe16.unet.dtype == pipe16.vae.dtype == pipe16.text_encoder.dtype == torch.bfloat16
    assert pipe32.unet.dtype == torch.float32
    seen = []
    step = pipe16.scheduler.step
    pipe16.scheduler.step = lambda eps, t, x, **kw: seen.append((eps.dtype, x.dtype)) or step(eps, t, x, **kw)
    a, b = G.generate_identity(pipe32, "Ione Vasquez", cfg), G.generate_identity(pipe16, "Ione Vasquez", cfg)
    assert seen == [(torch.float32, torch.float32)] * 3
    assert a.shape == b.shape == (2, 16, 16, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 4  # bf16 rounding, not other noise


# ---- scoring: streamed references on the actor's device ----------------------------------------

@pytest.fixture(scope="module")
def latent_prepared(tmp_path_factory):
    """A prepared dir of a latent (Stable Diffusion) model, as prepare writes it: ``encoded/``
    in two parquet files with the sample indices shuffled across them, a tiny VAE, held-out PNGs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from diffusers import AutoencoderKL
    from PIL import Image

    from pogdiff_dist.data.shards import Manifest

    root = tmp_path_factory.mktemp("latent_prepared")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=16).save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(len(NAMES)), COUNTS)
    latents = rng.normal(size=(len(ids), *LATENT)).astype(np.float32) * 2
    perm = rng.permutation(len(ids))
    (root / "encoded").mkdir()
    for part, rows in enumerate(np.array_split(perm, 2)):
        pq.write_table(pa.table({"index": rows.astype(np.int64), "identity_id": ids[rows].astype(np.int64),
                                 "latent": pa.array(list(latents[rows].reshape(len(rows), -1)))}),
                       root / "encoded" / f"part-{part}.parquet")
    heldout = []
    for name in NAMES[:2]:
        for j in range(3):
            path = root / "heldout" / f"{name}-{j}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
            heldout.append({"image": str(path), "identity": name})
    manifest = Manifest(fingerprint="", num_samples=len(ids), k_max=1, latent_shape=LATENT, text_shape=[8, 32],
                        identities=NAMES, train_counts=COUNTS, shards=[], text_encoder_dir="", tokenizer_dir="",
                        vae_dir=str(root / "vae"), heldout=heldout)
    return root, manifest, latents, ids


def _generated(seed=1):
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8) for n in NAMES}


def test_references_decode_in_order_as_one_pass_would(latent_prepared):
    """Streamed in batches from shuffled files, each training image lands at its identity and
    sample index, decoded as one pass over the latents in index order decodes it."""
    from pogdiff_dist.evaluation.features import TrainingImages, load_real_images, to_uint8
    from pogdiff_dist.models import LatentCodec

    root, manifest, latents, ids = latent_prepared
    expected = to_uint8(LatentCodec(manifest.vae_dir).decode(torch.from_numpy(latents)).clamp(-1, 1).numpy())
    real = load_real_images(root, manifest, 16, 3)
    for i, name in enumerate(NAMES):
        assert real.train[name].shape == (COUNTS[i], 16, 16, 3)
        assert np.abs(real.train[name].astype(int) - expected[ids == i]).max() <= 1
    assert len(real.heldout[NAMES[0]]) == 3 and len(real.heldout[NAMES[2]]) == 0
    assert sum(len(r) for r, _ in TrainingImages(root, manifest).batches(16, 3, batch_size=4)) == len(ids)


def _arrays(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _arrays(v)


def test_scorer_streams_references_and_hands_back_numbers(latent_prepared, monkeypatch, tmp_path):
    """At most one batch of decoded training images is alive at a time; what goes back to the
    driver is the metrics plus ``keep`` training images per identity; the numbers are those of
    the in-memory path (compute_metrics on every image at once)."""
    from pogdiff_dist.config import EvalConfig
    from pogdiff_dist.evaluation import features
    from pogdiff_dist.evaluation.scoring import Scorer, compute_metrics

    root, manifest, _, ids = latent_prepared
    batch, keep = 4, 2
    alive, peak, decoded = [], [0], [0]
    pixels = features.TrainingImages._pixels

    def tracked(self, *args):  # reference counting frees an array as soon as nothing holds it
        before = sum(len(r()) for r in alive if r() is not None)
        out = pixels(self, *args)
        alive.append(weakref.ref(out))
        decoded[0] += len(out)
        peak[0] = max(peak[0], before + len(out))
        return out

    monkeypatch.setattr(features.TrainingImages, "_pixels", tracked)
    cfg = EvalConfig(num_images=keep)
    generated = _generated()
    out = Scorer(manifest, cfg, 16, 3, batch_size=batch, cache_dir=tmp_path).score(root, generated)
    assert decoded[0] == len(ids) and 0 < peak[0] <= batch
    assert not [r for r in alive if r() is not None]  # the previews are copies, not views of a batch

    results, previews = out
    image_bytes = 16 * 16 * 3
    assert sum(a.nbytes for a in _arrays(out)) <= keep * len(NAMES) * image_bytes
    assert len(json.dumps(results, default=float)) < 20_000  # numbers, whatever the number of references
    real = features.load_real_images(root, manifest, 16, 3)
    for name in NAMES:
        # the same images, decoded in batches of 4 against all at once: a batch-size-dependent
        # convolution kernel may round one pixel to the other side of a uint8 step
        np.testing.assert_allclose(previews[name].astype(int), real.train[name][:keep].astype(int), rtol=0, atol=1)

    monkeypatch.setattr(features.TrainingImages, "_pixels", pixels)
    again = compute_metrics(generated, real, manifest, cfg, cache_dir=tmp_path)
    assert results["classifier"]["classifier"] == "nearest-centroid"
    assert results["classifier"]["accuracy_on_real_heldout"] == again["classifier"]["accuracy_on_real_heldout"]
    for name in NAMES:
        row, ref = results["per_identity"][name], again["per_identity"][name]
        assert (row["reference"], row["num_reference"]) == (ref["reference"], ref["num_reference"])
        for m in ("fid", "dino", "grecall", "accuracy"):
            # (within the one-pixel decode rounding above: the thread count picks the kernel)
            assert row[m] == pytest.approx(ref[m], rel=1e-3, abs=1e-6), (name, m)
    assert results["summary"] == pytest.approx(again["summary"], rel=1e-3, abs=1e-6)


def test_scoring_actor_decodes_and_encodes_on_its_gpu(latent_prepared, monkeypatch, tmp_path):
    """The scoring actor Ray gives a GPU builds the VAE and the image encoder on ``cuda`` (here
    the recorded request, run on the CPU); one without a GPU on the CPU."""
    from pogdiff_dist import models
    from pogdiff_dist.config import EvalConfig
    from pogdiff_dist.evaluation import scoring

    root, manifest, _, _ = latent_prepared
    asked = []

    class Codec(models.LatentCodec):
        def __init__(self, vae_dir, device="cpu"):
            asked.append(("vae", str(device)))
            super().__init__(vae_dir, "cpu")

    class Encoder(scoring.ImageEncoder):
        def __init__(self, spec, batch_size=64, device="cpu"):
            asked.append(("encoder", str(device)))
            super().__init__(spec, batch_size, "cpu")

    monkeypatch.setattr(models, "LatentCodec", Codec)
    monkeypatch.setattr(scoring, "ImageEncoder", Encoder)
    threads = torch.get_num_threads()
    try:
        for gpus, device in ((1.0, "cuda"), (0.0, "cpu")):
            asked.clear()
            actor = G.ScoringActor(manifest, EvalConfig(num_images=2).to_dict(), 16, 3, 1, gpus, str(tmp_path))
            results, _ = actor.score(root, _generated())
            assert asked == [("encoder", device), ("vae", device)] and actor.device == device
            assert results["identities"] == NAMES
    finally:
        torch.set_num_threads(threads)
