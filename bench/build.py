"""The index build pipeline: how busy it keeps the model (ratio 5).

A generated corpus is built with the real pipeline (``index.build_index``) and decode worker
processes; ``BuildSummary.model_s`` (time inside ``Encoder.embed``) over the build's wall time
is the model-busy ratio (target >= 0.85 where decoding can keep up). Whether it can is measured
in the same run: the same files decoded by the same number of workers with no model, items/s,
against the model's items/s in the build.

* images: JPEGs (640x480) through the ``imagebind_huge`` vision tower (random weights; bf16 on
  CUDA) — the case where decoding should keep up;
* text: captions of mixed length through the text tower, with length bucketing on
  (``index.engine.TEXT_BUCKET_BATCHES``) and off, side by side.

    .venv/bin/python -m bench.build --quick
    python -m bench.build --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import io
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from bench._common import log, machine_info, write_json
from bench.throughput import random_texts
from encoders import Encoder, load_encoder
from index import BuildOptions, ModelSource, build_index, engine
from index._decode import DecodeTask, decode, init_worker


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    """Photo-sized JPEGs (smooth gradients + noise, so they compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    noise = rng.integers(0, 60, (480 + 64, 640 + 64, 3), dtype=np.uint8)
    for i in range(n):
        base = (xx * rng.uniform(0.1, 0.4) + yy * rng.uniform(0.1, 0.4))[..., None]
        dy, dx = rng.integers(0, 64, 2)  # a shifted window of one noise field: distinct files
        img = (base + noise[dy : dy + 480, dx : dx + 640]) % 256
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
        (folder / f"img{i:05d}.jpg").write_bytes(buf.getvalue())


def write_texts(folder: Path, n: int, seed: int = 0) -> None:
    for i, t in enumerate(random_texts(n, seed)):
        (folder / f"cap{i:05d}.txt").write_text(t, encoding="utf-8")


def decode_rate(folder: Path, modality: str, enc: Encoder, workers: int) -> float:
    """Items/s of decoding every file of ``folder`` with ``workers`` processes, no model."""
    files = sorted(folder.iterdir())
    tasks = [
        DecodeTask(i, str(f), modality, enc.preprocess_cfg, 10.0, False)
        for i, f in enumerate(files)
    ]
    t0 = time.perf_counter()
    if workers > 0:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, ctx, initializer=init_worker) as pool:
            list(pool.map(decode, tasks[:workers]))  # start-up is not decoding
            t0 = time.perf_counter()
            items = sum(len(d.items) for d in pool.map(decode, tasks, chunksize=4))
    else:
        items = sum(len(decode(t).items) for t in tasks)
    return items / (time.perf_counter() - t0)


def one_build(
    corpus: Path, out: Path, enc: Encoder, workers: int, batch: int, label: str
) -> dict[str, Any]:
    source = ModelSource(enc.config, None, str(enc.device), encoder=enc)
    s = build_index(corpus, out, source, BuildOptions(workers=workers, batch_size=batch))
    model_rate = s.embedded_items / s.model_s if s.model_s > 0 else float("inf")
    log(
        f"  {label}: {s.embedded_items} items in {s.wall_s:.1f} s, model busy {s.model_s:.1f} s "
        f"({s.overlap:.2f}), waited {s.decode_wait_s:.1f} s for decoding"
    )
    return {
        "items": s.embedded_items,
        "wall_s": s.wall_s,
        "model_s": s.model_s,
        "decode_wait_s": s.decode_wait_s,
        "overlap": s.overlap,
        "model_items_per_s": model_rate,
    }


def run(device: str, quick: bool, workers: int | None) -> dict[str, Any]:
    cuda = device == "cuda"
    n_images = 6 if quick else 2048
    n_texts = 32 if quick else 4096
    batch = 2 if quick else 64
    w = workers if workers is not None else (1 if quick else max(1, (os.cpu_count() or 2) - 1))
    dtype = torch.bfloat16 if cuda else torch.float32
    log(f"loading imagebind_huge vision + text on {device} ({dtype})")
    enc = load_encoder(
        config="imagebind_huge", modalities=["vision", "text"], device=device, dtype=dtype
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-build-"))
    builds = []
    text: dict[str, Any] = {}
    try:
        images, texts = tmp / "images", tmp / "texts"
        images.mkdir()
        texts.mkdir()
        write_images(images, n_images)
        write_texts(texts, n_texts)
        rate = decode_rate(images, "vision", enc, w)
        b = one_build(images, tmp / "idx_images", enc, w, batch, f"{n_images} images, {w} workers")
        b.update(
            {
                "corpus": f"{n_images} JPEG 640x480, huge vision {str(dtype)[6:]}",
                "workers": w,
                "batch": batch,
                "decode_items_per_s": rate,
                "decode_keeps_up": rate >= b["model_items_per_s"],
            }
        )
        log(
            f"  decoding alone: {rate:.1f} images/s with {w} workers; the model "
            f"{b['model_items_per_s']:.1f}/s"
        )
        builds.append(b)
        old = engine.TEXT_BUCKET_BATCHES
        tb = 8 if quick else 256
        try:
            for bucket in (1, old):
                engine.TEXT_BUCKET_BATCHES = bucket
                text[f"bucket_{bucket}"] = one_build(
                    texts,
                    tmp / f"idx_text{bucket}",
                    enc,
                    0,
                    tb,
                    f"{n_texts} captions, bucketing x{bucket}",
                )
        finally:
            engine.TEXT_BUCKET_BATCHES = old
        text["bucketing_model_speedup"] = (
            text["bucket_1"]["model_s"] / text[f"bucket_{old}"]["model_s"]
        )
        text["bucketing_wall_speedup"] = (
            text["bucket_1"]["wall_s"] / text[f"bucket_{old}"]["wall_s"]
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"builds": builds, "text_bucketing": text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workers", type=int, default=None, help="decode processes")
    p.add_argument("--quick", action="store_true", help="6 images, 32 captions")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    result = {
        "benchmark": "build",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": a.device,
        "quick": a.quick,
        "machine": machine_info(),
        **run(a.device, a.quick, a.workers),
    }
    for b in result["builds"]:
        print(
            f"(5) {b['corpus']}, {b['workers']} workers: model busy {b['model_s']:.1f} s of "
            f"{b['wall_s']:.1f} s = {b['overlap']:.2f} (target >= 0.85); decoding alone "
            f"{b['decode_items_per_s']:.1f}/s vs model {b['model_items_per_s']:.1f}/s"
        )
    t = result["text_bucketing"]
    print(
        f"text length bucketing: model time {t['bucketing_model_speedup']:.2f}x faster, "
        f"build {t['bucketing_wall_speedup']:.2f}x"
    )
    out = a.out or Path(__file__).resolve().parent / "results" / f"build_{a.device}.json"
    log(f"wrote {write_json(out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
