"""The dtypes side by side: fp32 vs bf16 vs int8 per tower, beside the machine's bf16/fp32 matmul.

For each tower (``imagebind_huge`` vision and audio by default, random weights, real input
shapes) this times ``Encoder.embed`` in fp32 and in each reduced dtype, interleaved rep by rep
in one run, and reports the speed-up over fp32 with the cosine of the two outputs. Beside it:
the rate of a square bf16 ``torch.mm`` over fp32 in the same run (the limit the bf16 speed-up
can approach), the CPU's flags and what ``encoders.dtype`` picks by default on this machine.
Also the top-10 overlap, fp32 vs each reduced dtype, of text queries over the demo world's
other modalities with the demo model (the retrieval the demo index serves).

Where the time goes (``breakdown``): per tower and dtype, the seconds spent in each part of a
file's way to its vector (the input transform from a real file, the stem, attention, MLP,
LayerNorm, head, the rest), and the dtype each part really runs in. What still runs in fp32 under
a reduced dtype is listed with its share of the time: that share bounds the speed-up the reduced
dtype can give (Amdahl), whatever its matmuls do.

On a CPU without native bf16 (AVX2 only) bf16 is emulated and slower than fp32: the default
stays fp32 there, and this benchmark says so rather than hiding it.

    .venv/bin/python -m bench.dtypes --quick
    python -m bench.dtypes --towers vision --batch 4      # a CPU with avx512_bf16 / AMX
    python -m bench.dtypes --device cuda                 # fp32 vs bf16 vs fp16 on a GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import io
import time
import wave
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from bench._common import log, machine_info, matmul_fn, time_interleaved, write_json
from encoders import Encoder, Modality, load_encoder
from encoders import dtype as dtypes
from encoders.config import resolve_config
from encoders.inputs import preprocess

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dtypes_cpu.json"
TARGET_SPEEDUP = 3.0  # the default dtype over fp32 on a CPU with native bf16 (issue 20)


def _input(enc: Encoder, tower: str, batch: int) -> torch.Tensor:
    p = enc.preprocess_cfg
    g = torch.Generator().manual_seed(0)
    if tower == "vision":
        return torch.randn(batch, 3, p.image_size, p.image_size, generator=g)
    if tower == "audio":
        return torch.randn(batch, 1, p.audio_mel_bins, p.audio_target_length, generator=g)
    if tower == "text":
        return torch.randint(1, 49407, (batch, p.context_length), generator=g)
    raise ValueError(f"unsupported tower {tower!r}; accepted: vision, audio, text")


def _embedder(enc: Encoder, tower: str, x: torch.Tensor) -> Callable[[], np.ndarray]:
    return lambda: enc.embed(tower, x)


def matmul_ratio(
    n: int, reduced: Sequence[str], reps: int, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """GFLOP/s of a square ``torch.mm`` per dtype (interleaved), and each over fp32."""
    fns, flops = {}, 0
    for name in ("float32", *[r for r in reduced if r != "int8"]):
        fn, flops = matmul_fn(n, dtypes.DtypeChoice(name, "").torch_dtype)
        fns[name] = fn
    timings = time_interleaved(fns, warmup=1, reps=reps)
    rates = {k: flops / t.median_s / 1e9 for k, t in timings.items()}
    return {k: {"gflop_per_s": v, "over_fp32": v / rates["float32"]} for k, v in rates.items()}


def bench_tower(
    preset: str, tower: str, reduced: Sequence[str], batch: int, reps: int, device: str
) -> dict[str, Any]:
    """fp32 against each reduced dtype on one tower: paired timings, speed-up, cosine."""
    cfg = resolve_config(preset)
    fp32 = load_encoder(config=cfg, modalities=[tower], dtype="fp32", device=device)
    x = _input(fp32, tower, batch)
    ref = fp32.embed(tower, x)
    row: dict[str, Any] = {"tower": tower, "batch": batch, "dtypes": {}}
    for name in reduced:
        log(f"  {tower}: fp32 vs {name}")
        try:
            enc = load_encoder(config=cfg, modalities=[tower], dtype=name, device=device)
        except ValueError as e:  # int8 on a GPU
            row["dtypes"][name] = {"skipped": str(e)}
            continue
        t = time_interleaved(
            {"float32": _embedder(fp32, tower, x), name: _embedder(enc, tower, x)},
            warmup=1,
            reps=reps,
        )
        got = t[name].last
        row["dtypes"][name] = {
            "fp32": t["float32"].to_dict(),
            "reduced": t[name].to_dict(),
            "speedup_over_fp32": t["float32"].median_s / t[name].median_s,
            "items_per_s": batch / t[name].median_s,
            "min_cosine": float((ref * got).sum(axis=1).min()),
            "note": enc.dtype_note,
        }
        del enc
        gc.collect()
    del fp32
    gc.collect()
    return row


def retrieval_overlap(reduced: Sequence[str], n: int = 120, seed: int = 0) -> dict[str, float]:
    """Mean top-10 overlap with fp32 of text queries over the demo world's other modalities.

    The demo model (shipped weights) embeds ``n`` test-split samples of the demo world (what
    ``serve`` indexes by default) in fp32 and in each dtype of ``reduced``; each caption is a
    query over the images, videos, sounds, depth, thermal and IMU items.
    """
    from encoders import resolve_model
    from world import generate
    from world.world import to_model_inputs

    ref = resolve_model("imagebind_demo")
    cfg = ref.config.preprocess
    x = to_model_inputs(generate(n, cfg, seed=seed, split="test"), cfg)
    targets = ("vision", "video", "audio", "depth", "thermal", "imu")

    def top10(name: str) -> np.ndarray:
        enc = load_encoder(ref, dtype=name)
        db = np.concatenate([enc.embed(m, x[m]) for m in targets])
        scores = enc.embed("text", x["text"]) @ db.T
        return np.argsort(-scores, axis=1, kind="stable")[:, :10]

    base = top10("float32")
    out = {}
    for name in reduced:
        got = top10(name)
        out[name] = float(
            np.mean([len(set(a) & set(b)) / 10 for a, b in zip(base, got, strict=True)])
        )
    return out


# The parts of a tower, timed by forward hooks (leaf categories: none contains another).
PARTS = ("preprocess", "stem", "attention", "mlp", "layernorm", "head", "other")


def _sample_file(tower: str) -> bytes | str:
    """One real input of ``tower`` as a user gives it: a 10 s WAV, a 640x480 PNG, a caption."""
    rng = np.random.default_rng(0)
    if tower == "audio":
        sr = 16_000
        t = np.arange(10 * sr) / sr
        x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sr)
            w.writeframes((x * 32767).astype("<i2").tobytes())
        return buf.getvalue()
    if tower == "vision":
        from PIL import Image

        img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    if tower == "text":
        return "a small red bird singing on a branch by the sea at dawn"
    raise ValueError(f"unsupported tower {tower!r}; accepted: vision, audio, text")


def _runs_in(module: torch.nn.Module) -> str:
    """The dtype a module computes in: int8 for dynamic-quantised linears, else its weights'."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for sub in module.modules():
        if isinstance(sub, DynamicLinear):
            return "int8"
    for param in module.parameters(recurse=True):
        return str(param.dtype).removeprefix("torch.")
    return "n/a"


def _parts(enc: Encoder, tower: str) -> dict[str, list[torch.nn.Module]]:
    from encoders.model import Attention, Mlp

    model = enc.model
    trunk = model.modality_trunks[tower]
    parts: dict[str, list[torch.nn.Module]] = {
        "stem": [model.modality_preprocessors[tower]],
        "attention": [m for m in trunk.modules() if isinstance(m, Attention)],
        "mlp": [m for m in trunk.modules() if isinstance(m, Mlp)],
        "layernorm": [m for m in trunk.modules() if isinstance(m, torch.nn.LayerNorm)],
        "head": [model.modality_heads[tower], model.modality_postprocessors[tower]],
    }
    return parts


@contextmanager
def _timed_parts(
    parts: dict[str, list[torch.nn.Module]], spent: dict[str, float]
) -> Iterator[None]:
    """Add each part's forward wall time to ``spent`` while the context is open."""
    handles = []
    starts: dict[int, float] = {}

    def pre(mod: torch.nn.Module, _args: object) -> None:
        starts[id(mod)] = time.perf_counter()

    def post(name: str) -> Callable[[torch.nn.Module, object, object], None]:
        def hook(mod: torch.nn.Module, _args: object, _out: object) -> None:
            spent[name] += time.perf_counter() - starts.pop(id(mod))

        return hook

    for name, mods in parts.items():
        for mod in mods:
            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post(name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def breakdown(
    preset: str, tower: str, names: Sequence[str], batch: int, reps: int, device: str = "cpu"
) -> dict[str, Any]:
    """Seconds per part of one file -> vector path, per dtype, with the dtype each part runs in.

    ``preprocess`` is the input transform from a real file (decode, resample, fbank, resize,
    tokenise): pure CPU code that runs in fp32 whatever the model's dtype. The model parts are
    timed by forward hooks over ``reps`` calls of ``Encoder.embed`` (after one warm-up); ``other``
    is the rest of the call (residual adds, casts, the final normalisation).
    """
    cfg = resolve_config(preset)
    out: dict[str, Any] = {"tower": tower, "batch": batch, "dtypes": {}}
    for name in ("float32", *names):
        try:
            enc = load_encoder(config=cfg, modalities=[tower], dtype=name, device=device)
        except ValueError as e:  # int8 on a GPU
            out["dtypes"][name] = {"skipped": str(e)}
            continue
        sample = _sample_file(tower)
        items = [sample] * batch
        x = preprocess(tower, items, enc.preprocess_cfg)
        enc.embed(tower, x)  # warm-up
        spent: dict[str, float] = defaultdict(float)
        total = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            x = preprocess(tower, items, enc.preprocess_cfg)
            spent["preprocess"] += time.perf_counter() - t0
            parts = _parts(enc, tower)
            with _timed_parts(parts, spent):
                t1 = time.perf_counter()
                enc.embed(tower, x)
                total += time.perf_counter() - t1
        model_parts = sum(v for k, v in spent.items() if k != "preprocess")
        spent["other"] = max(total - model_parts, 0.0)
        whole = spent["preprocess"] + total
        runs_in = {k: _runs_in_all(v) for k, v in _parts(enc, tower).items()}
        runs_in["preprocess"] = "float32"
        runs_in["other"] = str(enc.tower_dtypes.get(Modality.parse(tower), enc.dtype)).removeprefix(
            "torch."
        )
        rows = {
            part: {
                "seconds": spent[part] / reps,
                "share": spent[part] / whole if whole else 0.0,
                "runs_in": runs_in[part],
            }
            for part in PARTS
        }
        fp32 = [p for p, r in rows.items() if r["runs_in"] == "float32"]
        out["dtypes"][name] = {
            "parts": rows,
            "seconds_per_batch": whole / reps,
            "fp32_parts": fp32 if name != "float32" else [],
            "fp32_share": sum(rows[p]["share"] for p in fp32) if name != "float32" else 1.0,
        }
        del enc
        gc.collect()
    return out


def _runs_in_all(mods: Sequence[torch.nn.Module]) -> str:
    kinds = sorted({_runs_in(m) for m in mods} - {"n/a"})
    return "+".join(kinds) if kinds else "n/a"


def plot_breakdown(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Stacked bars: per tower and dtype, the seconds of each part; True if written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bars = [
        (f"{row['tower']}\n{name}", d["parts"])
        for row in rows
        for name, d in row["dtypes"].items()
        if "parts" in d
    ]
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(bars)), 4.0))
    bottom = np.zeros(len(bars))
    for part in PARTS:
        vals = np.array([parts[part]["seconds"] for _, parts in bars])
        ax.bar([label for label, _ in bars], vals, bottom=bottom, label=part)
        bottom += vals
    ax.set_ylabel("seconds per batch")
    ax.set_title("Where the time goes, per part and dtype")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(
    preset: str = "imagebind_huge",
    towers: Sequence[str] = ("vision", "audio"),
    batch: int = 4,
    reps: int = 3,
    threads: int | None = None,
    device: str = "cpu",
    matmul_n: int = 2048,
    overlap_n: int = 120,
    out: Path | None = DEFAULT_OUT,
    parts: bool = True,
) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to ``out``) every number."""
    if threads is not None:
        torch.set_num_threads(threads)
    reduced = ("bfloat16", "int8") if device == "cpu" else ("bfloat16", "float16")
    default = dtypes.choose_dtype("auto", device)
    result: dict[str, Any] = {
        "benchmark": f"dtypes_{device}",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "preset": preset,
        "device": device,
        "machine": machine_info(),
        "native_bf16": dtypes.cpu_has_native_bf16() if device == "cpu" else None,
        "native_bf16_flags": list(dtypes.native_bf16_flags()),
        "default_dtype": default.name,
        "default_reason": default.reason,
        "matmul": {},
        "towers": [],
        "retrieval_top10_overlap": {},
        "breakdown": [],
    }
    if device == "cpu":
        log(f"matmul {matmul_n}^2: fp32 vs bf16")
        result["matmul"] = matmul_ratio(matmul_n, reduced, max(reps, 3))
    for tower in towers:
        log(f"{preset} {tower}, batch {batch}")
        result["towers"].append(bench_tower(preset, tower, reduced, batch, reps, device))
        if parts:
            log(f"{preset} {tower}: where the time goes, per part and dtype")
            result["breakdown"].append(breakdown(preset, tower, reduced, batch, reps, device))
    if overlap_n and device == "cpu":
        log(f"retrieval top-10 overlap, demo model, {overlap_n} demo-world samples")
        result["retrieval_top10_overlap"] = retrieval_overlap(reduced, overlap_n)
    print_report(result)
    if out is not None:
        write_json(out, result)
        out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
        log(f"wrote {out} and {out.with_suffix('.md').name}")
        plot = out.parent / "plots" / f"{out.stem}_breakdown.png"
        if plot_breakdown(result["breakdown"], plot):
            log(f"wrote {plot}")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The README's table: speed-up over fp32 and cosine per tower and dtype, the machine."""
    m = result["machine"]
    mm = result["matmul"].get("bfloat16", {}).get("over_fp32")
    head = (
        f"{m['cpu_model']}, {m['torch_threads']} threads, CPU flags: "
        f"{', '.join(m['cpu_flags']) or 'none'}; torch {m['torch_version']}; default dtype "
        f"{result['default_dtype']}; bf16/fp32 matmul rate "
        + ("n/a" if mm is None else f"{mm:.2f}x")
        + f" ({result['when']})"
    )
    lines = [head, "", "| tower | batch | dtype | speed-up over fp32 | min cosine to fp32 |"]
    lines.append("|---|---|---|---|---|")
    for row in result["towers"]:
        for name, d in row["dtypes"].items():
            if "skipped" not in d:
                lines.append(
                    f"| {row['tower']} | {row['batch']} | {name} | "
                    f"{d['speedup_over_fp32']:.2f} | {d['min_cosine']:.5f} |"
                )
    for name, v in result["retrieval_top10_overlap"].items():
        lines.append(f"\nDemo retrieval, top-10 overlap {name} vs fp32: {v:.3f}")
    if result.get("breakdown"):
        lines += [
            "",
            "Where the time goes (share of a batch's time, from the file; the dtype it runs in):",
        ]
        lines += ["", "| tower | dtype | " + " | ".join(PARTS) + " | still fp32 |"]
        lines.append("|---|---|" + "---|" * len(PARTS) + "---|")
        for row in result["breakdown"]:
            for name, d in row["dtypes"].items():
                if "parts" not in d:
                    continue
                cells = [
                    f"{d['parts'][p]['share']:.0%} ({_short(d['parts'][p]['runs_in'])})"
                    for p in PARTS
                ]
                still = "-" if name == "float32" else f"{d['fp32_share']:.0%}"
                lines.append(f"| {row['tower']} | {name} | " + " | ".join(cells) + f" | {still} |")
    return "\n".join(lines) + "\n"


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def print_report(result: dict[str, Any]) -> None:
    m = result["machine"]
    lines = [
        f"{m['cpu_model']} ({m['logical_cpus']} CPUs, {m['torch_threads']} threads), "
        f"flags {', '.join(m['cpu_flags']) or 'none'}; torch {m['torch_version']}",
        f"default dtype here: {result['default_dtype']} ({result['default_reason']})",
    ]
    for name, mm in result["matmul"].items():
        lines.append(f"matmul {name}: {mm['gflop_per_s']:.1f} GFLOP/s ({mm['over_fp32']:.2f}x)")
    for row in result["towers"]:
        for name, d in row["dtypes"].items():
            if "skipped" in d:
                lines.append(f"{row['tower']} {name}: skipped ({d['skipped']})")
                continue
            lines.append(
                f"{row['tower']} batch {row['batch']} {name}: {d['speedup_over_fp32']:.2f}x fp32, "
                f"cosine {d['min_cosine']:.5f}"
            )
    for name, v in result["retrieval_top10_overlap"].items():
        lines.append(f"retrieval top-10 overlap {name} vs fp32: {v:.3f}")
    for row in result.get("breakdown", []):
        for name, d in row["dtypes"].items():
            if "parts" not in d or name == "float32":
                continue
            still = ", ".join(f"{p} {d['parts'][p]['share']:.0%}" for p in d["fp32_parts"])
            lines.append(
                f"{row['tower']} {name}: {d['fp32_share']:.0%} of the time still runs in fp32"
                + (f" ({still})" if still else "")
            )
    log("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.dtypes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 repeats, batch 2, a 512 matmul, 48 demo samples",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="imagebind_huge")
    ap.add_argument(
        "--towers",
        default=None,
        help="comma-separated: vision,audio,text (default vision,audio; --quick on a CPU "
        "without native bf16: audio,text, as emulated bf16 takes minutes on the vision tower)",
    )
    ap.add_argument("--batch", type=int, default=None, help="default 4 (2 --quick)")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats (default 3, 2 --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--matmul-n", type=int, default=None, help="default 2048 (512 --quick)")
    ap.add_argument("--overlap-n", type=int, default=None, help="demo samples (0: skip)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results path")
    ap.add_argument(
        "--no-breakdown",
        action="store_true",
        help="skip the per-part timing (where the time goes, and what still runs in fp32)",
    )
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda was asked for but torch sees no CUDA GPU")
    towers = args.towers
    if towers is None:
        slow_bf16 = args.device == "cpu" and not dtypes.cpu_has_native_bf16()
        towers = "audio,text" if args.quick and slow_bf16 else "vision,audio"
    run(
        preset=args.preset,
        towers=[t.strip() for t in towers.split(",") if t.strip()],
        batch=args.batch or (2 if args.quick else 4),
        reps=args.reps or (2 if args.quick else 3),
        threads=args.threads,
        device=args.device,
        matmul_n=args.matmul_n or (512 if args.quick else 2048),
        overlap_n=args.overlap_n if args.overlap_n is not None else (48 if args.quick else 120),
        out=args.out or DEFAULT_OUT.with_name(f"dtypes_{args.device}.json"),
        parts=not args.no_breakdown,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
