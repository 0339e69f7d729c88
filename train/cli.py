"""``bindsearch demo world``, ``bindsearch demo eval`` and ``bindsearch train``.

Each command is a plain typed function (callable from Python) under a thin typer layer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from encoders.cli import fail as _fail
from encoders.errors import EncoderError
from world.world import write_demo_world

from .recipe import DEMO_PRESET

__all__ = [
    "DEMO_PRESET",
    "demo_app",
    "demo_weights_path",
    "run_demo_eval",
    "run_train",
    "train",
]

demo_app = typer.Typer(
    help="The demo world and the demo model trained on it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def demo_weights_path() -> Path:
    """The shipped demo weights (package data of ``encoders``)."""
    from encoders.weights import bundled_weights

    path = bundled_weights(DEMO_PRESET)
    if path is None:
        raise ValueError(f"no weights ship with {DEMO_PRESET}")
    return path


# ----------------------------------------------------------------------------- functions


def run_demo_eval(
    weights: Path | None = None,
    n: int = 600,
    seed: int = 1234,
    preset: str = DEMO_PRESET,
    threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate weights (default: the shipped weights of ``preset``) on a fresh held-out world."""
    import torch

    from encoders import load_encoder, resolve_model

    from .eval import best_arithmetic, check, evaluate

    if threads:
        torch.set_num_threads(threads)
    ref = resolve_model(preset, weights)
    enc = load_encoder(ref, device="cpu")
    report = evaluate(enc.model, n=n, seed=seed)
    if "arithmetic" in report:
        report["arithmetic_best"] = best_arithmetic(report["arithmetic"])[0]
    report["done_when_failures"] = check(report)
    report["weights"] = str(ref.weights)
    return report


def run_train(
    out: Path,
    preset: str = DEMO_PRESET,
    world: int = 6000,
    world_seed: int = 0,
    manifest: Path | None = None,
    stage1_steps: int = 2100,
    stage2_steps: int = 400,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_every: int = 100,
    resume: bool = False,
    threads: int | None = None,
    export: Path | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train (both stages) on a manifest of pairs, or else on an in-memory demo world.

    Writes ``out/checkpoint.pt`` as it goes, ``out/<preset>.safetensors`` (fp16) and
    ``out/train_log.json`` at the end; returns the log. ``device`` ("cpu", "cuda") is where
    the model trains (the data stay in CPU memory).
    """
    import time

    import torch

    from encoders.config import resolve_config

    from .recipe import TrainConfig, export_weights, from_manifest, from_world
    from .recipe import train as train_model

    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown --device {device!r}; accepted: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    cfg = resolve_config(preset)
    tc = TrainConfig(
        preset=preset,
        stage1_steps=stage1_steps,
        stage2_steps=stage2_steps,
        batch_size=batch_size,
        lr=lr,
        stage2_lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    if manifest is not None:
        data = from_manifest(manifest, cfg, progress=progress)
        source = f"manifest {manifest}"
    else:
        data = from_world(world, cfg, seed=world_seed, progress=progress)
        source = f"demo world n={world} seed={world_seed}"
    t_data = time.perf_counter() - t0
    result = train_model(
        data,
        tc,
        out,
        resume=resume,
        progress=progress,
        log=lambda s: typer.echo(s, err=True),
        device=str(dev),
    )
    target = export or (Path(out) / f"{preset}.safetensors")
    total = time.perf_counter() - t0
    log = {
        "source": source,
        "train_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(tc).items()},
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "seconds_data": round(t_data, 1),
        "seconds_train": round(result.seconds, 1),
        "seconds_total": round(total, 1),
        "loss_first": {k: v[:10] for k, v in result.losses.items()},
        "loss_last": {k: v[-10:] for k, v in result.losses.items()},
    }
    export_weights(result.model, target, metadata={"train": json.dumps(log)})
    log["weights"] = str(target)
    (Path(out) / "train_log.json").write_text(json.dumps(log, indent=1), encoding="utf-8")
    return log


# ----------------------------------------------------------------------------- typer layer


_ERRORS = (EncoderError, ValueError, KeyError, FileNotFoundError, OSError)


@demo_app.command("world")
def world(
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder to write into.")],
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 200,
    seed: Annotated[int, typer.Option(help="World seed.")] = 0,
    split: Annotated[
        str,
        typer.Option(help="test (every combination) or train (held-out combinations left out)."),
    ] = "test",
    preset: Annotated[
        str, typer.Option(help="Preset whose input sizes to render at.")
    ] = DEMO_PRESET,
) -> None:
    """Write the demo world as real files (PNG, 16-bit PNG, WAV, MP4, CSV) + manifest.jsonl."""
    if split not in ("train", "test"):
        _fail(f"--split must be train or test, got {split!r}")
    try:
        path = write_demo_world(out, n, seed, "train" if split == "train" else "test", preset)
    except _ERRORS as e:
        _fail(str(e).strip("'\""))
    typer.echo(f"wrote {n} samples; manifest {path}", err=True)


@demo_app.command("eval")
def eval_(
    weights: Annotated[
        Path | None, typer.Option(help="safetensors weights (default: the shipped demo weights).")
    ] = None,
    n: Annotated[int, typer.Option("--n", min=50, help="Held-out samples.")] = 600,
    seed: Annotated[int, typer.Option(help="Seed of the held-out world.")] = 1234,
    preset: Annotated[str, typer.Option(help="Architecture of the weights.")] = DEMO_PRESET,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Measure zero-shot, retrieval, emergent alignment and arithmetic on held-out data."""
    from .eval import format_report

    try:
        report = run_demo_eval(weights, n, seed, preset)
    except _ERRORS as e:
        _fail(str(e).strip("'\""))
    if as_json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    typer.echo(format_report(report))
    fails = report["done_when_failures"]
    typer.echo("done-when: all met" if not fails else "done-when misses:\n  " + "\n  ".join(fails))


def train(
    out: Annotated[
        Path,
        typer.Option(
            "-o", "--out", help="Folder for checkpoints, the log and the exported weights."
        ),
    ],
    preset: Annotated[str, typer.Option(help="Architecture to train.")] = DEMO_PRESET,
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="JSONL manifest of pairs (image, "
            "text, audio, ...); default: the demo "
            "world in memory."
        ),
    ] = None,
    world: Annotated[int, typer.Option(help="Demo-world samples to train on.")] = 6000,
    world_seed: Annotated[int, typer.Option(help="Demo-world seed.")] = 0,
    stage1_steps: Annotated[int, typer.Option(min=0, help="Image-text steps.")] = 2100,
    stage2_steps: Annotated[int, typer.Option(min=0, help="X-to-image steps.")] = 400,
    batch_size: Annotated[int, typer.Option(min=2)] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Training seed (init and batches).")] = 0,
    checkpoint_every: Annotated[
        int, typer.Option(min=0, help="Steps between checkpoints (0: only at stage ends).")
    ] = 100,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt.")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    export: Annotated[
        Path | None,
        typer.Option(help="Where to write the weights (default OUT/<preset>.safetensors)."),
    ] = None,
    device: Annotated[
        str, typer.Option(help="Where to train: cpu, cuda or cuda:N (data stay on the CPU).")
    ] = "cpu",
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Start from these weights: a preset with its weights (imagebind_demo, "
            "imagebind_huge) or a checkpoint file (with --config). Only --train-towers "
            "learn (stage 2, --stage2-steps steps); the rest stay bit-identical.",
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option("--config", help="Architecture of an --init checkpoint file."),
    ] = None,
    train_towers: Annotated[
        str | None,
        typer.Option(
            "--train-towers",
            help="With --init: the towers that learn, e.g. audio,imu (audio, depth, thermal, imu).",
        ),
    ] = None,
    reinit: Annotated[
        bool,
        typer.Option(
            "--reinit", help="With --init: re-initialise the --train-towers first (bind anew)."
        ),
    ] = False,
    lora_rank: Annotated[
        int,
        typer.Option(
            "--lora-rank",
            min=0,
            help="With --init: train rank-R adapters on the towers' trunk projections "
            "(plus their LayerNorms and biases) instead of every weight; 0: off.",
        ),
    ] = 0,
    lora_alpha: Annotated[
        float, typer.Option("--lora-alpha", help="LoRA scale numerator (scale alpha/R).")
    ] = 16.0,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            "--lora-targets",
            help="With --lora-rank: the trunk projections that get adapters, a comma list of "
            "qkv, out_proj, fc1, fc2. Default: all four.",
        ),
    ] = None,
    lora_norms: Annotated[
        bool,
        typer.Option(
            "--lora-norms/--no-lora-norms",
            help="With --lora-rank: the towers' LayerNorms and biases train in full next to "
            "the adapters (default), or only the adapters learn.",
        ),
    ] = True,
    keep_adapters: Annotated[
        bool,
        typer.Option(
            "--keep-adapters",
            help="With --lora-rank: keep the adapters apart (OUT/<name>.adapters.safetensors, "
            "merged at load) instead of merged into the exported weights.",
        ),
    ] = False,
    grad_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--grad-checkpointing/--no-grad-checkpointing",
            help="With --init: recompute trunk blocks in the backward pass (less memory). "
            "Default: on for trunks of 10M parameters or more.",
        ),
    ] = None,
) -> None:
    """Train an ImageBind model: image-text (stage 1), then each modality to images only.

    With --init, bind or fine-tune some towers of an existing model, everything else frozen.
    """
    lora = {
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "lora_targets": lora_targets,
        "lora_norms": lora_norms,
        "keep_adapters": keep_adapters,
        "grad_checkpointing": grad_checkpointing,
    }
    if init is not None or train_towers is not None or reinit or config is not None:
        _train_init(
            init, config, train_towers, reinit, out, manifest, world, world_seed, stage2_steps,
            batch_size, lr, seed, checkpoint_every, resume, threads, export, device, lora,
        )  # fmt: skip
        return
    lora_set = lora_rank or keep_adapters or lora_targets is not None or not lora_norms
    if lora_set or grad_checkpointing is not None:
        _fail(
            "--lora-rank, --lora-targets, --no-lora-norms, --keep-adapters and "
            "--grad-checkpointing are for --init WEIGHTS "
            "(adapting the towers of a trained model)"
        )
    try:
        log = run_train(
            out,
            preset,
            world,
            world_seed,
            manifest,
            stage1_steps,
            stage2_steps,
            batch_size,
            lr,
            seed,
            checkpoint_every,
            resume,
            threads,
            export,
            device=device,
        )
    except _ERRORS as e:
        _fail(str(e).strip("'\""))
    typer.echo(f"trained in {log['seconds_total']:.0f} s; weights {log['weights']}", err=True)


def _train_init(
    init: str | None,
    config: str | None,
    train_towers: str | None,
    reinit: bool,
    out: Path,
    manifest: Path | None,
    world: int,
    world_seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    checkpoint_every: int,
    resume: bool,
    threads: int | None,
    export: Path | None,
    device: str,
    lora: dict[str, Any],
) -> None:
    from .init import TRAINABLE_TOWERS, run_train_init

    if init is None:
        _fail("--train-towers, --reinit and --config need --init WEIGHTS (the model to start from)")
    if train_towers is None:
        _fail(f"--init needs --train-towers (a comma list of {', '.join(TRAINABLE_TOWERS)})")
    try:
        card = run_train_init(
            init,
            out,
            train_towers,
            config=config,
            reinit=reinit,
            world=world,
            world_seed=world_seed,
            manifest=manifest,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            checkpoint_every=checkpoint_every,
            resume=resume,
            threads=threads,
            export=export,
            device=device,
            log=lambda s: typer.echo(s, err=True),
            **lora,
        )
    except _ERRORS as e:
        _fail(str(e).strip("'\""))
    typer.echo(
        f"trained {', '.join(card['towers_changed'])} in {card['seconds_total']:.0f} s; "
        f"weights {card['path']} (licence: {card['licence']})",
        err=True,
    )


# `bindsearch demo eval-generate`: the demo decoder (train/decoder.py) judged on held-out data.
from .decoder import eval_generate_cmd  # noqa: E402

demo_app.command("eval-generate")(eval_generate_cmd)
