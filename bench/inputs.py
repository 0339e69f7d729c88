"""Decode+preprocess throughput per modality over the model's throughput on the same batch.

A ratio above 1 means one decoding worker keeps up with the model; below 1, decoding would
starve it (the index build then needs about 1/ratio decode workers). Both sides are measured
in this run, on this machine, on the same generated files:

    python -m bench.inputs [--preset imagebind_huge] [--batch 4] [--modalities vision,audio]

Writes bench/results/inputs_<preset>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from encoders import load_encoder


def _media(modality: str, rng: np.random.Generator) -> bytes | str:
    """One realistic input of each modality, generated."""
    if modality == "text":
        return "a golden retriever running across a wet beach at sunset, photographed from afar"
    buf = io.BytesIO()
    if modality == "vision":
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
    elif modality in ("depth", "thermal"):
        from PIL import Image

        arr = rng.integers(500, 5000, (480, 640)).astype(np.uint16)
        Image.fromarray(arr).save(buf, "PNG")
    elif modality == "audio":
        import soundfile as sf

        sf.write(
            buf,
            0.1 * rng.standard_normal((44100 * 10, 2)).astype(np.float32),
            44100,
            format="WAV",
            subtype="PCM_16",
        )
    elif modality == "imu":
        t = np.arange(2000) / 200.0
        rows = np.column_stack([t, rng.standard_normal((2000, 6))])
        buf.write(b"t,ax,ay,az,gx,gy,gz\n")
        np.savetxt(buf, rows, delimiter=",", fmt="%.5f")
    elif modality == "video":
        import av

        with av.open(buf, "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
            for _ in range(30 * 5):
                frame = av.VideoFrame.from_ndarray(
                    rng.integers(0, 255, (360, 640, 3), dtype=np.uint8), format="rgb24"
                )
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    else:
        raise ValueError(modality)
    return buf.getvalue()


def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="imagebind_huge")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modalities", default="vision,video,text,audio,depth,thermal,imu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'modality':9} {'decode items/s':>15} {'model items/s':>14} {'ratio':>7}")
    for m in args.modalities.split(","):
        print(f"[{m}] generating media, loading the {m} tower ...", file=sys.stderr)
        items = [_media(m, rng) for _ in range(args.batch)]
        enc = load_encoder(config=args.preset, modalities=[m], dtype=torch.float32)
        decode_s = _median_time(lambda: enc.preprocess(m, items), args.reps)  # noqa: B023
        x = enc.preprocess(m, items)
        model_s = _median_time(lambda: enc.embed(m, x), args.reps)  # noqa: B023
        row = {
            "modality": m,
            "batch": args.batch,
            "decode_items_per_s": args.batch / decode_s,
            "model_items_per_s": args.batch / model_s,
            "ratio": model_s / decode_s,
        }
        rows.append(row)
        print(
            f"{m:9} {row['decode_items_per_s']:15.1f} {row['model_items_per_s']:14.2f} "
            f"{row['ratio']:7.2f}"
        )

    result: dict[str, object] = {
        "preset": args.preset,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"inputs_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
