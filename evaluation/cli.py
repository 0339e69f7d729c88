"""``bindsearch eval``: a thin typer layer over ``run_eval`` (mounted by ``bindsearch.cli``)."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Annotated

import typer

from encoders import DEFAULT_MODEL, EncoderError
from encoders.cli import fail
from index.errors import IndexStoreError

from .run import DEFAULT_PROMPTS, MERGES, EvalOptions

_ERRORS = (EncoderError, IndexStoreError, ValueError, KeyError, OSError, sqlite3.Error)


def eval_cmd(
    manifest: Annotated[
        Path,
        typer.Argument(
            help="Labelled manifest (.jsonl, or .csv with a 'path' column): path, modality, "
            "tags with the labels as key:value, optional caption (docs/evaluation.md)."
        ),
    ],
    index: Annotated[
        Path | None,
        typer.Option(
            help="An index of the manifest's files, built with the same model. Default: build "
            "one into the cache ($BINDSEARCH_CACHE/eval/), reused by later runs."
        ),
    ] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            help="Weights (.pth/.safetensors). Default: the shipped or downloaded weights of "
            "--config. 'none': seeded random weights (tests)."
        ),
    ] = None,
    config: Annotated[
        str | None, typer.Option(help=f"Model preset or JSON config (default: {DEFAULT_MODEL}).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    k: Annotated[
        list[int] | None, typer.Option("-k", min=1, help="Cut-offs k (repeat; default 1 and 10).")
    ] = None,
    label_key: Annotated[
        str | None,
        typer.Option(
            "--label-key",
            help="Binary relevance on this label key. Default: graded, by the number of shared "
            "label values.",
        ),
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt",
            help="Zero-shot prompt template, '{}' for the label value, '{key}' for every value "
            f"of another key (repeat: an ensemble). Default: {DEFAULT_PROMPTS[0]!r}.",
        ),
    ] = None,
    merge: Annotated[
        str,
        typer.Option(help=f"How the any-to-any section merges modalities: {', '.join(MERGES)}."),
    ] = "calibrated",
    query_template: Annotated[
        str | None,
        typer.Option(
            "--query-template",
            help='Also make text queries from label combinations, e.g. "a {colour} {class} in '
            "the {scene}\", and report docs/ranking.md's three figures for --merge.",
        ),
    ] = None,
    max_queries: Annotated[
        int,
        typer.Option("--max-queries", min=1, help="Queries per modality (a seeded sample beyond)."),
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the query sample.")] = 0,
    soundtrack: Annotated[
        bool, typer.Option(help="Building: also embed a video's soundtrack as audio items.")
    ] = True,
    allow_outside: Annotated[
        bool,
        typer.Option("--allow-outside", help="Let the manifest name files outside its own folder."),
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Cache folder (default: $BINDSEARCH_CACHE, else ~/.cache/bindsearch)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object.")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Write a PNG of the per-pair metrics (needs matplotlib, bindsearch[bench])."
        ),
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Progress bar (default: on a tty)."),
    ] = None,
) -> None:
    """Measure retrieval (recall@k, nDCG@k) and zero-shot accuracy of a model on labelled data."""
    from encoders import resolve_model

    from .report import format_report, write_plot
    from .run import run_eval

    opts = EvalOptions(
        k=tuple(dict.fromkeys(k or (1, 10))),
        label_key=label_key,
        prompts=tuple(prompt or DEFAULT_PROMPTS),
        merge=merge,
        query_template=query_template,
        max_queries=max_queries,
        seed=seed,
        soundtrack=soundtrack,
        allow_outside=allow_outside,
        progress=progress,
    )
    try:
        opts.check()
        if plot is not None and not plot.parent.is_dir():
            raise ValueError(f"--plot {plot}: the folder {plot.parent} does not exist")
        if checkpoint is not None and checkpoint.lower() == "none":
            ref = resolve_model(config, random_weights=True)
        else:
            ref = resolve_model(config, checkpoint)
        report = run_eval(
            manifest, ref, index, opts, device, cache_dir, log=lambda s: typer.echo(s, err=True)
        )
        if plot is not None:
            write_plot(report, plot)
    except ImportError as e:  # FAISS and matplotlib come from extras
        if "faiss" not in str(e):
            raise
        fail("bindsearch eval needs FAISS: install bindsearch with the 'cpu' extra (faiss-cpu)")
    except _ERRORS as e:
        fail(str(e).strip("'\""))
    if as_json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        typer.echo(format_report(report))
    if plot is not None:
        typer.echo(f"plot: {plot}", err=True)
