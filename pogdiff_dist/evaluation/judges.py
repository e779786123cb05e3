"""Identity classifiers for the identity-accuracy metric (the automatic stand-in for the
paper's human and GPT-4o judgements).

- :class:`CNNJudge`: a small CNN trained for a bundled dataset from the
  :class:`~pogdiff_dist.data.bundled.base.JudgeSpec` the dataset gives it: for Digits-IT2I the
  ten digit classes of scikit-learn's balanced ``load_digits()`` rendered as the dataset
  renders them (every identity is a digit under a name, so the digit read names the
  identity; an image of a digit no evaluated identity has is wrong for every prompt); for
  Faces-IT2I exactly the identities it judges, from fresh renders no dataset image uses.
  Trained once per (dataset, classes, resolution, channels) and cached (safetensors +
  JSON, no pickle).
- :class:`NearestCentroidClassifier`: for any other dataset (user folders), cosine
  nearest centroid of the encoder features of each identity's training images.

Both map ``uint8 [N, H, W, C]`` images (and their encoder features) to identity names.
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

from pogdiff_dist.data.bundled.base import JudgeSpec
from pogdiff_dist.evaluation.metrics import l2_normalize


def _cnn_input(images: np.ndarray, size: int, channels: int = 1) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, channels, size, size] in [0, 1] (grayscale or RGB,
    Lanczos resize)."""
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


def _network(channels: int, size: int, classes: int, width: int) -> nn.Module:
    """Two 3x3 conv blocks (``width``, then ``2 * width`` filters, each followed by 2x2
    max-pooling) and a linear layer."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(2 * width * (size // 4) ** 2, classes),
    )


def _augment(x: torch.Tensor, g: torch.Generator, shift: float = 0.15, scale: float = 0.1,
             padding_mode: str = "zeros", noise: float = 0.0) -> torch.Tensor:
    """Random shift (+-``shift`` / 2 of the side) and scale (+-``scale``), then Gaussian
    pixel noise of std ``noise``."""
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


class CNNJudge:
    """A bundled dataset's CNN judge: reads which of ``spec.classes`` an image shows, and names
    the evaluated identity of that class."""

    def __init__(self, net: nn.Module, info: dict):
        self.net = net.eval()
        self.info = info
        self.classes = list(info["classes"])
        self.class_of = dict(info["class_of"])
        self.input, self.channels = int(info["input"]), int(info["channels"])

    @property
    def name(self) -> str:
        return self.info["classifier"]

    @staticmethod
    def _build(info: dict) -> nn.Module:
        return _network(int(info["channels"]), int(info["input"]), len(info["classes"]), int(info["width"]))

    @staticmethod
    def _info(spec: JudgeSpec, seed: int) -> dict:
        return {"classifier": spec.name, "version": spec.version, "resolution": spec.resolution,
                "channels": spec.channels, "input": spec.input_size, "width": spec.width, "epochs": spec.epochs,
                "seed": seed, "classes": list(spec.classes), "class_of": dict(spec.class_of),
                "trained_on": spec.trained_on, **spec.extra}

    @classmethod
    def train(cls, spec: JudgeSpec, exclude=(), seed: int = 0) -> CNNJudge:
        """Train on ``spec.training_set()`` except the rows in ``exclude`` (a test uses that to
        measure held-out accuracy honestly): Adam with a one-cycle schedule and the spec's
        augmentation, on one thread."""
        images, labels = spec.training_set()
        keep = np.setdiff1d(np.arange(len(labels)), np.asarray(list(exclude), dtype=np.int64))
        x, y = _cnn_input(images[keep], spec.input_size, spec.channels), torch.from_numpy(labels[keep])
        info = {**cls._info(spec, seed), "train_images": len(keep)}
        # its own RNG state: the judge may be trained inside a training worker (rank 0's first
        # validation), whose global generator it must neither depend on nor reseed
        with _one_thread(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights and dropout
            g = torch.Generator().manual_seed(seed)
            net = _fit(cls._build(info), x, y, spec.epochs, g, lambda b, gen: _augment(b, gen, **spec.augment))
        return cls(net, info)

    @staticmethod
    def cache_stem(cache_dir: str | Path, spec: JudgeSpec) -> Path:
        """``<name>_r<resolution>_c<channels>_<hash of the classes>_<version>``."""
        key = hashlib.sha256("\n".join(spec.classes).encode()).hexdigest()[:12]
        return Path(cache_dir) / f"{spec.name.replace('-', '_')}_r{spec.resolution}_c{spec.channels}_{key}_{spec.version}"

    @classmethod
    def load_or_train(cls, cache_dir: str | Path, spec: JudgeSpec) -> CNNJudge:
        """The judge for ``spec`` from ``cache_dir``, training and caching it on first use
        (safetensors weights + a JSON with how it was trained, including its classes)."""
        stem = cls.cache_stem(cache_dir, spec)
        cached = _load_cached(stem, cls._build, lambda info: info.get("classes") == list(spec.classes))
        if cached is not None:
            net, info = cached
            return cls(net, {**info, "class_of": dict(spec.class_of)})  # this evaluation's identities
        judge = cls.train(spec)
        _save_cached(stem.with_suffix(".safetensors"), stem.with_suffix(".json"), judge.net, judge.info)
        return judge

    @torch.no_grad()
    def predict_classes(self, images: np.ndarray) -> np.ndarray:
        """The class index the CNN reads in each image."""
        if len(images) == 0:
            return np.zeros(0, dtype=np.int64)
        with _one_thread():
            return self.net(_cnn_input(images, self.input, self.channels)).argmax(1).numpy()

    def predict(self, images: np.ndarray, features: np.ndarray | None = None,
                identities: list[str] | None = None) -> list[str]:
        """The identity (of ``identities``, default all) of the class read in each image; a
        class no such identity has comes back as ``"<class>"``, wrong for every prompt."""
        names = set(self.class_of) if identities is None else set(identities)
        by_class = {c: n for n, c in self.class_of.items() if n in names}
        return [by_class.get(self.classes[int(i)], f"<{self.classes[int(i)]}>") for i in self.predict_classes(images)]

    def describe(self) -> dict:
        info = {k: v for k, v in self.info.items() if k != "class_of"}
        info["classes"] = len(self.classes)
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
