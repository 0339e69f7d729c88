"""A tiny random Stable unCLIP pipeline, built offline and saved like a hub snapshot.

Same classes and wiring as ``stabilityai/stable-diffusion-2-1-unclip`` (UNet with a projection
class embedding of 2 x D inputs, a KL autoencoder, a CLIP text model and tokenizer, the image
normaliser and the two schedulers), at toy sizes: it makes 16 x 16 images in well under a
second per step on one CPU core. The tokenizer is built from a vocabulary and merges written
here, so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAMPLE = 8  # latent side; the VAE below upsamples by 2 -> 16 x 16 images


def _tokenizer(tmp: Path):  # type: ignore[no-untyped-def]
    from transformers import CLIPTokenizer

    # A byte-level BPE vocabulary: every printable byte character, a few merges, the specials.
    chars = [chr(c) for c in range(33, 127)] + [c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz"]
    merges = ["a b</w>", "d o", "do g</w>"]
    merged = ["ab</w>", "do", "dog</w>"]
    tokens = [*chars, *merged, "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (tmp / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=16)
    tok.pad_token = "<|endoftext|>"
    return tok, len(vocab)


def build_tiny_unclip(out: Path, dim: int, seed: int = 0) -> Path:
    """Save a random Stable unCLIP pipeline taking ``dim``-d image embeddings to ``out``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableUnCLIPImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    tmp = out.with_name(out.name + "-tokenizer")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab_size = _tokenizer(tmp)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=16,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=SAMPLE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=2,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * dim,  # embedding + noise-level encoding
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * SAMPLE,
    )
    # The real repository's image encoder; the generator never loads it.
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
            projection_dim=dim,
        )
    )
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 8}, crop_size=8),
        image_encoder=vision,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=dim),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=text,
        unet=unet,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        vae=vae,
    )
    pipe.save_pretrained(out)
    return out
