"""Stable unCLIP as an ``ImageGenerator``: ImageBind vectors condition its UNet directly.

Stable unCLIP H (``stabilityai/stable-diffusion-2-1-unclip``) is Stable Diffusion 2.1
fine-tuned to take an OpenCLIP ViT-H/14 *image* embedding (1024-d) as a class embedding. The
vision tower of ``imagebind_huge`` is that same OpenCLIP ViT-H/14 (frozen during ImageBind's
training) and every other ImageBind modality is bound to it, so a sound, a depth map or a
weighted mix can stand in for the image embedding (the paper's audio -> image demo).

    gen = load_unclip(device="cuda")                  # first use: ~5 GB from the HF hub
    [img] = gen.generate(encoder.embed_items("audio", ["rain.wav"]), seed=1)

Weights: the user's Hugging Face cache (``HF_HOME``), else a download from the hub at first
use; their licence is the CreativeML Open RAIL++-M (``UNCLIP_LICENCE``), logged on load and
shown in ``/v1/info``. The repository's own 632M-parameter image encoder is never loaded: a
tiny placeholder takes its place (the pipeline only reads its dtype when embeddings are given).

diffusers and transformers are optional: ``pip install 'bindsearch[generate]'``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from encoders.errors import EncoderError
from encoders.modality import Modality

from .generation import GeneratorInfo, check_embeddings

if TYPE_CHECKING:
    from encoders.encoder import Encoder
    from encoders.inputs import Item

log = logging.getLogger(__name__)

UNCLIP_MODEL = "stabilityai/stable-diffusion-2-1-unclip"
UNCLIP_LICENCE = (
    "CreativeML Open RAIL++-M (Stability AI; use restrictions apply): "
    "https://huggingface.co/stabilityai/stable-diffusion-2-1-unclip"
)
# Norm the unit contract vectors are scaled to before they reach the UNet. Stable unCLIP was
# trained on raw (un-normalised) ViT-H image embeddings, so it expects their typical norm.
# Without the 2.5 GB imagebind_huge weights we cannot measure it here: 20 is what the public
# ImageBind -> unCLIP demos fed (ImageBind's audio output, unit vector x its fixed logit scale
# 20), and it is the order of the raw CLIP image-embedding norms reported for ViT-L/14 (about
# 21). With real weights, measure it: ``calibrate_embedding_scale(encoder, images)``.
DEFAULT_EMBEDDING_SCALE = 20.0
DEFAULT_STEPS = 20
INSTALL_HINT = "Stable unCLIP needs diffusers and transformers: pip install 'bindsearch[generate]'"


def calibrate_embedding_scale(
    encoder: Encoder, images: Sequence[Item], batch_size: int = 8
) -> float:
    """The median L2 norm of the encoder's raw (un-normalised) vision embeddings of ``images``.

    Pass it as ``load_unclip(embedding_scale=...)`` so unit vectors reach the UNet at the norm
    of the image embeddings it was trained on (use a few hundred everyday photos).
    """
    if Modality.VISION not in encoder.modalities:
        raise EncoderError("calibration needs the encoder's vision tower; load it with vision")
    if not images:
        raise EncoderError("calibration needs at least one image")
    norms = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = encoder.preprocess(Modality.VISION, list(images[start : start + batch_size]))
            x = x.to(encoder.device, encoder.dtype)  # (B, 3, S, S)
            raw = encoder.model.head_features(Modality.VISION, x).float()  # (B, D), no norm
            norms.append(raw.norm(dim=-1).cpu())
    return float(torch.cat(norms).median())


class UnCLIPGenerator:
    """A loaded ``StableUnCLIPImg2ImgPipeline`` behind the ``ImageGenerator`` protocol.

    Each row is generated on its own, from a generator seeded with ``seed``: a row's image
    does not depend on the other rows of the batch. One generation at a time (the pipeline's
    scheduler keeps state), guarded by a lock.
    """

    def __init__(
        self,
        pipeline: Any,
        name: str,
        dim: int,
        embedding_scale: float,
        noise_level: int,
        guidance_scale: float,
    ) -> None:
        self.pipeline = pipeline
        self.embedding_scale = embedding_scale
        self.noise_level = noise_level
        self.guidance_scale = guidance_scale
        size = int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)
        self._info = GeneratorInfo(
            name=name,
            dim=dim,
            image_size=size,
            licence=UNCLIP_LICENCE,
            default_steps=DEFAULT_STEPS,
        )
        self._lock = threading.Lock()

    @property
    def info(self) -> GeneratorInfo:
        return self._info

    def generate(
        self, embeddings: np.ndarray, *, seed: int = 0, steps: int | None = None
    ) -> list[Image.Image]:
        """One image per row of ``embeddings`` ((B, dim) unit float32); same seed, same images."""
        x = check_embeddings(embeddings, self._info.dim)
        n = self._info.default_steps if steps is None else int(steps)
        if n < 1:
            raise EncoderError(f"steps must be at least 1, got {n}")
        pipe = self.pipeline
        unet = pipe.unet
        # Unit rows (a zero row stays zero: the model's unconditional input) x the scale.
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-12) * self.embedding_scale
        out = []
        with self._lock:
            for row in x:
                emb = torch.from_numpy(row[None]).to(unet.device, unet.dtype)  # (1, D)
                g = torch.Generator(device=unet.device).manual_seed(int(seed))
                result = pipe(
                    image_embeds=emb,
                    prompt="",
                    num_inference_steps=n,
                    guidance_scale=self.guidance_scale,
                    noise_level=self.noise_level,
                    generator=g,
                    output_type="pil",
                )
                out.append(result.images[0].convert("RGB"))
        return out


def _placeholder_image_encoder(dtype: torch.dtype) -> Any:
    """A 372-parameter CLIPVisionModelWithProjection: the pipeline reads its dtype, nothing else."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        hidden_size=4,
        intermediate_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        image_size=4,
        patch_size=4,
        projection_dim=4,
    )
    model: Any = CLIPVisionModelWithProjection(cfg)
    return model.to(dtype=dtype).eval()


def _embedding_dim(pipe: Any, name: str) -> int:
    """D of the image embeddings the pipeline takes; its UNet's class embedding takes 2 x D."""
    cfg = pipe.unet.config
    proj = getattr(cfg, "projection_class_embeddings_input_dim", None)
    if getattr(cfg, "class_embed_type", None) != "projection" or not proj or proj % 2:
        raise EncoderError(
            f"{name} is not a Stable unCLIP pipeline: its UNet has no projection class "
            "embedding of 2 x D inputs (image embedding + noise-level encoding)"
        )
    dim = int(proj) // 2
    norm_dim = int(pipe.image_normalizer.mean.shape[-1])
    if norm_dim != dim:
        raise EncoderError(
            f"{name} is inconsistent: its UNet takes {dim}-d image embeddings but its image "
            f"normaliser {norm_dim}-d ones"
        )
    return dim


def load_unclip(
    model: str | Path = UNCLIP_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    embedding_scale: float | None = None,
    noise_level: int = 0,
    guidance_scale: float = 10.0,
    pipeline: Any = None,
    dim: int | None = None,
    local_files_only: bool = False,
) -> UnCLIPGenerator:
    """Load Stable unCLIP as an ``ImageGenerator``.

    Args:
        model: a hub id or a local directory saved by ``save_pretrained``; hub weights come
            from the Hugging Face cache, else are downloaded at first use.
        device: "cpu" (default) or "cuda"; dtype: default fp16 on CUDA, fp32 on CPU.
        embedding_scale: norm the unit vectors are scaled to (default
            ``DEFAULT_EMBEDDING_SCALE``; see ``calibrate_embedding_scale``).
        noise_level: 0-999, noise added to the embedding (more: more varied images, further
            from the query). 0 keeps the query as it is.
        guidance_scale: classifier-free guidance against the all-zero (unconditional)
            embedding; the model's default is 10.
        pipeline: an already built ``StableUnCLIPImg2ImgPipeline`` (then ``model`` is only its
            name).
        dim: the encoder's embedding width, checked against the pipeline's.
        local_files_only: never reach the hub (the weights must be cached or local).
    """
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError("device 'cuda' was asked for but no CUDA GPU is available")
    dt = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    scale = DEFAULT_EMBEDDING_SCALE if embedding_scale is None else float(embedding_scale)
    if not np.isfinite(scale) or scale <= 0:
        raise EncoderError(f"embedding_scale must be a positive number, got {embedding_scale}")
    if not np.isfinite(guidance_scale) or guidance_scale < 0:
        raise EncoderError(f"guidance_scale must be 0 or more, got {guidance_scale}")
    name = f"unclip:{model}"
    if pipeline is None:
        pipeline = _load_pipeline(model, dt, local_files_only)
    pipeline = pipeline.to(dev)
    pipeline.set_progress_bar_config(disable=True)
    timesteps = int(pipeline.image_noising_scheduler.config.num_train_timesteps)
    if not 0 <= int(noise_level) < timesteps:
        raise EncoderError(f"noise_level must be in 0..{timesteps - 1}, got {noise_level}")
    d = _embedding_dim(pipeline, name)
    if dim is not None and dim != d:
        raise EncoderError(
            f"{name} takes {d}-d image embeddings but the encoder makes {dim}-d ones: "
            f"Stable unCLIP H needs imagebind_huge (1024-d, the OpenCLIP ViT-H/14 space); "
            "the demo model uses the demo decoder (--generator demo)"
        )
    log.info("loaded %s (%d-d embeddings); licence of its weights: %s", name, d, UNCLIP_LICENCE)
    return UnCLIPGenerator(pipeline, name, d, scale, int(noise_level), float(guidance_scale))


def _load_pipeline(model: str | Path, dtype: torch.dtype, local_files_only: bool) -> Any:
    try:
        from diffusers import StableUnCLIPImg2ImgPipeline
    except ImportError as e:
        raise EncoderError(f"{INSTALL_HINT} ({e})") from None
    log.info(
        "loading %s from the Hugging Face cache or hub (about 5 GB on first use); licence: %s",
        model,
        UNCLIP_LICENCE,
    )
    try:
        load: Any = StableUnCLIPImg2ImgPipeline.from_pretrained
        return load(
            str(model),
            image_encoder=_placeholder_image_encoder(dtype),  # never the 632M-param ViT-H
            feature_extractor=None,
            dtype=dtype,
            local_files_only=local_files_only,
        )
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EncoderError(
            f"cannot load Stable unCLIP from {str(model)!r}: {first} (a hub id such as "
            f"{UNCLIP_MODEL}, downloaded into the Hugging Face cache on first use, or a "
            "directory saved with save_pretrained)"
        ) from None
