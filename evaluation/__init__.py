"""``bindsearch eval``: retrieval and zero-shot metrics of a model on a labelled manifest.

    from evaluation import EvalOptions, format_report, run_eval
    opts = EvalOptions(k=(1, 10), prompts=("a photo of a {}",))
    report = run_eval("labelled.jsonl", options=opts)
    print(format_report(report))

The metric functions (``retrieval_metrics``, ``zero_shot_accuracy``, ``prompt_classifiers``)
work on plain arrays, so ``bindsearch demo eval`` calls them on its in-memory embeddings;
``run_eval`` applies them to the vectors of an index (built from the manifest by the ordinary
build, or given). Definitions: docs/evaluation.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .metrics import (
    Estimate,
    LabelSet,
    RetrievalMetrics,
    mean_estimate,
    prompt_classifiers,
    proportion,
    relevance,
    retrieval_metrics,
    split_label,
    zero_shot_accuracy,
)

if TYPE_CHECKING:
    from .report import format_report, write_plot
    from .run import MERGES, EvalOptions, merged_search, run_eval

# What needs the index (FAISS) or matplotlib is imported when first asked for.
_LAZY = {
    **dict.fromkeys(["MERGES", "EvalOptions", "merged_search", "run_eval"], ".run"),
    **dict.fromkeys(["format_report", "write_plot"], ".report"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "MERGES",
    "Estimate",
    "EvalOptions",
    "LabelSet",
    "RetrievalMetrics",
    "format_report",
    "mean_estimate",
    "merged_search",
    "prompt_classifiers",
    "proportion",
    "relevance",
    "retrieval_metrics",
    "run_eval",
    "split_label",
    "write_plot",
    "zero_shot_accuracy",
]
