"""The metric functions of ``evaluation`` on hand-computed cases (no model, no index)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation import (
    LabelSet,
    mean_estimate,
    prompt_classifiers,
    proportion,
    retrieval_metrics,
    split_label,
    zero_shot_accuracy,
)
from train.eval import CAPTION_TEMPLATE, VIDEO_CAPTION_TEMPLATE
from world.world import FACTORS, caption


def _unit(rows: list[list[float]]) -> np.ndarray:
    x = np.array(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_labels_from_tags() -> None:
    assert split_label(" class : dog ") == ("class", "dog")
    assert split_label("pets") is None and split_label(":x") is None and split_label("k:") is None
    labels = LabelSet.from_tags([["class:dog", "pets"], ["class:cat", "class:dog", "scene:x"], []])
    assert labels.values == {"class": ("cat", "dog"), "scene": ("x",)}
    assert labels.member["class"].tolist() == [[False, True], [True, True], [False, False]]
    assert labels.shared(labels, "class").tolist() == [
        [True, True, False],
        [True, True, False],
        [False, False, False],
    ]
    assert labels.take([2, 0]).member["scene"].tolist() == [[False], [False]]


def test_estimates_state_their_standard_error() -> None:
    e = proportion(np.array([1, 1, 1, 0], bool))
    assert e.value == 0.75 and e.n == 4
    assert e.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    m = mean_estimate(np.array([1.0, 2.0, 3.0]))
    assert m.value == 2.0 and m.stderr == pytest.approx(1.0 / math.sqrt(3))
    assert proportion(np.zeros(0, bool)).to_dict() == {"value": None, "stderr": None, "n": 0}


def test_recall_and_ndcg_by_hand() -> None:
    gallery = _unit([[1, 0], [0.8, 0.6], [0, 1]])  # ranked for q0: g0, g1, g2
    g_tags = [["class:b", "scene:x"], ["class:a", "scene:x"], ["class:a", "scene:y"]]
    q_tags = [["class:a", "scene:x"], ["class:c"]]
    labels = LabelSet.from_tags(q_tags + g_tags)
    ql, gl = labels.take([0, 1]), labels.take([2, 3, 4])
    got = retrieval_metrics(_unit([[1, 0], [0, 1]]), gallery, ql, gl, ks=(1, 2))
    # q0: g0 shares scene (gain 1), g1 both (2, the only full match), g2 class (1).
    # q1 carries class:c, which no item has: left out of recall and nDCG.
    assert got.queries == 2
    assert got.recall[1].value == 0.0 and got.recall[2].value == 1.0 and got.recall[1].n == 1
    ideal = 2 + 1 / math.log2(3)
    assert got.ndcg[2].value == pytest.approx((1 + 2 / math.log2(3)) / ideal)
    assert got.ndcg[1].value == pytest.approx(1 / 2)
    assert got.by_key["class"][1].value == 0.0 and got.by_key["class"][2].value == 1.0
    assert got.by_key["class"][1].n == 1  # q1's class has no match anywhere
    assert got.by_key["scene"][1].value == 1.0
    # Binary relevance on one key: only class counts.
    one = retrieval_metrics(_unit([[1, 0]]), gallery, ql.take([0]), gl, ks=(1,), keys=["class"])
    assert one.recall[1].value == 0.0 and one.ndcg[1].value == 0.0


def test_exclude_leaves_the_query_itself_out() -> None:
    x = _unit([[1, 0], [0.9, 0.1], [0, 1]])
    labels = LabelSet.from_tags([["k:a"], ["k:a"], ["k:b"]])
    with_self = retrieval_metrics(x, x, labels, labels, ks=(1,))
    assert with_self.recall[1].value == 1.0  # every item finds itself
    without = retrieval_metrics(x, x, labels, labels, ks=(1,), exclude=np.arange(3))
    # items 0 and 1 find each other; item 2 has no other "k:b" item and is left out
    assert without.recall[1].value == 1.0 and without.recall[1].n == 2
    # -1: nothing left out (item 2 finds itself)
    partly = retrieval_metrics(x, x, labels, labels, ks=(1,), exclude=np.array([0, 1, -1]))
    assert partly.recall[1].n == 3 and partly.recall[1].value == 1.0


def test_zero_shot_accuracy() -> None:
    classes = _unit([[1, 0], [0, 1]])
    items = _unit([[1, 0.1], [0.2, 1], [1, 0], [1, 1e-3]])
    truth = np.array([[1, 0], [0, 1], [0, 1], [0, 0]], bool)  # the last carries no class
    e = zero_shot_accuracy(items, classes, truth)
    assert e.n == 3 and e.value == pytest.approx(2 / 3)


def test_prompt_templates_expand_and_ensemble() -> None:
    seen: list[str] = []

    def embed(texts: list[str]) -> np.ndarray:
        seen.extend(texts)
        return _unit([[1.0 + t.count("dog"), 1.0 + t.count("cat"), 0.1] for t in texts])

    values = {"class": ("cat", "dog"), "scene": ("beach", "snow")}
    clf = prompt_classifiers(embed, ["a photo of a {}", "a {class} in the {scene}"], values)
    # {} is the classified key; {scene} brings every scene in; each text is embedded once
    assert "a photo of a beach" in seen and "a cat in the snow" in seen
    # "a photo of a" + each of 4 values, and the 4 (class, scene) captions, shared by both keys
    assert len(seen) == len(set(seen)) == 4 + 4
    assert set(clf) == {"class", "scene"}
    assert clf["class"].shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(clf["class"], axis=1), 1.0, rtol=1e-6)
    assert clf["class"][1, 0] > clf["class"][0, 0]  # the dog prompt leans to the dog axis
    only_scene = prompt_classifiers(embed, ["in the {scene}"], values)
    assert set(only_scene) == {"scene"}  # no template names class
    with pytest.raises(ValueError, match="names 'colour', which no label has"):
        prompt_classifiers(embed, ["a {colour} {}"], values)


def test_demo_caption_templates_are_the_world_captions() -> None:
    f = {"class": 3, "colour": 1, "scene": 4, "distance": 2, "motion": 3}
    named = {k: FACTORS[k][v] for k, v in f.items()}
    assert CAPTION_TEMPLATE.format(**named) == caption(f, motion=False)
    assert VIDEO_CAPTION_TEMPLATE.format(**named) == caption(f, motion=True)


def test_evaluation_exports() -> None:
    import evaluation

    assert sorted(evaluation.__all__) == sorted(
        [
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
    )
    for name in evaluation.__all__:
        assert hasattr(evaluation, name), name
    assert evaluation.MERGES == ("calibrated", "raw", "rrf", "per_modality")  # the index's own


def test_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evaluation import write_plot

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    report = {"k": [1], "pairs": [{"query": "text", "target": "vision", "recall@1": None}]}
    with pytest.raises(
        ValueError, match=r"--plot needs matplotlib: pip install 'bindsearch\[bench\]'"
    ):
        write_plot(report, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()
