"""Reading the golden parity fixture (``shared/fixtures/imagebind-parity``), case by case."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ModelCase:
    id: str
    modality: str
    kind: str
    raw: dict[str, Any]


def load_manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def model_cases(root: Path) -> list[ModelCase]:
    return [
        ModelCase(c["id"], c["modality"], c["input"]["kind"], c)
        for c in load_manifest(root)["model_cases"]
    ]


def model_input(root: Path, case: ModelCase) -> np.ndarray | None:
    """The batch of a model case; None for cases that need our own video loader."""
    inp = case.raw["input"]
    kind = inp["kind"]
    if kind == "concat":
        return np.concatenate([np.load(root / f) for f in inp["files"]], 0)
    if kind == "stack":
        return np.stack([np.load(root / f) for f in inp["files"]], 0)
    if kind == "file":
        return np.load(root / inp["file"])  # type: ignore[no-any-return]
    if kind == "video_index":
        images = model_input(root, _case_by_id(root, inp.get("from", "vision/images")))
        assert images is not None
        # images[index]: (B, S, T, 3, H, W) -> (B, S, 3, T, H, W)
        return images[np.array(inp["index"])].transpose(0, 1, 3, 2, 4, 5)
    return None


def _case_by_id(root: Path, case_id: str) -> ModelCase:
    for c in model_cases(root):
        if c.id == case_id:
            return c
    raise KeyError(case_id)


def assert_within(got: np.ndarray, expected: np.ndarray, tol: dict[str, float], what: str) -> None:
    """``|got - expected| <= atol + rtol * |expected|`` everywhere, with a useful message."""
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    err = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    bound = tol["atol"] + tol["rtol"] * np.abs(expected.astype(np.float64))
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.size} elements off; max abs err {err.max():.3g} "
        f"(atol {tol['atol']}, rtol {tol['rtol']})"
    )
