"""The demo decoder: a small conv net from a unit embedding to an image, shipped with the demo.

It is trained (``bindsearch train-decoder``, ``train/decoder.py``) on the demo world to rebuild
an image from the frozen demo vision tower's unit embedding of it. Because every modality of the
demo model is bound to that vision space, the embedding of a sound, a depth map or a thermal
frame (or a weighted mix) can be decoded the same way, with no prior in between.

    gen = load_demo_decoder()                       # encoders/data/imagebind_demo_decoder.*
    [img] = gen.generate(audio_vectors[:1])         # 64x64 PIL image

The decoder is one-shot and deterministic: ``seed`` and ``steps`` are accepted for the
``ImageGenerator`` interface and change nothing (the same embedding always gives the same
pixels). Its weights record, in their safetensors metadata, the sha256 of the encoder weights it
was trained against (``DemoDecoder.trained_for``): a decoder paired with other encoder weights
decodes vectors from a space it never saw, so ``load_demo_decoder(encoder=...)`` refuses that.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from encoders.checkpoint import sha256_file
from encoders.errors import CheckpointError, EncoderError

from .generation import GeneratorInfo, check_embeddings

__all__ = [
    "DECODER_LICENCE",
    "DecoderConfig",
    "DemoDecoder",
    "ImageDecoder",
    "demo_decoder_path",
    "load_demo_decoder",
    "save_decoder",
]

DECODER_LICENCE = "Apache-2.0 (trained by bindsearch)"
# safetensors metadata keys
META_CONFIG = "decoder_config"
META_TRAINED_FOR = "encoder_sha256"


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture of the decoder.

    Args:
        dim: embedding width it takes (the encoder's ``embed_dim``).
        image_size: side of the output image; a power of two times 4.
        channels: feature channels at 4x4, then after each 2x up-sampling but the last (which
            goes straight to RGB); ``len(channels) == log2(image_size / 4)``.
        convs: extra 3x3 conv layers after each up-sampling but the last (capacity where it
            is cheap: the high-resolution layers dominate the cost on CPU).
    """

    dim: int = 64
    image_size: int = 64
    channels: tuple[int, ...] = (256, 128, 96, 64)
    convs: int = 0

    def __post_init__(self) -> None:
        ups = math.log2(self.image_size / 4) if self.image_size >= 8 else -1
        if ups != int(ups) or ups < 1:
            raise ValueError(f"image_size must be 4 x a power of two >= 8, got {self.image_size}")
        if len(self.channels) != int(ups):
            raise ValueError(
                f"image_size {self.image_size} needs {int(ups)} channel widths, "
                f"got {len(self.channels)}"
            )
        if self.dim < 1 or self.convs < 0 or min(self.channels) < 8:
            raise ValueError(f"invalid decoder config {self}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DecoderConfig:
        d = json.loads(text)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class ImageDecoder(nn.Module):
    """(B, dim) unit embeddings -> (B, 3, S, S) pixels in [0, 1].

    A linear map to a 4x4 feature map, then 2x transposed-conv up-samplings (GroupNorm, SiLU)
    and optional 3x3 convs, the last up-sampling straight to RGB, a sigmoid.
    """

    def __init__(self, cfg: DecoderConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.fc = nn.Linear(cfg.dim, c[0] * 16, device=device)
        self.norm0 = nn.GroupNorm(_groups(c[0]), c[0], device=device)
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(c):
            layers += [
                nn.ConvTranspose2d(cin, cout, 4, 2, 1, device=device),
                nn.GroupNorm(_groups(cout), cout, device=device),
                nn.SiLU(),
            ]
            for _ in range(cfg.convs):
                layers += [
                    nn.Conv2d(cout, cout, 3, padding=1, device=device),
                    nn.GroupNorm(_groups(cout), cout, device=device),
                    nn.SiLU(),
                ]
        layers.append(nn.ConvTranspose2d(c[-1], 3, 4, 2, 1, device=device))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        x = self.fc(z).view(len(z), self.cfg.channels[0], 4, 4)  # (B, C0, 4, 4)
        x = nn.functional.silu(self.norm0(x))
        return torch.sigmoid(self.body(x))  # (B, 3, S, S)


class DemoDecoder:
    """The demo decoder as an ``ImageGenerator``: unit embeddings in, PIL images out."""

    def __init__(
        self, model: ImageDecoder, trained_for: str | None = None, source: str = "demo"
    ) -> None:
        self.model = model.eval()
        self.trained_for = trained_for  # sha256 of the encoder weights it was trained against
        self._info = GeneratorInfo(
            name=source,
            dim=model.cfg.dim,
            image_size=model.cfg.image_size,
            licence=DECODER_LICENCE,
            default_steps=1,
            model_sha256=trained_for,
        )

    @property
    def info(self) -> GeneratorInfo:
        return self._info

    @torch.inference_mode()
    def decode(self, embeddings: np.ndarray) -> np.ndarray:
        """(B, dim) embeddings -> (B, S, S, 3) uint8 pixels; rows are renormalised to unit."""
        x = torch.from_numpy(check_embeddings(embeddings, self._info.dim))
        norms = x.norm(dim=1, keepdim=True)
        if bool((norms < 1e-6).any()):
            raise EncoderError("an embedding is all zeros: nothing to decode")
        dev = next(self.model.parameters()).device
        y = self.model((x / norms).to(dev))  # (B, 3, S, S) in [0, 1]
        out = (y.float() * 255).round().clamp(0, 255).to(torch.uint8)
        return np.ascontiguousarray(out.permute(0, 2, 3, 1).cpu().numpy())

    def generate(
        self, embeddings: np.ndarray, *, seed: int = 0, steps: int | None = None
    ) -> list[Image.Image]:
        """One image per row; one-shot and deterministic, so ``seed``/``steps`` change nothing."""
        if steps is not None and steps < 1:
            raise EncoderError(f"steps must be >= 1 (the demo decoder is one-shot), got {steps}")
        del seed  # no noise anywhere: the same embedding always gives the same image
        return [Image.fromarray(a) for a in self.decode(embeddings)]


def demo_decoder_path() -> Path:
    """The decoder shipped with the default model (package data of ``encoders``)."""
    from encoders.models import DEFAULT_MODEL
    from encoders.weights import bundled_decoder

    path = bundled_decoder(DEFAULT_MODEL)
    if path is None:
        raise CheckpointError(f"the default model {DEFAULT_MODEL} ships no demo decoder")
    return path


def save_decoder(
    model: ImageDecoder,
    path: str | Path,
    trained_for: str,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write fp16 safetensors with the config and the encoder's sha256 in the metadata."""
    from encoders.checkpoint import save_safetensors

    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {META_CONFIG: model.cfg.to_json(), META_TRAINED_FOR: trained_for, **(metadata or {})}
    return save_safetensors(sd, path, meta)


def load_demo_decoder(
    path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    encoder: str | Path | None = None,
    dim: int | None = None,
    encoder_sha256: str | None = None,
) -> DemoDecoder:
    """Load decoder weights (default: the shipped ones) as an ``ImageGenerator``.

    Args:
        encoder: encoder weights the vectors will come from; when given, their sha256 must be
            the one the decoder was trained against, or this raises.
        dim: the encoder's embedding width; when given, it must be the decoder's.
        encoder_sha256: the same check with the sha256 already known (``ModelRef.sha256``).
    """
    from safetensors import safe_open

    p = Path(path) if path is not None else demo_decoder_path()
    if not p.is_file():
        raise CheckpointError(
            f"decoder weights {p} do not exist (train them with `bindsearch train-decoder`)"
        )
    try:
        with safe_open(str(p), framework="pt") as f:
            meta: dict[str, Any] = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for a corrupt file
        raise CheckpointError(f"cannot read decoder weights {p}: {e}") from None
    if META_CONFIG not in meta:
        raise CheckpointError(f"{p} is not a bindsearch decoder (no {META_CONFIG!r} metadata)")
    cfg = DecoderConfig.from_json(meta[META_CONFIG])
    if dim is not None and dim != cfg.dim:
        raise EncoderError(f"the decoder {p} takes {cfg.dim}-d embeddings; the encoder gives {dim}")
    trained_for = meta.get(META_TRAINED_FOR)
    if encoder is not None and trained_for is not None:
        got = sha256_file(encoder)
        if got != trained_for:
            raise EncoderError(
                f"the decoder {p} was trained against encoder weights with sha256 "
                f"{trained_for[:12]}..., not {Path(encoder).name} ({got[:12]}...): retrain it "
                f"with `bindsearch train-decoder --checkpoint {encoder}`"
            )
    if encoder_sha256 is not None and trained_for is not None and encoder_sha256 != trained_for:
        raise EncoderError(
            f"the decoder {p} was trained against encoder weights with sha256 "
            f"{trained_for[:12]}..., not the served model's ({encoder_sha256[:12]}...): retrain "
            "it with `bindsearch train-decoder --checkpoint WEIGHTS`"
        )
    dev = torch.device(device)
    model = ImageDecoder(cfg, device="meta")
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"decoder weights {p} do not match their config: {e}") from None
    return DemoDecoder(model.to(dev), trained_for=trained_for)
