"""Cross-modal merging compared: raw, z-score, tail probability, RRF, fitted map (issue 18).

    python -m bench.ranking                 # demo model and tiny random model, ~2 CPU-minutes
    python -m bench.ranking --json out.json

On the demo index (``bindsearch serve``'s, 120 samples) and on the same world indexed by the
tiny random model, prints for text queries ("a {colour} {class} in the {scene}", every
combination present among the images) and image queries (every image by its stored id, itself
left out; class and scene) the three figures of ``index.ranking_eval`` per merge. The table
and the reasoning are in docs/ranking.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import json
import tempfile
import time
from typing import Any

MERGES = ("raw", "zscore", "tail", "rrf", "platt", "isotonic", "graded")


def run(cache: Path, samples: int) -> dict[str, Any]:
    """Build both indexes (reused when present) and compute every merge's figures."""
    from encoders import resolve_model
    from index.calibration import compute_calibration
    from index.pipeline import BuildOptions, ModelSource, build_index
    from index.ranking_eval import item_queries, ranking_figures, text_queries
    from index.search import open_index
    from index.store import IndexStore
    from service.demo import ensure_demo_index

    demo = ensure_demo_index(cache, n=samples, progress=False)
    corpus = next((cache / "demo").glob(f"world-{samples}-*")) / "corpus.jsonl"
    tiny = cache / f"tiny-{samples}"
    tiny_ref = resolve_model("imagebind_test", random_weights=True, seed=0)
    if not (tiny / "manifest.json").is_file():
        build_index(corpus, tiny, ModelSource.from_ref(tiny_ref), BuildOptions(workers=0))
    out: dict[str, Any] = {}
    for name, root, ref in (
        ("demo", demo, resolve_model()),
        ("tiny random", tiny, tiny_ref),
    ):
        model = ModelSource.from_ref(ref)
        model.embed_text(["warm-up"])  # load the text tower outside the timing
        with IndexStore.open_readonly(root) as store:
            t0 = time.perf_counter()
            fresh = compute_calibration(store, model.embed_text)
            cost = time.perf_counter() - t0
        with open_index(root) as searcher:
            # The figures of this code's calibration, whatever a reused --cache index stored.
            searcher.manifest = dataclasses.replace(searcher.manifest, calibration=fresh)
            sets = {
                "text": text_queries(searcher, model.embed_text),
                "image": item_queries(searcher, "vision", ("class", "scene")),
            }
            rows = {
                kind: [ranking_figures(searcher, qs, m).to_dict() for m in MERGES]
                for kind, qs in sets.items()
            }
            cal = searcher.calibration
        out[name] = {
            "calibration_s": cost,
            "items": sum(searcher.counts().values()),
            "notes": list(cal.notes) if cal else [],
            "figures": rows,
        }
    return out


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per model, query kind and merge."""
    lines = [
        "| model | queries | merge | top-1 all | best single (mod) | top-1 ratio | "
        "distinct mods | matched | matched / raw |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, r in results.items():
        for kind, rows in r["figures"].items():
            for f in rows:
                lines.append(
                    f"| {model} | {kind} ({f['queries']}) | {f['merge']} | {f['top1']:.3f} | "
                    f"{f['best_single_top1']:.3f} ({f['best_single']}) | {f['top1_ratio']:.2f} | "
                    f"{f['distinct']:.2f} | {f['matched']:.3f} | {f['matched_ratio']:.3f} |"
                )
    for model, r in results.items():
        lines.append("")
        lines.append(
            f"{model}: calibration of {r['items']} items took {r['calibration_s']:.2f} s"
            + "".join(f"; {n}" for n in r["notes"])
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, help="where the indexes go (default: a temp dir)")
    p.add_argument("--samples", type=int, default=120, help="demo world samples (default 120)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.cache or Path(tmp), args.samples)
    sys.stdout.write(table(results) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
