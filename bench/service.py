"""The service's overhead, measured against the raw encoder in the same run.

1. Idle HTTP latency over raw encoder latency for the same input (target <= 1.2): one
   ``POST /v1/embed`` at a time vs ``Encoder.embed_items`` on the same item.
2. Served throughput under concurrency over raw batched throughput (target >= 0.8): many
   concurrent ``POST /v1/embed`` vs ``Encoder.embed`` on batches of the service's max batch.

A real uvicorn server on a free localhost port, the demo model by default:

    python -m bench.service [--config imagebind_demo] [--modality vision] [--clients 32]

Writes bench/results/service_<config>_<modality>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np


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


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="imagebind_demo")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--modality", default="vision", choices=["vision", "text"])
    ap.add_argument("--requests", type=int, default=30, help="idle latency samples")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import httpx
    import torch
    import uvicorn

    from encoders import load_encoder
    from encoders.weights import default_checkpoint
    from service.app import create_app
    from service.embedders import TorchEmbedder
    from service.settings import ServiceSettings

    ckpt, config = (args.checkpoint, args.config) if args.checkpoint else default_checkpoint(
        args.config)
    enc = load_encoder(ckpt, config=config, modalities=[args.modality])
    item, body = _item(args.modality)

    # Raw encoder: one item end to end (decode + embed), and batched embedding.
    def raw_one() -> None:
        enc.embed_items(args.modality, [item])

    raw_one()
    raw: list[float] = []
    for _ in range(args.requests):
        t0 = time.perf_counter()
        raw_one()
        raw.append(time.perf_counter() - t0)
    batch = enc.preprocess(args.modality, [item] * args.max_batch)
    enc.embed(args.modality, batch)
    t0 = time.perf_counter()
    reps = max(1, (args.clients * args.per_client) // args.max_batch)
    for _ in range(reps):
        x = enc.preprocess(args.modality, [item] * args.max_batch)  # decoding counts too
        enc.embed(args.modality, x)
    raw_tput = reps * args.max_batch / (time.perf_counter() - t0)

    settings = ServiceSettings(max_batch_size=args.max_batch,
                               max_queue=args.clients * args.per_client + 1)
    app = create_app(settings, TorchEmbedder(enc, str(config), "bench"), None)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=60) as c:
        for _ in range(600):
            try:
                if c.get(base + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        c.post(base + "/v1/embed", json=body).raise_for_status()
        http = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            c.post(base + "/v1/embed", json=body).raise_for_status()
            http.append(time.perf_counter() - t0)

    async def load() -> tuple[float, list[int]]:
        async with httpx.AsyncClient(timeout=300) as ac:
            async def client() -> list[int]:
                return [(await ac.post(base + "/v1/embed", json=body)).status_code
                        for _ in range(args.per_client)]

            t0 = time.perf_counter()
            codes = await asyncio.gather(*(client() for _ in range(args.clients)))
            return time.perf_counter() - t0, [s for cs in codes for s in cs]

    wall, codes = asyncio.run(load())
    server.should_exit = True
    thread.join(timeout=10)
    ok = sum(1 for s in codes if s == 200)
    served_tput = ok / wall
    result: dict[str, object] = {
        "config": str(config), "modality": args.modality, "threads": torch.get_num_threads(),
        "raw_latency_ms": 1e3 * statistics.median(raw),
        "http_latency_ms": 1e3 * statistics.median(http),
        "latency_ratio": statistics.median(http) / statistics.median(raw),
        "raw_batched_items_per_s": raw_tput, "served_items_per_s": served_tput,
        "throughput_ratio": served_tput / raw_tput,
        "requests": len(codes), "ok": ok, "statuses": sorted(set(codes)),
    }
    print(f"idle latency: HTTP {result['http_latency_ms']:.1f} ms / raw "
          f"{result['raw_latency_ms']:.1f} ms = {result['latency_ratio']:.2f}  (target <= 1.2)")
    print(f"throughput:   served {served_tput:.1f} / raw batched {raw_tput:.1f} items/s = "
          f"{result['throughput_ratio']:.2f}  (target >= 0.8; {ok}/{len(codes)} answered 200)")
    out = args.out or Path(__file__).parent / "results" / f"service_{config}_{args.modality}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
