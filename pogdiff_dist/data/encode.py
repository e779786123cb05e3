"""Encode raw samples: image -> latent (or pixels) and image embedding, caption -> tokens
and hidden states. A plain callable over numpy batches, so Ray Data can run it in
actors and a test can call it directly."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch

from pogdiff_dist.data.records import load_image
from pogdiff_dist.models import LatentCodec, load_image_embedder, load_text_encoder
from pogdiff_dist.output import quiet_libraries


class SampleEncoder:
    """Batch in: ``index, image, caption, identity_id``. Batch out adds
    ``latent`` [C,H,W] f32, ``y`` [L,D] f16, ``tokens`` [L] i32, ``length``, ``pooled`` [D] f32
    (what the text density models: the family's pooled caption vector, else the masked mean of y),
    ``y_pooled`` [P] f16 (SDXL / SD3 / Flux: the pooled vector their denoiser reads),
    ``z`` [d] f32 (L2-normalised image embedding), and ``encoded_by`` (host:pid:device, so the
    prepare stage can record where its encoders ran).

    Every encoder (VAE, text encoder, image encoder) lives on ``device``: the GPU a Ray
    actor was given (``prepare.gpus_per_encoder``), or the CPU. Outputs return to numpy.
    """

    def __init__(self, text_encoder_dir: str, tokenizer_dir: str, max_length: int, resolution: int,
                 channels: int, image_encoder: str = "pixels", vae_dir: str | None = None, device: str = "cpu"):
        quiet_libraries()  # a Ray Data actor: the driver's --verbose arrives as $POGDIFF_VERBOSE
        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # one core per actor; Ray schedules the actors
        self.text = load_text_encoder(text_encoder_dir, tokenizer_dir, max_length).to(self.device)
        self.embed = load_image_embedder(image_encoder, self.device)
        self.codec = LatentCodec(vae_dir, self.device) if vae_dir else None
        self.resolution, self.channels = resolution, channels
        self.where = f"{socket.gethostname()}:{os.getpid()}:{self.device}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack([load_image(Path(p), self.resolution, self.channels) for p in batch["image"]])
        if self.codec is not None:
            latent = self.codec.encode(torch.from_numpy(images)).float().cpu().numpy()
        else:
            latent = images
        ids, lengths = self.text.tokenize([str(c) for c in batch["caption"]])
        hidden, pooled = self.text.encode_ids(torch.from_numpy(ids).to(self.device),
                                              torch.from_numpy(lengths).to(self.device))
        out = {"latent": latent, "y": hidden.float().cpu().numpy().astype(np.float16),
               "pooled": pooled.float().cpu().numpy(), "z": self.embed(images).astype(np.float32)}
        if getattr(self.text, "family", None) is not None:  # the denoiser reads the pooled vector too
            out["y_pooled"] = out["pooled"].astype(np.float16)
        for name, a in out.items():  # e.g. a VAE overflowing in half precision, fp16 hidden states out of range
            bad = ~np.isfinite(a.reshape(len(a), -1)).all(1)
            if bad.any():
                files = [str(batch["image"][i]) for i in np.nonzero(bad)[0]]
                raise ValueError(f"encoding produced NaN/Inf in {name!r} for image(s) {files}: check the encoder "
                                 f"({'VAE' if name == 'latent' else 'text/image encoder'}) and its precision")
        return {
            "index": batch["index"].astype(np.int64),
            "key": batch["key"],
            "identity_id": batch["identity_id"].astype(np.int64),
            "caption": batch["caption"],
            "tokens": ids,
            "length": lengths,
            **out,
            "encoded_by": np.array([self.where] * len(images)),
        }
