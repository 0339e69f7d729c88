"""Decode+preprocess throughput per modality over the model's throughput on the same batch.

A ratio above 1 means one decoding worker keeps up with the model; below 1, decoding would
starve it (the index build then needs about 1/ratio decode workers). Both sides are measured
in this run, on this machine, on the same generated files:

    python -m bench.inputs [--quick] [--device cuda] [--batch 4] [--modalities vision,audio]

Decoding is one process on the CPU; the model runs on ``--device`` (bf16 on CUDA). Writes
bench/results/inputs_<device>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench._common import machine_info
from encoders import Encoder, load_encoder


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


def _median_time(fn: Callable[[], object], reps: int, sync: bool = False) -> float:
    def run() -> None:
        fn()
        if sync:
            torch.cuda.synchronize()

    run()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(
    enc: Encoder, m: str, items: list[bytes | str], reps: int, cuda: bool
) -> tuple[float, float]:
    """Seconds to decode+preprocess the batch, and to embed it."""
    decode_s = _median_time(lambda: enc.preprocess(m, items), reps)
    x = enc.preprocess(m, items)
    return decode_s, _median_time(lambda: enc.embed(m, x), reps, sync=cuda)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="imagebind_huge")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="default 4 (1 --quick, 32 cuda)")
    ap.add_argument("--reps", type=int, default=None, help="default 3 (1 --quick)")
    ap.add_argument("--modalities", default="vision,video,text,audio,depth,thermal,imu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="batch 1, one timed repeat")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    batch = args.batch or (32 if cuda else 1 if args.quick else 4)
    reps = args.reps or (1 if args.quick else 3)
    dtype = torch.bfloat16 if cuda else torch.float32
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'modality':9} {'decode items/s':>15} {'model items/s':>14} {'ratio':>7}")
    for m in args.modalities.split(","):
        print(f"[{m}] generating media, loading the {m} tower ...", file=sys.stderr)
        try:
            items = [_media(m, rng) for _ in range(batch)]
        except ImportError as e:  # e.g. PyAV absent on a GPU box: report, go on
            print(f"{m:9} skipped: {e}")
            continue
        enc = load_encoder(config=args.preset, modalities=[m], device=args.device, dtype=dtype)
        decode_s, model_s = _measure(enc, m, items, reps, cuda)
        row = {
            "modality": m,
            "batch": batch,
            "decode_items_per_s": batch / decode_s,
            "model_items_per_s": batch / model_s,
            "ratio": model_s / decode_s,
        }
        rows.append(row)
        print(
            f"{m:9} {row['decode_items_per_s']:15.1f} {row['model_items_per_s']:14.2f} "
            f"{row['ratio']:7.2f}"
        )
        del enc  # free the tower before the next one loads

    result: dict[str, object] = {
        "benchmark": "inputs",
        "preset": args.preset,
        "device": args.device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": machine_info(),
        "quick": args.quick,
        "rows": rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"inputs_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
    raise SystemExit(0)
