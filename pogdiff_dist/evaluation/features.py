"""Images in, features out: the pluggable image encoder and the real images to compare with.

All images in evaluation are ``uint8 [N, H, W, C]`` (what the pipeline generates), so
generated and real images go through exactly the same encoder input path.

Encoders (``EvalConfig.encoder``):

- ``"pixels"`` (default): the offline image embedder the prepare stage uses for its
  neighbour index (:class:`pogdiff_dist.models.PixelEmbedder`: mean-removed, L2-normalised
  pixels). It needs no download and works on this machine; its cosine is the similarity
  the training neighbours were built with, so gRecall's 0.7 and the k-NN agree on what
  "similar" means. It is not a perceptual space: for photographs use a vision model.
- a local directory of a transformers vision model (DINOv2 as in the paper, CLIP vision,
  ViT): ``AutoModel`` + ``AutoImageProcessor``, pooled output (DINOv2: the normalised CLS
  token), L2-normalised (:class:`pogdiff_dist.models.VisionEmbedder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pogdiff_dist.data.records import load_image
from pogdiff_dist.data.shards import Manifest


class ImageEncoder:
    """``uint8 [N, H, W, C]`` -> L2-normalised ``float32 [N, d]`` features, in batches."""

    def __init__(self, spec: str = "pixels", batch_size: int = 64):
        from pogdiff_dist.models import load_image_embedder

        if spec != "pixels" and not Path(spec).is_dir():
            raise ValueError(f"encoder must be 'pixels' or a local transformers vision model directory; "
                             f"{spec!r} is neither (no downloads: save the model with save_pretrained first)")
        self.spec = spec
        self.batch_size = batch_size
        self._embed = load_image_embedder(spec)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if len(images) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        return np.concatenate([self._embed(x[i:i + self.batch_size])
                               for i in range(0, len(x), self.batch_size)]).astype(np.float32)

    def describe(self) -> str:
        return self.spec


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float ``[N, C, H, W]`` in [-1, 1] -> ``uint8 [N, H, W, C]`` (the pipeline's rounding)."""
    x = np.clip((np.asarray(images, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1)


def resize_images(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """``uint8 [N, H, W, C]`` to ``size`` squared and ``channels`` (Lanczos), if needed."""
    images = np.asarray(images)
    if images.shape[1:] == (size, size, channels):
        return images
    out = []
    for im in images:
        pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("L" if channels == 1 else "RGB")
        arr = np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS))
        out.append(arr[..., None] if channels == 1 else arr)
    return np.stack(out) if out else np.zeros((0, size, size, channels), np.uint8)


@dataclass
class RealImages:
    """Each identity's real images, ``uint8 [n, H, W, C]`` at the generated size."""

    train: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]


def _tensor_column(table, name: str) -> np.ndarray:
    """A Ray Data tensor column read with plain pyarrow: a list column whose field
    metadata holds the per-row shape (``ray.data.arrow_tensor*``)."""
    import json

    import pyarrow as pa

    field = table.schema.field(name)
    col = table.column(name).combine_chunks()
    if isinstance(col, pa.ExtensionArray):
        shape = list(getattr(col.type, "shape", ()) or ())
        col = col.storage
    else:
        shape = json.loads((field.metadata or {}).get(b"ARROW:extension:metadata", b"[]"))
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(col), *shape) if shape else values.reshape(len(col), -1)


def training_images(prepared_dir: str | Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Every training sample as the model saw it: float ``[N, C, H, W]`` in [-1, 1] and
    identity ids ``[N]``, from the prepared ``encoded/`` table. Pixel models store the
    pixels themselves; latent models store VAE latents, decoded here with the same VAE
    (so their "real" images are VAE reconstructions, like everything the model makes)."""
    import pyarrow.parquet as pq

    encoded = Path(prepared_dir) / "encoded"
    if not encoded.is_dir():
        raise ValueError(f"{encoded} not found: the prepared dir is incomplete; re-run jobs/prepare.py")
    table = pq.read_table(str(encoded), columns=["index", "identity_id", "latent"])
    order = np.argsort(table.column("index").to_numpy())
    latents = _tensor_column(table, "latent").astype(np.float32)
    if latents.ndim == 2:
        latents = latents.reshape(len(latents), *manifest.latent_shape)
    latents = latents[order]
    ids = table.column("identity_id").to_numpy()[order]
    if manifest.vae_dir is None:
        return latents, ids
    import torch

    from pogdiff_dist.models import LatentCodec

    codec = LatentCodec(manifest.vae_dir)
    images = [codec.decode(torch.from_numpy(latents[i:i + 16])).clamp(-1, 1).numpy()
              for i in range(0, len(latents), 16)]
    return np.concatenate(images), ids


def load_real_images(prepared_dir: str | Path, manifest: Manifest, size: int, channels: int,
                     identities: list[str] | None = None) -> RealImages:
    """Training images (``encoded/``) and held-out images (``manifest.heldout``) per
    identity, at the generated images' ``size`` and ``channels``."""
    names = list(identities) if identities is not None else list(manifest.identities)
    pixels, ids = training_images(prepared_dir, manifest)
    all_train = resize_images(to_uint8(pixels), size, channels)
    empty = np.zeros((0, size, size, channels), np.uint8)
    train = {}
    for name in names:
        i = manifest.identities.index(name)
        train[name] = all_train[ids == i] if (ids == i).any() else empty
    heldout = {}
    for name in names:
        paths = [Path(h["image"]) for h in manifest.heldout if h["identity"] == name]
        heldout[name] = (to_uint8(np.stack([load_image(p, size, channels) for p in paths]))
                         if paths else empty)
    return RealImages(train, heldout)
