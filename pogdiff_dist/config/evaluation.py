"""The evaluation section of the config (``eval.*``): everything that changes a metric."""

from __future__ import annotations

from dataclasses import dataclass

from pogdiff_dist.config.sections import _check, _one_of

EVAL_METRICS = ("fid", "dino", "grecall", "accuracy")
CLASSIFIERS = ("auto", "digits", "faces", "centroid")
FID_EPS = 1e-6  # added to both covariances' diagonals before sqrtm
GRECALL_THRESHOLD = 0.7  # PoGDiff Sec. 4.1: cosine similarity of image embeddings


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (``jobs/evaluate.py``, a sweep's rungs): everything that changes a number
    is here and in metrics.json. Set with ``--set eval.num_images=16``."""

    num_images: int = 10  # generated per identity (the paper samples 10 per identity)
    steps: int = 50  # DDIM steps (the paper's 50)
    guidance_scale: float = 3.0  # classifier-free guidance, as train.guidance_scale
    seed: int = 0  # identity i's generator is seeded from (seed, name): see identity_seed
    encoder: str = "pixels"  # "pixels" or a local transformers vision model dir (DINOv2...)
    # "digits" (Digits-IT2I CNN), "faces" (Faces-IT2I CNN), "centroid" (nearest centroid of encoder
    # features), or "auto": the CNN of the bundled dataset the data was prepared from, else centroid
    classifier: str = "auto"
    fid_dims: int = 16  # FID on this many principal axes of the real features (see metrics.py)
    fid_eps: float = FID_EPS
    grecall_threshold: float = GRECALL_THRESHOLD
    few_threshold: int | None = None  # few-shot: <= this many training images (None: Manifest.minority default)
    identities: tuple[str, ...] | None = None  # a subset to evaluate (None: all)
    cache_dir: str | None = None  # classifier cache (None: <prepared>/eval_cache)

    def __post_init__(self):
        _check(self.num_images >= 1, f"eval.num_images must be >= 1, got {self.num_images}")
        _check(self.steps >= 1, f"eval.steps must be >= 1, got {self.steps}")
        _check(self.guidance_scale >= 0, f"eval.guidance_scale must be >= 0, got {self.guidance_scale}")
        _one_of("eval.classifier", self.classifier, CLASSIFIERS)
        _check(self.fid_dims >= 1, f"eval.fid_dims must be >= 1, got {self.fid_dims}")
        _check(self.fid_eps > 0, f"eval.fid_eps must be > 0, got {self.fid_eps}")
        _check(-1 <= self.grecall_threshold <= 1, "eval.grecall_threshold must be a cosine in [-1, 1]")
        _check(self.few_threshold is None or self.few_threshold >= 0, "eval.few_threshold must be >= 0 or null")
        # whether a model directory exists is checked where the run starts (runtime.absolute_paths), not here:
        # validating a config never touches the disk (a worker may validate it on another machine)
        _check(bool(self.encoder), "eval.encoder must be 'pixels' or a local transformers vision model directory")
        if self.identities is not None:
            object.__setattr__(self, "identities", tuple(self.identities))

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)
