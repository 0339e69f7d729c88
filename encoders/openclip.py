"""OpenCLIP's own state-dict layout -> our vision and text towers (``openclip_vit_h14_bind``).

ImageBind's image and text towers are OpenCLIP ViT-H-14's, so open_clip's published weights
(MIT) fill them directly. The key table, with its transposes and the patch kernel, is in
docs/training.md ("OpenCLIP ViT-H-14 as the image and text towers").

The one change of form is the patch kernel: open_clip patchifies an image with a 2-D kernel
(D, 3, 14, 14); our vision stem repeats a still image into ``kt`` frames and applies a
(D, 3, kt, 14, 14) kernel of temporal stride ``kt``. Putting ``w / kt`` in every temporal slice
gives, for a still image, ``sum_t (w / kt) * x = w * x``: the 2-D convolution. With kt = 2 the
halves are exact in binary floating point, so the sum is the 2-D kernel bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .config import ModelConfig
from .errors import CheckpointError

__all__ = ["openclip_shapes", "openclip_to_bindsearch"]

# One transformer block: open_clip's ResidualAttentionBlock -> our Block.
_BLOCK = {
    "ln_1.weight": "norm_1.weight",
    "ln_1.bias": "norm_1.bias",
    "attn.in_proj_weight": "attn.in_proj_weight",
    "attn.in_proj_bias": "attn.in_proj_bias",
    "attn.out_proj.weight": "attn.out_proj.weight",
    "attn.out_proj.bias": "attn.out_proj.bias",
    "ln_2.weight": "norm_2.weight",
    "ln_2.bias": "norm_2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# Buffers some open_clip files carry (the text causal mask, not a parameter): checked, dropped.
_IGNORED = ("attn_mask",)

_V, _T = "modality_preprocessors.vision.", "modality_preprocessors.text."


def _block_shapes(prefix: str, width: int, mlp_ratio: int) -> dict[str, tuple[int, ...]]:
    hidden = mlp_ratio * width
    return {
        f"{prefix}ln_1.weight": (width,),
        f"{prefix}ln_1.bias": (width,),
        f"{prefix}attn.in_proj_weight": (3 * width, width),
        f"{prefix}attn.in_proj_bias": (3 * width,),
        f"{prefix}attn.out_proj.weight": (width, width),
        f"{prefix}attn.out_proj.bias": (width,),
        f"{prefix}ln_2.weight": (width,),
        f"{prefix}ln_2.bias": (width,),
        f"{prefix}mlp.c_fc.weight": (hidden, width),
        f"{prefix}mlp.c_fc.bias": (hidden,),
        f"{prefix}mlp.c_proj.weight": (width, hidden),
        f"{prefix}mlp.c_proj.bias": (width,),
    }


def _check_config(cfg: ModelConfig) -> None:
    kt, kh, kw = cfg.vision_patch
    if cfg.preprocess.video_frames != kt:
        raise ValueError(
            f"open_clip weights need one temporal patch per image (video_frames == "
            f"vision_patch[0]); this config has {cfg.preprocess.video_frames} frames and "
            f"a temporal patch of {kt}"
        )
    if cfg.preprocess.image_size % kh or cfg.preprocess.image_size % kw:
        raise ValueError(
            f"image size {cfg.preprocess.image_size} is not a multiple of the patch ({kh}, {kw})"
        )


def openclip_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key and shape of an open_clip CLIP state dict whose towers fit ``cfg``.

    The image tower is open_clip's ``VisionTransformer`` (``visual.*``), the text tower the
    CLIP model's own (top-level ``token_embedding``, ``transformer``, ...), with ``logit_scale``.
    """
    _check_config(cfg)
    v, t, p = cfg.vision, cfg.text, cfg.preprocess
    _, kh, kw = cfg.vision_patch
    grid = (p.image_size // kh) * (p.image_size // kw)
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (v.width, 3, kh, kw),
        "visual.class_embedding": (v.width,),
        "visual.positional_embedding": (grid + 1, v.width),
        "visual.ln_pre.weight": (v.width,),
        "visual.ln_pre.bias": (v.width,),
    }
    for i in range(v.depth):
        shapes |= _block_shapes(f"visual.transformer.resblocks.{i}.", v.width, v.mlp_ratio)
    shapes |= {
        "visual.ln_post.weight": (v.width,),
        "visual.ln_post.bias": (v.width,),
        "visual.proj": (v.width, cfg.embed_dim),
        "token_embedding.weight": (p.vocab_size, t.width),
        "positional_embedding": (p.context_length, t.width),
    }
    for i in range(t.depth):
        shapes |= _block_shapes(f"transformer.resblocks.{i}.", t.width, t.mlp_ratio)
    shapes |= {
        "ln_final.weight": (t.width,),
        "ln_final.bias": (t.width,),
        "text_projection": (t.width, cfg.embed_dim),
        "logit_scale": (),
    }
    return shapes


def _check(sd: Mapping[str, Tensor], cfg: ModelConfig) -> None:
    """One ``CheckpointError`` line naming the first wrong key and what was expected."""
    expected = openclip_shapes(cfg)
    ctx = cfg.preprocess.context_length
    problems: list[str] = []
    for key, shape in expected.items():
        if key not in sd:
            problems.append(f"lacks key {key!r} (expected shape {shape})")
        elif tuple(sd[key].shape) != shape:
            problems.append(f"has {key!r} of shape {tuple(sd[key].shape)}, expected {shape}")
    for key in sd:
        if key in expected:
            continue
        if key in _IGNORED and tuple(sd[key].shape) == (ctx, ctx):
            continue
        problems.append(
            f"has unexpected key {key!r} (expected only open_clip's visual.*, token_embedding, "
            "positional_embedding, transformer.*, ln_final, text_projection and logit_scale)"
        )
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"not an open_clip checkpoint of this architecture (vision {cfg.vision.width}x"
            f"{cfg.vision.depth}, text {cfg.text.width}x{cfg.text.depth}, embed {cfg.embed_dim}): "
            f"it {problems[0]}{more}"
        )


def openclip_to_bindsearch(sd: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """An open_clip ViT state dict -> the vision and text tower keys of our model for ``cfg``.

    Checks every key and shape first (``CheckpointError``, one line). Tensors that need no
    change are passed through, not copied; the text causal mask (a buffer of ours) is made
    here in the dtype of the weights.
    """
    _check(sd, cfg)
    kt = cfg.vision_patch[0]
    out: dict[str, Tensor] = {}

    # Vision: stem, trunk, head (the vision postprocessor has no parameters).
    w2d = sd["visual.conv1.weight"]  # (D, 3, kh, kw)
    out[f"{_V}rgbt_stem.proj.1.weight"] = (w2d / kt).unsqueeze(2).repeat(1, 1, kt, 1, 1)
    out[f"{_V}cls_token"] = sd["visual.class_embedding"].view(1, 1, -1)  # (1, 1, D)
    out[f"{_V}pos_embedding_helper.pos_embed"] = sd["visual.positional_embedding"].unsqueeze(0)
    out["modality_trunks.vision.pre_transformer_layer.0.weight"] = sd["visual.ln_pre.weight"]
    out["modality_trunks.vision.pre_transformer_layer.0.bias"] = sd["visual.ln_pre.bias"]
    out |= _blocks(sd, "visual.transformer", "modality_trunks.vision", cfg.vision.depth)
    out["modality_heads.vision.0.weight"] = sd["visual.ln_post.weight"]
    out["modality_heads.vision.0.bias"] = sd["visual.ln_post.bias"]
    # open_clip computes x @ proj; a Linear computes x @ weight.T.
    out["modality_heads.vision.2.weight"] = sd["visual.proj"].t().contiguous()  # (E, D)

    # Text: stem (with its causal mask), trunk, head, learnable logit scale.
    pos = sd["positional_embedding"]  # (L, D)
    L = pos.shape[0]
    out[f"{_T}token_embedding.weight"] = sd["token_embedding.weight"]
    out[f"{_T}pos_embed"] = pos.unsqueeze(0)  # (1, L, D)
    out[f"{_T}mask"] = torch.full((L, L), float("-inf"), dtype=pos.dtype).triu(1)
    out |= _blocks(sd, "transformer", "modality_trunks.text", cfg.text.depth)
    out["modality_heads.text.proj.0.weight"] = sd["ln_final.weight"]
    out["modality_heads.text.proj.0.bias"] = sd["ln_final.bias"]
    out["modality_heads.text.proj.1.weight"] = sd["text_projection"].t().contiguous()  # (E, D)
    # Both are the log of the scale, clamped at 100 after exp: the same parameter.
    out["modality_postprocessors.text.1.log_logit_scale"] = sd["logit_scale"]
    return out


def _blocks(sd: Mapping[str, Tensor], theirs: str, ours: str, depth: int) -> dict[str, Tensor]:
    """A trunk's ``depth`` blocks: ``<theirs>.resblocks.i.*`` -> ``<ours>.blocks.i.*``."""
    return {
        f"{ours}.blocks.{i}.{dst}": sd[f"{theirs}.resblocks.{i}.{src}"]
        for i in range(depth)
        for src, dst in _BLOCK.items()
    }
