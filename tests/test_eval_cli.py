"""``bindsearch eval`` on a labelled manifest of demo-world files reproduces ``demo eval``.

The world is the one the service's first start writes (``service.demo``: the same files and
the same ``key:value`` tags from the factors), at a small size; ``demo eval`` measures the same
world (same seed, same split) from its in-memory embeddings. Each figure ``bindsearch eval``
prints must lie within twice the standard error it states (plus one item: the two differ only
by what file coding changes, e.g. MP4 video frames).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bindsearch.cli import app
from encoders.encoder import load_encoder
from service.demo import DEMO_SEED, _ensure_world
from train.cli import demo_weights_path
from train.eval import CAPTION_TEMPLATE, GALLERY, VIDEO_CAPTION_TEMPLATE, evaluate

N = 48  # samples (x 6 files): the build takes about half a minute on 2 cores


def _eval(*args: str) -> dict[str, Any]:
    res = CliRunner().invoke(app, ["eval", *args, "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    report: dict[str, Any] = json.loads(res.stdout)
    return report


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("eval")
    corpus = _ensure_world(tmp / "world", N, progress=False)
    plot = tmp / "pairs.png"
    # The stills' caption template, then (on the index just built) the clips' one, as demo eval.
    # No soundtrack items: demo eval's audio is the WAV files alone.
    common = ["--no-soundtrack", "--cache-dir", str(tmp / "cache")]
    still = _eval(
        str(corpus), *common, "-k", "1", "--prompt", CAPTION_TEMPLATE, "--plot", str(plot)
    )
    clip = _eval(
        str(corpus), "--index", still["index"], "-k", "1", "--prompt", VIDEO_CAPTION_TEMPLATE
    )
    enc = load_encoder(demo_weights_path(), config="imagebind_demo")
    demo = evaluate(enc.model, n=N, seed=DEMO_SEED, arith_queries=20)
    return {"still": still, "clip": clip, "demo": demo, "plot": plot, "corpus": corpus}


def _close(got: dict[str, Any], want: float, what: str) -> None:
    bound = 2 * got["stderr"] + 1 / got["n"]
    assert abs(got["value"] - want) <= bound, (what, got, want)


def _pair(report: dict[str, Any], query: str, target: str) -> dict[str, Any]:
    found = [p for p in report["pairs"] if (p["query"], p["target"]) == (query, target)]
    assert len(found) == 1, (query, target)
    return found[0]


def test_items_and_labels_are_the_worlds(runs: dict[str, Any]) -> None:
    still = runs["still"]
    for m in ("vision", "video", "audio", "depth", "thermal", "imu"):
        assert still["items"][m] == N, still["items"]
    # each sample's still and clip captions; samples of equal factors share theirs
    assert N < still["items"]["text"] <= 2 * N
    assert set(still["labels"]) == {"class", "colour", "scene", "distance", "motion"}


def test_zero_shot_reproduces_demo_eval(runs: dict[str, Any]) -> None:
    compared = 0
    for m, per_key in runs["demo"]["zero_shot"].items():
        report = runs["clip"] if m in ("video", "imu") else runs["still"]
        for key, want in per_key.items():
            got = report["zero_shot"][m][key]
            assert got["n"] == N
            _close(got, want, f"zero-shot {m} {key}")
            compared += 1
    assert compared >= 15


def test_retrieval_reproduces_demo_eval(runs: dict[str, Any]) -> None:
    demo, still = runs["demo"], runs["still"]
    compared = 0
    for m, per_key in demo["to_image"].items():
        pair = _pair(still, m, GALLERY[m])
        for key, want in per_key.items():
            _close(pair["by_key"][key]["recall@1"], want, f"{m}->{GALLERY[m]} {key}")
            compared += 1
    for name, per_key in demo["cross_modal"].items():
        a, b = name.split("->")
        for key, want in per_key.items():
            _close(_pair(still, a, b)["by_key"][key]["recall@1"], want, f"{name} {key}")
            compared += 1
    assert compared >= 15


def test_report_has_every_section(runs: dict[str, Any]) -> None:
    still = runs["still"]
    queries = {p["query"] for p in still["pairs"]}
    assert queries == {"vision", "video", "audio", "depth", "thermal", "imu", "text"}
    for p in still["pairs"]:
        for name in ("recall@1", "ndcg@1"):
            e = p[name]
            if e["n"]:
                assert 0.0 <= e["value"] <= 1.0 and e["stderr"] >= 0.0
    a2a = still["any_to_any"]
    assert a2a["merge"] == "calibrated" and a2a["k"] == 1  # the service's default merge
    text = a2a["by_query"]["text"]
    assert text["modalities_in_top_k"]["value"] == 1.0  # one result, one modality
    # Issue 18's figures: the merged top-1 against the best target modality searched alone
    # (the pair section), and the modalities and labels of the top k against the raw merge.
    against = a2a["against"]
    assert set(against) == set(a2a["by_query"])
    alone_by = {
        p["target"]: p["recall@1"]["value"]
        for p in still["pairs"]
        if p["query"] == "text" and p["recall@1"]["value"] is not None
    }
    best = max(alone_by, key=lambda t: (alone_by[t], t))
    assert against["text"]["best_single"] == best
    alone = alone_by[best]
    assert against["text"]["top1_vs_best_single"] == pytest.approx(
        text["recall@1"]["value"] / alone
    )
    assert against["text"]["modalities_in_top_k"] == 1.0
    assert against["text"]["matched_vs_raw"] > 0


def test_plot_is_a_png(runs: dict[str, Any]) -> None:
    with Image.open(runs["plot"]) as im:
        assert im.format == "PNG"
        assert im.width > 200 and im.height > 200
        px = np.asarray(im.convert("RGB"))
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 20  # a drawn figure, not a blank page


def test_table_on_stdout(runs: dict[str, Any]) -> None:
    res = CliRunner().invoke(
        app, ["eval", str(runs["corpus"]), "--index", runs["still"]["index"], "-k", "5"]
    )
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "recall@5" in out and "ndcg@5" in out and "zero-shot" in out and "any-to-any" in out
    assert "±" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--merge", "best"],
            "error: unknown --merge 'best'; accepted: calibrated, raw, rrf, per_modality",
        ),
        (["--label-key", "size"], "error: --label-key 'size' is no label of the manifest"),
        (["--query-template", "a cat"], "error: --query-template 'a cat' names no label key"),
        (["--query-template", "a {size} cat"], "error: --query-template names size, no label"),
        (["--prompt", "a {size} {}"], "error: prompt 'a {size} {}' names 'size'"),
        (["--plot", "/nonexistent/dir/p.png"], "error: --plot /nonexistent/dir/p.png"),
    ],
)
def test_bad_options_are_one_line_errors(
    runs: dict[str, Any], args: list[str], message: str
) -> None:
    res = CliRunner().invoke(
        app, ["eval", str(runs["corpus"]), "--index", runs["still"]["index"], *args]
    )
    assert res.exit_code == 1, res.output
    assert res.output.startswith(message), res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_bad_manifests_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    unlabelled = tmp_path / "m.jsonl"
    unlabelled.write_text('{"path": "a.png", "modality": "vision", "tags": ["pets"]}\n')
    for target, message in [
        (unlabelled, "has a label: give each row tags of the form key:value"),
        (tmp_path, "is not a manifest"),
        (tmp_path / "missing.jsonl", "is not a manifest"),
    ]:
        res = CliRunner().invoke(app, ["eval", str(target), "--cache-dir", str(tmp_path)])
        assert res.exit_code == 1, res.output
        assert res.output.startswith("error: ") and message in res.output, res.output


def test_merged_search_agrees_with_the_pair_when_one_modality(tmp_path: Path) -> None:
    """With one item modality, the any-to-any section (through the index's own search) and
    the vision pair (ranked by the metric functions) measure the same lists: equal figures."""
    from encoders import resolve_model
    from evaluation import EvalOptions, run_eval

    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}
    rows = []
    for i in range(12):
        name = list(colours)[i % 3]
        px = np.clip(np.array(colours[name]) + rng.normal(0, 40, (32, 32, 3)), 0, 255)
        Image.fromarray(px.astype(np.uint8)).save(tmp_path / f"{i}.png")
        tags = [f"colour:{name}", f"size:{'big' if i % 2 else 'small'}", "unlabelled-tag"]
        rows.append({"path": f"{i}.png", "caption": f"a {name} square", "tags": tags})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = resolve_model()  # the demo model: random weights score every pair ~1.0 (ties)
    opts = EvalOptions(k=(1, 3), prompts=("a {} square", "{}"), progress=False)
    report = run_eval(manifest, ref, options=opts, cache_dir=tmp_path / "cache")
    assert report["items"] == {"vision": 12, "text": 6}  # distinct (caption, labels)
    assert report["labels"] == {"colour": ["blue", "green", "red"], "size": ["big", "small"]}
    for query in ("vision", "text"):
        pair = _pair(report, query, "vision")
        merged = report["any_to_any"]["by_query"][query]
        for name in ("recall@1", "recall@3", "ndcg@3"):
            assert merged[name]["n"] == pair[name]["n"]
            if pair[name]["n"]:
                assert merged[name]["value"] == pytest.approx(pair[name]["value"]), (query, name)
        assert merged["modalities_in_top_k"]["value"] == 1.0
    zs = report["zero_shot"]["vision"]
    assert set(zs) == {"colour", "size"} and zs["colour"]["chance"] == pytest.approx(1 / 3)
    assert zs["colour"]["n"] == 12
    # binary relevance on one key: only that key is measured
    one = run_eval(
        manifest,
        ref,
        index=report["index"],
        options=EvalOptions(k=(1,), label_key="colour", progress=False),
    )
    assert one["relevance"] == "binary on colour"
    assert set(_pair(one, "vision", "vision")["by_key"]) == {"colour"}
    assert set(one["zero_shot"]["vision"]) == {"colour"}


def test_an_index_of_another_model_is_refused(runs: dict[str, Any]) -> None:
    res = CliRunner().invoke(
        app,
        [
            *("eval", str(runs["corpus"]), "--index", runs["still"]["index"]),
            *("--config", "imagebind_test", "--checkpoint", "none"),
        ],
    )
    assert res.exit_code == 1, res.output
    assert (
        res.output.startswith("error: the index at ") and "built with another model" in res.output
    )
    assert len(res.output.strip().splitlines()) == 1


def test_query_template_reports_the_ranking_figures_of_the_index(runs: dict[str, Any]) -> None:
    # docs/ranking.md's three figures, as tests/test_ranking.py computes them on the demo
    # index: bindsearch eval prints them for any labelled manifest and merge.
    from encoders import Modality
    from index.ranking_eval import ranking_figures, text_queries
    from index.search import open_index

    template = "a {colour} {class} in the {scene}"
    index = runs["still"]["index"]
    got = {}
    for merge in ("calibrated", "raw"):
        report = _eval(
            str(runs["corpus"]),
            "--index",
            index,
            "-k",
            "10",
            "--query-template",
            template,
            "--merge",
            merge,
        )
        got[merge] = report["template_queries"]
    enc = load_encoder(demo_weights_path(), config="imagebind_demo", modalities=[Modality.TEXT])
    with open_index(index) as s:
        queries = text_queries(s, lambda t: enc.embed_items(Modality.TEXT, list(t)), template)
        assert queries and got["raw"]["queries"] == len(queries) == got["calibrated"]["queries"]
        for merge, figures in got.items():
            want = ranking_figures(s, queries, merge, k=10).to_dict()
            assert figures["source"] == "vision" and figures["template"] == template
            for name in ("top1", "best_single_top1", "distinct", "matched", "raw_matched"):
                assert figures[name] == pytest.approx(want[name], abs=1e-9), (merge, name)
    # The raw merge is its own reference; the calibrated one brings more modalities.
    assert got["raw"]["matched_ratio"] == pytest.approx(1.0)
    assert got["calibrated"]["distinct"] > got["raw"]["distinct"]
    res = CliRunner().invoke(
        app, ["eval", str(runs["corpus"]), "--index", index, "--query-template", template]
    )
    assert res.exit_code == 0 and "the best single modality (" in res.stdout, res.output
