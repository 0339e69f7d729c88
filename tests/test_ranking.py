"""Calibrated any-to-any ranking (issue 18): the figures on the demo index, the merge modes.

The demo index is the one ``bindsearch serve`` builds with no arguments (120 samples x 6
files, the shipped demo model), built once per session. The tiny random model indexes a slice
of the same world.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bindsearch.cli import app as cli_app
from encoders import resolve_model
from index.calibration import (
    MERGES,
    METHODS,
    Calibration,
    PairCalibration,
    _measure,
    _Sample,
    compute_calibration,
    query_weights,
)
from index.pipeline import BuildOptions, ModelSource, build_index
from index.ranking_eval import item_queries, ranking_figures, text_queries
from index.search import open_index
from index.store import MANIFEST, IndexStore
from service import FakeEmbedder, ServiceSettings, create_app
from service.demo import ensure_demo_index

DEMO_SAMPLES = 120


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_index(tmp_path_factory.mktemp("cache"), n=DEMO_SAMPLES, progress=False)


@pytest.fixture(scope="session")
def demo_model() -> ModelSource:
    return ModelSource.from_ref(resolve_model())


@pytest.fixture(scope="session")
def tiny_index(demo_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 12 samples of the demo world (72 files), indexed by the tiny random model."""
    world = next(demo_index.parent.glob(f"world-{DEMO_SAMPLES}-*"))
    rows = (world / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    (world / "tiny.jsonl").write_text("\n".join(rows[:72]) + "\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("tiny") / "idx"
    build_index(world / "tiny.jsonl", out, _tiny_model(), BuildOptions(workers=0, progress=False))
    return out


def _tiny_model() -> ModelSource:
    return ModelSource.from_ref(resolve_model("imagebind_test", random_weights=True, seed=0))


# --- the bars on the demo index ---------------------------------------------------------


def test_demo_text_queries_meet_the_bars(demo_index: Path, demo_model: ModelSource) -> None:
    with open_index(demo_index) as s:
        assert s.calibration is not None and s.calibration_note is None
        queries = text_queries(s, demo_model.embed_text)
        assert len(queries) >= 50  # every (colour, class, scene) among the images
        f = ranking_figures(s, queries, "calibrated")
        raw = ranking_figures(s, queries, "raw")
    assert f.top1_ratio >= 0.9, f
    assert f.distinct >= 2.5, f
    assert f.matched_ratio >= 0.95, f
    # what the calibration mends: the raw merge's first result (0.60 of the best single)
    assert raw.top1_ratio < 0.75, raw


def test_demo_readme_example(demo_index: Path, demo_model: ModelSource) -> None:
    """The README's any-to-any example, merged by cosine and calibrated."""
    star, yellow = demo_model.embed_text(["a purple star in the snow", "a yellow star in the snow"])
    want = {"class:star", "colour:purple", "scene:snow"}
    with open_index(demo_index) as s:
        (raw,) = s.search(star, 10, merge="raw", query_modalities="text")
        (cal,) = s.search(star, 10, query_modalities="text")
        (twelve,) = s.search(yellow, 12, merge="raw", query_modalities="text")
    assert [h.item.modality.value for h in raw[:6]] == ["audio"] * 6
    assert [h.item.modality.value for h in cal[:5]] == [
        "vision",
        "video",
        "video",
        "thermal",
        "vision",
    ]
    assert all(want <= set(h.item.tags) for h in cal[:5])
    assert {h.item.modality.value for h in cal[5:]} == {"audio"}
    assert all({"class:star", "scene:snow"} <= set(h.item.tags) for h in cal[5:])
    assert {h.item.modality.value for h in twelve} == {"audio"}


def test_demo_image_queries_meet_the_bars(demo_index: Path) -> None:
    with open_index(demo_index) as s:
        queries = item_queries(s, "vision", ("class", "scene"))
        assert len(queries) == DEMO_SAMPLES
        f = ranking_figures(s, queries, "calibrated")
    assert f.distinct >= 2.5, f
    assert f.matched_ratio >= 0.95, f
    # the bar; measured 0.91, 90 of 120 queries where 90 are needed (docs/ranking.md)
    assert f.top1_ratio >= 0.9, f


def test_demo_calibration_is_in_the_manifest_and_deterministic(
    demo_index: Path, demo_model: ModelSource
) -> None:
    stored = json.loads((demo_index / MANIFEST).read_text())["calibration"]
    cal = Calibration.from_dict(stored)
    mods = {"vision", "video", "audio", "depth", "thermal", "imu"}
    assert {q for q, _ in cal.pairs} == mods | {"text"}
    assert {t for _, t in cal.pairs} == mods
    assert cal.text == "captions"
    with IndexStore.open_readonly(demo_index) as store:
        again = compute_calibration(store, demo_model.embed_text)
    assert json.dumps(again.to_dict()) == json.dumps(stored)


# --- the tiny random model ----------------------------------------------------------------------


@pytest.mark.parametrize("merge", MERGES)
def test_tiny_merges_are_well_formed_and_deterministic(tiny_index: Path, merge: str) -> None:
    k = 5
    with open_index(tiny_index) as s:
        q = np.stack([s.vector(0), s.vector(7)])
        one = s.search(q, k, merge=merge, query_modalities="vision")
        two = s.search(q, k, merge=merge, query_modalities="vision")
        mods = s.modalities
    assert one == two
    for hits in one:
        per: dict[str, int] = {}
        for h in hits:
            per[h.item.modality.value] = per.get(h.item.modality.value, 0) + 1
            assert np.isfinite(h.score) and h.relevance is not None
            assert 0.0 <= h.relevance <= 1.0
        if merge == "per_modality":
            assert len(per) == len(mods) and all(n == k for n in per.values())
            order = [h.item.modality.value for h in hits]  # one modality after another
            assert order == sorted(order, key=order.index)
        else:
            assert len(hits) == k
        if merge == "raw":
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        if merge == "calibrated":
            rel = [h.relevance for h in hits]
            assert rel == sorted(rel, reverse=True)


def test_tiny_relevance_is_monotone_in_score_within_a_pair(tiny_index: Path) -> None:
    with open_index(tiny_index) as s:
        cal = s.calibration
        assert cal is not None
        grid = np.linspace(-1, 1, 2001)
        for (q, t), pair in cal.pairs.items():
            for method in METHODS:
                r = pair.relevance(grid, method)  # type: ignore[arg-type]
                assert np.all(np.diff(r) >= -1e-12), (q, t, method)
        # and on real hits: within one target modality, relevance follows the score
        (hits,) = s.search(s.vector(3), 10, merge="per_modality", query_modalities="vision")
    for m in {h.item.modality for h in hits}:
        mine = [h for h in hits if h.item.modality == m]
        assert [h.relevance for h in mine] == sorted((h.relevance for h in mine), reverse=True)


def test_mixed_query_calibrates_against_its_terms(tiny_index: Path) -> None:
    with open_index(tiny_index) as s:
        cal = s.calibration
        assert cal is not None
        scores = np.linspace(-0.5, 0.9, 15)
        w = query_weights({"text": 3.0, "audio": -1.0})
        assert w == {"text": 0.75, "audio": 0.25}
        mixed = cal.relevance(w, "vision", scores)
        parts = [cal.pairs[(m, "vision")].relevance(scores) for m in ("text", "audio")]
        np.testing.assert_allclose(mixed, 0.75 * parts[0] + 0.25 * parts[1])


def test_an_index_without_calibration_merges_by_raw_score(tiny_index: Path, tmp_path: Path) -> None:
    """A manifest written before calibration existed opens; search says so and ranks raw."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_index, old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["calibration"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    with open_index(old) as s:
        assert s.calibration is None
        assert s.calibration_note and "raw cosine" in s.calibration_note
        v = s.vector(2)
        (cal,) = s.search(v, 8)
        (raw,) = s.search(v, 8, merge="raw")
    assert cal == raw and all(h.relevance == h.score for h in cal)


def test_graded_fits_the_share_of_the_query_tags() -> None:
    """A target that carries all of the query's tags and four more is a full match (share 1,
    where the Jaccard overlap would read 2 / 6); a query without tags is left out of the fit."""
    close = [0.85, float(np.sqrt(1 - 0.85**2))]
    far = [0.1, float(np.sqrt(1 - 0.1**2))]
    q = np.tile(np.array([[1.0, 0.0]], np.float32), (50, 1))
    t = np.array([close] * 40 + [far] * 40, np.float32)
    qtags = [frozenset({"class:star", "scene:snow"})] * 40 + [frozenset()] * 10
    rich = frozenset({"class:star", "scene:snow", "colour:red", "motion:left", "a:1", "b:2"})
    ttags = [rich] * 40 + [frozenset({"class:ring"})] * 40
    none = [frozenset[str]()]
    queries = _Sample(np.arange(50), q, none * 50, qtags)
    targets = _Sample(np.arange(100, 180), t, none * 80, ttags)
    pair = _measure(queries, targets, same=False, rng=np.random.default_rng(0))
    assert pair is not None and pair.graded
    rel = pair.relevance(np.array([0.1, 0.85]), "graded")
    assert rel[0] == pytest.approx(0.0, abs=1e-3)
    assert rel[1] == pytest.approx(1.0, abs=1e-3)


def test_pair_calibration_round_trips_and_rejects_bad_input() -> None:
    p = PairCalibration(0.1, 0.2, tuple(np.linspace(0.1, 0.6, 9).tolist()), 100, 10, 50)
    assert PairCalibration.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="std"):
        PairCalibration.from_dict({**p.to_dict(), "std": 0})
    c = Calibration({("text", "vision"): p})
    assert Calibration.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="query->target"):
        Calibration.from_dict({**c.to_dict(), "pairs": {"text->sound": p.to_dict()}})


# --- the service and the CLI --------------------------------------------------------------------


def test_service_search_takes_merge_and_answers_relevance(tiny_index: Path) -> None:
    with open_index(tiny_index) as s:
        app = create_app(ServiceSettings(), FakeEmbedder(s.dim), s)
        with TestClient(app) as client:
            r = client.post("/v1/search", json={"item_id": 0, "k": 3})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["query"]["merge"] == "calibrated"
            rel = [h["relevance"] for h in body["results"]]
            assert len(rel) == 3 and rel == sorted(rel, reverse=True)
            r = client.post("/v1/search", json={"item_id": 0, "k": 2, "merge": "per_modality"})
            assert r.status_code == 200, r.text
            mods = [h["modality"] for h in r.json()["results"]]
            assert len(mods) == 2 * len(s.modalities) and 0 not in [
                h["id"] for h in r.json()["results"]
            ]
            # A vector query has no modality: calibrated against every query modality the
            # index measured, equally, exactly as IndexSearcher.search without one.
            v = s.vector(0)
            r = client.post("/v1/search", json={"vector": v.tolist(), "k": 5})
            assert r.status_code == 200, r.text
            want = s.search(v[None], 5)[0]
            got = r.json()["results"]
            assert [h["id"] for h in got] == [h.item.id for h in want]
            assert [h["relevance"] for h in got] == pytest.approx([h.relevance for h in want])
            r = client.post("/v1/search", json={"item_id": 0, "merge": "best"})
            assert r.status_code == 400, r.text
            assert "calibrated" in r.json()["error"]["message"]
            r = client.post(
                "/v1/search",
                files={"file": ("q.txt", b"a red ring", "text/plain")},
                data={"k": "2", "merge": "rrf"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["query"]["merge"] == "rrf" and len(r.json()["results"]) == 2


def test_cli_query_merge(tiny_index: Path) -> None:
    runner = CliRunner()
    base = ["index", "query", str(tiny_index), "--text", "a red ring", "--checkpoint", "none"]
    base += ["--config", "imagebind_test", "-k", "2"]
    r = runner.invoke(cli_app, [*base, "--merge", "per_modality", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)
    assert len(hits) == 12 and all("relevance" in h for h in hits)
    r = runner.invoke(cli_app, [*base, "--merge", "best"])
    assert r.exit_code == 1
    assert "error: --merge is 'best'; accepted: calibrated, raw, rrf, per_modality" in r.output
