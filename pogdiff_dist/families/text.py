"""Captions -> what a family's denoiser is conditioned on, exactly as its diffusers pipeline
encodes a prompt (``encode_prompt``; the tests compare the two).

- sd: CLIP's last hidden states [B, 77, D].
- sdxl: CLIP-L's and OpenCLIP-G's penultimate hidden states concatenated on features
  [B, 77, D1 + D2]; pooled: OpenCLIP-G's projected EOS state (text_embeds) [B, P2].
- sd3: CLIP-L's and CLIP-G's penultimate states concatenated on features, zero-padded to T5's
  width and put before T5's last hidden states on the sequence [B, 77 + L_t5, D_t5]; pooled:
  both CLIPs' text_embeds concatenated [B, P1 + P2].
- flux: T5's last hidden states [B, L_t5, D_t5]; pooled: CLIP-L's pooler_output [B, D1].
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from pogdiff_dist.families.spec import Family


@dataclass
class Conditioning:
    """A batch of caption conditions: ``hidden`` [B, L, D] (attended to), ``pooled`` [B, P] or None.
    Rows index and concatenate together, so a dual-condition pass builds [y; y'] in one place."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, rows) -> Conditioning:
        return Conditioning(**{f.name: None if (v := getattr(self, f.name)) is None else v[rows] for f in fields(self)})

    def cat(self, *others: Conditioning) -> Conditioning:
        parts = (self, *others)
        out = {}
        for f in fields(self):
            values = [getattr(p, f.name) for p in parts]
            if any(v is None for v in values) and not all(v is None for v in values):
                raise ValueError(f"cannot concatenate conditions with and without {f.name}")
            out[f.name] = None if values[0] is None else torch.cat(values)
        return Conditioning(**out)

    def to(self, device=None, dtype: torch.dtype | None = None) -> Conditioning:
        return Conditioning(**{f.name: None if (v := getattr(self, f.name)) is None else v.to(device, dtype)
                               for f in fields(self)})

    def zeros_like(self) -> Conditioning:
        """SDXL's unconditional input (``force_zeros_for_empty_prompt``)."""
        return Conditioning(**{f.name: None if (v := getattr(self, f.name)) is None else torch.zeros_like(v)
                               for f in fields(self)})


def _encoder_outputs(spec, model, ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(hidden, pooled) of one encoder for padded ids, as the pipelines read them (no mask)."""
    out = model(ids, output_hidden_states=spec.hidden == "penultimate")
    hidden = {"last": lambda: out.last_hidden_state, "penultimate": lambda: out.hidden_states[-2],
              None: lambda: None}[spec.hidden]()
    pooled = None if spec.pooled is None else getattr(out, spec.pooled)
    return hidden, pooled


def combine(family: Family, outputs: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> Conditioning:
    """The family's conditioning from its encoders' (hidden, pooled), in ``family.encoders`` order."""
    if family.name == "sd":
        return Conditioning(outputs[0][0])
    if family.name == "sdxl":
        return Conditioning(torch.cat([outputs[0][0], outputs[1][0]], dim=-1), outputs[1][1])
    if family.name == "sd3":
        (h1, p1), (h2, p2), (t5, _) = outputs
        clip = torch.cat([h1, h2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), torch.cat([p1, p2], dim=-1))
    if family.name == "flux":
        return Conditioning(outputs[1][0], outputs[0][1])
    raise ValueError(f"no caption encoding for family {family.name!r}")


class CaptionEncoder:
    """A family's frozen tokenizers + text encoders: captions -> token ids (host) -> :class:`Conditioning`.

    Token ids are per encoder (``{"text_encoder": [B, 77], "text_encoder_2": [B, 512]}``), int32
    numpy, padded/truncated to each encoder's ``max_length``, so the training step can pick
    them on the host and cache states per distinct caption.
    """

    def __init__(self, family: Family, tokenizers: dict, models: dict):
        self.family = family
        self.tokenizers = tokenizers  # encoder folder -> tokenizer
        self.models = {name: m.eval().requires_grad_(False) for name, m in models.items()}

    @classmethod
    def from_pretrained(cls, family: Family, pretrained: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> CaptionEncoder:
        import transformers

        root = Path(pretrained)
        tokenizers, models = {}, {}
        for e in family.encoders:
            tokenizers[e.encoder] = transformers.AutoTokenizer.from_pretrained(str(root / e.tokenizer))
            model_cls = getattr(transformers, e.model_class)
            models[e.encoder] = model_cls.from_pretrained(str(root / e.encoder), dtype=dtype).to(device)
        return cls(family, tokenizers, models)

    @classmethod
    def from_pipeline(cls, family: Family, pipe) -> CaptionEncoder:
        """Wrap a loaded diffusers pipeline's tokenizers and encoders."""
        return cls(family, {e.encoder: getattr(pipe, e.tokenizer) for e in family.encoders},
                   {e.encoder: getattr(pipe, e.encoder) for e in family.encoders})

    def tokenize(self, captions: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for e in self.family.encoders:
            enc = self.tokenizers[e.encoder](list(captions), padding="max_length", max_length=e.max_length,
                                             truncation=True, return_tensors="np")
            out[e.encoder] = enc["input_ids"].astype(np.int32)
        return out

    @torch.no_grad()
    def encode_ids(self, ids: dict) -> Conditioning:
        """The conditioning of token ids (numpy or tensors) on the encoders' device and dtype."""
        outputs = []
        for e in self.family.encoders:
            model = self.models[e.encoder]
            device = next(model.parameters()).device
            outputs.append(_encoder_outputs(e, model, torch.as_tensor(ids[e.encoder], device=device).long()))
        return combine(self.family, outputs)

    def encode(self, captions: list[str]) -> Conditioning:
        return self.encode_ids(self.tokenize(captions))

    def to(self, device=None, dtype: torch.dtype | None = None) -> CaptionEncoder:
        for m in self.models.values():
            m.to(device=device, dtype=dtype)
        return self


class FamilyTextEncoder:
    """A family's :class:`CaptionEncoder` behind the single-encoder interface the data pipeline
    and the training step use (:class:`pogdiff_dist.models.TextEncoder`): ``tokenize`` gives one
    id row per caption, every encoder's ids side by side ([B, sum of the encoders' lengths]), so
    a caption's row is its cache key and its shard field; ``encode_ids`` splits the row again
    and returns (hidden [B, L, D], pooled [B, P] or None), as the family's pipeline encodes.
    ``lengths`` (the first encoder's non-padding count) are carried for the interface; the
    pipelines encode without a mask."""

    def __init__(self, captions: CaptionEncoder):
        self.captions, self.family = captions, captions.family
        self.widths = [e.max_length for e in self.family.encoders]
        self.tokenizer = captions.tokenizers[self.family.encoders[0].encoder]

    @classmethod
    def from_pretrained(cls, family: Family, pretrained: str | Path, device: torch.device | str = "cpu"):
        return cls(CaptionEncoder.from_pretrained(family, pretrained, device=device))

    @property
    def max_length(self) -> int:
        return sum(self.widths)

    @property
    def device(self) -> torch.device:
        return next(next(iter(self.captions.models.values())).parameters()).device

    @property
    def models(self) -> dict:
        return self.captions.models

    def tokenize(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        per = self.captions.tokenize(captions)
        ids = np.concatenate([per[e.encoder] for e in self.family.encoders], axis=1).astype(np.int32)
        first = self.family.encoders[0]
        pad = self.captions.tokenizers[first.encoder].pad_token_id
        lengths = (per[first.encoder] != pad).sum(1).astype(np.int32)
        return ids, lengths

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, lengths: torch.Tensor | None = None):
        parts, at = {}, 0
        for e, width in zip(self.family.encoders, self.widths):
            parts[e.encoder] = ids[:, at:at + width]
            at += width
        cond = self.captions.encode_ids(parts)
        return cond.hidden, cond.pooled

    def encode(self, captions: list[str]):
        ids, lengths = self.tokenize(captions)
        return self.encode_ids(torch.from_numpy(ids).to(self.device), torch.from_numpy(lengths).to(self.device))

    def to(self, device=None, dtype: torch.dtype | None = None) -> FamilyTextEncoder:
        self.captions.to(device, dtype)
        return self
