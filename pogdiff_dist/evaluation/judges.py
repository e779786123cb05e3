"""Identity classifiers for the identity-accuracy metric (the automatic stand-in for the
paper's human and GPT-4o judgements).

- :class:`DigitsClassifier`: for Digits-IT2I, a small CNN trained on all 1,797 images of
  scikit-learn's balanced ``load_digits()`` (no download), rendered exactly as
  Digits-IT2I renders them at the evaluation resolution. Every identity of that dataset
  is a digit class under a name, so the digit the CNN reads names the identity. It is
  ten-way: an image of the wrong digit is wrong even when that digit is not in the
  (sub)dataset. Trained once per resolution and cached (safetensors + JSON, no pickle).
- :class:`FacesClassifier`: for Faces-IT2I, a small CNN trained on fresh renders of
  exactly the identities it judges (balanced, a few hundred per identity, poses,
  expressions, lighting and backgrounds drawn from seeds no image of the dataset uses),
  at the evaluation resolution and channel count. Cached per (resolution, channels,
  identity names) like the digit CNN.
- :class:`NearestCentroidClassifier`: for any other dataset (user folders), cosine
  nearest centroid of the encoder features of each identity's training images.

All map ``uint8 [N, H, W, C]`` images (and their encoder features) to identity names.
"""

from __future__ import annotations

import hashlib
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
FACES_CNN_VERSION = 1  # bump when the faces network, its input or its training changes
FACES_MAX_INPUT = 32  # the faces CNN's input side: the evaluation resolution, at most this
FACES_JUDGE_SPLIT = 2  # the judge's renders: Faces-IT2I's own images use split codes 0 (train), 1 (heldout)


def digit_names() -> dict[str, int]:
    """Identity name -> digit class, for every naming Digits-IT2I uses (its presets and
    the ``base`` pretraining population)."""
    from pogdiff_dist.data.bundled import digits

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


def _cnn_input(images: np.ndarray, size: int = DIGITS_INPUT, channels: int = 1) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, channels, size, size] in [0, 1] (grayscale or RGB,
    Lanczos resize). The defaults are the digit CNN's input."""
    out = []
    for im in np.asarray(images):
        pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("L" if channels == 1 else "RGB")
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.LANCZOS)
        out.append(np.asarray(pil, dtype=np.float32) / 255.0)
    if not out:
        return torch.zeros(0, channels, size, size)
    x = torch.from_numpy(np.stack(out))
    return x[:, None] if channels == 1 else x.permute(0, 3, 1, 2).contiguous()


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


def _network(channels: int = 1, size: int = DIGITS_INPUT, classes: int = 10, width: int = 32) -> nn.Module:
    """Two 3x3 conv blocks (``width``, then ``2 * width`` filters, each followed by 2x2
    max-pooling) and a linear layer. The defaults are the digit CNN."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(2 * width * (size // 4) ** 2, classes),
    )


def _augment(x: torch.Tensor, g: torch.Generator, shift: float = 0.15, scale: float = 0.1,
             padding_mode: str = "zeros", noise: float = 0.0) -> torch.Tensor:
    """Random shift (+-``shift`` / 2 of the side) and scale (+-``scale``), then Gaussian
    pixel noise of std ``noise``. The defaults are the digits' (generated digits are
    rarely centred exactly like load_digits' normalised ones)."""
    n = len(x)
    theta = torch.zeros(n, 2, 3)
    s = 1 + scale * (torch.rand(n, generator=g) * 2 - 1)
    theta[:, 0, 0], theta[:, 1, 1] = s, s
    theta[:, :, 2] = shift * (torch.rand(n, 2, generator=g) * 2 - 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode=padding_mode)
    if noise:
        x = x + noise * torch.randn(x.shape, generator=g)
    return x


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, g: torch.Generator, augment,
         batch: int = 64, lr: float = 2e-3) -> nn.Module:
    """Adam with a one-cycle schedule over ``epochs`` shuffled passes, ``augment(x, g)``
    applied to every batch (call inside :func:`_one_thread`)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(y) + batch - 1) // batch))
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for b in range(0, len(y), batch):
            idx = perm[b:b + batch]
            loss = F.cross_entropy(net(augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def _load_cached(stem: Path, build, accept=lambda info: True) -> tuple[nn.Module, dict] | None:
    """(network, info) from ``stem``.safetensors + ``stem``.json, or None when the pair is
    missing or ``accept(info)`` is false; ``build(info)`` makes the empty network."""
    from safetensors.torch import load_file

    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not (weights.is_file() and meta.is_file()):
        return None
    info = json.loads(meta.read_text())
    if not accept(info):
        return None
    net = build(info)
    net.load_state_dict(load_file(str(weights)))
    return net, info


def _save_cached(weights: Path, meta: Path, net: nn.Module, info: dict) -> None:
    """safetensors weights + JSON info; weights last: a complete pair means a complete entry."""
    from safetensors.torch import save_file

    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    meta.write_text(json.dumps(info, indent=1))
    tmp.replace(weights)


class DigitsClassifier:
    """Ten-way digit CNN; ``predict`` returns identity names of ``identities``."""

    name = "digits-cnn"

    def __init__(self, net: nn.Module, info: dict):
        self.net = net.eval()
        self.info = info

    @classmethod
    def train(cls, resolution: int, exclude=(), epochs: int = 12, seed: int = 0) -> DigitsClassifier:
        """Train on every load_digits image except the indices in ``exclude`` (a test uses
        that to measure held-out accuracy honestly): Adam with a one-cycle schedule, shift
        and scale augmentation, on one thread."""
        images, labels = render_digits(resolution)
        keep = np.setdiff1d(np.arange(len(labels)), np.asarray(list(exclude), dtype=np.int64))
        x, y = _cnn_input(images[keep]), torch.from_numpy(labels[keep])
        with _one_thread():
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            net = _fit(_network(), x, y, epochs, g, _augment)
        info = {"classifier": cls.name, "version": DIGITS_CNN_VERSION, "resolution": resolution,
                "input": DIGITS_INPUT, "epochs": epochs, "seed": seed, "train_images": len(keep),
                "trained_on": "scikit-learn load_digits (balanced, 10 classes)"}
        return cls(net, info)

    @classmethod
    def load_or_train(cls, cache_dir: str | Path, resolution: int) -> DigitsClassifier:
        """The classifier for ``resolution`` from ``cache_dir``, training and caching it on
        first use (safetensors weights + a JSON with how it was trained)."""
        stem = Path(cache_dir) / f"digits_cnn_r{resolution}_v{DIGITS_CNN_VERSION}"
        cached = _load_cached(stem, lambda info: _network())
        if cached is not None:
            return cls(*cached)
        clf = cls.train(resolution)
        _save_cached(stem.with_suffix(".safetensors"), stem.with_suffix(".json"), clf.net, clf.info)
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


def face_names() -> set[str]:
    """Every Faces-IT2I identity name (targets and the ``base`` population)."""
    from pogdiff_dist.data.bundled import faces

    return set(faces.identities())


def render_faces(names, resolution: int, per_identity: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fresh Faces-IT2I renders for the judge: ``per_identity`` images of each of
    ``names`` (labels index ``names``), ``uint8 [N, R, R, 3]``. Image ``j`` of an identity
    varies with ``default_rng([seed, identity number, FACES_JUDGE_SPLIT, j])``, a seed no
    image of the dataset uses (:func:`pogdiff_dist.data.bundled.faces.image_variation`: split 0
    or 1), so the judge never sees a dataset image, whatever the dataset's seed."""
    from pogdiff_dist.data.bundled import faces

    people = faces.identities()
    number = {n: i for i, n in enumerate(people)}
    images, labels = [], []
    for k, name in enumerate(names):
        for j in range(per_identity):
            var = faces.sample_variation(np.random.default_rng([seed, number[name], FACES_JUDGE_SPLIT, j]))
            images.append(faces.render(people[name], var, resolution))
            labels.append(k)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def faces_input_size(resolution: int) -> int:
    return min(resolution, FACES_MAX_INPUT)


class FacesClassifier:
    """N-way CNN over exactly the Faces-IT2I identities it was trained for (classes in
    sorted name order); ``predict`` returns their names."""

    name = "faces-cnn"
    WIDTH = 16  # filters of the first conv block (the digit CNN has 32: faces train on more images)

    def __init__(self, net: nn.Module, info: dict):
        self.net = net.eval()
        self.info = info
        self.names = list(info["identities"])
        self.input = int(info["input"])
        self.channels = int(info["channels"])

    @staticmethod
    def _build(info: dict) -> nn.Module:
        return _network(int(info["channels"]), int(info["input"]), len(info["identities"]), int(info["width"]))

    @classmethod
    def train(cls, identities, resolution: int, channels: int = 3, per_identity: int = 250, epochs: int = 8,
              seed: int = 0) -> FacesClassifier:
        """Render ``per_identity`` fresh images of every identity at ``resolution``
        (:func:`render_faces`) and train on them on one thread: Adam with a one-cycle
        schedule, light augmentation (shift +-4%, scale +-5%, edge padding, pixel noise
        std 0.02: poses already vary in the renders)."""
        from pogdiff_dist.data.bundled import faces

        names = sorted(set(identities))
        unknown = sorted(set(names) - face_names())
        if unknown:
            raise ValueError(f"FacesClassifier needs Faces-IT2I identities; {unknown[:3]} are not")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        size = faces_input_size(resolution)
        images, labels = render_faces(names, resolution, per_identity, seed)
        x, y = _cnn_input(images, size, channels), torch.from_numpy(labels)
        info = {"classifier": cls.name, "version": FACES_CNN_VERSION, "render_version": faces.RENDER_VERSION,
                "resolution": resolution, "channels": channels, "input": size, "width": cls.WIDTH,
                "identities": names, "per_identity": per_identity, "epochs": epochs, "seed": seed,
                "train_images": len(y),
                "trained_on": f"fresh Faces-IT2I renders ({per_identity} per identity, balanced; variation seeds "
                              f"[seed, identity, {FACES_JUDGE_SPLIT}, j], disjoint from the dataset's images)"}
        with _one_thread():
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            net = _fit(cls._build(info), x, y, epochs, g,
                       lambda b, gen: _augment(b, gen, shift=0.08, scale=0.05, padding_mode="border", noise=0.02))
        return cls(net, info)

    @classmethod
    def cache_stem(cls, cache_dir: str | Path, identities, resolution: int, channels: int = 3) -> Path:
        """``faces_cnn_r{resolution}_c{channels}_{hash of the sorted names}_v{version}r{render version}``."""
        from pogdiff_dist.data.bundled import faces

        key = hashlib.sha256("\n".join(sorted(set(identities))).encode()).hexdigest()[:16]
        version = f"v{FACES_CNN_VERSION}r{faces.RENDER_VERSION}"
        return Path(cache_dir) / f"faces_cnn_r{resolution}_c{channels}_{key}_{version}"

    @classmethod
    def load_or_train(cls, cache_dir: str | Path, identities, resolution: int, channels: int = 3) -> FacesClassifier:
        """The classifier for these identities at ``resolution`` from ``cache_dir``,
        training and caching it on first use (safetensors weights + a JSON with how it
        was trained, including the identity names it separates)."""
        stem = cls.cache_stem(cache_dir, identities, resolution, channels)
        cached = _load_cached(stem, cls._build, lambda info: info.get("identities") == sorted(set(identities)))
        if cached is not None:
            return cls(*cached)
        clf = cls.train(identities, resolution, channels)
        _save_cached(stem.with_suffix(".safetensors"), stem.with_suffix(".json"), clf.net, clf.info)
        return clf

    @torch.no_grad()
    def predict(self, images: np.ndarray, features: np.ndarray | None = None,
                identities: list[str] | None = None) -> list[str]:
        """The identity name the CNN reads in each image (one of the names it was trained on)."""
        if len(images) == 0:
            return []
        with _one_thread():
            best = self.net(_cnn_input(images, self.input, self.channels)).argmax(1).numpy()
        return [self.names[int(i)] for i in best]

    def describe(self) -> dict:
        info = dict(self.info)
        info["identities"] = len(self.names)
        return info


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
