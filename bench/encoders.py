"""Encoder towers: achieved FLOP/s over the machine's matmul FLOP/s, ours vs eager (ratios 1, 2).

For each tower (``imagebind_huge`` vision and audio by default, random weights, real input
shapes, batch 8, fp32) this times two paths side by side in one run:

* **ours**: the model as shipped (``Attention.fused = True``: ``scaled_dot_product_attention``);
* **eager**: the same weights with ``Attention.fused = False`` (plain softmax attention).

Achieved FLOP/s is the analytic count of ``tower_flops`` over the median forward time; the
ratio divides it by the FLOP/s of a square fp32 ``torch.mm`` timed in the same run with the same
thread count. ``--experiments`` (on by default) also times alternatives to our path: oneDNN
switches, bf16 matmuls, bf16 weights, and other ways to compute the vision stem.

On CUDA (``--device cuda``) ours is bf16 weights + SDPA, its utilisation is against cuBLAS
bf16 (square 8192 products timed in the same run), and the eager reference is a plain fp32
model of the same weights (utilisation against cuBLAS fp32); they must agree to cosine 0.999.

    .venv/bin/python -m bench.encoders --quick
    .venv/bin/python bench/encoders.py --towers audio --threads 2
    python -m bench.encoders --device cuda      # bf16 + SDPA vs cuBLAS bf16, and vs eager fp32
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/encoders.py` puts bench/ first on sys.path, where this file would shadow the
# `encoders` package: put the repo root in front of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import copy
import gc
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench._common import (
    Timing,
    bar_plot,
    log,
    machine_info,
    matmul_fn,
    matmul_peak,
    time_interleaved,
    write_json,
)
from encoders import Encoder, Modality, ModelConfig, load_encoder
from encoders.config import resolve_config
from encoders.model import Attention

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "encoders_cpu.json"
MIN_COSINE = 0.9999  # ours and eager must agree to this cosine, row by row
MIN_COSINE_BF16 = 0.999  # on CUDA, ours (bf16) against eager fp32


# ----------------------------------------------------------------------------- FLOPs


def stem_flops(cfg: ModelConfig, modality: Modality | str) -> int:
    """Multiply-add FLOPs (x2) of one item's stem projection, as our model computes it.

    A still image meets a kernel that spans the whole repeated clip, so the model sums the
    kernel over time and pays for one frame (``ClipPatchProj``); a video clip pays for all.
    """
    m, p = Modality.parse(modality), cfg.preprocess
    tower = m.tower
    n = cfg.num_patches(tower)
    if tower is Modality.VISION:
        kt, kh, kw = cfg.vision_patch
        time_summed = m is Modality.VISION and p.video_frames == kt
        k = 3 * kh * kw * (1 if time_summed else kt)
    elif tower is Modality.AUDIO:
        k = cfg.audio_patch**2
    elif tower is Modality.DEPTH:
        k = cfg.depth_patch**2
    elif tower is Modality.THERMAL:
        k = cfg.thermal_patch**2
    elif tower is Modality.IMU:
        k = p.imu_channels * cfg.imu_window
    else:  # text: an embedding lookup
        return 0
    return 2 * n * k * cfg.trunk(tower).width


def tower_flops(cfg: ModelConfig, modality: Modality | str, batch: int, clips: int = 1) -> int:
    """Analytic FLOPs of one forward of a tower (multiply-add = 2), matmuls only.

    Counts the stem projection, per block qkv (2·L·D·3D), attention scores and weighted sum
    (2·2·L·L'·D, L' = L+1 where a learned bias key/value is appended), the output projection
    and the MLP (2·2·L·D·rD), then the head's linear on one token. Norms, GELU, softmax and
    adds are left out (FlopCounterMode leaves them out too).

    Args:
        modality: ``vision`` is still images, ``video`` clips of ``video_frames`` frames.
        clips: clips per item (audio's real input has 3); every clip runs the whole tower.
    """
    m = Modality.parse(modality)
    tower = m.tower
    t = cfg.trunk(tower)
    D = t.width
    L = cfg.preprocess.context_length if tower is Modality.TEXT else cfg.num_patches(tower) + 1
    Lk = L + 1 if tower not in (Modality.VISION, Modality.TEXT) else L  # bias_kv
    block = 2 * L * D * 3 * D + 2 * 2 * L * Lk * D + 2 * L * D * D + 2 * 2 * L * D * t.mlp_ratio * D
    per_item = stem_flops(cfg, m) + t.depth * block + 2 * D * cfg.embed_dim
    return batch * clips * per_item


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One timed input: a tower fed a batch of a given shape."""

    tower: str
    label: str
    shape: tuple[int, ...]
    clips: int = 1

    def flops(self, cfg: ModelConfig) -> int:
        return tower_flops(cfg, self.tower, self.shape[0], clips=self.clips)


def cases_for(cfg: ModelConfig, tower: str, batch: int) -> list[Case]:
    """The inputs timed for a tower: real shapes (audio also with its 3 clips per item)."""
    p = cfg.preprocess
    if tower == "vision":
        return [Case("vision", "vision", (batch, 3, p.image_size, p.image_size))]
    if tower == "audio":
        clip = (1, p.audio_mel_bins, p.audio_target_length)
        return [
            Case("audio", "audio", (batch, *clip)),
            Case(
                "audio",
                f"audio x{p.audio_clips} clips",
                (batch, p.audio_clips, *clip),
                clips=p.audio_clips,
            ),
        ]
    raise ValueError(f"unsupported tower {tower!r}; accepted: vision, audio")


@contextlib.contextmanager
def attention_path(fused: bool) -> Iterator[None]:
    """Select our fused attention (SDPA) or the eager reference for every Attention."""
    old = Attention.fused
    Attention.fused = fused
    try:
        yield
    finally:
        Attention.fused = old


def _forward(model: torch.nn.Module, tower: str, x: Tensor, fused: bool = True) -> Tensor:
    with torch.inference_mode(), attention_path(fused):
        out: Tensor = model.embed_one(tower, x)  # type: ignore[operator]
    return out


def _agreement(ref: Tensor, other: Tensor) -> dict[str, float]:
    ref, other = ref.float(), other.float()
    return {
        "max_abs_diff": float((ref - other).abs().max()),
        "min_cosine": float(F.cosine_similarity(ref, other, dim=-1).min()),
    }


def _rates(flops: int, timing: Timing, mm_flops: int) -> dict[str, Any]:
    """Achieved rate, and its ratio to the matmul timed just before each run.

    ``ratio`` is the median over reps of (achieved / matmul rate of that rep), which cancels
    the neighbours' load better than a ratio of medians; ``ratio_best`` uses the fastest runs.
    """
    achieved = flops / timing.median_s
    matmul = mm_flops / statistics.median(timing.ref_times_s)
    return {
        **timing.to_dict(),
        "gflop_per_s": achieved / 1e9,
        "matmul_gflop_per_s": matmul / 1e9,
        "ratio": flops / mm_flops * timing.paired_ratio(),
        "ratio_best": flops / mm_flops * min(timing.ref_times_s) / timing.min_s,
    }


def bench_case(enc: Encoder, case: Case, matmul_n: int, warmup: int, reps: int) -> dict[str, Any]:
    """Ours vs eager on one input, outputs checked to agree.

    The fp32 square matmul that gives the machine's rate is timed right before every run of
    either path, so each run is compared with the machine's speed at that moment.
    """
    cfg = enc.config
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(0))
    flops = case.flops(cfg)
    model = enc.model
    log(f"  {case.label} {tuple(case.shape)}: {flops / 1e9:.1f} GFLOP per forward")
    mm, mm_flops = matmul_fn(matmul_n)
    times = time_interleaved(
        {
            "ours": lambda: _forward(model, case.tower, x, fused=True),
            "eager": lambda: _forward(model, case.tower, x, fused=False),
        },
        warmup=warmup,
        reps=reps,
        reference=mm,
    )
    matmul = mm_flops / statistics.median(times["ours"].ref_times_s + times["eager"].ref_times_s)
    agree = _agreement(times["ours"].last, times["eager"].last)
    log(
        f"    ours {times['ours'].median_s:.2f} s, eager {times['eager'].median_s:.2f} s, "
        f"matmul {matmul / 1e9:.1f} GFLOP/s; max|diff| {agree['max_abs_diff']:.2e}, "
        f"cosine {agree['min_cosine']:.6f}"
    )
    return {
        "tower": case.tower,
        "input": case.label,
        "shape": list(case.shape),
        "flops": flops,
        "matmul_gflop_per_s": matmul / 1e9,
        "paths": {name: _rates(flops, t, mm_flops) for name, t in times.items()},
        "speedup_ours_over_eager": times["eager"].median_s / times["ours"].median_s,
        **agree,
        "match": agree["min_cosine"] >= MIN_COSINE,
    }


def _synced(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def cuda_matmul_peaks(n: int, reps: int) -> dict[torch.dtype, float]:
    """cuBLAS FLOP/s of a square (n, n) @ (n, n) per dtype, median of ``reps`` x 10 products."""
    peaks = {}
    for dt in (torch.bfloat16, torch.float32):
        a = torch.randn(n, n, device="cuda", dtype=dt)
        b = torch.randn(n, n, device="cuda", dtype=dt)

        def ten(a: Tensor = a, b: Tensor = b) -> None:
            for _ in range(10):
                torch.mm(a, b)

        t = time_interleaved({"mm": _synced(ten)}, warmup=2, reps=reps)["mm"]
        peaks[dt] = 10 * 2 * n**3 / t.median_s
        del a, b
    return peaks


def bench_case_cuda(
    enc: Encoder,
    eager32: torch.nn.Module,
    case: Case,
    peaks: dict[torch.dtype, float],
    warmup: int,
    reps: int,
) -> dict[str, Any]:
    """Ours (the encoder's dtype, SDPA) vs a plain eager fp32 model of the same weights.

    Each path's utilisation is against cuBLAS in its own dtype, measured in this run.
    """
    cfg = enc.config
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(0)).to("cuda")
    flops = case.flops(cfg)
    x16, x32 = x.to(enc.dtype), x.float()
    times = time_interleaved(
        {
            "ours": _synced(lambda: _forward(enc.model, case.tower, x16, fused=True)),
            "eager": _synced(lambda: _forward(eager32, case.tower, x32, fused=False)),
        },
        warmup=warmup,
        reps=reps,
    )
    agree = _agreement(times["eager"].last, times["ours"].last)
    paths = {}
    for name, dt in (("ours", enc.dtype), ("eager", torch.float32)):
        t = times[name]
        achieved = flops / t.median_s
        paths[name] = {
            **t.to_dict(),
            "dtype": str(dt).removeprefix("torch."),
            "gflop_per_s": achieved / 1e9,
            "matmul_gflop_per_s": peaks[dt] / 1e9,
            "ratio": achieved / peaks[dt],
            "ratio_best": flops / t.min_s / peaks[dt],
        }
    log(
        f"    ours {times['ours'].median_s * 1e3:.1f} ms ({paths['ours']['ratio']:.2f} of "
        f"cuBLAS), eager fp32 {times['eager'].median_s * 1e3:.1f} ms; cosine "
        f"{agree['min_cosine']:.5f}"
    )
    return {
        "tower": case.tower,
        "input": case.label,
        "shape": list(case.shape),
        "flops": flops,
        "matmul_gflop_per_s": peaks[enc.dtype] / 1e9,
        "paths": paths,
        "speedup_ours_over_eager": times["eager"].median_s / times["ours"].median_s,
        **agree,
        "match": agree["min_cosine"] >= MIN_COSINE_BF16,
    }


def run_cuda(
    preset: str, towers: Sequence[str], batch: int, reps: int, warmup: int, out: Path | None
) -> dict[str, Any]:
    """The CUDA path: bf16 + SDPA against cuBLAS bf16, and against an eager fp32 model."""
    cfg = resolve_config(preset)
    peaks = cuda_matmul_peaks(8192, reps=max(reps, 3))
    log("cuBLAS " + ", ".join(f"{dt}: {v / 1e12:.0f} TFLOP/s" for dt, v in peaks.items()))
    result: dict[str, Any] = {
        "benchmark": "encoders_cuda",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": "cuda",
        "gpu": torch.cuda.get_device_name(0),
        "preset": preset,
        "dtype": "bfloat16",
        "batch": batch,
        "reps": reps,
        "warmup": warmup,
        "machine": machine_info(),
        "matmul": [{"dtype": str(k), "tflop_per_s": v / 1e12} for k, v in peaks.items()],
        "cases": [],
        "experiments": [],
        "stem_variants": [],
    }
    for tower in towers:
        log(f"building {preset} {tower} on cuda")
        enc = load_encoder(config=cfg, modalities=[tower], device="cuda", dtype=torch.bfloat16)
        eager32 = copy.deepcopy(enc.model).float()
        for case in cases_for(cfg, tower, batch):
            result["cases"].append(bench_case_cuda(enc, eager32, case, peaks, warmup, reps))
        del enc, eager32
        gc.collect()
        torch.cuda.empty_cache()
    print_report(result)
    if out is not None:
        write_json(out, result)
        log(f"wrote {out}")
    return result


# ----------------------------------------------------------------------------- experiments


@contextlib.contextmanager
def _fp32_matmul_precision(value: str) -> Iterator[None]:
    mm = torch.backends.mkldnn.matmul
    old = mm.fp32_precision
    mm.fp32_precision = value
    try:
        yield
    finally:
        mm.fp32_precision = old


@contextlib.contextmanager
def _mkldnn_enabled(value: bool) -> Iterator[None]:
    # Not torch.backends.mkldnn.flags(): it also sets oneDNN TF32, which warns on CPU builds.
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = value
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = old


def experiment_variants(
    enc: Encoder, case: Case, matmul_n: int, warmup: int, reps: int
) -> list[dict[str, Any]]:
    """Alternatives to our path on one input, timed interleaved with our path as shipped.

    Each row's ``ratio`` is to the fp32 matmul rate; ``ratio_to_own_dtype_matmul`` is to the
    rate of the dtype its matmuls run in (bf16 for the bf16 variants), both timed interleaved.
    """
    model, tower = enc.model, case.tower
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(0))
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)

    def mkldnn_off() -> Tensor:
        with _mkldnn_enabled(False):
            return _forward(model, tower, x)

    def bf16_matmuls() -> Tensor:
        with _fp32_matmul_precision("bf16"):
            return _forward(model, tower, x)

    mm32, mm_flops = matmul_fn(matmul_n, torch.float32)
    mm16, _ = matmul_fn(matmul_n, torch.bfloat16)
    variants: dict[str, tuple[Callable[[], Tensor], str]] = {
        "ours": (lambda: _forward(model, tower, x), "fp32"),
        "ours, mkldnn disabled": (mkldnn_off, "fp32"),
        "ours, mkldnn fp32_precision=bf16": (bf16_matmuls, "bf16"),
        "ours, bf16 weights": (lambda: _forward(bf16_model, tower, x16), "bf16"),
    }
    times = time_interleaved(
        {**{name: fn for name, (fn, _) in variants.items()}, "bf16": mm16},
        warmup=warmup,
        reps=reps,
        reference=mm32,
    )
    mm16_time = times.pop("bf16")
    bf16_speed = mm16_time.paired_ratio()  # fp32 mm time / bf16 mm time, paired
    peaks = {
        "fp32": mm_flops / statistics.median(mm16_time.ref_times_s),
        "bf16": mm_flops / mm16_time.median_s,
    }
    log(f"  matmul fp32 {peaks['fp32'] / 1e9:.1f}, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    agree = {name: _agreement(times["ours"].last, times[name].last) for name in variants}
    flops, base = case.flops(enc.config), times["ours"].median_s
    rows = []
    for name, (_, dt) in variants.items():
        row = {
            "tower": tower,
            "input": case.label,
            "variant": name,
            "matmul_dtype": dt,
            "own_dtype_matmul_gflop_per_s": peaks[dt] / 1e9,
            **_rates(flops, times[name], mm_flops),
            "ratio_to_own_dtype_matmul": (
                flops
                / mm_flops
                * times[name].paired_ratio()
                * (1 / bf16_speed if dt == "bf16" else 1)
            ),
            "speedup_over_ours": base / times[name].median_s,
            "speedup_over_ours_best": times["ours"].min_s / times[name].min_s,
            **agree[name],
        }
        rows.append(row)
    return rows


def stem_variants(enc: Encoder, batch: int, warmup: int, reps: int) -> list[dict[str, Any]]:
    """Ways to compute the vision stem projection of still images; all give the same tokens."""
    cfg = enc.config
    p = cfg.preprocess
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, p.image_size, p.image_size, generator=g)
    patch_embed = enc.model.modality_preprocessors["vision"].rgbt_stem
    clip_proj = patch_embed.proj  # ClipPatchProj: [RepeatFrames, PatchProj]
    repeat, proj = clip_proj[0], clip_proj[1]
    w = proj.weight  # (D, 3, kt, kh, kw)
    k3 = tuple(proj.kernel)
    w2 = w.sum(dim=2)  # (D, 3, kh, kw): a still image repeated over kt frames
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def tokens(y: Tensor) -> Tensor:
        return y.flatten(2).transpose(1, 2)  # (B, D, *grid) -> (B, N, D)

    variants: dict[str, Callable[[], Tensor]] = {
        "ours: patchify + matmul, time-summed kernel": lambda: patch_embed(x),
        "patchify + matmul on the repeated clip": lambda: proj(repeat(x)),
        "Conv3d on the repeated clip": lambda: tokens(F.conv3d(repeat(x), w, stride=k3)),
        "Conv2d, time-summed kernel": lambda: tokens(F.conv2d(x, w2, stride=k3[1:])),
        "Conv2d, time-summed kernel, channels_last": lambda: tokens(
            F.conv2d(x_cl, w2, stride=k3[1:])
        ),
    }
    with torch.inference_mode():
        times = time_interleaved(variants, warmup=max(warmup, 1), reps=max(reps, 3))
    ref = times["ours: patchify + matmul, time-summed kernel"].last
    diffs = {name: float((t.last - ref).abs().max()) for name, t in times.items()}
    base = times["ours: patchify + matmul, time-summed kernel"].median_s
    return [
        {
            **times[name].to_dict(),
            "variant": name,
            "max_abs_diff": diffs[name],
            "relative_time": times[name].median_s / base,
        }
        for name in variants
    ]


# ----------------------------------------------------------------------------- run


def run(
    preset: str = "imagebind_huge",
    towers: Sequence[str] = ("vision", "audio"),
    batch: int = 8,
    threads: int | None = None,
    quick: bool = False,
    reps: int | None = None,
    warmup: int | None = None,
    matmul_n: int = 4096,
    experiments: bool = True,
    out: Path | None = DEFAULT_OUT,
    plot: bool = True,
) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to ``out``, if given) every number.

    Args:
        quick: fewer repeats (2 instead of 5); the batch stays as given.
        reps, warmup: override the repeat counts that ``quick`` picks.
        matmul_n: side of the square matrices timed (interleaved) for the matmul rate.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    reps = reps if reps is not None else (2 if quick else 5)
    warmup = warmup if warmup is not None else 1
    cfg = resolve_config(preset)
    unknown = sorted(set(towers) - {"vision", "audio"})
    if unknown:
        raise ValueError(f"unsupported towers {unknown}; accepted: vision, audio")
    result: dict[str, Any] = {
        "benchmark": "encoders_cpu",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "preset": preset,
        "dtype": "float32",
        "batch": batch,
        "reps": reps,
        "warmup": warmup,
        "machine": machine_info(),
        "matmul": [],
        "cases": [],
        "experiments": [],
        "stem_variants": [],
    }
    for tower in towers:
        # A standalone reading too (the ratios use the matmul timed interleaved per input).
        matmul, mm_time = matmul_peak(matmul_n, warmup=2, reps=max(reps, 3))
        mm_row = {"tower": tower, "n": matmul_n, "gflop_per_s": matmul / 1e9}
        result["matmul"].append({**mm_row, **mm_time.to_dict()})
        log(f"{tower}: fp32 matmul at {matmul / 1e9:.1f} GFLOP/s; building {preset} {tower}")
        enc = load_encoder(config=cfg, modalities=[tower], dtype=torch.float32)
        for case in cases_for(cfg, tower, batch):
            result["cases"].append(bench_case(enc, case, matmul_n, warmup, reps))
        if experiments:
            log(f"  experiments on {tower}")
            case = cases_for(cfg, tower, batch)[0]
            result["experiments"] += experiment_variants(enc, case, matmul_n, warmup, reps)
            if tower == "vision":
                result["stem_variants"] = stem_variants(enc, batch, warmup, reps)
        del enc
        gc.collect()
    print_report(result)
    if out is not None:
        write_json(out, result)
        log(f"wrote {out}")
        if plot and result["cases"]:
            labels = [f"{c['input']} {p}" for c in result["cases"] for p in c["paths"]]
            ratios = [v["ratio"] for c in result["cases"] for v in c["paths"].values()]
            png = out.with_suffix(".png")
            if bar_plot(png, labels, ratios, "achieved / matmul FLOP/s", f"{preset}, CPU"):
                log(f"wrote {png}")
    return result


def print_report(result: dict[str, Any]) -> None:
    """The results as plain-text tables on stdout."""
    m = result["machine"]
    where = result.get("gpu") or f"{m['cpu_model']} ({m['torch_threads']} threads"
    print(
        f"\n{result['preset']} on {where}, "
        f"torch {m['torch_version']}), {result['dtype']}, batch {result['batch']}, "
        f"median of {result['reps']} after {result['warmup']} warm-up"
    )
    head = (
        f"{'input':<16} {'path':<6} {'GFLOP':>8} {'median s':>9} {'GFLOP/s':>8} "
        f"{'matmul':>8} {'ratio':>6} {'best':>6} {'speed-up':>9}"
    )
    print(head)
    print("-" * len(head))
    for c in result["cases"]:
        for name, p in c["paths"].items():
            speedup = f"{c['speedup_ours_over_eager']:.3f}x" if name == "ours" else ""
            print(
                f"{c['input']:<16} {name:<6} {c['flops'] / 1e9:>8.1f} {p['median_s']:>9.3f} "
                f"{p['gflop_per_s']:>8.1f} {c['matmul_gflop_per_s']:>8.1f} "
                f"{p['ratio']:>6.3f} {p['ratio_best']:>6.3f} {speedup:>9}"
            )
        flag = "" if c["match"] else "  MISMATCH"
        print(
            f"{'':<16} ours vs eager: max|diff| {c['max_abs_diff']:.2e}, "
            f"min cosine {c['min_cosine']:.6f}{flag}"
        )
    if result["experiments"]:
        print(
            "\nAlternatives to our path (ratio: to the fp32 matmul rate; own: to the matmul "
            "rate of the dtype the matmuls run in)"
        )
        for e in result["experiments"]:
            print(
                f"{e['input']:<8} {e['variant']:<34} {e['median_s']:>8.3f} s "
                f"ratio {e['ratio']:.3f} own {e['ratio_to_own_dtype_matmul']:.3f} "
                f"x{e['speedup_over_ours']:.2f} cosine {e['min_cosine']:.6f}"
            )
    if result["stem_variants"]:
        print("\nVision stem projection (still images), time relative to ours")
        for s in result["stem_variants"]:
            print(
                f"{s['variant']:<44} {s['median_s'] * 1e3:>8.1f} ms  "
                f"x{s['relative_time']:.2f}  max|diff| {s['max_abs_diff']:.1e}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns 1 if ours and eager disagree on any input."""
    ap = argparse.ArgumentParser(
        prog="python -m bench.encoders",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 timed repeats, batch 1, no alternatives (a 2-core CPU in about 2 minutes)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--towers", default="vision,audio", help="comma-separated: vision,audio")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (4 --quick, 64 cuda)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats (overrides --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs (default 1)")
    ap.add_argument("--preset", default="imagebind_huge")
    ap.add_argument("--matmul-n", type=int, default=4096, help="side of the timed square mm")
    ap.add_argument("--no-experiments", action="store_true", help="skip the alternatives")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="JSON results path")
    args = ap.parse_args(argv)
    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    out = args.out or DEFAULT_OUT.with_name(f"encoders_{args.device}.json")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda was asked for but torch sees no CUDA GPU")
        reps = args.reps if args.reps is not None else (3 if args.quick else 5)
        result = run_cuda(args.preset, towers, args.batch or 64, reps, args.warmup or 2, out)
        return 0 if all(c["match"] for c in result["cases"]) else 1
    result = run(
        preset=args.preset,
        towers=towers,
        batch=args.batch or (4 if args.quick else 8),
        threads=args.threads,
        quick=args.quick,
        reps=args.reps,
        warmup=args.warmup,
        matmul_n=args.matmul_n,
        experiments=not (args.no_experiments or args.quick),
        out=out,
        plot=not args.no_plot,
    )
    return 0 if all(c["match"] for c in result["cases"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
