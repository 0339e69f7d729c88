"""The performance suite: every benchmark, then one table of the nine ratios of issue 10.

    python -m bench --quick                 # this 2-core machine: about 12 CPU-minutes
    python -m bench --device cuda --budget 420   # a GPU box: bf16, at most 7 minutes
    python -m bench --quick --only index memory
    python -m bench --summarise-only        # table + plots from the results already there

Each benchmark runs as its own subprocess (so one failing is reported and the rest still
run) and writes ``bench/results/<name>_<device>.json``; the suite then prints the table,
writes ``bench/results/summary_<device>.json`` (with the machine it ran on) and the plots in
``bench/results/plots/``. Every ratio is of two things measured side by side in one run.
Rows read from a file that this run did not rewrite (its benchmark failed) say so.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from bench.suite import Ratio, markdown_table, summarise, table

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Bench:
    """One benchmark: its module and the arguments for a mode and device."""

    name: str
    module: str
    quick_s: int  # time limit in --quick mode: ~4x its quiet 2-core time (the box is shared)
    full_s: int  # time limit in full mode (a GPU box)

    def argv(self, quick: bool, device: str, out: Path) -> list[list[str]]:
        """The command line(s) to run; most benchmarks take one."""
        q = ["--quick"] if quick else []
        dev = ["--device", device]
        if self.name == "service":
            # It names its own files: service_<config>_<modality>[_cuda].json, one per case,
            # and service_search[_cuda].json.
            return [[*q, *dev, "--out-dir", str(out)]]
        extra = ["--compile"] if self.name == "throughput" and not quick else []
        return [[*q, *dev, *extra, "--out", str(out / f"{self.name}_{device}.json")]]


# Ratio-carrying benchmarks first, so a --budget that runs out cuts the plots' extras last.
BENCHES = (
    Bench("encoders", "bench.encoders", quick_s=600, full_s=150),
    Bench("dtypes", "bench.dtypes", quick_s=600, full_s=600),
    Bench("index", "bench.index", quick_s=400, full_s=120),
    Bench("memory", "bench.memory", quick_s=300, full_s=90),
    Bench("inputs", "bench.inputs", quick_s=600, full_s=90),
    Bench("build", "bench.build", quick_s=500, full_s=120),
    Bench("service", "bench.service", quick_s=600, full_s=150),
    Bench("throughput", "bench.throughput", quick_s=400, full_s=240),
)


def machine(device: str) -> dict[str, Any]:
    """CPU model (and GPU name on cuda), torch version, date."""
    from bench._common import machine_info

    info = machine_info()
    info["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    return info


def machine_label(info: dict[str, Any]) -> str:
    cpu = f"{info.get('cpu_model', '?')} ({info.get('logical_cpus', '?')} CPUs)"
    gpu = info.get("gpu")
    return f"{gpu}, {cpu}" if gpu else cpu


def run_bench(
    b: Bench, quick: bool, device: str, out: Path, log_dir: Path, cap_s: float | None = None
) -> dict[str, Any]:
    """Run one benchmark's command(s); stdout/stderr go to the terminal and to a log file.

    Args:
        cap_s: a tighter time limit than the benchmark's own (what is left of ``--budget``).
    """
    limit = b.quick_s if quick else b.full_s
    if cap_s is not None:
        limit = int(min(limit, cap_s))
    t0 = time.perf_counter()
    cpu0 = _children_cpu_s()
    rcs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{b.name}_{device}.log"
    with log_path.open("w", encoding="utf-8") as log:
        for args in b.argv(quick, device, out):
            cmd = [sys.executable, "-m", b.module, *args]
            print(f"\n=== {b.name}: {' '.join(cmd[1:])}", flush=True)
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            left = max(10.0, limit - (time.perf_counter() - t0))
            rc = _run_streamed(cmd, left, log)
            rcs.append(rc)
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    ok = all(rc == 0 for rc in rcs)
    status = "ok" if ok else ("timeout" if "timeout" in rcs else f"failed (exit {rcs})")
    print(
        f"=== {b.name}: {status} in {wall:.0f} s, {cpu:.0f} s of CPU (log {log_path})",
        flush=True,
    )
    return {
        "status": status,
        "wall_s": wall,
        "cpu_s": cpu,
        "log": os.path.relpath(log_path, out),
        "limit_s": limit,
    }


def _run_streamed(cmd: list[str], limit_s: float, log: TextIO) -> int | str:
    """Run ``cmd`` in its own process group, echoing its output; kill the group at the limit.

    Returns the exit code, or ``"timeout"``. The group kill also ends what the benchmark
    started (decode workers, a server, loader subprocesses).
    """
    with subprocess.Popen(
        cmd,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(limit_s, kill)
        timer.start()
        try:
            for line in proc.stdout or ():
                print(line, end="", flush=True)
                log.write(line)
            rc = proc.wait()
        finally:
            timer.cancel()
    return "timeout" if expired.is_set() else rc


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished subprocesses so far.

    On a shared machine the wall time depends on the neighbours; the CPU time does not, and
    over the machine's cores it bounds what the wall time would be on a quiet machine.
    """
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="sizes for a 2-core CPU machine")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    names = [b.name for b in BENCHES]
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"run only these: {', '.join(names)}",
    )
    ap.add_argument("--skip", nargs="+", default=(), metavar="NAME", help="do not run these")
    ap.add_argument(
        "--summarise-only",
        action="store_true",
        help="run nothing: table and plots from the results already there",
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="results folder")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop starting benchmarks after this long; cap the one running",
    )
    args = ap.parse_args(argv)
    unknown = sorted((set(args.only or ()) | set(args.skip)) - set(names))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; accepted: {', '.join(names)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda was asked for but torch sees no CUDA GPU")

    chosen = [
        b for b in BENCHES if (args.only is None or b.name in args.only) and b.name not in args.skip
    ]
    runs: dict[str, Any] = {}
    t0 = time.perf_counter()
    started = time.time()
    if not args.summarise_only:
        for b in chosen:
            left = None if args.budget is None else args.budget - (time.perf_counter() - t0)
            if left is not None and left < 20:
                runs[b.name] = {
                    "status": "skipped (--budget spent)",
                    "wall_s": 0.0,
                    "cpu_s": 0.0,
                    "log": "",
                    "limit_s": 0,
                }
                continue
            runs[b.name] = run_bench(
                b, args.quick, args.device, args.results, args.results / "logs", left
            )
    total = time.perf_counter() - t0

    info = machine(args.device)
    summary = summarise(
        args.results,
        args.device,
        info,
        runs,
        mode="quick" if args.quick else "full",
        since=None if args.summarise_only else started,
    )
    objs = [Ratio(**r) for r in summary["ratios"]]
    print(
        f"\nissue 10 ratios on {machine_label(info)}, torch {info['torch_version']}, "
        f"{'quick' if args.quick else 'full'} mode, {info['date']}"
    )
    print(table(objs))
    for name, r in runs.items():
        if r["status"] != "ok":
            print(f"benchmark {name}: {r['status']} (see {r['log']})")
    counts = summary["counts"]
    print(
        f"{counts['pass']} pass, {counts['miss']} miss, {counts['info']} reported, "
        f"{counts['missing']} missing; benchmarks took {total:.0f} s "
        f"({sum(r['cpu_s'] for r in runs.values()):.0f} s of CPU on {os.cpu_count()} cores)"
    )
    for plot, path in summary["plots"].items():
        print(f"{plot}: {path or 'no data'}")
    md = args.results / f"summary_{args.device}.md"
    md.write_text(markdown_table(objs, machine_label(info)) + "\n", encoding="utf-8")
    # Misses are reported in the table, not turned into the exit code; a benchmark that
    # failed to run is.
    failed = any(r["status"] != "ok" for r in runs.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
