"""Model throughput vs batch size per modality, and what each fast-path choice buys.

For every modality, ``Encoder.embed`` on preprocessed random inputs of the real shape, at a
range of batch sizes (items/s, median of repeats; the curve is the suite's throughput plot).
Then, side by side in the same run:

* **text trimming** (exact): token batches cut to their longest real sequence vs the full
  77-token context, on texts of realistic lengths; and **length bucketing**: a shuffled
  stream batched in arrival order vs sorted by length first (both trimmed);
* **bf16**: bf16 weights and activations vs fp32, per modality, with the cosine of the
  embeddings (bf16 is the default on GPUs; on CPU it is reported, not used);
* **torch.compile** (``--compile``): one tower eager vs compiled, with the compile time;
* **pinned host memory** (CUDA only): ``Encoder.pin_memory`` on vs off.

Quick mode (this 2-core CPU) runs the shipped ``imagebind_demo`` model in fp32; full mode on
CUDA runs ``imagebind_huge`` in bf16.

    .venv/bin/python -m bench.throughput --quick
    python -m bench.throughput --device cuda --compile
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from bench._common import log, machine_info, time_interleaved, write_json
from encoders import Encoder, Modality, load_encoder
from encoders.config import ModelConfig
from encoders.transforms.text import trim_to_longest

MODALITIES = ("vision", "video", "text", "audio", "depth", "thermal", "imu")
WORDS = (
    "a dog cat red blue car running beach sunset photo of the in on with small large old man "
    "woman child playing guitar street night city river mountain snow forest bird flying over"
).split()


def example(cfg: ModelConfig, modality: str, batch: int, seed: int = 0) -> torch.Tensor:
    """A preprocessed batch of the real shape (random values; token ids for text)."""
    p = cfg.preprocess
    g = torch.Generator().manual_seed(seed)
    if modality == "text":
        return texts_tokens(cfg, batch, seed)
    shape: tuple[int, ...] = {
        "vision": (batch, 3, p.image_size, p.image_size),
        "video": (batch, p.video_clips, 3, p.video_frames, p.image_size, p.image_size),
        "audio": (batch, p.audio_clips, 1, p.audio_mel_bins, p.audio_target_length),
        "depth": (batch, 1, p.depth_size, p.depth_size),
        "thermal": (batch, 1, p.thermal_size, p.thermal_size),
        "imu": (batch, p.imu_channels, p.imu_samples),
    }[modality]
    return torch.randn(shape, generator=g)


def random_texts(n: int, seed: int) -> list[str]:
    """Captions of 3 to 30 words (a search corpus's spread of lengths)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for _ in range(n)]


def texts_tokens(cfg: ModelConfig, n: int, seed: int) -> torch.Tensor:
    from encoders.transforms.text import tokenize

    return tokenize(random_texts(n, seed), cfg.preprocess)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(enc: Encoder, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` followed by a device sync, so its time is the device's too."""

    def run() -> object:
        out = fn()
        _sync(enc.device)
        return out

    return run


MIN_REP_S = 0.2  # a timed repeat runs a call this long at least: sub-ms calls are all noise


def repeated(enc: Encoder, fn: Callable[[], object]) -> tuple[Callable[[], object], int]:
    """``fn`` run ``n`` times per call, ``n`` chosen so one call lasts ``MIN_REP_S``."""
    one = timed(enc, fn)
    t0 = time.perf_counter()
    one()  # also the warm-up
    n = max(1, int(MIN_REP_S / max(time.perf_counter() - t0, 1e-6)))

    def run() -> object:
        out = None
        for _ in range(n):
            out = one()
        return out

    return run, n


def batch_curve(enc: Encoder, modality: str, batches: list[int], reps: int) -> list[dict[str, Any]]:
    rows = []
    for b in batches:
        x = example(enc.config, modality, b)  # text: embed trims it (exact)
        fn, n = repeated(enc, lambda: enc.embed(modality, x))  # noqa: B023
        t = time_interleaved({"embed": fn}, warmup=0, reps=reps)["embed"]
        per_call = t.median_s / n
        rows.append({"batch": b, "items_per_s": b / per_call, "median_s": per_call})
        log(f"  {modality} batch {b}: {rows[-1]['items_per_s']:.1f} items/s")
    return rows


def text_trimming(enc: Encoder, batch: int, stream: int, reps: int) -> dict[str, Any]:
    """Full context vs trimmed (exact), and arrival-order vs length-sorted batches."""
    full = texts_tokens(enc.config, batch, seed=1)
    trimmed = trim_to_longest(full)
    tokens = texts_tokens(enc.config, stream, seed=2)
    lengths = tokens.argmax(dim=-1)
    order = torch.argsort(lengths)

    def batched(ids: torch.Tensor) -> np.ndarray:
        return np.concatenate(
            [enc.embed("text", ids[i : i + batch]) for i in range(0, len(ids), batch)]
        )

    def untrimmed(ids: torch.Tensor) -> np.ndarray:
        # embed trims; forward (the parity path) runs every position: the baseline, normalised.
        out = enc.forward({"text": ids})["text"]
        return torch.nn.functional.normalize(out, dim=-1).cpu().numpy()

    times = time_interleaved(
        {
            "full_context": timed(enc, lambda: untrimmed(full)),
            "trimmed": timed(enc, lambda: enc.embed("text", trimmed)),
            "stream_arrival_order": timed(enc, lambda: batched(tokens)),
            "stream_length_sorted": timed(enc, lambda: batched(tokens[order])),
        },
        warmup=1,
        reps=reps,
    )
    a, b = times["full_context"].last, times["trimmed"].last
    sa = times["stream_arrival_order"].last
    sb = np.empty_like(sa)
    sb[order.numpy()] = times["stream_length_sorted"].last
    out = {
        "batch": batch,
        "context": int(full.shape[1]),
        "trimmed_to": int(trimmed.shape[1]),
        "trim_speedup": times["full_context"].median_s / times["trimmed"].median_s,
        "trim_max_abs_diff": float(np.abs(a - b).max()),
        "stream": stream,
        "bucket_speedup": times["stream_arrival_order"].median_s
        / times["stream_length_sorted"].median_s,
        "bucket_max_abs_diff": float(np.abs(sa - sb).max()),
        "timings": {k: v.to_dict() for k, v in times.items()},
    }
    log(
        f"  text: trimmed {out['trim_speedup']:.2f}x ({out['context']} -> {out['trimmed_to']} "
        f"tokens), "
        f"length-sorted stream {out['bucket_speedup']:.2f}x"
    )
    return out


def bf16_check(enc: Encoder, modalities: list[str], batch: int, reps: int) -> list[dict[str, Any]]:
    """bf16 vs fp32 encoders of the same weights: cosine of the embeddings and the speed-up."""
    other_dtype = torch.float32 if enc.dtype == torch.bfloat16 else torch.bfloat16
    other = Encoder(_copy_model(enc, other_dtype), enc.device, other_dtype, enc.ref)
    rows = []
    for m in modalities:
        x = example(enc.config, m, batch, seed=3)
        fa, na = repeated(enc, lambda: enc.embed(m, x))  # noqa: B023
        fb, nb = repeated(other, lambda: other.embed(m, x))  # noqa: B023
        times = time_interleaved({str(enc.dtype): fa, str(other_dtype): fb}, warmup=0, reps=reps)
        calls = {str(enc.dtype): na, str(other_dtype): nb}
        f32, b16 = times["torch.float32"], times["torch.bfloat16"]
        cos = float((f32.last * b16.last).sum(axis=1).min())
        speedup = (f32.median_s / calls["torch.float32"]) / (b16.median_s / calls["torch.bfloat16"])
        rows.append(
            {
                "modality": m,
                "batch": batch,
                "min_cosine": cos,
                "bf16_speedup": speedup,
                "ok": cos >= 0.999,
            }
        )
        log(f"  bf16 {m}: cosine {cos:.5f}, {rows[-1]['bf16_speedup']:.2f}x fp32")
    return rows


def _copy_model(enc: Encoder, dtype: torch.dtype) -> Any:
    import copy

    return copy.deepcopy(enc.model).to(dtype)


def compile_check(enc: Encoder, modality: str, batch: int, reps: int) -> dict[str, Any]:
    """Eager vs ``torch.compile`` of one tower's forward; compile time is the first call."""
    x = example(enc.config, modality, batch, seed=4).to(enc.device, enc.dtype)
    model = enc.model

    def eager() -> torch.Tensor:
        with torch.inference_mode():
            return model.embed_one(modality, x, scaled=False)

    compiled_fn = torch.compile(model.embed_one, dynamic=False)

    def compiled() -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = compiled_fn(modality, x, scaled=False)
            return out

    t0 = time.perf_counter()
    timed(enc, compiled)()
    compile_s = time.perf_counter() - t0
    times = time_interleaved(
        {"eager": timed(enc, eager), "compiled": timed(enc, compiled)}, warmup=1, reps=reps
    )
    cos = torch.nn.functional.cosine_similarity(
        times["eager"].last.float(), times["compiled"].last.float(), dim=-1
    ).min()
    out = {
        "modality": modality,
        "batch": batch,
        "compile_s": compile_s,
        "speedup": times["eager"].median_s / times["compiled"].median_s,
        "min_cosine": float(cos),
        "timings": {k: v.to_dict() for k, v in times.items()},
    }
    log(f"  compile {modality}: {out['speedup']:.2f}x eager after {compile_s:.0f} s compiling")
    return out


@contextlib.contextmanager
def pinning(value: bool) -> Iterator[None]:
    old = Encoder.pin_memory
    Encoder.pin_memory = value
    try:
        yield
    finally:
        Encoder.pin_memory = old


def pinned_check(enc: Encoder, modality: str, batch: int, reps: int) -> dict[str, Any]:
    x = example(enc.config, modality, batch, seed=5)

    def on() -> object:
        with pinning(True):
            return enc.embed(modality, x)

    def off() -> object:
        with pinning(False):
            return enc.embed(modality, x)

    times = time_interleaved(
        {"pinned": timed(enc, on), "pageable": timed(enc, off)}, warmup=1, reps=reps
    )
    out = {
        "modality": modality,
        "batch": batch,
        "speedup": times["pageable"].median_s / times["pinned"].median_s,
        "timings": {k: v.to_dict() for k, v in times.items()},
    }
    log(f"  pinned memory {modality} batch {batch}: {out['speedup']:.2f}x pageable")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, help="default: imagebind_demo on CPU, huge on CUDA")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--modalities", default=",".join(MODALITIES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU default 1)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    p.add_argument("--quick", action="store_true", help="3 repeats (CPU: the demo model)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    # The CPU default is one thread: the small demo model's ops are too short to split, and
    # OpenMP's spinning threads collapse when the machine's cores are shared.
    torch.set_num_threads(a.threads or (torch.get_num_threads() if cuda else 1))
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda was asked for but torch sees no CUDA GPU")
    preset = a.preset or ("imagebind_huge" if cuda else "imagebind_demo")
    batches = (
        [int(b) for b in a.batches.split(",")]
        if a.batches
        else [1, 4, 16, 64]
        if cuda
        else [1, 2, 4, 8, 16, 32]
    )
    reps = 3 if a.quick else a.reps
    modalities = [m.strip() for m in a.modalities.split(",") if m.strip()]
    for m in modalities:
        Modality.parse(m)
    log(f"loading {preset} on {a.device}")
    enc = load_encoder(
        config=preset, device=a.device, dtype=torch.bfloat16 if cuda else torch.float32
    )
    result: dict[str, Any] = {
        "benchmark": "throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": a.device,
        "device_name": torch.cuda.get_device_name(0) if cuda else machine_info()["cpu_model"],
        "preset": preset,
        "dtype": str(enc.dtype).removeprefix("torch."),
        "quick": a.quick,
        "machine": machine_info(),
        "modalities": {},
    }
    for m in modalities:
        result["modalities"][m] = batch_curve(enc, m, batches, reps)
    if "text" in modalities:
        # Trimming only matters with the real 77-token context: the huge text tower (the one
        # loaded on CUDA; on CPU a text-only copy, small batches).
        if enc.config.preprocess.context_length < 77:
            log("loading the imagebind_huge text tower for the trimming comparison")
            text_enc = load_encoder(config="imagebind_huge", modalities=["text"])
            result["text"] = text_trimming(text_enc, batch=4, stream=16, reps=1)
            del text_enc
        else:
            result["text"] = text_trimming(enc, batch=32, stream=256, reps=reps)
        result["text"]["preset"] = "imagebind_huge"
    mid = batches[len(batches) // 2]
    result["bf16"] = bf16_check(enc, modalities, mid, reps)
    if cuda:
        result["pinned"] = [
            pinned_check(enc, m, batches[-1], reps) for m in ("vision", "audio") if m in modalities
        ]
    if a.compile:
        result["compile"] = compile_check(enc, "vision", mid, reps)
    print_report(result)
    out = a.out or Path(__file__).resolve().parent / "results" / f"throughput_{a.device}.json"
    log(f"wrote {write_json(out, result)}")
    return 0


def print_report(r: dict[str, Any]) -> None:
    print(f"\n{r['preset']} {r['dtype']} on {r['device_name']}: items/s by batch size")
    batches = sorted({p["batch"] for pts in r["modalities"].values() for p in pts})
    print(f"{'modality':<9}" + "".join(f"{b:>10}" for b in batches))
    for m, pts in r["modalities"].items():
        by = {p["batch"]: p["items_per_s"] for p in pts}
        print(f"{m:<9}" + "".join(f"{by.get(b, float('nan')):>10.1f}" for b in batches))
    if "text" in r:
        t = r["text"]
        print(
            f"text trimmed to {t['trimmed_to']} of {t['context']} tokens: "
            f"{t['trim_speedup']:.2f}x (max |diff| {t['trim_max_abs_diff']:.1e}); "
            f"length-sorted batches: {t['bucket_speedup']:.2f}x "
            f"(max |diff| {t['bucket_max_abs_diff']:.1e})"
        )
    for row in r.get("bf16", []):
        print(
            f"bf16 {row['modality']:<8} cosine {row['min_cosine']:.5f} "
            f"({'ok' if row['ok'] else 'below 0.999'}), {row['bf16_speedup']:.2f}x fp32"
        )
    for row in r.get("pinned", []):
        print(
            f"pinned host memory, {row['modality']} batch {row['batch']}: "
            f"{row['speedup']:.2f}x pageable"
        )
    if "compile" in r:
        c = r["compile"]
        print(
            f"torch.compile {c['modality']} batch {c['batch']}: {c['speedup']:.2f}x eager, "
            f"compiled in {c['compile_s']:.0f} s, cosine {c['min_cosine']:.6f}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
