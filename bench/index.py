"""Search benchmarks: exact search against the memory-bandwidth bound, and the ANN recipes.

On synthetic clustered unit vectors (ImageBind's 1024 dimensions by default), in one run:

* **data**: clusters in a low-dimensional space mapped to ``--dim`` dimensions (see
  ``clustered``), queries drawn apart from the database;
* **memory bandwidth**: the median rate of summing the whole database (numpy, one thread, and
  torch, all threads; the faster is the machine's bound), timed in the same interleaved rounds
  as the searches;
* **ratio 7**: exact ``Flat`` search of single queries as the service runs it
  (``index.search.FlatScan``: one BLAS matrix-vector product over the index's vectors and a
  partial sort): queries/s over the bound ``bandwidth / (n * d * 4)``, since each query
  streams the whole database once. Recorded beside it: FAISS's own ``IndexFlat.search`` of
  one query (one thread per query, one vector at a time), a threaded ``torch``
  matrix-vector product + top-k, and the batched rate;
* **ratio 8**: recall@10 vs queries/s (batched) for each recipe ``--factory auto`` can pick
  (IVF-Flat, IVF-PQ) and HNSW, sweeping ``nprobe``/``efSearch``; the best speed-up over exact
  ``Flat`` among points with recall@10 >= 0.95, and the IVF-PQ recipe's memory compression
  (serialised bytes of Flat over IVF-PQ).

FAISS runs on the CPU (faiss-cpu); ``--device`` only names the results file.

    .venv/bin/python -m bench.index --quick
    .venv/bin/python -m bench.index --vectors 1000000 --dim 1024 --no-hnsw
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import faiss
import numpy as np
import torch

from bench._common import log, machine_info, time_fn, time_interleaved, write_json
from index import recall_at_k
from index.search import FlatScan
from index.spec import IndexSpec, new_index

MIN_RECALL = 0.95


def clustered(n: int, d: int, centers: int, seed: int, latent: int = 48) -> np.ndarray:
    """Unit vectors with the low intrinsic dimension of real embeddings.

    A mixture of ``centers`` Gaussian clusters in a ``latent``-dimensional space, mapped to
    ``d`` dimensions by one fixed random linear map, plus a little isotropic noise. (Pure
    isotropic noise in 1024 dimensions makes every neighbour nearly equidistant, which no
    real embedding does.) Unit spread makes neighbouring clusters overlap, so IVF needs a few
    probes for recall@10 >= 0.95, as on real embeddings. The centres and the map are the
    same for every ``seed``.
    """
    fixed = np.random.default_rng(12345)
    c = fixed.standard_normal((centers, latent), dtype=np.float32)
    w = fixed.standard_normal((latent, d), dtype=np.float32) / np.float32(np.sqrt(latent))
    rng = np.random.default_rng(seed)
    z = c[rng.integers(0, centers, n)] + rng.standard_normal((n, latent), dtype=np.float32)
    x = z @ w
    x += 0.05 * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bandwidth_probes(x: np.ndarray, sweeps: int) -> dict[str, Callable[[], None]]:
    """Read-bandwidth probes over ``x``, ``sweeps`` full reads each: numpy's sum (one thread) and
    torch's (all threads). Timed interleaved with the searches, so both see the same machine."""
    t = torch.from_numpy(x)

    def numpy_sum() -> None:
        for _ in range(sweeps):
            x.sum(dtype=np.float32)

    def torch_sum() -> None:
        for _ in range(sweeps):
            t.sum()

    return {"bw_numpy_1_thread": numpy_sum, "bw_torch_all_threads": torch_sum}


def _nlist(n: int) -> int:
    return int(max(64, min(65536, 2 ** round(np.log2(np.sqrt(n))))))


def _set(index: faiss.Index, name: str, value: int) -> None:
    faiss.ParameterSpace().set_index_parameter(index, name, value)


def build(factory: str, x: np.ndarray, train: int) -> tuple[faiss.Index, float]:
    """A recipe built as the index builds it (``IDMap2`` + factory, inner product)."""
    t0 = time.perf_counter()
    index = new_index(IndexSpec(factory), x.shape[1])
    if not index.is_trained:
        rng = np.random.default_rng(7)
        index.train(x[rng.choice(len(x), min(train, len(x)), replace=False)])
    index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    return index, time.perf_counter() - t0


def index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def sweep(
    index: faiss.Index,
    param: str,
    values: list[int],
    q: np.ndarray,
    truth: np.ndarray,
    reps: int,
) -> list[dict[str, Any]]:
    """Recall@10 and batched queries/s for each value of the search parameter."""
    out = []
    for v in values:
        _set(index, param, v)
        t = time_fn(lambda: index.search(q, 10), warmup=1, reps=reps)
        _, got = t.last
        out.append(
            {
                "param": f"{param}={v}",
                "value": v,
                "recall": recall_at_k(got, truth, 10),
                "qps": len(q) / t.median_s,
                "median_s": t.median_s,
            }
        )
        log(f"    {param}={v}: recall@10 {out[-1]['recall']:.3f}, {out[-1]['qps']:.0f} q/s")
    return out


def run(n: int, d: int, queries: int, reps: int, single: int, hnsw: bool) -> dict[str, Any]:
    centers = max(100, n // 200)
    log(f"generating {n} x {d} clustered unit vectors and {queries} queries")
    x = clustered(n, d, centers, seed=0)
    q = clustered(queries, d, centers, seed=1)
    flat, _ = build("Flat", x, 0)
    scan = FlatScan(flat)
    single_q = q[:single]

    def one_by_one(search: Callable[[np.ndarray, int], Any]) -> Callable[[], None]:
        def run() -> None:
            for i in range(len(single_q)):
                search(single_q[i : i + 1], 10)

        return run

    xt = torch.from_numpy(x)

    def matvec_one_by_one() -> None:
        # The same scan as a threaded matrix-vector product + top-k: what the bound allows.
        for i in range(len(single_q)):
            torch.topk(xt @ torch.from_numpy(single_q[i]), 10)

    probes = bandwidth_probes(x, sweeps=len(single_q))
    times = time_interleaved(
        {
            **probes,
            "single": one_by_one(scan.search),
            "single_faiss": one_by_one(flat.search),
            "single_torch_mv": matvec_one_by_one,
            "batch": lambda: flat.search(q, 10),
            "batch_scan": lambda: scan.search(q, 10),
        },
        warmup=1,
        reps=reps,
    )
    _, truth = times["batch"].last
    # The bound: the faster probe, each read of the database timed in the same rounds as the
    # searches (a probe measured apart once gave a bound below what the search itself read).
    bw = {k.removeprefix("bw_"): len(single_q) * x.nbytes / times[k].median_s for k in probes}
    bandwidth = max(bw.values())
    log("  bandwidth " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items()))
    scan_bytes = n * d * 4
    qps = len(single_q) / times["single"].median_s
    bound_qps = bandwidth / scan_bytes
    flat_batch_qps = queries / times["batch"].median_s
    log(f"  Flat: {qps:.1f} single q/s (bound {bound_qps:.1f}); batched {flat_batch_qps:.0f} q/s")
    result: dict[str, Any] = {
        "vectors": n,
        "dim": d,
        "queries": queries,
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss_version": faiss.__version__,
        "bandwidth": bw,
        "bandwidth_gb_per_s": bandwidth / 1e9,
        "flat": {
            "qps": qps,
            "bound_qps": bound_qps,
            "ratio": qps / bound_qps,
            "path": "FlatScan (BLAS mat-vec + partial sort)",
            "faiss_ratio": len(single_q) / times["single_faiss"].median_s / bound_qps,
            "torch_mv_ratio": len(single_q) / times["single_torch_mv"].median_s / bound_qps,
            "scan_bytes": scan_bytes,
            "single_queries": len(single_q),
            "batch_qps": flat_batch_qps,
            "batch_ratio_to_bandwidth_bound": flat_batch_qps / bound_qps,
            "batch_scan_qps": queries / times["batch_scan"].median_s,
            "timings": {k: v.to_dict() for k, v in times.items()},
        },
        "curves": {},
        "builds": {},
    }
    nlist = _nlist(n)
    train = max(40 * nlist, 256 * 40)
    m = d // 16  # 16 dimensions per 8-bit sub-quantizer: 4 bytes/dim -> 1/16 byte... x64
    recipes: list[tuple[str, str, list[int]]] = [
        (f"IVF{nlist},Flat", "nprobe", [1, 2, 4, 8, 16, 32]),
        (f"IVF{nlist},PQ{m}np", "nprobe", [1, 4, 16, 64]),
    ]
    if hnsw:
        recipes.append(("HNSW32", "efSearch", [16, 32, 64, 128]))
    flat_bytes = index_bytes(flat)
    for factory, param, values in recipes:
        log(f"  building {factory}")
        index, build_s = build(factory, x, train)
        size = index_bytes(index)
        result["builds"][factory] = {
            "build_s": build_s,
            "bytes": size,
            "compression": flat_bytes / size,
        }
        result["curves"][factory] = sweep(index, param, values, q, truth, reps)
        if "PQ" in factory:
            result["ivfpq"] = {
                "recipe": factory,
                "bytes": size,
                "flat_bytes": flat_bytes,
                "compression": flat_bytes / size,
                "best_recall": max(p["recall"] for p in result["curves"][factory]),
            }
        del index
    best = None
    for factory, pts in result["curves"].items():
        for p in pts:
            if p["recall"] >= MIN_RECALL:
                s = p["qps"] / flat_batch_qps
                if best is None or s > best["speedup"]:
                    best = {"recipe": factory, **p, "speedup": s}
    result["best_ann"] = best
    return result


def print_report(r: dict[str, Any]) -> None:
    f = r["flat"]
    print(
        f"\n{r['vectors']} x {r['dim']} vectors, {r['queries']} queries, "
        f"{r['faiss_threads']} FAISS threads; bandwidth {r['bandwidth_gb_per_s']:.1f} GB/s"
    )
    print(
        f"(7) Flat, one query at a time (the service's FlatScan): {f['qps']:.1f} q/s over the "
        f"bandwidth bound {f['bound_qps']:.1f} q/s = {f['ratio']:.2f}  (target >= 0.5)"
    )
    print(f"    FAISS IndexFlat.search, one query at a time: {f['faiss_ratio']:.2f}")
    print(f"    the same scan as a threaded torch mat-vec + top-k: {f['torch_mv_ratio']:.2f}")
    print(
        f"    batched: {f['batch_qps']:.0f} q/s ({f['batch_ratio_to_bandwidth_bound']:.1f}x "
        "the single-query bound: one scan serves the whole batch)"
    )
    print(f"{'recipe':<20} {'param':<14} {'recall@10':>9} {'q/s':>9} {'x Flat':>7}")
    for factory, pts in r["curves"].items():
        for p in pts:
            print(
                f"{factory:<20} {p['param']:<14} {p['recall']:>9.3f} {p['qps']:>9.0f} "
                f"{p['qps'] / f['batch_qps']:>7.1f}"
            )
    b = r["best_ann"]
    if b:
        print(
            f"(8) best ANN at recall@10 >= {MIN_RECALL}: {b['recipe']} {b['param']}, "
            f"recall {b['recall']:.3f}, {b['speedup']:.1f}x Flat"
        )
    else:
        print(f"(8) no recipe reached recall@10 >= {MIN_RECALL}")
    if "ivfpq" in r:
        p = r["ivfpq"]
        print(
            f"    {p['recipe']}: {p['compression']:.0f}x smaller than Flat "
            f"({p['bytes'] / 1e6:.1f} MB vs {p['flat_bytes'] / 1e6:.1f} MB), "
            f"best recall@10 {p['best_recall']:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vectors", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=50, help="queries searched one at a time")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-hnsw", action="store_true", help="skip the HNSW graph (slow to build)")
    p.add_argument("--quick", action="store_true", help="30k vectors, 500 queries, 2 reps")
    p.add_argument("--device", default="cpu", help="names the results file (FAISS runs on CPU)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.vectors, a.queries, a.reps, a.single = 30_000, 500, 2, 20
    if a.vectors < 1000 or a.dim < 16 or a.dim % 16:
        p.error("--vectors must be >= 1000 and --dim a multiple of 16 (>= 16)")
    result = {
        "benchmark": "index",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": a.device,
        "quick": a.quick,
        "machine": machine_info(),
        **run(a.vectors, a.dim, a.queries, a.reps, a.single, not a.no_hnsw),
    }
    print_report(result)
    out = a.out or Path(__file__).resolve().parent / "results" / f"index_{a.device}.json"
    log(f"wrote {write_json(out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
