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

    def __init__(self, spec: str = "pixels", batch_size: int = 64, device: str = "cpu"):
        from pogdiff_dist.models import load_image_embedder

        if spec != "pixels" and not Path(spec).is_dir():
            raise ValueError(f"encoder must be 'pixels' or a local transformers vision model directory; "
                             f"{spec!r} is neither (no downloads: save the model with save_pretrained first)")
        self.spec = spec
        self.batch_size = batch_size
        self.device = device
        self._embed = load_image_embedder(spec, device)  # a vision model runs on device, pixels on the CPU

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if len(images) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate([self._embed(_signed(images[i:i + self.batch_size]))
                               for i in range(0, len(images), self.batch_size)]).astype(np.float32)

    def describe(self) -> str:
        return self.spec


def _signed(images: np.ndarray) -> np.ndarray:
    """``uint8 [b, H, W, C]`` -> ``float32 [b, C, H, W]`` in [-1, 1], what the embedders take."""
    return images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


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


class TrainingImages:
    """The training samples of a prepared ``encoded/`` table as the model saw them, streamed.

    The identity of every sample (``ids``: ``int [N]``, in sample-index order) is read up front;
    :meth:`batches` then reads the ``latent`` column ``batch_size`` rows at a time and decodes
    each batch with the dataset's VAE on ``device`` (a pixel model's rows are the pixels
    themselves), so one batch of decoded images is alive at a time, never the dataset. A latent
    model's "real" images are VAE reconstructions, like everything the model makes.
    """

    def __init__(self, prepared_dir: str | Path, manifest: Manifest):
        import pyarrow.parquet as pq

        self.path = Path(prepared_dir) / "encoded"
        if not self.path.is_dir():
            raise ValueError(f"{self.path} not found: the prepared dir is incomplete; re-run jobs/prepare.py")
        self.manifest = manifest
        table = pq.read_table(str(self.path), columns=["index", "identity_id"])
        index = table.column("index").to_numpy()
        order = np.argsort(index)
        self.ids = table.column("identity_id").to_numpy()[order]
        self._sorted_index = index[order]
        assert len(np.unique(index)) == len(index), "encoded/ holds a sample index twice"

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, size: int, channels: int, batch_size: int = 16, device: str = "cpu"):
        """Yield ``(rows, images)``: ``rows`` ``int64 [b]`` (positions in sample-index order, as
        ``ids``), ``images`` ``uint8 [b, size, size, channels]`` (``b <= batch_size``), batches in
        file order."""
        import pyarrow as pa
        import pyarrow.dataset as pads

        from pogdiff_dist.models import LatentCodec

        codec = LatentCodec(self.manifest.vae_dir, device) if self.manifest.vae_dir else None
        scan = pads.dataset(str(self.path), format="parquet").to_batches(columns=["index", "latent"],
                                                                         batch_size=batch_size)
        for batch in scan:
            if batch.num_rows:
                table = pa.Table.from_batches([batch])
                rows = np.searchsorted(self._sorted_index, table.column("index").to_numpy())
                # no local name for the images: once the consumer drops a batch, nothing here holds it
                yield rows, self._pixels(table, codec, size, channels)

    def _pixels(self, table, codec, size: int, channels: int) -> np.ndarray:
        latents = _tensor_column(table, "latent").astype(np.float32)
        if latents.ndim == 2:
            latents = latents.reshape(len(latents), *self.manifest.latent_shape)
        if codec is not None:
            import torch

            latents = codec.decode(torch.from_numpy(latents)).clamp(-1, 1).float().cpu().numpy()
        return resize_images(to_uint8(latents), size, channels)


def heldout_images(manifest: Manifest, name: str, size: int, channels: int) -> np.ndarray:
    """One identity's held-out images (``manifest.heldout``), ``uint8 [n, size, size, channels]``."""
    paths = [Path(h["image"]) for h in manifest.heldout if h["identity"] == name]
    if not paths:
        return np.zeros((0, size, size, channels), np.uint8)
    return to_uint8(np.stack([load_image(p, size, channels) for p in paths]))


def load_real_images(prepared_dir: str | Path, manifest: Manifest, size: int, channels: int,
                     identities: list[str] | None = None) -> RealImages:
    """Training images (``encoded/``) and held-out images (``manifest.heldout``) per
    identity, at the generated images' ``size`` and ``channels``, all in memory: for tests and
    a look at the data. The evaluation streams them instead
    (:meth:`pogdiff_dist.evaluation.scoring.Scorer.load_references`)."""
    names = list(identities) if identities is not None else list(manifest.identities)
    source = TrainingImages(prepared_dir, manifest)
    all_train = np.zeros((len(source), size, size, channels), np.uint8)
    for rows, images in source.batches(size, channels):
        all_train[rows] = images
    train = {name: all_train[source.ids == manifest.identities.index(name)] for name in names}
    return RealImages(train, {name: heldout_images(manifest, name, size, channels) for name in names})
