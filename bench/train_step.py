"""What one stage-2 training step of a tower costs: seconds, samples/s, memory, FLOPs (issue #21).

Builds a preset's architecture with random weights (``imagebind_huge`` by default: no download
needed; the cost of a step does not depend on the weights' values) holding the tower to train
and the frozen vision tower, caches the anchor embeddings of a batch of images once with the
frozen vision tower (``train.recipe.cache_embeddings``, as stage 2 does), then times the step
``bindsearch train --init ... --train-towers TOWER`` runs: the tower's forward on real input
shapes (audio: 3 clips per sample), the recipe's ``info_nce`` against the cached anchors,
backward and the AdamW step over the parameters that learn (``freeze_except``, or LoRA
adapters with ``--lora-rank``: ``add_adapters`` + ``set_lora_trainable``).

It reports the median seconds per step after warm-up, samples/s, the step's FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; with
``--grad-checkpointing`` the recomputed forward is counted too), the achieved FLOP/s over a
square fp32 ``torch.mm``'s timed in the same run, and the memory: peak RSS on a CPU
(``getrusage``, the whole process, frozen vision tower included) or the CUDA peak allocated.
From the FLOPs per sample, seconds per 1000 pairs per epoch follow at the measured rate.

    .venv/bin/python -m bench.train_step                        # audio, full fine-tune, batch 2
    .venv/bin/python -m bench.train_step --lora-rank 8
    .venv/bin/python -m bench.train_step --tower imu --batch 4
    python -m bench.train_step --device cuda --batch 32        # bf16 autocast, as train does

Results go to ``bench/results/train_step_<device>.json``: one entry per setting, keyed by
tower, batch, LoRA rank and checkpointing, so several runs fill one file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import json
import resource
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench._common import log, machine_info, matmul_peak, time_fn, write_json
from bench.throughput import example
from encoders.config import ModelConfig, resolve_config
from encoders.model import ImageBind, Trunk, init_weights
from train.recipe import (
    STAGE2_MODALITIES,
    PairedData,
    cache_embeddings,
    freeze_except,
    info_nce,
    trainable_optimizer,
)

RESULTS = Path(__file__).resolve().parent / "results"
ANCHOR = "vision"  # the frozen tower whose cached embeddings are the targets


def build(
    cfg: ModelConfig,
    tower: str,
    batch: int,
    lora_rank: int = 0,
    grad_checkpointing: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[ImageBind, torch.Tensor, torch.Tensor, torch.optim.AdamW, dict[str, float]]:
    """The model (``tower`` learning, vision frozen), its input, the cached anchors, AdamW, and
    what caching an anchor cost (one frozen vision forward per image, once per training run)."""
    model = ImageBind(cfg, [tower, ANCHOR], device="meta").to_empty(device="cpu")
    init_weights(model, seed=seed)
    if lora_rank:
        from train.lora import add_adapters, set_lora_trainable

        add_adapters(model, [tower], lora_rank, alpha=16.0, seed=seed)
        set_lora_trainable(model, [tower])
    else:
        freeze_except(model, [tower])
    trunk: Trunk = model.modality_trunks[tower]  # type: ignore[assignment]
    trunk.grad_checkpointing = grad_checkpointing
    model.to(device)
    images = example(cfg, ANCHOR, batch, seed=seed + 1)
    data = PairedData({ANCHOR: images})
    counter = FlopCounterMode(display=False)
    with counter:
        anchors = cache_embeddings(model, data, ANCHOR).to(device)
    sec = time_fn(lambda: cache_embeddings(model, data, ANCHOR), warmup=0, reps=1).median_s
    cost = {"flops_per_image": counter.get_total_flops() / batch, "seconds_per_image": sec / batch}
    x = example(cfg, tower, batch, seed=seed).to(device)
    model.train()
    return model, x, anchors, trainable_optimizer(model, lr=1e-4, weight_decay=0.05), cost


def step_fn(
    model: ImageBind,
    tower: str,
    x: torch.Tensor,
    anchors: torch.Tensor,
    opt: torch.optim.Optimizer,
    device: str = "cpu",
) -> Callable[[], float]:
    """One stage-2 step as ``train.recipe.train`` runs it; returns the loss."""
    amp = torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda"))

    def step() -> float:
        with amp:
            emb = model.embed_one(tower, x, scaled=False)
        scale = model.logit_scale(tower)
        if scale is None:
            raise ValueError(f"the {tower} tower has no logit scale")
        loss = info_nce(emb.float(), anchors, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def _rss_mb() -> float:
    """This process's resident memory now (MB), from /proc (0 where unreadable)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def matmul_rate(n: int, device: str, reps: int = 3) -> float:
    """FLOP/s of a square fp32 ``torch.mm`` on ``device`` (median of ``reps`` after warm-up)."""
    if not device.startswith("cuda"):
        return matmul_peak(n, torch.float32, warmup=1, reps=reps)[0]
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def fn() -> None:
        torch.mm(a, b)
        torch.cuda.synchronize()

    return 2 * n**3 / time_fn(fn, warmup=1, reps=reps).median_s


def bench_step(
    preset: str | ModelConfig = "imagebind_huge",
    tower: str = "audio",
    batch: int = 2,
    lora_rank: int = 0,
    grad_checkpointing: bool = False,
    device: str = "cpu",
    reps: int = 3,
    warmup: int = 1,
    matmul_n: int = 2048,
) -> dict[str, Any]:
    """Time ``reps`` training steps of ``tower`` after ``warmup``; every figure of one setting.

    Also returns, under ``"check"``, whether the trained tower's parameters changed and the
    frozen vision tower's did not (what a step must do), so that a test can read it.
    """
    if tower not in STAGE2_MODALITIES:
        raise ValueError(f"unsupported tower {tower!r}; accepted: {', '.join(STAGE2_MODALITIES)}")
    cfg = resolve_config(preset)
    model, x, anchors, opt, anchor = build(cfg, tower, batch, lora_rank, grad_checkpointing, device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rss_built = _rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step = step_fn(model, tower, x, anchors, opt, device)
    counter = FlopCounterMode(display=False)
    with counter:
        first_loss = step()  # the first step counts FLOPs (and warms up)
    flops = counter.get_total_flops()
    for _ in range(max(warmup - 1, 0)):
        step()
    timing = time_fn(step, warmup=0, reps=reps)
    mm = matmul_rate(matmul_n, device)
    after = dict(model.named_parameters())
    learns = {n for n, p in model.named_parameters() if p.requires_grad}
    moved = {n for n in before if not torch.equal(before[n], after[n].detach())}
    in_tower = {n for n in before if n.split(".")[1] == tower}
    full = sum(  # a full fine-tune's: the tower's own weights, adapters left out
        p.numel()
        for n, p in model.named_parameters()
        if n.split(".")[1] == tower and ".lora_" not in n
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sec = timing.median_s
    row: dict[str, Any] = {
        "tower": tower,
        "batch": batch,
        "lora_rank": lora_rank,
        "grad_checkpointing": grad_checkpointing,
        "device": device,
        "input_shape": list(x.shape),
        "trainable_params": trainable,
        "tower_params": full,
        "loss_first_step": first_loss,
        "seconds_per_step": sec,
        "timing": timing.to_dict(),
        "samples_per_s": batch / sec,
        "flops_per_step": flops,
        "flops_per_sample": flops / batch,
        "achieved_flop_per_s": flops / sec,
        "matmul_fp32_flop_per_s": mm,
        "ratio_to_matmul": flops / sec / mm,
        "seconds_per_1000_samples": 1000 * sec / batch,
        # caching the anchors (before training, once): a vision forward per image
        "anchor_flops_per_image": anchor["flops_per_image"],
        "anchor_seconds_per_image": anchor["seconds_per_image"],
        "check": {
            "trainable_tensors": len(learns),
            "trained_params_changed": len(moved & learns),
            # the tower's own frozen weights (with LoRA: the base projections)
            "tower_frozen_tensors": len(in_tower - learns),
            "tower_frozen_changed": len((in_tower - learns) & moved),
            "vision_tensors": sum(n.split(".")[1] == ANCHOR for n in before),
            "vision_changed": sum(n.split(".")[1] == ANCHOR for n in moved),
        },
    }
    if device.startswith("cuda"):
        row["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["rss_after_build_mb"] = rss_built
        row["peak_rss_mb"] = _peak_rss_mb()
    del model, opt, before, after
    gc.collect()
    return row


def key(row: dict[str, Any]) -> str:
    """The setting a row measures (runs of other settings are kept beside it)."""
    ck = "+ckpt" if row["grad_checkpointing"] else ""
    lora = f"lora{row['lora_rank']}" if row["lora_rank"] else "full"
    return f"{row['tower']}/{lora}/b{row['batch']}{ck}"


def run(
    preset: str,
    tower: str,
    batch: int,
    lora_rank: int,
    grad_checkpointing: bool,
    device: str,
    reps: int,
    threads: int | None,
    out: Path | None,
    matmul_n: int = 2048,
) -> dict[str, Any]:
    """Measure one setting and merge it into ``out`` (the other settings there are kept)."""
    if threads is not None:
        torch.set_num_threads(threads)
    log(
        f"{preset} {tower} batch {batch}, "
        + (f"LoRA rank {lora_rank}" if lora_rank else "full fine-tune")
        + (", grad checkpointing" if grad_checkpointing else "")
        + f", {reps} timed steps on {device}"
    )
    row = bench_step(
        preset, tower, batch, lora_rank, grad_checkpointing, device, reps, matmul_n=matmul_n
    )
    row["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    result: dict[str, Any] = {"benchmark": f"train_step_{device}", "preset": preset, "runs": {}}
    if out is not None and out.is_file():
        old = json.loads(out.read_text(encoding="utf-8"))
        if old.get("preset") == preset:
            result["runs"] = old.get("runs", {})
    result["machine"] = machine_info()
    result["runs"][key(row)] = row
    log(report(row))
    if out is not None:
        write_json(out, result)
        log(f"wrote {out}")
    return result


def report(row: dict[str, Any]) -> str:
    mem = (
        f"CUDA peak {row['cuda_peak_allocated_mb']:.0f} MB"
        if "cuda_peak_allocated_mb" in row
        else f"peak RSS {row['peak_rss_mb']:.0f} MB (after build {row['rss_after_build_mb']:.0f})"
    )
    return (
        f"{key(row)}: {row['seconds_per_step']:.2f} s/step, {row['samples_per_s']:.3f} samples/s, "
        f"{row['flops_per_sample'] / 1e9:.1f} GFLOP/sample, "
        f"{row['achieved_flop_per_s'] / 1e9:.1f} GFLOP/s = {row['ratio_to_matmul']:.2f} of fp32 "
        f"matmul ({row['matmul_fp32_flop_per_s'] / 1e9:.1f} GFLOP/s), {mem}; "
        f"{row['seconds_per_1000_samples']:.0f} s per 1000 pairs; anchor caching "
        f"{row['anchor_seconds_per_image']:.1f} s, "
        f"{row['anchor_flops_per_image'] / 1e9:.0f} GFLOP per image; trainable "
        f"{row['trainable_params']:,} of {row['tower_params']:,}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.train_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default="imagebind_huge")
    ap.add_argument("--tower", default="audio", choices=list(STAGE2_MODALITIES))
    ap.add_argument("--batch", type=int, default=2, help="samples per step (default 2)")
    ap.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tune (default)")
    ap.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute the trunk's blocks in backward (train's default on huge towers)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=None, help="JSON results path")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda was asked for but torch sees no CUDA GPU")
    if args.batch < 2:
        ap.error("--batch must be at least 2 (the contrastive loss needs negatives)")
    if args.lora_rank < 0 or args.reps < 1:
        ap.error("--lora-rank must be >= 0 and --reps >= 1")
    run(
        preset=args.preset,
        tower=args.tower,
        batch=args.batch,
        lora_rank=args.lora_rank,
        grad_checkpointing=args.grad_checkpointing,
        device=args.device,
        reps=args.reps,
        threads=args.threads,
        out=args.out or RESULTS / f"train_step_{args.device}.json",
        matmul_n=args.matmul_n,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
