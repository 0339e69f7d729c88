"""Shared benchmark helpers: warm-up + median timing, matmul peak, machine info, JSON, plots.

Benchmarks report ratios of quantities measured side by side in the same run, never absolute
times taken elsewhere; the machine is shared and noisy, so every number is a median of repeats
taken after warm-up runs, and competing variants are interleaved rep by rep.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
    """Progress message on stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Timing:
    """Wall-clock seconds of repeated runs of one thing, and what its last run returned."""

    times_s: list[float] = field(default_factory=list)
    ref_times_s: list[float] = field(default_factory=list)  # the reference, run just before
    last: Any = field(default=None, repr=False)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    def paired_ratio(self) -> float:
        """Median over reps of reference time / own time (each run against its own reference)."""
        return statistics.median(r / t for r, t in zip(self.ref_times_s, self.times_s, strict=True))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "median_s": self.median_s,
            "min_s": self.min_s,
            "times_s": self.times_s,
        }
        if self.ref_times_s:
            d["ref_times_s"] = self.ref_times_s
        return d


def time_fn(fn: Callable[[], object], warmup: int = 1, reps: int = 3) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times timed."""
    return time_interleaved({"fn": fn}, warmup=warmup, reps=reps)["fn"]


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    warmup: int = 1,
    reps: int = 3,
    reference: Callable[[], object] | None = None,
) -> dict[str, Timing]:
    """Time several variants rep by rep (A B, then B A, ...), so load drifts hit them alike.

    With a ``reference`` (e.g. a square matmul), it is timed right before every timed run, so
    each run can be compared with the machine's speed at that moment (``paired_ratio``).
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out = {name: Timing() for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            if reference is not None:
                t0 = time.perf_counter()
                reference()
                out[name].ref_times_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            value = fns[name]()
            out[name].times_s.append(time.perf_counter() - t0)
            out[name].last = value
    return out


def matmul_peak(
    n: int = 4096, dtype: torch.dtype = torch.float32, warmup: int = 2, reps: int = 5
) -> tuple[float, Timing]:
    """The machine's matmul rate: FLOP/s of ``torch.mm`` on (n, n) @ (n, n), median of reps.

    Runs with the current ``torch.get_num_threads()``; set it as for the run being compared.
    """
    fn, flops = matmul_fn(n, dtype)
    timing = time_fn(fn, warmup=warmup, reps=reps)
    return flops / timing.median_s, timing


def matmul_fn(n: int = 4096, dtype: torch.dtype = torch.float32) -> tuple[Callable[[], Any], int]:
    """A square ``torch.mm`` to time (e.g. interleaved with a model) and its FLOPs."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    return (lambda: torch.mm(a, b, out=c)), 2 * n**3


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags(wanted: tuple[str, ...] = ISA_FLAGS) -> list[str]:
    """Which of the ``wanted`` ISA flags /proc/cpuinfo lists (empty where it is unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_enabled": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return path


def _jsonable(obj: object) -> object:
    if isinstance(obj, Timing):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)  # type: ignore[call-overload]
    if isinstance(obj, torch.dtype | torch.Size | Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def bar_plot(path: Path, labels: list[str], values: list[float], ylabel: str, title: str) -> bool:
    """Save a bar chart when matplotlib is installed (it is optional); True if written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels)), 3.5))
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
