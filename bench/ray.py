"""The Ray engine against the local build: throughput and the per-item overhead Ray adds.

One generated corpus (photo-sized JPEGs and captions of mixed length), one model, built by
``index.build_index`` (the local pipeline, decode worker processes) and by
``index.ray_engine.build_index_ray`` on a local Ray instance with the same CPUs, side by side,
rep by rep in alternating order. Reported:

* **ray over local**: items/s of the Ray build over items/s of the local build (< 1 on one
  machine, where Ray can only add scheduling, serialisation and an actor start per build);
* **overhead per item**: ``(t_ray - t_local) / n`` at the larger corpus size (what the brief
  asks: the whole difference, actor start included, spread over the items), and the marginal
  figure from two corpus sizes, ``((t_ray - t_local)(n2) - (t_ray - t_local)(n1)) / (n2 - n1)``,
  which leaves out the fixed cost per build (actor start, shard planning).

The Ray instance is started once, before timing (a cluster is already up in real use); each
timed Ray build still starts its embedding actor and loads the model in it.

    .venv/bin/python -m bench.ray --quick
    .venv/bin/python -m bench.ray --sizes 200 600 --preset imagebind_demo
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from bench._common import log, machine_info, write_json
from bench.throughput import random_texts
from encoders import load_encoder
from encoders.config import resolve_config
from index import BuildOptions, ModelSource, build_index

RESULTS = Path(__file__).resolve().parent / "results"


def write_corpus(folder: Path, n: int, seed: int = 0) -> int:
    """``n`` files: half 320x240 JPEGs, half captions. Returns the item count (one per file)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:320]
    images = n // 2
    for i in range(images):
        base = (xx * rng.uniform(0.1, 0.8) + yy * rng.uniform(0.1, 0.8))[..., None]
        img = (base + rng.integers(0, 60, (240, 320, 3))) % 256
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
        (folder / f"img{i:05d}.jpg").write_bytes(buf.getvalue())
    for i, t in enumerate(random_texts(n - images, seed)):
        (folder / f"cap{i:05d}.txt").write_text(t, encoding="utf-8")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small corpora (a 2-core box)")
    p.add_argument(
        "--sizes",
        type=int,
        nargs=2,
        default=None,
        metavar=("N1", "N2"),
        help="two corpus sizes in files (default 64 256; --quick 32 128)",
    )
    p.add_argument("--preset", default="imagebind_test", help="model preset (random weights)")
    p.add_argument("--reps", type=int, default=None, help="timed reps (default 3; --quick 2)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs for both engines")
    p.add_argument("--out", type=Path, default=RESULTS / "ray_cpu.json")
    args = p.parse_args(argv)
    import ray

    from index.ray_engine import build_index_ray

    sizes = args.sizes or ([32, 128] if args.quick else [64, 256])
    reps = args.reps or (2 if args.quick else 3)
    torch.set_num_threads(1)  # the model's share of the CPUs in both engines: one embedder
    cfg = resolve_config(args.preset)
    enc = load_encoder(config=args.preset)
    local_model = ModelSource(cfg, None, encoder=enc)
    ray_model = ModelSource(cfg, None)  # each actor builds the same seeded random weights
    opts: dict[str, Any] = {"batch_size": 16, "chunk_items": 64, "progress": False}
    # Local: the model in this process and cpus - 1 decode workers. Ray: one actor per CPU,
    # each decoding and embedding its shards (its default with workers=0). Both use every CPU.
    local_workers = max(1, args.cpus - 1)

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    log(f"starting a local Ray instance with {args.cpus} CPUs")
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        object_store_memory=200 << 20,
        logging_level="WARNING",
    )
    try:
        corpora = {n: work / f"corpus{n}" for n in sizes}
        for n, folder in corpora.items():
            write_corpus(folder, n, seed=n)

        def local(n: int) -> float:
            out = work / "idx"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            s = build_index(
                corpora[n], out, local_model, BuildOptions(workers=local_workers, **opts)
            )
            dt = time.perf_counter() - t0
            if s.embedded_items != n:
                raise RuntimeError(f"local build embedded {s.embedded_items} of {n} items")
            return dt

        def on_ray(n: int) -> float:
            out = work / "idx"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            s = build_index_ray(corpora[n], out, ray_model, BuildOptions(**opts))
            dt = time.perf_counter() - t0
            if s.embedded_items != n:
                raise RuntimeError(f"Ray build embedded {s.embedded_items} of {n} items")
            return dt

        log("warm-up (one build of each, untimed)")
        local(sizes[0])
        on_ray(sizes[0])
        times: dict[str, dict[int, list[float]]] = {"local": {}, "ray": {}}
        for rep in range(reps):
            for n in sizes:
                order = [("local", local), ("ray", on_ray)]
                for name, fn in order if rep % 2 == 0 else order[::-1]:
                    dt = fn(n)
                    times[name].setdefault(n, []).append(dt)
                    log(f"rep {rep}: {name:5s} {n:4d} items {dt:6.2f} s ({n / dt:6.1f} items/s)")
        med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in times.items()}
        n1, n2 = sizes
        rate = {k: n2 / med[k][n2] for k in med}
        diff = {n: med["ray"][n] - med["local"][n] for n in sizes}
        result: dict[str, Any] = {
            "bench": "ray",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "loadavg_1_5_15": os.getloadavg(),  # a shared box: how busy it was
            "ray": {"version": ray.__version__, "cluster": ray.cluster_resources()},
            "preset": args.preset,
            "cpus": args.cpus,
            "local_decode_workers": local_workers,
            "sizes": sizes,
            "reps": reps,
            "times_s": times,
            "median_s": med,
            "items_per_s": rate,
            "ray_over_local": rate["ray"] / rate["local"],
            "overhead_ms_per_item": 1000 * diff[n2] / n2,
            "marginal_overhead_ms_per_item": 1000 * (diff[n2] - diff[n1]) / (n2 - n1),
            "fixed_overhead_s": diff[n1] - n1 * (diff[n2] - diff[n1]) / (n2 - n1),
        }
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, result)
    print(
        f"corpus: {n2} items ({n2 // 2} JPEGs + {n2 - n2 // 2} captions), model {args.preset}, "
        f"{args.cpus} CPUs"
    )
    print(f"local: {rate['local']:7.1f} items/s   ray: {rate['ray']:7.1f} items/s")
    print(f"ray over local throughput: {result['ray_over_local']:.3f}")
    print(
        f"overhead Ray adds: {result['overhead_ms_per_item']:.1f} ms/item "
        f"((t_ray - t_local) / n at n={n2}); marginal "
        f"{result['marginal_overhead_ms_per_item']:.1f} ms/item, fixed "
        f"{result['fixed_overhead_s']:.1f} s per build"
    )
    if result["marginal_overhead_ms_per_item"] < 0:
        print("(a negative marginal figure is below this machine's timing noise)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
