"""Identity classifiers for the identity-accuracy metric (the automatic stand-in for the
paper's human and GPT-4o judgements).

- :class:`DigitsClassifier`: for Digits-IT2I, a small CNN trained on all 1,797 images of
  scikit-learn's balanced ``load_digits()`` (no download), rendered exactly as
  Digits-IT2I renders them at the evaluation resolution. Every identity of that dataset
  is a digit class under a name, so the digit the CNN reads names the identity. It is
  ten-way: an image of the wrong digit is wrong even when that digit is not in the
  (sub)dataset. Trained once per resolution and cached (safetensors + JSON, no pickle).
- :class:`NearestCentroidClassifier`: for any other dataset (user folders, Faces-IT2I),
  cosine nearest centroid of the encoder features of each identity's training images.

Both map ``uint8 [N, H, W, C]`` images (and their encoder features) to identity names.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pogdiff_dist.evaluation.metrics import l2_normalize

DIGITS_CNN_VERSION = 1  # bump when the network, its input or its training changes
DIGITS_INPUT = 16  # the CNN's input side: load_digits images hold 8x8 pixels of information


def digit_names() -> dict[str, int]:
    """Identity name -> digit class, for every naming Digits-IT2I uses (its presets and
    the ``base`` pretraining population)."""
    from pogdiff_dist.data import digits

    out = {}
    for names in (getattr(digits, "NAMES", ()), getattr(digits, "BASE_NAMES", ())):
        out.update({n: d for d, n in enumerate(names)})
    return out


def render_digits(resolution: int, indices=None) -> tuple[np.ndarray, np.ndarray]:
    """load_digits images as Digits-IT2I writes them (0..16 -> 0..255, bicubic to
    ``resolution``): ``uint8 [N, R, R, 1]`` and digit labels ``[N]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.arange(len(d.target)) if indices is None else np.asarray(indices)
    images = []
    for im in d.images[idx]:
        pixels = np.clip(np.rint(im * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        images.append(np.asarray(Image.fromarray(pixels, mode="L").resize((resolution, resolution),
                                                                          Image.Resampling.BICUBIC)))
    return np.stack(images)[..., None], d.target[idx].astype(np.int64)


def _cnn_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, 1, 16, 16] in [0, 1] (grayscale, Lanczos resize)."""
    out = []
    for im in np.asarray(images):
        pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("L")
        if pil.size != (DIGITS_INPUT, DIGITS_INPUT):
            pil = pil.resize((DIGITS_INPUT, DIGITS_INPUT), Image.Resampling.LANCZOS)
        out.append(np.asarray(pil, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(out))[:, None]


@contextmanager
def _one_thread():
    """A tiny network gains nothing from more threads, and on a shared CPU several
    threads spend their time waiting on each other (observed: 10x slower training)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3),
        nn.Linear(64 * (DIGITS_INPUT // 4) ** 2, 10),
    )


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift (+-7.5%) and scale (+-10%): generated digits are rarely centred
    exactly like load_digits' normalised ones."""
    n = len(x)
    theta = torch.zeros(n, 2, 3)
    s = 1 + 0.1 * (torch.rand(n, generator=g) * 2 - 1)
    theta[:, 0, 0], theta[:, 1, 1] = s, s
    theta[:, :, 2] = 0.15 * (torch.rand(n, 2, generator=g) * 2 - 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


class DigitsClassifier:
    """Ten-way digit CNN; ``predict`` returns identity names of ``identities``."""

    name = "digits-cnn"

    def __init__(self, net: nn.Module, info: dict):
        self.net = net.eval()
        self.info = info

    @classmethod
    def train(cls, resolution: int, exclude=(), epochs: int = 12, seed: int = 0) -> "DigitsClassifier":
        """Train on every load_digits image except the indices in ``exclude`` (a test uses
        that to measure held-out accuracy honestly): Adam with a one-cycle schedule, shift
        and scale augmentation, on one thread."""
        images, labels = render_digits(resolution)
        keep = np.setdiff1d(np.arange(len(labels)), np.asarray(list(exclude), dtype=np.int64))
        x, y = _cnn_input(images[keep]), torch.from_numpy(labels[keep])
        with _one_thread():
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            net = _network()
            batch = 64
            opt = torch.optim.Adam(net.parameters(), lr=2e-3)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3,
                                                        total_steps=epochs * ((len(y) + batch - 1) // batch))
            net.train()
            for _ in range(epochs):
                perm = torch.randperm(len(y), generator=g)
                for b in range(0, len(y), batch):
                    idx = perm[b:b + batch]
                    loss = F.cross_entropy(net(_augment(x[idx], g)), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
        info = {"classifier": cls.name, "version": DIGITS_CNN_VERSION, "resolution": resolution,
                "input": DIGITS_INPUT, "epochs": epochs, "seed": seed, "train_images": int(len(keep)),
                "trained_on": "scikit-learn load_digits (balanced, 10 classes)"}
        return cls(net, info)

    @classmethod
    def load_or_train(cls, cache_dir: str | Path, resolution: int) -> "DigitsClassifier":
        """The classifier for ``resolution`` from ``cache_dir``, training and caching it on
        first use (safetensors weights + a JSON with how it was trained)."""
        from safetensors.torch import load_file, save_file

        cache_dir = Path(cache_dir)
        stem = cache_dir / f"digits_cnn_r{resolution}_v{DIGITS_CNN_VERSION}"
        weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        if weights.is_file() and meta.is_file():
            net = _network()
            net.load_state_dict(load_file(str(weights)))
            return cls(net, json.loads(meta.read_text()))
        clf = cls.train(resolution)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in clf.net.state_dict().items()}, str(tmp))
        meta.write_text(json.dumps(clf.info, indent=1))
        tmp.replace(weights)  # weights last: a complete pair means a complete cache entry
        return clf

    @torch.no_grad()
    def predict_digits(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros(0, dtype=np.int64)
        with _one_thread():
            return self.net(_cnn_input(images)).argmax(1).numpy()

    def predict(self, images: np.ndarray, features: np.ndarray, identities: list[str]) -> list[str]:
        """Names of the predicted digits among ``identities``; a digit with no identity in
        the dataset is returned as ``"<digit d>"`` (wrong for every prompt)."""
        by_digit = {d: n for n, d in digit_names().items() if n in set(identities)}
        return [by_digit.get(int(d), f"<digit {int(d)}>") for d in self.predict_digits(images)]

    def describe(self) -> dict:
        return dict(self.info)


class NearestCentroidClassifier:
    """Cosine nearest centroid of encoder features, one centroid per identity (the mean
    of its training images' unit features)."""

    name = "nearest-centroid"

    def __init__(self, features_by_identity: dict[str, np.ndarray], encoder: str = ""):
        self.names = [n for n, f in features_by_identity.items() if len(f)]
        if not self.names:
            raise ValueError("nearest-centroid classifier: no identity has training images")
        self.centroids = l2_normalize(np.stack([l2_normalize(features_by_identity[n]).mean(0) for n in self.names]))
        self.encoder = encoder

    def predict(self, images: np.ndarray, features: np.ndarray, identities: list[str] | None = None) -> list[str]:
        if len(features) == 0:
            return []
        best = (l2_normalize(features) @ self.centroids.T).argmax(1)
        return [self.names[i] for i in best]

    def describe(self) -> dict:
        return {"classifier": self.name, "encoder": self.encoder, "identities": len(self.names),
                "trained_on": "encoder features of each identity's training images"}
