"""Beyond memory: ``index import`` of clustered vectors in clip-retrieval's layout under a memory
budget, then ``index query --vector`` of held-out queries in a fresh process (docs/scale.md).

``import`` (default): the issue's acceptance run. Clustered unit vectors are written shard by
shard (npy + parquet; never all in memory), imported with ``--memory-budget``, and queried by
``bindsearch index query --vector q.npy -k 10 --json`` in its own process, whose peak resident
set (``ru_maxrss`` from ``wait4``) is the figure; recall@10 is against exact search streamed
over the shards; ``index info`` gives the resident and on-disk sizes.

    python -m bench.scale --n 500000 --dim 1024 --budget 256MB    # the full size: 2 GB of vectors
    python -m bench.scale --n 100000 --dim 256 --budget 16MB      # a reduced run

``curves``: build time, resident size, query latency and recall@10 versus N for Flat, HNSW32,
IVF-Flat and the on-disk IVF-PQ, through the same store; JSON plus one plot per quantity.

    python -m bench.scale curves --sizes 20000 50000 100000 --dim 128
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from typing import Any

import numpy as np

from bench._common import log, machine_info, write_json

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SHARD_ROWS = 50_000
CENTRES = 1000
SPREAD = 0.8


def centres(dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((CENTRES, dim)).astype(np.float32)


def clustered_block(c: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors around the centres ``c`` (a stand-in for real embeddings)."""
    x = c[rng.integers(0, len(c), n)]
    x = x + SPREAD * rng.standard_normal(x.shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_corpus(folder: Path, n: int, dim: int, seed: int = 0) -> list[Path]:
    """clip-retrieval's layout, one shard at a time; returns the vector files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    c = centres(dim)
    rng = np.random.default_rng(seed + 1)
    files = []
    for i, start in enumerate(range(0, n, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n - start)
        f = folder / "img_emb" / f"img_emb_{i}.npy"
        np.save(f, clustered_block(c, rows, rng))
        ids = range(start, start + rows)
        table = pa.table({"image_path": [f"img/{j}.jpg" for j in ids]})
        pq.write_table(table, folder / "metadata" / f"metadata_{i}.parquet")
        files.append(f)
    return files


def exact_top_k(q: np.ndarray, files: list[Path], k: int) -> np.ndarray:
    """Exact inner-product top-``k`` ids, streamed over the shard files (one in memory)."""
    import faiss

    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    first = 0
    for f in files:
        x = np.load(f)
        d, i = faiss.knn(q, x, min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, np.where(i >= 0, i + first, -1))
        first += len(x)
    heap.finalize()
    return np.asarray(heap.I)


# The child reports its own peak (VmHWM of its address space, read at exit): ``ru_maxrss`` from
# wait4 would also count the pages it shared with this (large) process between fork and exec.
_WRAP = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write('PEAK_RSS_KB=' + line.split()[1] + '\\n')\n"
    "atexit.register(_peak)\n"
    "sys.argv = ['bindsearch', *sys.argv[1:]]\n"
    "from bindsearch.cli import main\n"
    "main()\n"
)


def run_measured(args: list[str]) -> tuple[subprocess.CompletedProcess[str], int, float]:
    """``bindsearch ARGS`` in a fresh process: its output, peak resident bytes, wall seconds."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _WRAP, *args], capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - t0
    peak = [int(x.split("=")[1]) for x in done.stderr.splitlines() if x.startswith("PEAK_RSS_KB=")]
    return done, (peak[-1] * 1024 if peak else 0), wall


def cli(*args: str) -> list[str]:
    """The arguments of one ``bindsearch`` command (``run_measured`` runs them)."""
    return list(args)


def bench_import(n: int, dim: int, budget: str, queries: int, work: Path) -> dict[str, Any]:
    from index.spec import recall_at_k

    t0 = time.perf_counter()
    files = write_corpus(work / "emb", n, dim)
    log(f"wrote {n} x {dim} vectors in {time.perf_counter() - t0:.0f} s")
    rng = np.random.default_rng(99)
    q = clustered_block(centres(dim), queries, rng)  # held out: never imported
    np.save(work / "q.npy", q)
    idx = work / "idx"
    done, import_rss, import_s = run_measured(
        cli(
            *("index", "import", str(work / "emb"), "-o", str(idx), "-m", "vision"),
            *("--dim", str(dim), "--memory-budget", budget, "--no-progress"),
        )
    )
    if done.returncode:
        raise SystemExit(f"import failed: {done.stderr.strip()}")
    log(f"imported in {import_s:.0f} s, peak RSS {import_rss / 1e6:.0f} MB")
    done, query_rss, query_s = run_measured(
        cli("index", "query", str(idx), "--vector", str(work / "q.npy"), "-k", "10", "--json")
    )
    if done.returncode:
        raise SystemExit(f"query failed: {done.stderr.strip()}")
    got = np.array(
        [[r["id"] for r in json.loads(line)["results"]] for line in done.stdout.splitlines()]
    )
    recall = recall_at_k(got, exact_top_k(q, files, 10), 10)
    info = json.loads(run_measured(cli("index", "info", str(idx), "--json"))[0].stdout)
    entry = info["modalities"]["vision"]
    result = {
        "n": n,
        "dim": dim,
        "vector_bytes": n * dim * 4,
        "memory_budget": budget,
        "recipe": entry["spec"],
        "build_recall": entry["recall"],
        "sizes": info["sizes"]["vision"],
        "import_s": round(import_s, 1),
        "import_peak_rss_bytes": import_rss,
        "queries": queries,
        "query_process_s": round(query_s, 2),
        "query_peak_rss_bytes": query_rss,
        "recall_at_10_held_out": round(recall, 4),
    }
    log(json.dumps(result, indent=2))
    return result


def bench_curves(sizes: list[int], dim: int, budget_share: float) -> dict[str, Any]:
    """Build time, resident size, latency and recall versus N for four recipes."""
    import faiss

    from index.search import open_index
    from index.spec import IndexSpec, recall_at_k
    from index.store import IndexStore, ItemRecord

    fp = {"checkpoint": "bench", "digest": "bench"}
    rows: list[dict[str, Any]] = []
    c = centres(dim)
    for n in sizes:
        x = clustered_block(c, n, np.random.default_rng(n))
        q = clustered_block(c, 100, np.random.default_rng(n + 1))
        _, truth = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        nlist = max(64, int(2 ** round(np.log2(np.sqrt(n)))))
        budget = int(n * dim * 4 * budget_share)
        recipes = {
            "Flat": ("Flat", None),
            "HNSW32": ("HNSW32", None),
            "IVF-Flat": (f"IVF{nlist},Flat", None),
            "IVF-PQ on disk": ("auto", budget),
        }
        for name, (factory, mem) in recipes.items():
            root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
            try:
                with IndexStore.create(root / "idx", fp, dim, {}) as store:
                    for s in range(0, n, 16384):
                        part = x[s : s + 16384]
                        items = [ItemRecord(f"{j}", "vision", "", 0) for j in range(len(part))]
                        store.commit_chunk([], items, part)
                    t0 = time.perf_counter()
                    manifest = store.refresh(factory=factory, memory_budget=mem)
                    build_s = time.perf_counter() - t0
                entry = manifest.modalities["vision"]
                spec: IndexSpec = entry.spec
                with open_index(root / "idx") as s:
                    s.search(q[:5], 10)  # warm
                    t0 = time.perf_counter()
                    got = np.array([[h.item.id for h in s.search(q[i], 10)[0]] for i in range(100)])
                    latency_ms = (time.perf_counter() - t0) * 10
                from index.ondisk import sizes as sizes_of

                size = sizes_of(root / "idx", entry.file, entry.data_file, entry.ntotal, dim)
                rows.append(
                    {
                        "n": n,
                        "recipe": name,
                        "factory": spec.factory,
                        "storage": spec.storage,
                        "search_params": dict(spec.search_params),
                        "build_s": round(build_s, 2),
                        "resident_bytes": size["resident_bytes"],
                        "on_disk_bytes": size["on_disk_bytes"],
                        "latency_ms_one_query": round(latency_ms, 3),
                        "recall_at_10": round(recall_at_k(got, truth, 10), 4),
                    }
                )
                log(json.dumps(rows[-1]))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    return {"dim": dim, "budget_share_for_disk": budget_share, "rows": rows}


def plot_curves(data: dict[str, Any], out: Path) -> list[Path]:
    """One plot per quantity versus N, a line per recipe (when matplotlib is installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    recipes = sorted({r["recipe"] for r in data["rows"]})
    for key, label in [
        ("build_s", "build time (s)"),
        ("resident_bytes", "resident bytes"),
        ("latency_ms_one_query", "latency per query (ms)"),
        ("recall_at_10", "recall@10 (held-out queries)"),
    ]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name in recipes:
            pts = [(r["n"], r[key]) for r in data["rows"] if r["recipe"] == name]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("vectors (N)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"scale_{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", nargs="?", default="import", choices=["import", "curves"])
    p.add_argument("--n", type=int, default=500_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--budget", default="256MB")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 100_000])
    p.add_argument(
        "--budget-share",
        type=float,
        default=0.25,
        help="curves: the on-disk recipe's budget as a share of the vectors' bytes",
    )
    p.add_argument("--work", type=Path, default=None, help="where to write the corpus (temp)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.what == "curves":
        data = {"machine": machine_info(), **bench_curves(args.sizes, args.dim, args.budget_share)}
        out = args.out or RESULTS / "scale_curves_cpu.json"
        write_json(out, data)
        for path in plot_curves(data, out.parent / "plots"):
            log(f"wrote {path}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work))
    try:
        result = bench_import(args.n, args.dim, args.budget, args.queries, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = args.out or RESULTS / f"scale_import_{args.n}x{args.dim}.json"
    write_json(out, {"machine": machine_info(), **result})
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
