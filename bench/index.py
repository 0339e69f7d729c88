"""Index benchmarks: the auto recipe's search speed-up over exact search at its recorded recall,
and the build pipeline's overlap ratio (time the model is busy / wall time of the build).

1. ``--vectors`` synthetic clustered unit vectors (default 200k x 64): ``--factory auto``
   builds its recipe (IVF-Flat at this size), tunes ``nprobe`` to recall@10 >= 0.95 on held-out
   queries; then fresh queries are searched by the tuned index and by exact ``Flat``,
   interleaved rep by rep, and the ratio of median times is printed with the recall on them.
2. A generated media corpus (images, audio, short videos with soundtracks) is built with the
   real pipeline and ``--workers`` decode processes; the summary's model-busy time over the
   build's wall time is the overlap ratio. With the tiny test model the model is cheap, so the
   ratio mostly measures decoding; run it with ``--config imagebind_huge --checkpoint ...
   --device cuda`` to see how well decoding keeps a real model fed.

    .venv/bin/python -m bench.index --quick
    .venv/bin/python bench/index.py --vectors 200000 --dim 1024 --workers 2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import shutil
import tempfile
from datetime import UTC, datetime
from typing import Any

import faiss
import numpy as np

from bench._common import log, machine_info, time_interleaved, write_json
from encoders.config import resolve_config
from index import BuildOptions, ModelSource, build_index, choose_spec, recall_at_k
from index.spec import ArraySource, apply_search_params, new_index, train_and_fill

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "index_cpu.json"


def clustered(n: int, d: int, centers: int, seed: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(12345).standard_normal((centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_recipe(n: int, d: int, queries: int, reps: int) -> dict[str, Any]:
    spread = 0.8  # noise and centres both scale with sqrt(d): the same difficulty at any d
    x = clustered(n, d, max(100, n // 200), seed=0, spread=spread)
    q = clustered(queries, d, max(100, n // 200), seed=1, spread=spread)
    spec = choose_spec(n, d)
    log(f"auto recipe for {n} x {d}: {spec.factory}; training and tuning")
    approx, tuned, report = train_and_fill(spec, d, ArraySource(x))
    flat = new_index(choose_spec(1, d), d)
    flat.add_with_ids(x, np.arange(n, dtype=np.int64))
    apply_search_params(approx, tuned)
    timings = time_interleaved(
        {"flat": lambda: flat.search(q, 10), "auto": lambda: approx.search(q, 10)},
        warmup=1, reps=reps,
    )
    _, exact = timings["flat"].last
    _, got = timings["auto"].last
    recall = recall_at_k(got, exact, 10)
    speedup = timings["flat"].median_s / timings["auto"].median_s
    print(f"recipe: {tuned.factory} {tuned.parameter_string()} (trained on {tuned.train_size})")
    print(f"recall@10 recorded at build (held-out): {report.recall if report else 1.0:.4f}; "
          f"on {queries} fresh queries: {recall:.4f}")
    print(f"search speed-up over exact Flat at that recall: {speedup:.1f}x "
          f"(flat {timings['flat'].median_s * 1e3:.1f} ms, auto "
          f"{timings['auto'].median_s * 1e3:.1f} ms per {queries} queries, "
          f"{faiss.omp_get_max_threads()} threads)")
    return {
        "vectors": n, "dim": d, "queries": queries, "spec": tuned.to_dict(),
        "recall_recorded": None if report is None else report.to_dict(),
        "recall_fresh_queries": recall, "speedup_over_flat": speedup,
        "timings": {k: v.to_dict() for k, v in timings.items()},
    }


def bench_overlap(workers: int, files: int, config: str, checkpoint: str | None,
                  device: str) -> dict[str, Any]:
    from tests.test_index_media import audio, image, video

    tmp = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        corpus = tmp / "corpus"
        corpus.mkdir()
        for i in range(files):
            kind = i % 4
            if kind in (0, 1):
                image(corpus / f"img{i:04d}.png", seed=i, size=320)
            elif kind == 2:
                audio(corpus / f"snd{i:04d}.wav", seed=i, seconds=8.0, rate=44100)
            else:
                video(corpus / f"vid{i:04d}.mp4", seed=i, seconds=4.0, size=160, audio_seed=i)
        model = ModelSource(resolve_config(config), None if checkpoint is None else
                            Path(checkpoint), device)
        model.load([])  # load outside the timed build
        out: dict[str, Any] = {}
        for w in sorted({0, workers}):
            log(f"building {files} files with {w} decode workers")
            s = build_index(corpus, tmp / f"idx{w}", model, BuildOptions(workers=w))
            print(f"workers={w}: {s.embedded_items} items in {s.wall_s:.1f} s; model busy "
                  f"{s.model_s:.1f} s; overlap ratio {s.overlap:.2f}; waited "
                  f"{s.decode_wait_s:.1f} s for decoding")
            out[f"workers_{w}"] = {"items": s.embedded_items, "wall_s": s.wall_s,
                                   "model_s": s.model_s, "decode_wait_s": s.decode_wait_s,
                                   "overlap": s.overlap}
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vectors", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--files", type=int, default=48, help="media files for the overlap build")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", default="imagebind_test")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="16 files, 3 reps")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    if a.quick:
        a.files, a.reps = 16, 3
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "recipe": bench_recipe(a.vectors, a.dim, a.queries, a.reps),
        "overlap": bench_overlap(a.workers, a.files, a.config, a.checkpoint, a.device),
    }
    log(f"wrote {write_json(a.out, result)}")


if __name__ == "__main__":
    main()
