"""The report of ``bindsearch eval`` as a table (stdout) and as a plot of the per-pair metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _est(d: dict[str, Any] | None) -> str:
    """``0.912±0.021`` (a figure and its standard error), ``-`` when nothing was measured."""
    if not d or d.get("value") is None:
        return "-"
    return f"{d['value']:.3f}±{d['stderr']:.3f}"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table of a ``run_eval`` report (``--json`` has every figure)."""
    ks = report["k"]
    kmax = max(ks)
    lines = [
        f"bindsearch eval of {report['model']['name']} on {report['manifest']}",
        f"index {report['index']}",
        "items: " + ", ".join(f"{m} {n}" for m, n in report["items"].items()),
        "labels: " + ", ".join(f"{k} ({len(v)} values)" for k, v in report["labels"].items()),
        f"relevance: {report['relevance']}",
        "every figure: mean ± standard error (binomial for rates; s/sqrt(n) for nDCG)",
        "",
        "retrieval, query -> target (recall@k: a fully relevant item in the top k):",
    ]
    cols = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    lines.append(
        f"  {'query':8s} {'target':8s} {'queries':>7s}  " + "  ".join(f"{c:>13s}" for c in cols)
    )
    for p in report["pairs"]:
        cells = "  ".join(f"{_est(p.get(c)):>13s}" for c in cols)
        lines.append(f"  {p['query']:8s} {p['target']:8s} {p['queries']:>7d}  {cells}")
    lines.append("")
    lines.append(f"per label key, recall@{kmax} (the top {kmax} holds an item sharing the value):")
    for p in report["pairs"]:
        cells = ", ".join(
            f"{key} {_est(v.get(f'recall@{kmax}'))}" for key, v in p["by_key"].items()
        )
        lines.append(f"  {p['query'] + ' -> ' + p['target']:20s} {cells}")
    lines.append("")
    prompts = " | ".join(report["prompts"])
    lines.append(f"zero-shot classification from text prompts ({prompts}), accuracy (chance):")
    for m, per_key in report["zero_shot"].items():
        cells = ", ".join(f"{k} {_est(v)} ({v['chance']:.2f})" for k, v in per_key.items())
        lines.append(f"  {m:8s} {cells or '-'}")
    a2a = report["any_to_any"]
    lines.append("")
    lines.append(
        f"any-to-any: every target modality at once, merge {a2a['merge']}, top {a2a['k']}:"
    )
    heads = ["recall@1", f"ndcg@{kmax}", "modalities", "matched labels"]
    lines.append(f"  {'query':8s} " + "  ".join(f"{c:>14s}" for c in heads))
    for m, v in a2a["by_query"].items():
        figures = [
            v.get("recall@1"),
            v.get(f"ndcg@{kmax}"),
            v["modalities_in_top_k"],
            v["matched_labels_in_top_k"],
        ]
        lines.append(f"  {m:8s} " + "  ".join(f"{_est(c):>14s}" for c in figures))
    against = a2a.get("against") or {}
    if against:
        lines.append("")
        lines.append(
            f"merge {a2a['merge']} against its references "
            "(docs/ranking.md's bars: >= 0.9, >= 2.5, >= 0.95):"
        )
        heads = ["top-1 / best single", "modalities", "matched / raw"]
        lines.append(f"  {'query':8s} " + "  ".join(f"{c:>20s}" for c in heads))
        for m, v in against.items():
            single = f"{_num(v['top1_vs_best_single'])} ({v['best_single'] or '-'})"
            row = [single, _num(v["modalities_in_top_k"]), _num(v["matched_vs_raw"])]
            lines.append(f"  {m:8s} " + "  ".join(f"{c:>20s}" for c in row))
    t = report.get("template_queries")
    if t:
        lines.append("")
        lines.append(
            f"{t['queries']} text queries {t['template']!r} (labels of {t['source']} items), "
            f"every modality, merge {t['merge']}, top {t['k']}:"
        )
        lines.append(
            f"  top-1 matches all: {t['top1']:.3f}, {_num(t['top1_ratio'])}x the best single "
            f"modality ({t['best_single']}, {t['best_single_top1']:.3f}); modalities in the "
            f"top {t['k']}: {t['distinct']:.2f}; matched labels {t['matched']:.3f}, "
            f"{_num(t['matched_ratio'])}x the raw merge's"
        )
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def write_plot(report: dict[str, Any], out: str | Path) -> Path:
    """Heatmaps of recall@k and nDCG@k per (query, target) pair, at the largest k, as PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'bindsearch[bench]'") from None
    import numpy as np

    kmax = max(report["k"])
    queries = list(dict.fromkeys(p["query"] for p in report["pairs"]))
    targets = list(dict.fromkeys(p["target"] for p in report["pairs"]))
    names = [f"recall@{kmax}", f"ndcg@{kmax}"]
    fig = Figure(figsize=(4.2 * len(names), 0.6 * len(queries) + 2.0), layout="constrained")
    FigureCanvasAgg(fig)
    for n, name in enumerate(names):
        grid = np.full((len(queries), len(targets)), np.nan)
        for p in report["pairs"]:
            v = (p.get(name) or {}).get("value")
            if v is not None:
                grid[queries.index(p["query"]), targets.index(p["target"])] = v
        ax = fig.add_subplot(1, len(names), n + 1)
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right")
        ax.set_yticks(range(len(queries)), queries)
        ax.set_xlabel("target")
        ax.set_ylabel("query")
        ax.set_title(name)
        for i in range(len(queries)):
            for j in range(len(targets)):
                if not np.isnan(grid[i, j]):
                    colour = "black" if grid[i, j] > 0.6 else "white"
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color=colour)
        fig.colorbar(im, ax=ax, shrink=0.8)
    path = Path(out)
    fig.savefig(path, format="png", dpi=100)
    return path
