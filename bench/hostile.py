"""Hostile clients against the real server, at issue #17's figures: memory and liveness.

Starts ``bindsearch serve`` (uvicorn, the tiny random ``imagebind_test`` model, a JSONL index,
the default limits) on 127.0.0.1 and, with raw sockets, runs three attacks while a thread asks
``/healthz`` every 50 ms and another reads the server's ``/proc/PID/status`` every 10 ms:

* **bodies**: 10 concurrent requests of 190 MB each, sent 1 MiB at a time until the server
  answers or hangs up (4 multipart uploads and 3 JSON searches that declare their length, 3
  chunked JSON searches that do not);
* **headers**: 4 concurrent requests with 100 MB of headers, sent 1 MiB at a time;
* **flood**: ``{"terms": [{"text": "a"}] * 10**6}`` (15 MB) to ``/v1/search``, 64 KiB at a time.

It prints, per attack, the answers, the megabytes each client got to send, the server's
resident memory above its idle size (the most sampled, and ``VmHWM``, the kernel's peak),
and the slowest ``/healthz``; and checks them against the issue's bounds (RSS under 1.5 GB
above idle, ``/healthz`` within 1 s; the flood refused within 1 s, ``/healthz`` under 100 ms
meanwhile). ``tests/test_service_limits.py`` runs the same attacks with generous time bounds.

    .venv/bin/python -m bench.hostile            # the issue's figures (about 20 s)
    .venv/bin/python -m bench.hostile --json     # the figures as JSON on stdout
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import re
import select
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import httpx

MB = 1_000_000
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
CONFIG = "imagebind_test"
# The bounds (#17, "Done when").
RSS_ABOVE_IDLE = 1.5e9
HEALTHZ_S = 1.0
FLOOD_S = 1.0
HEALTHZ_DURING_FLOOD_S = 0.1


def status_kb(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` figure in kB (``VmRSS``, ``VmHWM``)."""
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    if m is None:
        raise RuntimeError(f"no {key} in /proc/{pid}/status")
    return int(m.group(1))


@dataclass
class Watch:
    """What the server did during one attack."""

    idle_rss: int  # bytes, before the attack
    max_rss: int = 0  # the most sampled (every 10 ms)
    hwm: int = 0  # VmHWM after the attack: the peak, between samples too
    healthz_s: list[float] = field(default_factory=list)
    healthz_status: list[int] = field(default_factory=list)

    @property
    def rss_above_idle(self) -> int:
        return max(self.max_rss, self.hwm) - self.idle_rss

    @property
    def slowest_healthz_s(self) -> float:
        return max(self.healthz_s)


@contextmanager
def watching(url: str, pid: int) -> Iterator[Watch]:
    """Samples the server's memory and asks ``/healthz`` while the body runs."""
    try:  # start VmHWM afresh: the peak of this attack, not of start-up or the last one
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass  # then VmHWM is the peak since start: a bound all the same
    watch = Watch(idle_rss=status_kb(pid, "VmRSS") << 10)
    stop = threading.Event()

    def memory() -> None:
        while not stop.is_set():
            watch.max_rss = max(watch.max_rss, status_kb(pid, "VmRSS") << 10)
            time.sleep(0.01)

    def health() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    status = c.get(f"{url}/healthz").status_code
                except httpx.TransportError:
                    status = 0
                watch.healthz_s.append(time.perf_counter() - t)
                watch.healthz_status.append(status)
                time.sleep(0.05)

    threads = [threading.Thread(target=f, daemon=True) for f in (memory, health)]
    for t in threads:
        t.start()
    while not watch.healthz_s:
        time.sleep(0.01)
    try:
        yield watch
    finally:
        time.sleep(0.2)  # a last look after the attack
        stop.set()
        for t in threads:
            t.join(60)
        watch.hwm = status_kb(pid, "VmHWM") << 10


@dataclass
class Exchange:
    """One hostile client: what it got to send and the status line it got back."""

    kind: str
    sent: int = 0  # bytes of the body (or headers) the server took before answering
    status: int = 0  # 0: the server hung up without an answer
    seconds: float = 0.0


def exchange(
    port: int, head: bytes, pieces: Iterator[bytes], kind: str, start: threading.Barrier | None
) -> Exchange:
    """Send ``head``, then ``pieces`` while the server has not answered; read its answer."""
    out = Exchange(kind)
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        if start is not None:
            start.wait()
        t = time.perf_counter()
        try:
            s.sendall(head)
            for piece in pieces:
                if select.select([s], [], [], 0)[0]:
                    break  # the server answered (or hung up): stop sending
                s.sendall(piece)
                out.sent += len(piece)
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass  # it hung up mid-send: its answer may still be there to read
        try:
            while b"\r\n" not in answer:
                more = s.recv(65536)
                if not more:
                    break
                answer += more
        except (ConnectionResetError, TimeoutError):
            pass
        out.seconds = time.perf_counter() - t
    m = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    out.status = int(m.group(1)) if m else 0
    return out


def _head(port: int, method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _repeat(piece: bytes, total: int) -> Iterator[bytes]:
    for _ in range(total // len(piece)):
        yield piece


def _chunked(total: int) -> Iterator[bytes]:
    yield b'10\r\n{"text": "xxxxxx\r\n'
    piece = b"%x\r\n" % MIB + b"x" * MIB + b"\r\n"
    yield from _repeat(piece, total)


def _concurrently(jobs: list[Callable[[threading.Barrier], Exchange]]) -> list[Exchange]:
    start = threading.Barrier(len(jobs))
    results: list[Exchange | None] = [None] * len(jobs)

    def run(i: int) -> None:
        results[i] = jobs[i](start)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return [r if r is not None else Exchange("lost") for r in results]


def big_bodies(port: int, n: int = 10, size: int = 190 * MB) -> list[Exchange]:
    """``n`` concurrent bodies of ``size`` bytes: multipart, JSON with and without a length."""
    boundary = "b0undary"
    multipart = _head(
        port,
        "POST",
        "/v1/search",
        {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(size)},
    )
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    ).encode()
    json_len = _head(
        port,
        "POST",
        "/v1/search",
        {"Content-Type": "application/json", "Content-Length": str(size)},
    )
    json_chunked = _head(
        port,
        "POST",
        "/v1/search",
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    body = b"x" * MIB

    def job(i: int) -> Callable[[threading.Barrier], Exchange]:
        kind = ("multipart", "json", "chunked")[0 if i < 0.4 * n else 1 if i < 0.7 * n else 2]
        if kind == "multipart":
            return lambda b: exchange(port, multipart + part, _repeat(body, size), kind, b)
        if kind == "json":
            return lambda b: exchange(port, json_len + b'{"text": "', _repeat(body, size), kind, b)
        return lambda b: exchange(port, json_chunked, _chunked(size), kind, b)

    return _concurrently([job(i) for i in range(n)])


def huge_headers(port: int, n: int = 4, size: int = 100 * MB) -> list[Exchange]:
    """``n`` concurrent requests whose one header is ``size`` bytes long."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    piece = b"a" * MIB
    return _concurrently(
        [lambda b: exchange(port, head, _repeat(piece, size), "headers", b) for _ in range(n)]
    )


FLOOD = json.dumps({"terms": [{"text": "a"}] * 10**6}).encode()  # 15 MB, 10**6 terms


def term_flood(port: int) -> Exchange:
    """The 10**6-term search body, with its length, 64 KiB at a time."""
    head = _head(
        port,
        "POST",
        "/v1/search",
        {"Content-Type": "application/json", "Content-Length": str(len(FLOOD))},
    )
    pieces = (FLOOD[i : i + 65536] for i in range(0, len(FLOOD), 65536))
    return exchange(port, head, pieces, "flood", None)


@dataclass
class Figures:
    attack: str
    statuses: list[int]
    sent_mb: list[float]
    rss_above_idle_mb: float
    idle_rss_mb: float
    slowest_healthz_s: float
    healthz_status: list[int]
    seconds: float

    @classmethod
    def of(cls, attack: str, results: list[Exchange], watch: Watch) -> Figures:
        return cls(
            attack=attack,
            statuses=[r.status for r in results],
            sent_mb=[round(r.sent / MB, 1) for r in results],
            rss_above_idle_mb=round(watch.rss_above_idle / MB, 1),
            idle_rss_mb=round(watch.idle_rss / MB, 1),
            slowest_healthz_s=round(watch.slowest_healthz_s, 3),
            healthz_status=sorted(set(watch.healthz_status)),
            seconds=round(max(r.seconds for r in results), 3),
        )

    def problems(self) -> list[str]:
        """Where this run misses the issue's bounds."""
        out = []
        if self.rss_above_idle_mb * MB >= RSS_ABOVE_IDLE:
            out.append(f"{self.attack}: RSS {self.rss_above_idle_mb} MB above idle")
        limit = HEALTHZ_DURING_FLOOD_S if self.attack == "flood" else HEALTHZ_S
        if self.slowest_healthz_s >= limit:
            out.append(f"{self.attack}: /healthz took {self.slowest_healthz_s} s (bound {limit})")
        if self.healthz_status != [200]:
            out.append(f"{self.attack}: /healthz answered {self.healthz_status}")
        if self.attack == "flood" and self.seconds >= FLOOD_S:
            out.append(f"flood: refused after {self.seconds} s (bound {FLOOD_S})")
        if any(s < 400 or s >= 500 for s in self.statuses if s):
            out.append(f"{self.attack}: answers {self.statuses}")
        return out


def attack_all(url: str, pid: int) -> list[Figures]:
    """The three attacks, one after the other, against the server at ``url`` (process ``pid``)."""
    port = int(url.rsplit(":", 1)[1])
    out = []
    for name, attack in (
        ("bodies", lambda: big_bodies(port)),
        ("headers", lambda: huge_headers(port)),
        ("flood", lambda: [term_flood(port)]),
    ):
        with watching(url, pid) as watch:
            results = attack()
        out.append(Figures.of(name, results, watch))
    return out


@contextmanager
def server(tmp: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """``bindsearch serve`` with the default limits over a 4-item JSONL index; (url, pid)."""
    from encoders import resolve_model

    dim = resolve_model(CONFIG, None, random_weights=True).config.embed_dim
    rows = [
        {
            "id": i,
            "modality": "text",
            "caption": f"c{i}",
            "vector": [float(i == j) for j in range(dim)],
        }
        for i in range(4)
    ]
    items = tmp / "items.jsonl"
    items.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cmd = [
        sys.executable,
        "-c",
        "from bindsearch.cli import main; main()",
        "serve",
        "--random-weights",
        "--config",
        CONFIG,
        "--port",
        str(port),
        "--index",
        str(items),
        "--log-level",
        "warning",
    ]
    log = tmp / "server.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "BINDSEARCH_TORCH_THREADS": "1", **(env or {})},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"server never became ready:\n{log.read_text()}")
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, server(Path(tmp)) as (url, pid):
        figures = attack_all(url, pid)
    problems = [p for f in figures for p in f.problems()]
    if args.json:
        print(json.dumps({"figures": [asdict(f) for f in figures], "problems": problems}, indent=2))
    else:
        for f in figures:
            print(
                f"{f.attack:8s} answers {f.statuses}  MB sent {f.sent_mb}\n"
                f"         RSS +{f.rss_above_idle_mb} MB over {f.idle_rss_mb} MB idle "
                f"(bound {RSS_ABOVE_IDLE / MB:.0f})  slowest /healthz {f.slowest_healthz_s} s "
                f"{f.healthz_status}  attack took {f.seconds} s"
            )
        print("within the issue's bounds" if not problems else "\n".join(problems))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
