"""The sections of the typed config: one frozen dataclass per stage, validated in __post_init__."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLED_TEXT_ENCODER = "bundled:minilm"  # the offline all-MiniLM-L6-v2 package


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _one_of(name: str, value: Any, options: tuple) -> None:
    _check(value in options, f"{name} must be one of {list(options)}, got {value!r}")


# "<name>:<preset>" -> presets; "base" is the balanced pretraining population, "val" the validation split for M
BUNDLED_DATASETS = {
    "digits-it2i": ("S", "M", "L", "base", "val"),
    "faces-it2i": ("S", "M", "L", "base", "val"),
}


SAMPLING_MODES = ("uniform", "balanced", "power")
UNET_PRESET_NAMES = ("tiny", "small")  # pogdiff_dist.models.UNET_PRESETS (tests/test_config.py checks they agree)
PREDICTION_TYPES = ("epsilon", "v_prediction")
KNN_INDEXES = ("flat", "ivf")


@dataclass(frozen=True)
class DataConfig:
    """Where the raw dataset comes from and how images are read."""

    # "<digits-it2i|faces-it2i>:<S|M|L|base|val>", or a local dataset: a folder or its metadata.csv.
    # Layouts (data/layouts.py): metadata.csv (image,identity[,caption][,split]); or a folder per
    # identity, root/<identity>/*.png|jpg|jpeg|bmp|webp, where a kohya-style "<repeats>_<name>"
    # folder (15_Leila) is identity <name> seen <repeats> times per epoch (see sampling below).
    # Captions: a metadata.csv cell, root/<identity>/captions.csv (image,caption), or a caption
    # file <image stem>.txt next to the image; otherwise "An image of <identity>.". Files left
    # unused are listed in prepare's warnings.
    dataset: str = "digits-it2i:M"
    resolution: int = 32
    channels: int = 1  # pixel channels read from images (3 for RGB / Stable Diffusion)
    heldout_per_identity: int = 20  # bundled dataset only: images kept out of training
    on_bad: str = "raise"  # "raise" or "skip" (skips are counted and reported)
    seed: int = 0
    # How often each identity is seen per epoch (training time; the prepared data is the same):
    # "uniform" every sample once; "balanced" every identity equally often; "power" an identity's
    # share proportional to n_id ** sampling_alpha (0 = balanced, 1 = uniform). Folder repeats
    # (<repeats>_<name>) count each image <repeats> times in n_id: uniform shows it <repeats> times
    # per epoch, balanced is unchanged by them. See data/sampling.py. Default: balanced, part of
    # the recommended recipe (docs/RESULTS.md); PAPER_POGDIFF restores the paper's uniform.
    sampling: str = "balanced"
    sampling_alpha: float = 0.5

    def __post_init__(self):
        _check(isinstance(self.dataset, str) and self.dataset.strip() != "",
               f"data.dataset must name a bundled dataset, a dataset folder or its metadata.csv, got {self.dataset!r}")
        _check(self.resolution >= 8, f"data.resolution must be >= 8, got {self.resolution}")
        _one_of("data.sampling", self.sampling, SAMPLING_MODES)
        _check(self.sampling_alpha >= 0, f"data.sampling_alpha must be >= 0, got {self.sampling_alpha}")
        _one_of("data.channels", self.channels, (1, 3))
        _one_of("data.on_bad", self.on_bad, ("raise", "skip"))
        _check(self.heldout_per_identity >= 0, f"data.heldout_per_identity must be >= 0, got {self.heldout_per_identity}")
        bundled = self.bundled
        if bundled is not None:
            _one_of(f"data.dataset preset of {bundled[0]}", bundled[1], BUNDLED_DATASETS[bundled[0]])

    @property
    def bundled(self) -> tuple[str, str] | None:
        """(name, preset) for a bundled dataset, None for a user folder."""
        name, _, preset = self.dataset.partition(":")
        if name not in BUNDLED_DATASETS:
            return None
        return name, preset or "M"


@dataclass(frozen=True)
class ModelConfig:
    """The diffusion model and its frozen encoders, all from local directories."""

    pretrained: str | None = None  # local Stable Diffusion dir (unet/ vae/ text_encoder/ tokenizer/ scheduler/)
    text_encoder: str = BUNDLED_TEXT_ENCODER  # used when pretrained is None
    unet: str = "tiny"  # from-scratch UNet preset when pretrained is None
    image_encoder: str = "pixels"  # "pixels" or a local transformers vision model dir
    max_length: int = 32  # caption tokens (77 for CLIP)
    init_unet: str | None = None  # start from this UNet instead: an exported model dir (model/unet) or a unet dir
    num_train_timesteps: int = 1000
    # LoRA (peft): rank 0 fine-tunes the whole UNet; > 0 trains only low-rank adapters on
    # lora_targets (default: the attention projections), scaled by lora_alpha / rank
    lora_rank: int = 0
    lora_alpha: float | None = None  # None: lora_rank (scale 1)
    lora_targets: tuple[str, ...] = ()  # empty: the family's (attention projections; SD3 / Flux: joint blocks too)
    # what the UNet predicts: None = the pretrained scheduler's prediction_type (epsilon for a
    # from-scratch model); "epsilon" or "v_prediction" (e.g. Stable Diffusion 2.x 768) overrides it
    prediction_type: str | None = None

    def __post_init__(self):
        if self.pretrained is None:
            _one_of("model.unet", self.unet, UNET_PRESET_NAMES)
        _check(self.max_length >= 4, f"model.max_length must be >= 4, got {self.max_length}")
        _check(self.num_train_timesteps >= 2, "model.num_train_timesteps must be >= 2")
        _check(self.lora_rank >= 0, f"model.lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        _check(self.lora_alpha is None or self.lora_alpha > 0, "model.lora_alpha must be > 0 or null")
        _check(self.prediction_type in (None, *PREDICTION_TYPES),
               f"model.prediction_type must be one of {list(PREDICTION_TYPES)} or null, got {self.prediction_type!r}")


@dataclass(frozen=True)
class PrepareConfig:
    """Offline stage: encode, shard, neighbour index, text density."""

    out_dir: str = "runs/prepared"
    k_max: int = 20  # neighbours stored per sample; train-time k may be any value <= k_max
    samples_per_shard: int = 256
    batch_size: int = 32
    num_encoders: int = 2  # Ray Data actors encoding images/captions
    density_latent_dim: int = 16
    density_hidden_dim: int = 256
    density_epochs: int = 200
    density_lr: float = 1e-3
    # What the density VAE models (Eq. 10). "caption": each sample's own caption (the paper's
    # y_i). "identity": each sample's identity prompt "An image of {name}.", one row per
    # sample, so psi_den ranks rare *names* rather than rare *descriptions* (a departure for
    # per-image captions, whose ELBO measured a description's rarity; see README).
    density_text: str = "caption"
    # GPUs per encoder actor (fractional allowed) and per k-NN / density task: "auto" = 1 when
    # the Ray cluster has GPUs now, or its autoscaler reported GPU node types, or (neither known)
    # train.use_gpu is set, else 0 (pogdiff_dist.devices.auto_gpus).
    gpus_per_encoder: float | str = "auto"
    # The k-NN index (Eq. 8). "flat": exact search over the whole table in one process (the
    # default; N^2 d work). "ivf": FAISS IndexIVFFlat, approximate, for large N: knn_nlist
    # inverted lists (0: about 4 sqrt(N)) trained by k-means on knn_train_rows sampled rows
    # (0: 64 per list), each query scanning the knn_nprobe nearest lists; its recall@k against
    # exact search is measured on knn_recall_queries random samples and reported.
    knn_index: str = "flat"
    knn_nlist: int = 0
    knn_nprobe: int = 16
    knn_train_rows: int = 0
    knn_recall_queries: int = 1000
    # Rows the density VAE holds and shuffles together while it streams the encoded Parquet
    # (an epoch is still one pass over all samples; a dataset this small is shuffled whole).
    density_buffer_rows: int = 65536

    def __post_init__(self):
        _one_of("prepare.density_text", self.density_text, ("caption", "identity"))
        _one_of("prepare.knn_index", self.knn_index, KNN_INDEXES)
        for name in ("knn_nlist", "knn_train_rows"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                   f"prepare.{name} must be an integer >= 0 (0: automatic), got {v!r}")
        for name in ("knn_nprobe", "knn_recall_queries", "density_buffer_rows"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                   f"prepare.{name} must be an integer >= 1, got {v!r}")
        _check(self.knn_nlist == 0 or self.knn_nprobe <= self.knn_nlist,
               f"prepare.knn_nprobe={self.knn_nprobe} exceeds prepare.knn_nlist={self.knn_nlist}: "
               "a query cannot scan more lists than the index has")
        _check(self.knn_nlist == 0 or self.knn_train_rows == 0 or self.knn_train_rows >= self.knn_nlist,
               f"prepare.knn_train_rows={self.knn_train_rows} is fewer than prepare.knn_nlist={self.knn_nlist}: "
               "k-means needs at least one training row per list (FAISS asks for 39)")
        g = self.gpus_per_encoder
        _check(g == "auto" or (isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 0),
               f"prepare.gpus_per_encoder must be 'auto' or a number >= 0, got {g!r}")
        _check(self.k_max >= 1, f"prepare.k_max must be >= 1, got {self.k_max}")
        _check(self.samples_per_shard >= 1, "prepare.samples_per_shard must be >= 1")
        _check(self.batch_size >= 1 and self.num_encoders >= 1, "prepare.batch_size and num_encoders must be >= 1")
        _check(self.density_epochs >= 1, "prepare.density_epochs must be >= 1")


LOSS_METHODS = ("pogdiff", "vanilla", "cbdm", "t2h", "diffrop")
FLOW_TIMESTEP_SCHEMES = ("uniform", "logit_normal", "mode", "cosmap")  # pogdiff_dist.timesteps.SCHEMES
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")  # pogdiff_dist.losses_flow.WEIGHTINGS
FLOW_KEYS = ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "flow_shift", "flow_weighting")
DDPM_KEYS = ("snr_gamma",)  # loss.* keys that only a DDPM family reads


# The paper's literal PoGDiff and sampling (METHOD.md, Eq. 9-12; uniform data order), as
# overrides of the defaults (which are the recommended recipe): what benchmarks/reproduce.py's
# "PoGDiff" row and the tests written against the literal objective train.
PAPER_POGDIFF = {"loss.a1": 1.0, "loss.a2": 1.0, "loss.a3": 1.0, "loss.k": 10, "loss.den_temperature": 1.0,
                 "loss.psi_den_source": "elbo", "data.sampling": "uniform"}


@dataclass(frozen=True)
class LossConfig:
    """Training objective (METHOD.md). psi options beyond Eq. 12 are off by default."""

    # The defaults are the recommended recipe (docs/RESULTS.md, "Which recipe"): PoGDiff with the
    # psi settings a sweep chose on Faces-IT2I val (benchmarks/results/sweep-pogdiff-faces, rounded)
    # and balanced sampling. The paper's literal PoGDiff (a1 = a2 = a3 = 1, psi_den from the
    # caption ELBO at T = 1, uniform sampling): the overrides in PAPER_POGDIFF.
    method: str = "pogdiff"  # one of LOSS_METHODS (METHOD.md: PoGDiff and its baselines)
    a1: float = 4.32  # psi_img exponent for same-identity neighbours (Eq. 9)
    a2: float = 0.415  # extra exponent for cross-identity neighbours (Eq. 9)
    a3: float = 2.46  # psi_den scale (Eq. 11); psi_den averages to 1/a3 over the dataset
    k: int = 20  # neighbours drawn from (<= prepare.k_max)
    neighbor_grad: str = "full"  # "full" (Algorithm 1) or "stop" (y' branch is a fixed target)
    use_psi_img: bool = True  # ablation: off -> psi = psi_den
    use_psi_den: bool = True  # ablation: off -> psi = psi_img
    den_temperature: float = 19.2  # departure from Eq. 11: psi_den ~ exp(-ELBO / T); 1 = literal
    psi_cap: float | None = None  # departure from Eq. 12: psi = min(psi, cap); None = literal
    cbdm_tau: float = 1.0  # CBDM regulariser weight (times t / T)
    diffrop_tau: float = 1.0  # DiffROP overlap weight at t = 0
    diffrop_decay: float = 5.0  # DiffROP: tau(t) = diffrop_tau * exp(-diffrop_decay * t / T)
    # Per-sample loss weight by identity frequency, for every method: "none"; "inverse" (1 / n_id);
    # "power" (n_id ** (identity_weight_alpha - 1)); normalised to mean 1 over the training samples.
    identity_weight: str = "none"
    identity_weight_alpha: float = 0.5
    # What psi_den measures: "elbo" (Eq. 11: the text VAE's density of the caption) or
    # "identity_count" (inverse identity frequency n_id ** (-1 / T), normalised the same way;
    # a departure that uses the identities psi_img already needs).
    psi_den_source: str = "identity_count"
    # min-SNR-gamma weighting of the denoising term (Hang et al. 2023; diffusers --snr_gamma,
    # kohya --min_snr_gamma): weight min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v). None: off.
    snr_gamma: float | None = None
    noise_offset: float = 0.0  # eps += noise_offset * N(0, I) per sample and channel (diffusers --noise_offset)
    # Flow-matching families (SD3, Flux; docs/OBJECTIVES.md): how s is drawn (uniform, logit_normal with
    # logit_mean / logit_std, mode with mode_scale, cosmap), then shifted: flow_shift null = the model's own
    # scheduler's (SD3: 3.0; Flux: by image size), a number = that fixed shift. flow_weighting: w(s) of the
    # denoising term (none, sigma_sqrt, cosmap). A DDPM family (SD, SDXL, pixels) refuses changed values.
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float | None = None
    flow_weighting: str = "none"

    def __post_init__(self):
        _one_of("loss.method", self.method, LOSS_METHODS)
        _one_of("loss.identity_weight", self.identity_weight, ("none", "inverse", "power"))
        _check(self.identity_weight_alpha >= 0, "loss.identity_weight_alpha must be >= 0")
        _one_of("loss.psi_den_source", self.psi_den_source, ("elbo", "identity_count"))
        _check(self.snr_gamma is None or self.snr_gamma > 0, f"loss.snr_gamma must be > 0 or null, got {self.snr_gamma}")
        _check(self.noise_offset >= 0, f"loss.noise_offset must be >= 0, got {self.noise_offset}")
        _one_of("loss.timestep_sampling", self.timestep_sampling, FLOW_TIMESTEP_SCHEMES)
        _one_of("loss.flow_weighting", self.flow_weighting, FLOW_WEIGHTINGS)
        _check(self.logit_std > 0, f"loss.logit_std must be > 0, got {self.logit_std}")
        _check(self.flow_shift is None or self.flow_shift > 0, f"loss.flow_shift must be > 0 or null, got {self.flow_shift}")
        _check(self.cbdm_tau >= 0 and self.diffrop_tau >= 0 and self.diffrop_decay >= 0,
               "loss.cbdm_tau, loss.diffrop_tau and loss.diffrop_decay must be >= 0")
        _one_of("loss.neighbor_grad", self.neighbor_grad, ("full", "stop"))
        for name in ("a1", "a2"):
            _check(getattr(self, name) >= 0, f"loss.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.a3 > 0, f"loss.a3 must be > 0 (psi_den = 1 / (a3 e^ELBO)), got {self.a3}")
        _check(self.k >= 1, f"loss.k must be >= 1, got {self.k}")
        _check(self.den_temperature > 0, f"loss.den_temperature must be > 0, got {self.den_temperature}")
        _check(self.psi_cap is None or self.psi_cap > 0, f"loss.psi_cap must be > 0 or null, got {self.psi_cap}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule, accumulation and clipping: set here and nowhere else."""

    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 8  # micro-batch per worker
    grad_accum: int = 1
    max_steps: int = 300  # optimiser steps
    warmup_steps: int = 20
    schedule: str = "constant"  # "constant" (after warmup) or "cosine"
    grad_clip: float = 1.0

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "optim.batch_size and optim.grad_accum must be >= 1")
        _check(self.max_steps >= 1, f"optim.max_steps must be >= 1, got {self.max_steps}")
        _check(0 <= self.warmup_steps, "optim.warmup_steps must be >= 0")
        _one_of("optim.schedule", self.schedule, ("constant", "cosine"))
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
        _check(len(self.betas) == 2, "optim.betas must have two values")


@dataclass(frozen=True)
class TrainConfig:
    """Distributed run: workers, engine, checkpoints, EMA, sampling."""

    name: str = "default"
    storage_path: str = "runs"  # Ray Train storage (local path or URI); checkpoints live here
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    zero_stage: int = 2
    precision: str = "fp32"  # "fp32" or "bf16"
    seed: int = 0
    caption_dropout: float = 0.1  # train the unconditional branch for classifier-free guidance
    # EMA of the fp32 master weights (the adapter alone with LoRA), exported instead of the live
    # weights. Decay at optimiser step n (diffusers' EMAModel.get_decay, s = n - ema_update_after_step - 1):
    # 0 while s <= 0, then min(ema_decay, (1 + s) / (10 + s)), or with ema_warmup
    # min(ema_decay, 1 - (1 + s) ** -ema_power).
    ema: bool = False
    ema_decay: float = 0.999
    ema_warmup: bool = False
    ema_power: float = 2 / 3
    ema_update_after_step: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker-group restarts from the latest checkpoint (Ray Train FailureConfig)
    log_every: int = 10
    shuffle_buffer: int = 256
    sample_steps: int = 25  # DDIM steps for the sample grid logged at the end
    guidance_scale: float = 3.0
    samples_per_prompt: int = 4
    on_nonfinite: str = "skip"  # non-finite loss: "skip" the step (counted, logged) or "raise"
    max_nonfinite: int = 20  # with "skip": stop with an error after this many skipped steps in a row
    verify_shards: bool = True  # checksum every shard against the manifest before training (size is always checked)
    text_cache_mib: float = 256.0  # per worker: y' hidden states of distinct neighbour captions kept (LRU); 0: off
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (less memory, ~+30% step time)
    allow_tf32: bool = True  # CUDA: TF32 for fp32 matmuls/convolutions (bf16 compute is unaffected)
    compile: bool = False  # torch.compile the UNet inside the DeepSpeed engine (first steps pay the compile)
    # every validate_every steps (0: never) rank 0 logs a fixed-seed grid of validate_images images of the
    # largest majority and the rarest few-shot identity to MLflow (and their identity accuracy with a judge)
    validate_every: int = 100
    validate_images: int = 4
    validate_steps: int = 10  # DDIM steps of the validation images

    def __post_init__(self):
        _check(self.num_workers >= 1, "train.num_workers must be >= 1")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker must be > 0")
        _one_of("train.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _one_of("train.precision", self.precision, ("fp32", "bf16"))
        _check(0 <= self.caption_dropout < 1, "train.caption_dropout must be in [0, 1)")
        _check(0 < self.ema_decay < 1, "train.ema_decay must be in (0, 1)")
        _check(self.ema_power > 0, f"train.ema_power must be > 0, got {self.ema_power}")
        _check(self.ema_update_after_step >= 0, "train.ema_update_after_step must be >= 0")
        _check(not (self.precision == "bf16" and self.zero_stage == 0),
               "train.precision=bf16 needs train.zero_stage >= 1: DeepSpeed keeps fp32 master weights and "
               "accumulates gradients in fp32 only inside its ZeRO optimisers (set train.zero_stage=1, 2 or 3)")
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "train.checkpoint_every and log_every must be >= 1")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(self.sample_steps >= 1 and self.samples_per_prompt >= 1, "train.sample_steps and samples_per_prompt must be >= 1")
        _one_of("train.on_nonfinite", self.on_nonfinite, ("skip", "raise"))
        _check(self.max_nonfinite >= 1, "train.max_nonfinite must be >= 1")
        _check(self.text_cache_mib >= 0, f"train.text_cache_mib must be >= 0, got {self.text_cache_mib}")
        _check(self.validate_every >= 0 and self.validate_images >= 1 and self.validate_steps >= 1,
               "train.validate_every must be >= 0 (0: off), validate_images and validate_steps >= 1")


def resolve_tracking_uri(uri: str, cwd: Path | None = None) -> str:
    """Make a relative ``sqlite:///file.db`` absolute (against ``cwd``, default this process's),
    so Ray workers (other cwd) hit the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path.cwd() if cwd is None else Path(cwd)) / uri[len(prefix):])
    return uri



@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: where runs go and what a run keeps besides its params and metrics."""

    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "pogdiff"
    log_model: bool = True  # the exported pipeline as an MLflow model (prompts -> images) in the run
    register_model: str | None = None  # also a new version of this registered model (needs log_model)
    system_metrics: bool = False  # MLflow's system/* metrics (CPU, memory, disk, network; GPU with nvidia-ml-py)
    system_metrics_interval_s: float = 10.0

    def __post_init__(self):
        _check(self.register_model is None or self.log_model,
               "tracking.register_model needs tracking.log_model=true (the registered version is the logged model)")
        _check(self.system_metrics_interval_s > 0, "tracking.system_metrics_interval_s must be > 0")

    def resolved_uri(self) -> str:
        import os

        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: join $RAY_ADDRESS or start a local cluster
    num_cpus: int | None = None  # logical CPUs of a local cluster (None: 2 x physical, see ENVIRONMENT.md)
    verbose: bool = False  # Ray Data progress bars, Ray Train's info logs and known-harmless warnings (--verbose)
