"""The service's overhead, measured against the raw encoder and raw FAISS in the same run.

3. Idle HTTP latency over raw encoder latency for the same input (target <= 1.2): one
   ``POST /v1/embed`` at a time vs ``Encoder.embed_items`` (decode + embed) on the same item.
4. Served throughput under concurrency over raw batched throughput (target >= 0.8): many
   concurrent ``POST /v1/embed`` vs ``Encoder.preprocess`` + ``Encoder.embed`` on batches of the
   service's max batch size. Also p50/p95 latency against the number of concurrent clients.
6. Search path: raw FAISS latency over ``POST /v1/search`` latency for the same query, a stored
   item's vector against a Flat index on disk (target >= 0.8, i.e. the service adds <= 25 %).

The server is the real thing, started as users start it (``bindsearch serve`` in its own
process, uvicorn), and the client runs in this process: client and server do not share a GIL.
Raw figures are measured first, in this process, with the server not yet started.

    python -m bench.service --quick            # the suite's cases (demo + huge, random weights)
    python -m bench.service --quick --device cuda
    python -m bench.service --config imagebind_huge --modality vision --random-weights  # one case

Writes bench/results/service_<config>_<modality>.json (one file per case; ``search`` for 6).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
LATENCY_TARGET = 1.2
THROUGHPUT_TARGET = 0.8
SEARCH_TARGET = 0.8


@dataclass
class Case:
    device: str
    config: str
    modality: str
    random_weights: bool
    requests: int  # idle latency samples
    clients: tuple[int, ...]  # concurrency levels; the last one gives the throughput ratio
    per_client: int
    max_batch: int


def suite_cases(device: str) -> list[Case]:
    """The suite's cases: the shipped demo model, and the huge one that users deploy."""
    if device.startswith("cuda"):
        return [
            Case(device, "imagebind_huge", "vision", True, 30, (1, 8, 32, 64), 4, 32),
            Case(device, "imagebind_huge", "text", True, 30, (1, 8, 32, 64), 4, 32),
            Case(device, "imagebind_demo", "text", False, 30, (1, 8, 32), 4, 32),
        ]
    return [
        Case(device, "imagebind_demo", "vision", False, 30, (1, 4, 16, 32), 4, 32),
        Case(device, "imagebind_demo", "text", False, 60, (1, 4, 16, 32), 4, 32),
        Case(device, "imagebind_huge", "text", True, 8, (1, 8), 2, 8),
        Case(device, "imagebind_huge", "vision", True, 4, (1, 8), 1, 8),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _item(modality: str) -> tuple[bytes | str, dict[str, object]]:
    """One input and its /v1/embed body."""
    if modality == "text":
        text = "a red ring moving left far in the snow"
        return text, {"text": text}
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    return data, {"inputs": [{"data": base64.b64encode(data).decode(), "modality": modality}]}


class Server:
    """``bindsearch serve`` in a subprocess on a free port; stopped on exit."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        cmd = [
            sys.executable,
            "-c",
            "from bindsearch.cli import main; main()",
            "serve",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *args,
        ]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 900.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError("server exited:\n" + self.log.read().decode()[-2000:])
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server not ready")

    def __enter__(self) -> Server:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _idle(port: int, path: str, body: dict[str, object], n: int) -> list[float]:
    """n sequential requests on one keep-alive connection (the cheapest client there is)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    data = json.dumps(body).encode()
    hdr = {"Content-Type": "application/json"}
    out = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        c.request("POST", path, body=data, headers=hdr)
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}")
        if i:  # the first one warms the connection
            out.append(time.perf_counter() - t0)
    return out


def _load(
    base: str, path: str, body: dict[str, object], clients: int, per_client: int
) -> dict[str, Any]:
    """``clients`` concurrent clients, ``per_client`` requests each: rate, latency, statuses."""
    import httpx

    async def run() -> tuple[float, list[tuple[int, float]]]:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=600, limits=limits) as ac:

            async def client() -> list[tuple[int, float]]:
                res = []
                for _ in range(per_client):
                    t0 = time.perf_counter()
                    r = await ac.post(base + path, json=body)
                    res.append((r.status_code, time.perf_counter() - t0))
                return res

            t0 = time.perf_counter()
            got = await asyncio.gather(*(client() for _ in range(clients)))
            return time.perf_counter() - t0, [x for g in got for x in g]

    wall, res = asyncio.run(run())
    ok = [t for s, t in res if s == 200]
    return {
        "clients": clients,
        "requests": len(res),
        "ok": len(ok),
        "statuses": sorted({s for s, _ in res}),
        "items_per_s": len(ok) / wall,
        "p50_ms": 1e3 * float(np.percentile(ok, 50)) if ok else None,
        "p95_ms": 1e3 * float(np.percentile(ok, 95)) if ok else None,
    }


def _model_args(case: Case) -> tuple[list[str], Any, str | None]:
    """serve's model flags, and what load_encoder needs for the same model."""
    from encoders import resolve_model

    if case.random_weights:
        return (["--config", case.config, "--random-weights"], None, case.config)
    ref = resolve_model(case.config)
    return (
        ["--config", ref.config_name, "--checkpoint", str(ref.weights)],
        ref.weights,
        ref.config_name,
    )


def bench_embed(case: Case) -> dict[str, Any]:
    """Raw and served samples alternate, so a machine whose load drifts hurts both alike."""
    import torch

    from encoders import load_encoder

    serve_args, ckpt, config = _model_args(case)
    item, body = _item(case.modality)
    enc = load_encoder(ckpt, config=config, modalities=[case.modality], device=case.device)
    enc.embed_items(case.modality, [item])  # warm-up

    def raw_one() -> float:
        t0 = time.perf_counter()
        enc.embed_items(case.modality, [item])
        return time.perf_counter() - t0

    def raw_batches(reps: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        for _ in range(reps):
            x = enc.preprocess(case.modality, [item] * case.max_batch)  # decoding counts too
            enc.embed(case.modality, x)  # text trimmed inside, as in the service
        return reps * case.max_batch, time.perf_counter() - t0

    raw_batches(1)
    threads = torch.get_num_threads()
    dtype = str(enc.dtype).removeprefix("torch.")
    env = {
        "BINDSEARCH_MAX_BATCH_SIZE": str(case.max_batch),
        "BINDSEARCH_MAX_QUEUE": str(case.clients[-1] * case.per_client + 1),
    }
    raw: list[float] = []
    http_lat: list[float] = []
    with Server([*serve_args, "--modalities", case.modality, "--device", case.device], env) as srv:
        _idle(srv.port, "/v1/embed", body, 1)
        for _ in range(case.requests):
            raw.append(raw_one())
            http_lat += _idle(srv.port, "/v1/embed", body, 1)
        curve = []
        raw_items, raw_s = 0, 0.0
        reps = max(1, case.clients[-1] * case.per_client // case.max_batch // 2)
        for c in case.clients:
            if c == case.clients[-1]:
                n, t = raw_batches(reps)
                raw_items, raw_s = raw_items + n, raw_s + t
            curve.append(_load(srv.base, "/v1/embed", body, c, case.per_client))
            if c == case.clients[-1]:
                n, t = raw_batches(reps)
                raw_items, raw_s = raw_items + n, raw_s + t
    raw_tput = raw_items / raw_s
    top = curve[-1]
    return {
        "bench": "service",
        "kind": "embed",
        "device": case.device,
        "dtype": dtype,
        "config": config,
        "modality": case.modality,
        "random_weights": case.random_weights,
        "threads": threads,
        "raw_latency_ms": 1e3 * statistics.median(raw),
        "http_latency_ms": 1e3 * statistics.median(http_lat),
        "latency_ratio": statistics.median(http_lat) / statistics.median(raw),
        "latency_target": LATENCY_TARGET,
        "raw_batched_items_per_s": raw_tput,
        "max_batch": case.max_batch,
        "served_items_per_s": top["items_per_s"],
        "throughput_ratio": top["items_per_s"] / raw_tput,
        "throughput_target": THROUGHPUT_TARGET,
        "concurrency": curve,
        "requests": sum(c["requests"] for c in curve),
        "ok": sum(c["ok"] for c in curve),
        "statuses": sorted({s for c in curve for s in c["statuses"]}),
    }


def bench_search(n: int, dim: int, queries: int) -> dict[str, Any]:
    """A Flat index of ``n`` random ``dim``-d vectors on disk, served by the huge IMU tower."""
    import faiss

    from encoders.config import resolve_config
    from index import open_index
    from index.fingerprint import checkpoint_identity, model_fingerprint
    from index.store import FileRecord, IndexStore, ItemRecord

    config = "imagebind_huge"
    if resolve_config(config).embed_dim != dim:
        raise ValueError(f"{config} makes {resolve_config(config).embed_dim}-d vectors, not {dim}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "index"
        fp = model_fingerprint(resolve_config(config), checkpoint_identity(None))
        store = IndexStore.create(root, fp, dim, {})
        block = 20_000
        for start in range(0, n, block):
            m = min(block, n - start)
            v = rng.standard_normal((m, dim), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            paths = [f"item{start + i:07d}.jpg" for i in range(m)]
            files = [
                FileRecord(
                    p, "indexed", sha256=f"{start + i:064x}", size=1, mtime_ns=0, modality="vision"
                )
                for i, p in enumerate(paths)
            ]
            items = [ItemRecord(p, "vision", f"{start + i:064x}", 1) for i, p in enumerate(paths)]
            store.commit_chunk(files, items, v)
        store.refresh(factory="Flat")
        store.close()
        index = faiss.read_index(str(root / "vision.faiss"))
        searcher = open_index(root, gpu=False)  # the server's own search path, in process
        ids = rng.choice(n, queries + 1, replace=False)
        threads = faiss.omp_get_max_threads()
        args = ["--config", config, "--random-weights", "--modalities", "imu", "--index", str(root)]
        raw: list[float] = []
        lib: list[float] = []
        lat: list[float] = []
        with Server(args) as srv:
            c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=600)
            for j, i in enumerate(ids):
                q = np.asarray(index.reconstruct(int(i)))[None]
                t0 = time.perf_counter()
                index.search(q, 10)
                t_raw = time.perf_counter() - t0
                t0 = time.perf_counter()
                searcher.search(q, 10)
                t_lib = time.perf_counter() - t0
                body = json.dumps({"item_id": int(i), "k": 10, "target": ["vision"]}).encode()
                t0 = time.perf_counter()
                c.request(
                    "POST", "/v1/search", body=body, headers={"Content-Type": "application/json"}
                )
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    raise RuntimeError(f"/v1/search: HTTP {r.status}")
                if j:  # the first round warms caches and the connection
                    raw.append(t_raw)
                    lib.append(t_lib)
                    lat.append(time.perf_counter() - t0)
        searcher.close()
        del index
    return {
        "bench": "service",
        "kind": "search",
        "config": config,
        "n": n,
        "dim": dim,
        "factory": "Flat",
        "k": 10,
        "faiss_threads": threads,
        "raw_faiss_latency_ms": 1e3 * statistics.median(raw),
        "http_search_latency_ms": 1e3 * statistics.median(lat),
        "search_ratio": statistics.median(raw) / statistics.median(lat),
        # The same over the in-process search the server runs (IndexSearcher: the exact
        # FlatScan for one query, metadata join): what HTTP and the route add.
        "index_search_latency_ms": 1e3 * statistics.median(lib),
        "overhead_ratio": statistics.median(lib) / statistics.median(lat),
        "search_target": SEARCH_TARGET,
    }


def _write(result: dict[str, Any], name: str, out_dir: Path) -> None:
    result["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(result, indent=1))


def _report(r: dict[str, Any]) -> None:
    if r["kind"] == "search":
        print(
            f"search   {r['n']}x{r['dim']} Flat: raw FAISS {r['raw_faiss_latency_ms']:.1f} ms / "
            f"HTTP {r['http_search_latency_ms']:.1f} ms = {r['search_ratio']:.2f}  "
            f"(target >= {SEARCH_TARGET}); in-process IndexSearcher "
            f"{r['index_search_latency_ms']:.1f} ms / HTTP = {r['overhead_ratio']:.2f}"
        )
        return
    tag = (
        f"{r['config']}{' (random)' if r['random_weights'] else ''} {r['modality']} "
        f"[{r['device']} {r['dtype']}]"
    )
    print(
        f"{tag}: idle latency HTTP {r['http_latency_ms']:.1f} ms / raw "
        f"{r['raw_latency_ms']:.1f} ms = {r['latency_ratio']:.2f}  (target <= {LATENCY_TARGET})"
    )
    print(
        f"{tag}: throughput served {r['served_items_per_s']:.1f} / raw batched "
        f"{r['raw_batched_items_per_s']:.1f} items/s = {r['throughput_ratio']:.2f}  "
        f"(target >= {THROUGHPUT_TARGET}; {r['ok']}/{r['requests']} answered 200)"
    )
    for c in r["concurrency"]:
        print(
            f"    {c['clients']:>3} clients: {c['items_per_s']:.1f} items/s, "
            f"p50 {c['p50_ms']:.1f} ms, p95 {c['p95_ms']:.1f} ms"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the suite's cases (see suite_cases)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (half precision on GPU)")
    ap.add_argument("--config", default=None, help="one case (default: the suite's cases)")
    ap.add_argument("--modality", default="vision", choices=["vision", "text"])
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--requests", type=int, default=30, help="idle latency samples")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--search-n", type=int, default=100_000, help="vectors in the search index")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads, here and in the server (default: 1 with --quick, "
        "else torch's default)",
    )
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import torch

    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    torch.set_num_threads(threads)
    os.environ["BINDSEARCH_TORCH_THREADS"] = str(threads)  # the server's

    cases = (
        suite_cases(args.device)
        if args.quick or args.config is None
        else [
            Case(
                args.device,
                args.config,
                args.modality,
                args.random_weights,
                args.requests,
                tuple(args.clients),
                args.per_client,
                args.max_batch,
            )
        ]
    )
    ok = True
    for case in cases:
        r = bench_embed(case)
        _report(r)
        ok &= r["ok"] == r["requests"]
        dev = "" if case.device == "cpu" else "_cuda"
        _write(r, f"service_{case.config}_{case.modality}{dev}.json", args.out_dir)
    if not args.skip_search:
        r = bench_search(args.search_n, 1024, 30 if args.quick else 100)
        _report(r)
        _write(r, f"service_search{'' if args.device == 'cpu' else '_cuda'}.json", args.out_dir)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
