"""The suite's aggregation: every benchmark's results JSON -> one table of the nine ratios, plots.

Pure functions over files, so they are tested on small fake results (tests/test_bench_suite.py)
without timing anything. ``python -m bench`` runs the benchmarks and then calls ``summarise``.

Each ratio has a target from issue 10 and a status: ``pass`` / ``miss`` against the target,
``info`` where the issue sets no target (or the target's condition does not hold, e.g. the
build's model-busy ratio on a machine where decoding cannot keep up), ``missing`` where the
benchmark that measures it did not run or failed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PASS, MISS, INFO, MISSING = "pass", "miss", "info", "missing"


@dataclass(frozen=True)
class Ratio:
    """One row of the table: a measured ratio against its target."""

    number: str  # the numbering: "1" ... "9", with a/b for the two-part ones
    name: str
    detail: str  # which input/modality/recipe
    value: float | None
    target: str  # as printed
    status: str  # pass / miss / info / missing
    source: str  # the results file it came from
    note: str = ""


@dataclass(frozen=True)
class Target:
    """A comparison against a bound: ``op`` is ``>=``, ``<=`` or ``>``."""

    op: str
    bound: float

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}"

    def check(self, value: float | None) -> str:
        if value is None or not math.isfinite(value):
            return MISSING
        ok = {
            ">=": value >= self.bound,
            "<=": value <= self.bound,
            ">": value > self.bound,
        }[self.op]
        return PASS if ok else MISS


T_UTIL = Target(">=", 0.6)
T_SPEEDUP = Target(">", 1.0)
T_LATENCY = Target("<=", 1.2)
T_THROUGHPUT = Target(">=", 0.8)
T_OVERLAP = Target(">=", 0.85)
T_SEARCH = Target(">=", 0.8)
T_BANDWIDTH = Target(">=", 0.5)
T_RSS = Target("<=", 1.2)
T_READY = Target("<=", 1.0)
MIN_RECALL = 0.95


def load_json(path: Path) -> dict[str, Any] | None:
    """A results file, or None if it is absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _row(
    number: str,
    name: str,
    detail: str,
    value: float | None,
    target: Target | str,
    source: str,
    note: str = "",
    status: str | None = None,
) -> Ratio:
    if status is None:
        status = target.check(value) if isinstance(target, Target) else INFO
        if value is None:
            status = MISSING
    return Ratio(number, name, detail, value, str(target), status, source, note)


def _missing(number: str, name: str, target: Target | str, source: str, why: str) -> Ratio:
    return Ratio(number, name, "", None, str(target), MISSING, source, why)


# ----------------------------------------------------------------------------- extractors
# Each takes the results folder and the device ("cpu" or "cuda") and returns its rows.


def ratios_encoders(d: Path, device: str) -> list[Ratio]:
    """(1) achieved FLOP/s over matmul FLOP/s per tower input, (2) ours over eager."""
    name = f"encoders_{device}.json"
    r = load_json(d / name)
    if r is None or not r.get("cases"):
        return [
            _missing(
                "1", "encoder utilisation (achieved / matmul FLOP/s)", T_UTIL, name, "not run"
            ),
            _missing("2", "our encoder over eager fp32 (speed-up)", T_SPEEDUP, name, "not run"),
        ]
    dtype = r.get("dtype", "float32")
    rows = []
    for c in r["cases"]:
        ours = c["paths"]["ours"]
        rows.append(
            _row(
                "1",
                "encoder utilisation (achieved / matmul FLOP/s)",
                f"{r.get('preset', '')} {c['input']}, {dtype}, batch {c['shape'][0]}",
                ours["ratio"],
                T_UTIL,
                name,
                f"{ours['gflop_per_s']:.0f} of {c['matmul_gflop_per_s']:.0f} GFLOP/s; stretch 0.8",
            )
        )
    for c in r["cases"]:
        match = bool(c.get("match", False))
        value = c["speedup_ours_over_eager"]
        status = T_SPEEDUP.check(value) if match else MISS
        rows.append(
            _row(
                "2",
                "our encoder over eager fp32 (speed-up)",
                f"{c['input']}, batch {c['shape'][0]}",
                value,
                T_SPEEDUP,
                name,
                f"min cosine {c['min_cosine']:.6f}" + ("" if match else " (outputs differ)"),
                status=status,
            )
        )
    return rows


def service_files(d: Path) -> list[Path]:
    """The service benchmark's results (``service_<config>_<modality>.json``)."""
    return sorted(d.glob("service_*.json"))


def _first(r: Mapping[str, Any], keys: Iterable[str]) -> float | None:
    for k in keys:
        v = r.get(k)
        if isinstance(v, int | float):
            return float(v)
    return None


SEARCH_KEYS = ("search_ratio", "search_throughput_ratio", "search_latency_ratio")


def ratios_service(d: Path, device: str) -> list[Ratio]:
    """(3) idle HTTP over raw latency, (4) served over raw throughput, (6) search path.

    ``bench.service`` writes one file per embed case and one ``kind: search`` file.
    """
    rows: list[Ratio] = []
    for f in service_files(d):
        r = load_json(f)
        if r is None or not _device_matches(r, device, f):
            continue
        if r.get("kind") == "search" or "search_ratio" in r:
            what = f"{r.get('n', '?')} x {r.get('dim', '?')} {r.get('factory', '')}".strip()
            rows.append(
                _row(
                    "6",
                    "service search / raw FAISS (throughput)",
                    what,
                    _first(r, SEARCH_KEYS),
                    T_SEARCH,
                    f.name,
                    _ms_note(r, "http_search_latency_ms", "raw_faiss_latency_ms")
                    + (
                        f"; in-process IndexSearcher {r['index_search_latency_ms']:.1f} ms, "
                        f"its share of the HTTP time {r['overhead_ratio']:.2f}"
                        if "overhead_ratio" in r
                        else ""
                    ),
                )
            )
            continue
        what = f"{r.get('config', '?')} {r.get('modality', '?')}"
        if r.get("random_weights"):
            what += " (random weights)"
        rows.append(
            _row(
                "3",
                "idle HTTP latency / raw encoder latency",
                what,
                _first(r, ("latency_ratio",)),
                T_LATENCY,
                f.name,
                _ms_note(r, "http_latency_ms", "raw_latency_ms"),
            )
        )
        rows.append(
            _row(
                "4",
                "served / raw batched throughput",
                what,
                _first(r, ("throughput_ratio",)),
                T_THROUGHPUT,
                f.name,
                _rate_note(r, "served_items_per_s", "raw_batched_items_per_s"),
            )
        )
    for number, name, target in (
        ("3", "idle HTTP latency / raw encoder latency", T_LATENCY),
        ("4", "served / raw batched throughput", T_THROUGHPUT),
        ("6", "service search / raw FAISS (throughput)", T_SEARCH),
    ):
        if not any(row.number == number for row in rows):
            rows.append(_missing(number, name, target, "service_*", "not measured"))
    return rows


def _ms_note(r: Mapping[str, Any], a: str, b: str) -> str:
    if isinstance(r.get(a), int | float) and isinstance(r.get(b), int | float):
        return f"{r[a]:.1f} ms vs {r[b]:.1f} ms"
    return ""


def _rate_note(r: Mapping[str, Any], a: str, b: str) -> str:
    if isinstance(r.get(a), int | float) and isinstance(r.get(b), int | float):
        return f"{r[a]:.1f} vs {r[b]:.1f} items/s"
    return ""


def _device_matches(r: Mapping[str, Any] | None, device: str, path: Path | None = None) -> bool:
    """Whether a result was measured on ``device``: its ``device`` key, else a ``_cuda``
    suffix on the file name, else the CPU (the service benchmark's default)."""
    if r is None:
        return False
    default = "cuda" if path is not None and path.stem.endswith("_cuda") else "cpu"
    return str(r.get("device", default)).split(":")[0] == device


def ratios_build(d: Path, device: str) -> list[Ratio]:
    """(5a) model-busy over wall time of an index build, (5b) decode over model throughput."""
    rows: list[Ratio] = []
    name = f"build_{device}.json"
    r = load_json(d / name)
    label = "build: model busy / wall time"
    if r is None or not r.get("builds"):
        rows.append(_missing("5a", label, T_OVERLAP, name, "not run"))
    else:
        for b in r["builds"]:
            keeps_up = bool(b.get("decode_keeps_up"))
            rows.append(
                _row(
                    "5a",
                    label,
                    f"{b['corpus']}, {b['workers']} decode workers",
                    b["overlap"],
                    T_OVERLAP,
                    name,
                    "decoding keeps up"
                    if keeps_up
                    else "decoding cannot keep up here: target not applicable",
                    status=None if keeps_up else INFO,
                )
            )
    name = f"inputs_{device}.json"
    r = load_json(d / name)
    label = "decode throughput / model throughput"
    if r is None or not r.get("rows"):
        rows.append(_missing("5b", label, "report", name, "not run"))
    else:
        for x in r["rows"]:
            ratio = x["ratio"]
            need = math.ceil(1 / ratio) if ratio > 0 else None
            rows.append(
                _row(
                    "5b",
                    label,
                    f"{r.get('preset', '')} {x['modality']}",
                    ratio,
                    "report",
                    name,
                    f"{x['decode_items_per_s']:.3g} vs {x['model_items_per_s']:.3g} items/s"
                    + (f"; {need} decode workers keep up" if need and need > 1 else ""),
                )
            )
    return rows


def ratios_index(d: Path, device: str) -> list[Ratio]:
    """(7) Flat search over the bandwidth bound, (8) ANN speed-up and IVF-PQ compression."""
    name = f"index_{device}.json"
    r = load_json(d / name)
    if r is None or "flat" not in r:
        return [
            _missing("7", "Flat search / memory-bandwidth bound", T_BANDWIDTH, name, "not run"),
            _missing(
                "8a", "ANN speed-up over Flat at recall@10 >= 0.95", T_SPEEDUP, name, "not run"
            ),
            _missing("8b", "IVF-PQ memory compression", "report", name, "not run"),
        ]
    rows = []
    flat = r["flat"]
    what = f"{r['vectors']} x {r['dim']}"
    rows.append(
        _row(
            "7",
            "Flat search / memory-bandwidth bound",
            f"{what}, 1 query",
            flat["ratio"],
            T_BANDWIDTH,
            name,
            f"{flat['qps']:.1f} q/s vs bound {flat['bound_qps']:.1f} q/s at "
            f"{r['bandwidth_gb_per_s']:.1f} GB/s"
            + (
                f"; FAISS IndexFlat.search {flat['faiss_ratio']:.2f}"
                if "faiss_ratio" in flat
                else ""
            ),
        )
    )
    best = r.get("best_ann")
    if best is None:
        rows.append(
            _row(
                "8a",
                "ANN speed-up over Flat at recall@10 >= 0.95",
                what,
                None,
                T_SPEEDUP,
                name,
                "no recipe reached recall@10 >= 0.95",
            )
        )
    else:
        rows.append(
            _row(
                "8a",
                "ANN speed-up over Flat at recall@10 >= 0.95",
                f"{what}, {best['recipe']} {best['param']}",
                best["speedup"],
                T_SPEEDUP,
                name,
                f"recall@10 {best['recall']:.3f}",
                status=None if best["recall"] >= MIN_RECALL else MISS,
            )
        )
    pq = r.get("ivfpq")
    if pq is None:
        rows.append(_missing("8b", "IVF-PQ memory compression", "report", name, "not built"))
    else:
        rows.append(
            _row(
                "8b",
                "IVF-PQ memory compression",
                f"{what}, {pq['recipe']}",
                pq["compression"],
                "report",
                name,
                f"{pq['bytes'] / 1e6:.1f} MB vs Flat {pq['flat_bytes'] / 1e6:.1f} MB; "
                f"best recall@10 {pq['best_recall']:.3f}",
            )
        )
    return rows


def ratios_memory(d: Path, device: str) -> list[Ratio]:
    """(9a) peak resident memory over weight bytes, (9b) safetensors over torch.load ready time."""
    name = f"memory_{device}.json"
    r = load_json(d / name)
    if r is None or "rss" not in r:
        return [
            _missing("9a", "peak resident memory / weight bytes", T_RSS, name, "not run"),
            _missing("9b", "time to ready: safetensors / torch.load", T_READY, name, "not run"),
        ]
    rows = []
    w = r["weights_bytes"]
    for fmt, m in r["rss"].items():
        rows.append(
            _row(
                "9a",
                "peak resident memory / weight bytes",
                f"{r['model']}, {fmt}",
                m["ratio"],
                T_RSS,
                name,
                f"peak {m['peak_rss_bytes'] / 1e6:.0f} MB (imports {m['base_rss_bytes'] / 1e6:.0f}"
                f" MB) for {w / 1e6:.0f} MB of weights; whole process {m['ratio_total']:.2f}",
            )
        )
    ready = r["ready"]
    rows.append(
        _row(
            "9b",
            "time to ready: safetensors / torch.load",
            r["model"],
            ready["ratio"],
            T_READY,
            name,
            f"{ready['safetensors_s']:.2f} s vs {ready['torch_s']:.2f} s",
        )
    )
    return rows


EXTRACTORS: tuple[Callable[[Path, str], list[Ratio]], ...] = (
    ratios_encoders,
    ratios_service,
    ratios_build,
    ratios_index,
    ratios_memory,
)


def _sort_key(row: Ratio) -> tuple[int, str]:
    digits = "".join(ch for ch in row.number if ch.isdigit())
    return int(digits or 0), row.number


def collect(d: Path, device: str, since: float | None = None) -> list[Ratio]:
    """Every ratio the results folder holds for ``device``, in the issue's order.

    Args:
        since: a POSIX time; rows read from files written before it (an earlier run's, left
            by a benchmark that failed this time) say so in their note.
    """
    rows = [row for ex in EXTRACTORS for row in ex(d, device)]
    if since is not None:
        rows = [_mark_stale(row, d, since) for row in rows]
    return sorted(rows, key=_sort_key)


def _mark_stale(row: Ratio, d: Path, since: float) -> Ratio:
    path = d / row.source
    if row.status == MISSING or not path.is_file() or path.stat().st_mtime >= since:
        return row
    when = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="minutes")
    note = f"{row.note}; from an earlier run ({when})" if row.note else f"earlier run ({when})"
    return replace(row, note=note)


def format_value(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"


def table(rows: list[Ratio]) -> str:
    """A fixed-width text table: number, ratio, input, measured, target, status, note."""
    head = ("#", "ratio", "measured on", "value", "target", "status", "note")
    body = [
        (r.number, r.name, r.detail, format_value(r.value), r.target, r.status.upper(), r.note)
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head) - 1)]
    lines = []
    for x in [head, *body]:
        cells = [str(c).ljust(w) for c, w in zip(x[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, str(x[-1])]).rstrip())
        if x is head:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: list[Ratio], machine: str) -> str:
    """The README's performance table."""
    out = [
        "| # | ratio | measured on | value | target | status | machine |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.number} | {r.name} | {r.detail} | {format_value(r.value)} | {r.target} | "
            f"{r.status} | {machine} |"
        )
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(d: Path, device: str, out: Path) -> Path | None:
    """Items/s vs batch size, one line per modality (log-log)."""
    r = load_json(d / f"throughput_{device}.json")
    if r is None or not r.get("modalities"):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, points in sorted(r["modalities"].items()):
        pts = sorted(points, key=lambda p: p["batch"])
        ax.plot([p["batch"] for p in pts], [p["items_per_s"] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("items / s")
    ax.set_title(f"{r.get('preset', '')} {r.get('dtype', '')} on {r.get('device_name', device)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, out / f"throughput_vs_batch_{device}.png")


def plot_latency(d: Path, device: str, out: Path) -> Path | None:
    """Service latency (p50, p95) vs concurrent clients, from the service results' sweep."""
    series = []
    for f in service_files(d):
        r = load_json(f)
        if r is None or not _device_matches(r, device, f) or not r.get("concurrency"):
            continue
        series.append((f"{r.get('config', '')} {r.get('modality', '')}", r["concurrency"]))
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in series:
        pts = sorted(pts, key=lambda p: p["clients"])
        xs = [p["clients"] for p in pts]

        def ys(key: str, pts: list[dict[str, Any]] = pts) -> list[float]:
            return [float("nan") if p.get(key) is None else float(p[key]) for p in pts]

        (line,) = ax.plot(xs, ys("p50_ms"), marker="o", label=f"{label} p50")
        if any(p.get("p95_ms") is not None for p in pts):
            ax.plot(
                xs,
                ys("p95_ms"),
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{label} p95",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # the demo model answers in ms, the huge one in seconds
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"service latency vs concurrency ({device})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, out / f"latency_vs_concurrency_{device}.png")


def plot_recall(d: Path, device: str, out: Path) -> Path | None:
    """Recall@10 vs queries/s per index recipe, with exact Flat as one point."""
    r = load_json(d / f"index_{device}.json")
    if r is None or not r.get("curves"):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for recipe, pts in r["curves"].items():
        pts = sorted(pts, key=lambda p: p["qps"])
        ax.plot([p["qps"] for p in pts], [p["recall"] for p in pts], marker="o", label=recipe)
    if "flat" in r:
        ax.scatter([r["flat"]["batch_qps"]], [1.0], marker="*", s=120, color="k", label="Flat")
    ax.axhline(MIN_RECALL, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(_no_labels())  # decades only: minor labels overlap
    ax.set_xlabel("queries / s (batched)")
    ax.set_ylabel("recall@10")
    ax.set_title(f"{r['vectors']} x {r['dim']} vectors ({device})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, out / f"recall_vs_qps_{device}.png")


def _no_labels() -> Any:
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = (plot_throughput, plot_latency, plot_recall)


def make_plots(d: Path, device: str, out: Path) -> dict[str, str | None]:
    """Every plot whose data is there; {plot: path or None}."""
    try:
        _pyplot()
    except ImportError:
        return {p.__name__: None for p in PLOTS}
    made = {}
    for p in PLOTS:
        path = p(d, device, out)
        made[p.__name__] = None if path is None else str(path)
    return made


def summarise(
    d: Path,
    device: str,
    machine: Mapping[str, Any],
    runs: Mapping[str, Any] | None = None,
    plots_dir: Path | None = None,
    mode: str = "full",
    since: float | None = None,
) -> dict[str, Any]:
    """Collect the ratios, draw the plots, write ``summary_<device>.json``; returns the summary."""
    rows = collect(d, device, since)
    made = make_plots(d, device, plots_dir or d / "plots")
    # Paths relative to the results folder: the summary is committed with it.
    plots = {k: None if v is None else os.path.relpath(v, d) for k, v in made.items()}
    summary = {
        "device": device,
        "mode": mode,
        "machine": dict(machine),
        "runs": dict(runs or {}),
        "ratios": [asdict(r) for r in rows],
        "counts": {s: sum(r.status == s for r in rows) for s in (PASS, MISS, INFO, MISSING)},
        "plots": plots,
    }
    path = d / f"summary_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
