"""Model configurations: frozen dataclasses, one registry of presets.

Architecture lives here; where weights come from lives in ``encoders.weights``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .modality import TOWERS, Modality


@dataclass(frozen=True)
class TrunkConfig:
    """One transformer tower: token width, number of blocks, attention heads."""

    width: int
    depth: int
    heads: int
    drop_path: float = 0.0  # training only; inert in eval
    mlp_ratio: int = 4
    # LayerNorm epsilon of the trunk's blocks, its pre-norm and its head. ImageBind uses 1e-6;
    # OpenCLIP 1e-5 (``openclip_vit_h14_bind``, whose vision and text towers are OpenCLIP's).
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.width <= 0 or self.depth <= 0 or self.heads <= 0:
            raise ValueError(f"trunk sizes must be positive, got {self}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


@dataclass(frozen=True)
class PreprocessConfig:
    """Input geometry and normalisation constants, stored with the weights.

    The model reads its geometry (image size, fbank size, trace length, context length) from
    here, and the input transforms read the rest, so both always agree.
    """

    image_size: int = 224
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    context_length: int = 77
    vocab_size: int = 49408
    audio_sample_rate: int = 16000
    audio_mel_bins: int = 128
    audio_target_length: int = 204
    audio_clip_duration: float = 2.0
    audio_clips: int = 3
    audio_mean: float = -4.268
    audio_std: float = 9.138
    video_frames: int = 2
    video_clip_duration: float = 2.0
    video_clips: int = 5
    depth_size: int = 224
    thermal_size: int = 224
    imu_channels: int = 6
    imu_samples: int = 2000


@dataclass(frozen=True)
class ModelConfig:
    """An ImageBind-architecture model.

    Field names are ours; ``from_official_kwargs`` maps the official constructor arguments.
    """

    arch: Literal["imagebind"] = "imagebind"
    embed_dim: int = 768  # width of the shared embedding space
    vision: TrunkConfig = TrunkConfig(1024, 24, 16)
    text: TrunkConfig = TrunkConfig(768, 12, 12)
    audio: TrunkConfig = TrunkConfig(768, 12, 12, drop_path=0.1)
    depth: TrunkConfig = TrunkConfig(384, 12, 8)
    thermal: TrunkConfig = TrunkConfig(768, 12, 12)
    imu: TrunkConfig = TrunkConfig(512, 6, 8, drop_path=0.7)
    vision_patch: tuple[int, int, int] = (2, 14, 14)  # (time, height, width)
    audio_patch: int = 16
    audio_stride: int = 10
    depth_patch: int = 16
    thermal_patch: int = 16
    imu_window: int = 8
    # Initial logit scales (random init only: checkpoints carry their own values).
    text_logit_scale: float = 1 / 0.07
    audio_logit_scale: float = 20.0
    depth_logit_scale: float = 5.0
    thermal_logit_scale: float = 10.0
    imu_logit_scale: float = 5.0
    max_logit_scale: float = 100.0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        if self.arch != "imagebind":
            raise ValueError(f"unknown arch {self.arch!r}; accepted: 'imagebind'")
        p = self.preprocess
        if p.video_frames % self.vision_patch[0]:
            raise ValueError("video_frames must be a multiple of the temporal patch size")
        if p.imu_samples % self.imu_window:
            raise ValueError("imu_samples must be a multiple of imu_window")
        for name, size, patch in (
            ("image", p.image_size, self.vision_patch[1]),
            ("depth", p.depth_size, self.depth_patch),
            ("thermal", p.thermal_size, self.thermal_patch),
        ):
            if size < patch:
                raise ValueError(f"{name} size {size} is smaller than its patch {patch}")

    def trunk(self, modality: Modality | str) -> TrunkConfig:
        """The trunk of a tower (video uses the vision tower)."""
        tower = Modality.parse(modality).tower
        trunk: TrunkConfig = getattr(self, tower.value)
        return trunk

    def num_patches(self, modality: Modality | str) -> int:
        """Tokens produced by a tower's stem, class token excluded."""
        m, p = Modality.parse(modality).tower, self.preprocess
        if m is Modality.VISION:
            t, h, w = self.vision_patch
            return (p.video_frames // t) * (p.image_size // h) * (p.image_size // w)
        if m is Modality.AUDIO:
            k, s = self.audio_patch, self.audio_stride
            return ((p.audio_mel_bins - k) // s + 1) * ((p.audio_target_length - k) // s + 1)
        if m is Modality.DEPTH:
            return (p.depth_size // self.depth_patch) ** 2
        if m is Modality.THERMAL:
            return (p.thermal_size // self.thermal_patch) ** 2
        if m is Modality.IMU:
            return p.imu_samples // self.imu_window
        return p.context_length

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``from_dict`` reads it back).

        A trunk's ``norm_eps`` is written only when it is not the default, so the configs of
        every model made before the field existed (and the index fingerprints that hash them)
        stay the same.
        """
        d = dataclasses.asdict(self)
        for m in TOWERS:
            if d[m.value]["norm_eps"] == _DEFAULT_NORM_EPS:
                del d[m.value]["norm_eps"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read our own JSON form (as written by ``to_dict``)."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; accepted: {sorted(known)}")
        for m in TOWERS:
            if m.value in d and isinstance(d[m.value], dict):
                d[m.value] = TrunkConfig(**d[m.value])
        if isinstance(d.get("preprocess"), dict):
            pre = dict(d["preprocess"])
            for key in ("image_mean", "image_std"):
                if key in pre:
                    pre[key] = tuple(pre[key])
            d["preprocess"] = PreprocessConfig(**pre)
        if "vision_patch" in d:
            d["vision_patch"] = tuple(d["vision_patch"])
        return cls(**d)

    @classmethod
    def from_official_kwargs(cls, kwargs: dict[str, Any]) -> ModelConfig:
        """Map the official ``ImageBindModel(**kwargs)`` constructor arguments to a config.

        Missing arguments take the official defaults. ``imu_kernel_size`` is accepted and
        ignored, as the official constructor does (its IMU window is fixed at 8 samples).
        """
        unknown = sorted(set(kwargs) - set(OFFICIAL_DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown ImageBindModel arguments {unknown}; accepted: {sorted(OFFICIAL_DEFAULTS)}"
            )
        a = {**OFFICIAL_DEFAULTS, **kwargs}

        def trunk(name: str) -> TrunkConfig:
            return TrunkConfig(
                width=int(a[f"{name}_embed_dim"]),
                depth=int(a[f"{name}_num_blocks"]),
                heads=int(a[f"{name}_num_heads"]),
                drop_path=float(a.get(f"{name}_drop_path", 0.0)),
            )

        kernel = tuple(int(k) for k in a["kernel_size"])
        if len(kernel) != 3:
            raise ValueError(f"kernel_size must have 3 entries (t, h, w), got {a['kernel_size']}")
        pre = PreprocessConfig(
            video_frames=int(a["video_frames"]),
            audio_mel_bins=int(a["audio_num_mel_bins"]),
            audio_target_length=int(a["audio_target_len"]),
        )
        return cls(
            embed_dim=int(a["out_embed_dim"]),
            vision=trunk("vision"),
            text=trunk("text"),
            audio=trunk("audio"),
            depth=trunk("depth"),
            thermal=trunk("thermal"),
            imu=trunk("imu"),
            vision_patch=(kernel[0], kernel[1], kernel[2]),
            audio_patch=int(a["audio_kernel_size"]),
            audio_stride=int(a["audio_stride"]),
            depth_patch=int(a["depth_kernel_size"]),
            thermal_patch=int(a["thermal_kernel_size"]),
            preprocess=pre,
        )


_DEFAULT_NORM_EPS = TrunkConfig(1, 1, 1).norm_eps
# OpenCLIP's LayerNorm (torch's default epsilon), in its ViT and text transformer alike.
OPENCLIP_NORM_EPS = 1e-5

# The official constructor's defaults (ImageBindModel.__init__), used for missing arguments.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "video_frames": 2,
    "kernel_size": (2, 14, 14),
    "audio_kernel_size": 16,
    "audio_stride": 10,
    "out_embed_dim": 768,
    "vision_embed_dim": 1024,
    "vision_num_blocks": 24,
    "vision_num_heads": 16,
    "audio_embed_dim": 768,
    "audio_num_blocks": 12,
    "audio_num_heads": 12,
    "audio_num_mel_bins": 128,
    "audio_target_len": 204,
    "audio_drop_path": 0.1,
    "text_embed_dim": 768,
    "text_num_blocks": 12,
    "text_num_heads": 12,
    "depth_embed_dim": 384,
    "depth_kernel_size": 16,
    "depth_num_blocks": 12,
    "depth_num_heads": 8,
    "depth_drop_path": 0.0,
    "thermal_embed_dim": 768,
    "thermal_kernel_size": 16,
    "thermal_num_blocks": 12,
    "thermal_num_heads": 12,
    "thermal_drop_path": 0.0,
    "imu_embed_dim": 512,
    "imu_kernel_size": 8,
    "imu_num_blocks": 6,
    "imu_num_heads": 8,
    "imu_drop_path": 0.7,
}


PRESETS: dict[str, ModelConfig] = {
    # The official imagebind_huge checkpoint (ViT-H/14 vision = OpenCLIP ViT-H, 1024-d space).
    "imagebind_huge": ModelConfig(
        embed_dim=1024,
        vision=TrunkConfig(1280, 32, 16),
        text=TrunkConfig(1024, 24, 16),
    ),
    # ImageBind-huge with OpenCLIP ViT-H-14's image and text towers (MIT weights, LAION's
    # laion2b_s32b_b79k, converted by encoders.openclip): the towers ImageBind itself froze,
    # with OpenCLIP's LayerNorm epsilon. The other towers are bound by `train --init`.
    "openclip_vit_h14_bind": ModelConfig(
        embed_dim=1024,
        vision=TrunkConfig(1280, 32, 16, norm_eps=OPENCLIP_NORM_EPS),
        text=TrunkConfig(1024, 24, 16, norm_eps=OPENCLIP_NORM_EPS),
    ),
    # Tiny, for tests: real input geometry, toy widths.
    "imagebind_test": ModelConfig(
        embed_dim=16,
        vision=TrunkConfig(32, 2, 2),
        text=TrunkConfig(32, 2, 2),
        audio=TrunkConfig(32, 2, 2),
        depth=TrunkConfig(32, 1, 2),
        thermal=TrunkConfig(32, 1, 2),
        imu=TrunkConfig(32, 2, 2),
    ),
    # The embedded default: the same architecture at toy widths and small inputs, trained by
    # `bindsearch train` on the demo world (encoders/data/MODEL_CARD_imagebind_demo.md).
    # Non-text logit scales are 20, not the official 5-10: a tower that perceives a small
    # part of the image (IMU, depth) cannot separate its positives at a temperature of 1/5.
    "imagebind_demo": ModelConfig(
        embed_dim=64,
        vision=TrunkConfig(96, 4, 4),
        text=TrunkConfig(64, 2, 4),
        audio=TrunkConfig(64, 2, 4),
        depth=TrunkConfig(64, 2, 4),
        thermal=TrunkConfig(64, 2, 4),
        imu=TrunkConfig(64, 2, 4),
        vision_patch=(2, 16, 16),
        audio_patch=8,
        audio_stride=8,
        depth_patch=16,
        thermal_patch=16,
        audio_logit_scale=20.0,
        depth_logit_scale=20.0,
        thermal_logit_scale=20.0,
        imu_logit_scale=20.0,
        preprocess=PreprocessConfig(
            image_size=64,
            context_length=16,
            audio_sample_rate=8000,
            audio_mel_bins=32,
            audio_target_length=96,
            audio_clip_duration=1.0,
            audio_clips=1,
            video_clip_duration=1.0,
            video_clips=1,
            depth_size=64,
            thermal_size=64,
            imu_samples=128,
        ),
    ),
}


def list_presets() -> list[str]:
    """Names of the registered presets."""
    return sorted(PRESETS)


def resolve_config(config: str | Path | ModelConfig | dict[str, Any]) -> ModelConfig:
    """A preset name, a config object, a dict, or a JSON file path -> ModelConfig.

    A JSON file (or dict) may hold our own form (``to_dict``) or the official constructor
    kwargs (recognised by their official names, e.g. ``vision_embed_dim``).
    """
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, dict):
        return _from_any_dict(config, source="dict")
    text = str(config)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        return _from_any_dict(data, source=str(path))
    raise ValueError(
        f"unknown config {text!r}: not a preset ({', '.join(PRESETS)}) nor a JSON file"
    )


def _from_any_dict(d: dict[str, Any], source: str) -> ModelConfig:
    # Our form names its architecture ("arch") and has fields the official kwargs lack; both
    # share a few names (audio_stride), so those alone do not decide.
    ours = {f.name for f in dataclasses.fields(ModelConfig)} - set(OFFICIAL_DEFAULTS)
    try:
        if not any(k in ours for k in d):
            return ModelConfig.from_official_kwargs(d)
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad model config in {source}: {e}") from None
