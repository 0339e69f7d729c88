"""``serve --engine ray --shards N`` beside the single-process service: same index, same queries.

A Flat index of ``n`` random 1024-d vectors on disk (as ``bench.service``'s search case), served
twice, one server after the other: ``bindsearch serve --index IDX`` and ``bindsearch serve
--engine ray --shards N --index IDX`` on a local Ray instance this script starts (the servers
join it). Queries are stored items (``item_id``): the search path, the router's fan-out and
merge, not the model. For each: idle latency (one request at a time, p50/p95) and throughput
under ``--clients`` concurrent clients; the ratios sharded / single-process; and the memory of
each part (router, encoder replica, shard replica: resident and unique bytes from /proc).

    python -m bench.ray_serve                      # 20k items, 2 shards
    python -m bench.ray_serve --n 100000 --shards 4 --clients 16

Writes bench/results/ray_serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import log, machine_info, write_json
from bench.service import Server, _load

RESULTS = Path(__file__).parent / "results"
CONFIG = "imagebind_huge"  # 1024-d; only its small IMU tower is loaded (queries are item ids)


def make_index(root: Path, n: int, dim: int) -> None:
    """A Flat index of ``n`` random unit vectors (one vision item each)."""
    from encoders.config import resolve_config
    from index.fingerprint import checkpoint_identity, model_fingerprint
    from index.store import FileRecord, IndexStore, ItemRecord

    rng = np.random.default_rng(0)
    fp = model_fingerprint(resolve_config(CONFIG), checkpoint_identity(None))
    with IndexStore.create(root, fp, dim, {}) as store:
        for start in range(0, n, 20_000):
            m = min(20_000, n - start)
            v = rng.standard_normal((m, dim), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            paths = [f"item{start + i:07d}.jpg" for i in range(m)]
            files = [
                FileRecord(p, "indexed", f"{start + i:064x}", 1, 0, modality="vision")
                for i, p in enumerate(paths)
            ]
            items = [ItemRecord(p, "vision", f"{start + i:064x}", 1) for i, p in enumerate(paths)]
            store.commit_chunk(files, items, v)
        store.refresh(factory="Flat")


def _idle(port: int, bodies: list[bytes]) -> tuple[list[float], list[list[int]]]:
    """One request at a time on one connection: latencies (s) and each answer's ids."""
    import time

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    lat, answers = [], []
    for j, body in enumerate(bodies):
        t0 = time.perf_counter()
        c.request("POST", "/v1/search", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"/v1/search: HTTP {r.status}: {data[:200]!r}")
        if j:  # the first one warms the connection
            lat.append(time.perf_counter() - t0)
        answers.append([h["id"] for h in json.loads(data)["results"]])
    return lat, answers


def _memory(pid: int) -> dict[str, int]:
    out = {"rss": 0, "uss": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "Rss":
                out["rss"] = int(rest.split()[0]) * 1024
            elif key in ("Private_Clean", "Private_Dirty"):
                out["uss"] += int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _measure(srv: Server, ids: np.ndarray, clients: int, per_client: int) -> dict[str, Any]:
    bodies = [json.dumps({"item_id": int(i), "k": 10}).encode() for i in ids]
    lat, answers = _idle(srv.port, bodies)
    load = _load(srv.base, "/v1/search", {"item_id": int(ids[0]), "k": 10}, clients, per_client)
    return {
        "p50_ms": 1e3 * statistics.median(lat),
        "p95_ms": 1e3 * float(np.percentile(lat, 95)),
        "searches_per_s": load["items_per_s"],
        "load": load,
        "answers": answers,
        "router_memory": _memory(srv.proc.pid),
    }


def bench(n: int, shards: int, queries: int, clients: int, per_client: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from encoders.config import resolve_config

    dim = resolve_config(CONFIG).embed_dim
    rng = np.random.default_rng(1)
    ids = rng.choice(n, queries + 1, replace=False)
    model = ["--config", CONFIG, "--random-weights", "--modalities", "imu"]
    env = {"BINDSEARCH_TORCH_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "index"
        log(f"index: {n} x {dim} Flat")
        make_index(root, n, dim)
        log("single-process service")
        with Server([*model, "--index", str(root)], env) as srv:
            local = _measure(srv, ids, clients, per_client)
        ray.init(num_cpus=shards + 2, include_dashboard=False, logging_level=logging.WARNING)
        try:
            address = str(ray.get_runtime_context().gcs_address)
            log(f"serve --engine ray --shards {shards}")
            args = [*model, "--index", str(root), "--engine", "ray", "--shards", str(shards)]
            with Server([*args, "--ray-address", address], env) as srv:
                sharded = _measure(srv, ids, clients, per_client)
                shard_mem = [
                    serve.get_deployment_handle("shard", f"bindsearch-shard-{s}")
                    .memory.remote()
                    .result(timeout_s=60)
                    for s in range(shards)
                ]
                encoder_mem = (
                    serve.get_deployment_handle("encoder", "bindsearch-encoder")
                    .memory.remote()
                    .result(timeout_s=60)
                )
        finally:
            serve.shutdown()
            ray.shutdown()
    same = local.pop("answers") == sharded.pop("answers")
    return {
        "bench": "ray_serve",
        "config": CONFIG,
        "n": n,
        "dim": dim,
        "factory": "Flat",
        "k": 10,
        "shards": shards,
        "queries": queries,
        "clients": clients,
        "same_answers": same,
        "single_process": local,
        "sharded": {**sharded, "shard_memory": shard_mem, "encoder_memory": encoder_mem},
        "latency_ratio": sharded["p50_ms"] / local["p50_ms"],
        "throughput_ratio": sharded["searches_per_s"] / local["searches_per_s"],
        "machine": machine_info(),
    }


def _mib(b: int) -> str:
    return f"{b / 2**20:.0f} MiB"


def report(r: dict[str, Any]) -> None:
    lo, sh = r["single_process"], r["sharded"]
    print(
        f"search {r['n']}x{r['dim']} Flat, k=10, item_id queries; "
        f"sharded answers == single-process: {r['same_answers']}"
    )
    print(
        f"  single-process: p50 {lo['p50_ms']:.1f} ms, p95 {lo['p95_ms']:.1f} ms, "
        f"{lo['searches_per_s']:.1f} searches/s ({r['clients']} clients)"
    )
    print(
        f"  ray, {r['shards']} shards:  p50 {sh['p50_ms']:.1f} ms, p95 {sh['p95_ms']:.1f} ms, "
        f"{sh['searches_per_s']:.1f} searches/s"
    )
    print(
        f"  latency ratio (ray / single) {r['latency_ratio']:.2f}, "
        f"throughput ratio {r['throughput_ratio']:.2f}"
    )
    print(
        f"  memory: single-process server {_mib(lo['router_memory']['rss'])} rss; router "
        f"{_mib(sh['router_memory']['rss'])} rss; encoder replica "
        f"{_mib(sh['encoder_memory']['rss'])} rss; shard replicas "
        + ", ".join(
            f"{_mib(m['rss'])} rss ({_mib(m['vectors'])} vectors)" for m in sh["shard_memory"]
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="items in the index")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--queries", type=int, default=50, help="idle-latency samples")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (throughput)")
    ap.add_argument("--per-client", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    r = bench(a.n, a.shards, a.queries, a.clients, a.per_client)
    write_json(a.out / "ray_serve.json", r)
    report(r)
    return 0 if r["same_answers"] else 1


if __name__ == "__main__":
    sys.exit(main())
