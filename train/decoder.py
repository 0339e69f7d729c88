"""Training and judging the demo decoder (embedding -> image), ``bindsearch train-decoder``.

Recipe: render demo-world training images (the train split: held-out (class, scene) pairs are
never drawn), embed them once with the FROZEN demo vision tower, and train
``generate.decoder.ImageDecoder`` to rebuild each image from its unit embedding:

- a pixel loss (L1 on [0, 1] pixels), which alone gives the average image of everything that
  embeds alike, and
- an embedding-consistency loss, 1 - cos(vision(decoded), embedding), through the frozen vision
  tower: it pushes the decoded image to carry what the encoder sees (class pattern, colour,
  scene, size) rather than a blur of it.
- Input noise: each training embedding is jittered (Gaussian, then renormalised) so the decoder
  also decodes vectors that are near, not on, the image embeddings: those of sounds, depth maps
  and thermal frames (the "modality gap") and weighted mixes.

Judging (``evaluate_decoder``, ``bindsearch demo eval-generate``): on a held-out test world,
images are generated from the AUDIO, thermal, depth (and, as the reference, image) embeddings,
embedded again with the demo's own vision tower, and each factor is classified zero-shot by the
nearest text-prompt ensemble (``train.eval.prompt_classifiers``); accuracy is against the source
sample's factors, on the factors that modality perceives (``world.PERCEIVES``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import Tensor
from tqdm.auto import tqdm

from encoders.cli import fail as _fail
from encoders.errors import EncoderError
from encoders.model import ImageBind
from generate.decoder import (
    DecoderConfig,
    DemoDecoder,
    ImageDecoder,
    load_demo_decoder,
    save_decoder,
)
from world.world import (
    FACTORS,
    PERCEIVES,
    centred_images,
    generate,
    image_batch,
    to_model_inputs,
)

from .recipe import DEMO_PRESET

__all__ = [
    "EVAL_SOURCES",
    "canonical_images",
    "decoder_bars",
    "eval_generate_cmd",
    "evaluate_decoder",
    "format_decoder_report",
    "train_decoder",
    "train_decoder_cmd",
    "write_grid",
]

# Modalities images are generated from in the evaluation (vision: the reconstruction reference).
EVAL_SOURCES = ("vision", "audio", "thermal", "depth")


def _load_vision(
    checkpoint: str | Path | None, preset: str, towers: Sequence[str]
) -> tuple[ImageBind, Path, str]:
    """The frozen demo model (only ``towers``), the path its weights came from, their sha256."""
    from encoders import load_encoder, resolve_model

    # The reference holds the sha256 and the load is checked against it: the sha256 recorded
    # with the decoder is that of the weights actually loaded, even if the file is replaced.
    ref = resolve_model(preset, checkpoint)
    if ref.weights is None or ref.sha256 is None:
        raise ValueError(f"the decoder is trained against real weights; {preset} has none")
    enc = load_encoder(ref, device="cpu", dtype=torch.float32, modalities=towers)
    model = enc.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ref.weights, ref.sha256


def _normalise(pixels: Tensor, model: ImageBind) -> Tensor:
    """(B, 3, s, s) [0, 1] pixels -> the vision tower's (B, 3, S, S) input (resized if s != S)."""
    p = model.cfg.preprocess
    if pixels.shape[-1] != p.image_size:
        pixels = F.interpolate(pixels, size=p.image_size, mode="bilinear", align_corners=False)
    mean = torch.tensor(p.image_mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(p.image_std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def _embed(model: ImageBind, tower: str, x: Tensor, batch: int = 256) -> Tensor:
    return torch.cat(
        [
            model.embed_one(tower, x[i : i + batch], scaled=False).float()
            for i in range(0, len(x), batch)
        ]
    )


def canonical_images(
    factors: dict[str, np.ndarray], size: int, rng: np.random.Generator
) -> np.ndarray:
    """(n, S, S, 3) uint8: each sample's object, centred, unshaded, in its scene.

    The decoder's pixel target. Where an object stands is in no caption and the embedding
    barely carries it, so regressing the real image would teach the mean over positions: a
    blur in which shape and pattern are lost. The centred rendering keeps everything the
    embedding does carry (class shape and pattern, colour, scene, size from distance, haze),
    drawn by the world's own renderer. Scene textures stay random (their average is learned).
    """
    return centred_images(factors, size, rng)


def _jitter(z: Tensor, sigma: float, gen: torch.Generator) -> Tensor:
    """Unit vectors moved by Gaussian noise of expected norm ``sigma``, renormalised."""
    if sigma <= 0:
        return z
    noise = torch.randn(z.shape, generator=gen) * (sigma / math.sqrt(z.shape[1]))
    return F.normalize(z + noise, dim=1)


def train_decoder(
    checkpoint: str | Path | None,
    out: str | Path,
    *,
    world_size: int = 6000,
    steps: int = 1400,
    batch: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int | None = 1,
    image_size: int = 64,
    channels: Sequence[int] | None = None,
    convs: int = 0,
    consistency: float = 0.0,
    embed_noise: float = 0.3,
    world_seed: int = 0,
    preset: str = DEMO_PRESET,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a decoder against the frozen vision tower of ``checkpoint``; write ``out``.

    Args:
        checkpoint: demo encoder weights (None: the shipped default).
        out: the decoder's safetensors file (fp16; config and encoder sha256 in its metadata);
            a ``.json`` log is written next to it.
        world_size: demo-world training images, rendered in memory and embedded once.
        consistency: weight of the embedding-consistency term (0: pixel loss only).
        embed_noise: expected norm of the Gaussian jitter added to each unit embedding.
    Returns the log (losses, timings, config).
    """
    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    if steps < 1 or batch < 1 or world_size < batch:
        raise ValueError(
            f"need steps >= 1, batch >= 1 and world_size >= batch; got {steps}, {batch}, "
            f"{world_size}"
        )
    model, enc_path, enc_sha = _load_vision(checkpoint, preset, ["vision"])
    p = model.cfg.preprocess
    depth = round(math.log2(image_size / 4)) if image_size >= 8 else 0
    default = (256, 128, 96, 64, 48, 32)
    cfg = DecoderConfig(
        dim=model.cfg.embed_dim,
        image_size=image_size,
        channels=tuple(channels) if channels is not None else default[:depth],
        convs=convs,
    )

    # -- data: images and their (frozen) embeddings, computed once
    world = generate(
        world_size, p, seed=world_seed, split="train", video_frames=1, progress=progress
    )
    x = image_batch(world.image, p)  # (N, 3, S, S) normalised model input
    z_all = _embed(model, "vision", x)  # (N, D) unit
    canon = canonical_images(world.factors, p.image_size, np.random.default_rng([world_seed, 5]))
    target = torch.from_numpy(canon).permute(0, 3, 1, 2).float().div(255)  # (N, 3, S, S)
    if image_size != p.image_size:
        target = F.interpolate(target, size=image_size, mode="area")
    del world, x
    t_data = time.perf_counter() - t0

    # -- training
    torch.manual_seed(seed)
    dec = ImageDecoder(cfg)
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm)
            * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        ),
    )
    gen = torch.Generator().manual_seed(seed)
    losses: dict[str, list[float]] = {"pixel": [], "consistency": [], "total": []}
    bar = tqdm(range(steps), desc="decoder", unit="step", disable=not progress)
    dec.train()
    for _ in bar:
        idx = torch.randint(0, len(z_all), (batch,), generator=gen)
        z = _jitter(z_all[idx], embed_noise, gen)
        y = dec(z)  # (B, 3, s, s)
        pix = (y - target[idx]).abs().mean()
        loss = pix
        cons = torch.zeros(())
        if consistency > 0:
            e = F.normalize(model.head_features("vision", _normalise(y, model)), dim=-1)
            cons = 1 - (e * z_all[idx]).sum(1).mean()  # against the clean embedding
            loss = pix + consistency * cons
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses["pixel"].append(pix.item())
        losses["consistency"].append(cons.item())
        losses["total"].append(loss.item())
        bar.set_postfix(pix=f"{losses['pixel'][-1]:.4f}", cons=f"{losses['consistency'][-1]:.3f}")
    bar.close()
    dec.eval()
    t_train = time.perf_counter() - t0 - t_data

    log: dict[str, Any] = {
        "encoder": str(enc_path),
        "encoder_sha256": enc_sha,
        "decoder_config": json.loads(cfg.to_json()),
        "world_size": world_size,
        "world_seed": world_seed,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "consistency": consistency,
        "embed_noise": embed_noise,
        "threads": torch.get_num_threads(),
        "params": sum(q.numel() for q in dec.parameters()),
        "seconds_data": round(t_data, 1),
        "seconds_train": round(t_train, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "loss_first": {k: v[:10] for k, v in losses.items()},
        "loss_last": {k: v[-10:] for k, v in losses.items()},
    }
    path = save_decoder(
        dec, out, trained_for=log["encoder_sha256"], metadata={"train": json.dumps(log)}
    )
    log["decoder"] = str(path)
    log["bytes"] = path.stat().st_size
    path.with_suffix(".json").write_text(json.dumps(log, indent=1), encoding="utf-8")
    log["losses"] = losses
    return log


# ----------------------------------------------------------------------------- evaluation


def evaluate_decoder(
    decoder: DemoDecoder | str | Path | None = None,
    checkpoint: str | Path | None = None,
    *,
    n: int = 600,
    seed: int = 1234,
    sources: Sequence[str] = EVAL_SOURCES,
    preset: str = DEMO_PRESET,
    batch: int = 200,
) -> dict[str, Any]:
    """Generate from each source modality of a held-out world and judge with the vision tower.

    Args:
        decoder: a loaded decoder or its weights (None: the shipped one).
        checkpoint: the demo encoder weights (None: the shipped default).
    Returns accuracies per source modality and factor (``generated``), the same judge on the
    real source images (``real_images``, the ceiling), chance per factor, and the held-out
    (class, scene) split of each.
    """
    from .eval import prompt_classifiers

    towers = list(dict.fromkeys(["vision", "text", *sources]))
    model, enc_path, enc_sha = _load_vision(checkpoint, preset, towers)
    dec = decoder if isinstance(decoder, DemoDecoder) else load_demo_decoder(decoder)
    if dec.info.dim != model.cfg.embed_dim:
        raise EncoderError(
            f"the decoder takes {dec.info.dim}-d embeddings; "
            f"the encoder gives {model.cfg.embed_dim}"
        )
    p = model.cfg.preprocess
    world = generate(n, p, seed=seed, split="test", video_frames=1)
    inputs = to_model_inputs(world, p, modalities=[*sources, "vision"])
    clf = prompt_classifiers(model, motion=False)
    f = world.factors
    held = world.held_out()

    def judge(pixels: np.ndarray) -> dict[str, np.ndarray]:
        """(n, s, s, 3) uint8 -> predicted value per factor, (n,) each."""
        t = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
        e = _embed(model, "vision", _normalise(t, model)).numpy()
        return {k: (e @ c.T).argmax(1) for k, c in clf.items()}

    def scores(pred: dict[str, np.ndarray], factors: Sequence[str]) -> dict[str, Any]:
        acc = {k: float(np.mean(pred[k] == f[k])) for k in factors}
        acc_held = (
            {k: float(np.mean(pred[k][held] == f[k][held])) for k in factors} if held.any() else {}
        )
        return {"accuracy": acc, "held_out": acc_held}

    all_img = ("class", "colour", "scene", "distance")
    report: dict[str, Any] = {
        "n": n,
        "seed": seed,
        "held_out_samples": int(held.sum()),
        "encoder": str(enc_path),
        "encoder_sha256": enc_sha,
        "decoder_image_size": dec.info.image_size,
        "decoder_trained_for": dec.trained_for,
        "paired": dec.trained_for == enc_sha,
        "chance": {k: 1.0 / len(FACTORS[k]) for k in all_img},
        "real_images": scores(judge(world.image), all_img),
        "generated": {},
    }
    for m in sources:
        z = _embed(model, m, inputs[m]).numpy()
        pixels = np.concatenate([dec.decode(z[i : i + batch]) for i in range(0, len(z), batch)])
        factors = all_img if m == "vision" else PERCEIVES[m]
        report["generated"][m] = scores(judge(pixels), factors)
    return report


def write_grid(
    out: str | Path,
    decoder: DemoDecoder | str | Path | None = None,
    checkpoint: str | Path | None = None,
    *,
    n: int = 6,
    seed: int = 1234,
    sources: Sequence[str] = EVAL_SOURCES,
    scale: int = 2,
    preset: str = DEMO_PRESET,
) -> Path:
    """A PNG grid, one held-out sample per row: its real image, then the image generated from
    each of ``sources`` (columns in that order), upscaled ``scale`` x (nearest), stored with
    a 256-colour palette (a quarter of the bytes; for looking at, not for measuring)."""
    from PIL import Image

    model, _, _ = _load_vision(checkpoint, preset, list(dict.fromkeys(["vision", *sources])))
    dec = decoder if isinstance(decoder, DemoDecoder) else load_demo_decoder(decoder)
    p = model.cfg.preprocess
    world = generate(n, p, seed=seed, split="test", video_frames=1)
    inputs = to_model_inputs(world, p, modalities=list(sources))
    S = p.image_size
    cols = [world.image]  # each (n, S, S, 3) uint8
    for m in sources:
        img = dec.decode(_embed(model, m, inputs[m]).numpy())
        if img.shape[1] != S:
            img = np.stack([np.asarray(Image.fromarray(a).resize((S, S))) for a in img])
        cols.append(img)
    grid = np.concatenate([np.concatenate([c[i] for c in cols], axis=1) for i in range(n)])
    im = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), 0)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.quantize(256).save(path, optimize=True)
    return path


def format_decoder_report(report: dict[str, Any]) -> str:
    """Human-readable lines of ``evaluate_decoder``'s report."""
    ch = report["chance"]
    lines = [
        f"generated images judged by the demo vision tower, {report['n']} held-out samples "
        f"(seed {report['seed']}; {report['held_out_samples']} of unseen (class, scene) pairs)",
        "accuracy (chance in brackets) [held-out pairs only]:",
    ]
    if not report.get("paired", True):
        lines.insert(
            1,
            "WARNING: the decoder was trained against other encoder weights "
            f"(sha256 {str(report['decoder_trained_for'])[:12]}...): retrain it",
        )
    rows = [("real image", report["real_images"])]
    rows += [(f"from {m}", v) for m, v in report["generated"].items()]
    for name, v in rows:
        cells = ", ".join(
            f"{k} {a:.3f} ({ch[k]:.2f}) [{v['held_out'].get(k, float('nan')):.3f}]"
            for k, a in v["accuracy"].items()
        )
        lines.append(f"  {name:12s} {cells}")
    return "\n".join(lines)


def decoder_bars(report: dict[str, Any], scene: float = 0.8, x_chance: float = 3.0) -> list[str]:
    """The issue's bars that ``report`` misses: from audio, scene >= 0.8, class >= 3x chance."""
    fails = []
    aud = report["generated"].get("audio")
    if aud is None:
        return ["no audio row in the report"]
    if aud["accuracy"]["scene"] < scene:
        fails.append(f"audio -> image scene {aud['accuracy']['scene']:.3f} < {scene}")
    bar = x_chance * report["chance"]["class"]
    if aud["accuracy"]["class"] < bar:
        fails.append(f"audio -> image class {aud['accuracy']['class']:.3f} < {bar:.3f}")
    return fails


# ----------------------------------------------------------------------------- typer layer


def train_decoder_cmd(
    out: Annotated[
        Path,
        typer.Option(
            "-o", "--out", help="Decoder weights to write (.safetensors; log next to it)."
        ),
    ],
    checkpoint: Annotated[
        Path | None, typer.Option(help="Demo encoder weights (default: the shipped ones).")
    ] = None,
    world: Annotated[int, typer.Option(min=2, help="Demo-world training images.")] = 6000,
    steps: Annotated[int, typer.Option(min=1)] = 1400,
    batch: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine).")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Init and batch seed.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 1,
    image_size: Annotated[int, typer.Option(help="Output side: 64 or 32.")] = 64,
    consistency: Annotated[
        float, typer.Option(min=0.0, help="Weight of the embedding-consistency loss.")
    ] = 0.0,
    embed_noise: Annotated[
        float, typer.Option(min=0.0, help="Norm of the jitter added to training embeddings.")
    ] = 0.3,
) -> None:
    """Train the demo decoder (image embedding -> image) against the frozen demo vision tower."""
    try:
        log = train_decoder(
            checkpoint,
            out,
            world_size=world,
            steps=steps,
            batch=batch,
            lr=lr,
            seed=seed,
            threads=threads,
            image_size=image_size,
            consistency=consistency,
            embed_noise=embed_noise,
        )
    except (EncoderError, ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(
        f"trained in {log['seconds_total']:.0f} s; decoder {log['decoder']} ({log['bytes']} bytes)",
        err=True,
    )


def eval_generate_cmd(
    decoder: Annotated[
        Path | None, typer.Option(help="Decoder weights (default: the shipped ones).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Demo encoder weights (default: the shipped ones).")
    ] = None,
    n: Annotated[int, typer.Option("--n", min=20, help="Held-out samples.")] = 600,
    seed: Annotated[int, typer.Option(help="Seed of the held-out world.")] = 1234,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    grid: Annotated[
        Path | None,
        typer.Option(
            help="Also write a PNG: per sample, its image, then generated from "
            + ", ".join(EVAL_SOURCES)
            + "."
        ),
    ] = None,
) -> None:
    """Generate images from held-out audio/thermal/depth/image embeddings and judge them."""
    import sys

    try:
        report = evaluate_decoder(decoder, checkpoint, n=n, seed=seed)
        if grid is not None:
            report["grid"] = str(write_grid(grid, decoder, checkpoint, seed=seed))
    except (EncoderError, ValueError, OSError) as e:
        _fail(str(e))
    report["bar_failures"] = decoder_bars(report)
    if as_json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    typer.echo(format_decoder_report(report))
    fails = report["bar_failures"]
    typer.echo(
        "bars (audio scene >= 0.8, class >= 3x chance): "
        + ("met" if not fails else "missed: " + "; ".join(fails))
    )
