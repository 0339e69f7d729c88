"""Fidelity of the reduced dtypes, measured: every parity-fixture case (the video files too)
against the official fp32 outputs, and a retrieval's top-10 against fp32's.

A modality is offered in a dtype (``encoders.dtype.OFFERED``) only if every one of its cases
keeps the dtype's bound (bf16 >= 0.999, int8 >= 0.99): this test fails when one that is
offered does not. The parity tests themselves stay fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import Encoder, Modality, load_encoder
from encoders import dtype as dtypes

from .parity import ModelCase, load_manifest, model_cases, model_input

REDUCED = ("bfloat16", "int8")


def _cases() -> list[ModelCase]:
    from .conftest import shared_dir

    root = shared_dir() / "fixtures" / "imagebind-parity"
    return model_cases(root) if (root / "manifest.json").is_file() else []


@pytest.fixture(scope="module")
def encoders_(parity_dir: Path) -> dict[str, Encoder]:
    ckpt, cfg = parity_dir / "checkpoint.pth", parity_dir / "config.json"
    return {name: load_encoder(ckpt, config=cfg, dtype=name) for name in REDUCED}


def _batch(enc: Encoder, root: Path, case: ModelCase) -> tuple[Modality, object]:
    x = model_input(root, case)
    if x is not None:
        return Modality.parse(case.modality), x
    # A video file through our loader (official=True reproduces the official tensor).
    pre = next(
        p for p in load_manifest(root)["preprocessing_cases"] if p["id"] == case.raw["input"]["of"]
    )
    files = [str(root / p) for p in pre["inputs"]]
    return Modality.VIDEO, enc.preprocess("video", files, official=True)


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_reduced_dtype_cosine_to_official_fp32(
    case: ModelCase, dtype: str, encoders_: dict[str, Encoder], parity_dir: Path
) -> None:
    enc = encoders_[dtype]
    m, x = _batch(enc, parity_dir, case)
    got = enc.embed(m, x)  # type: ignore[arg-type]
    final = np.load(parity_dir / case.raw["outputs"]["final"]["file"]).astype(np.float64)
    want = final / np.linalg.norm(final, axis=1, keepdims=True)
    cos = (got * want).sum(axis=1)
    if m.tower in dtypes.OFFERED[dtype]:
        bound = dtypes.REDUCED_BOUNDS[dtype]
        assert cos.min() >= bound, f"{case.id} in {dtype}: cosine {cos.min():.5f} < {bound}"
    else:  # not offered: the tower runs in fp32
        assert enc.tower_dtypes[m.tower] == torch.float32


def test_every_modality_has_fixture_cases() -> None:
    """The bounds above cover every tower that is offered, and the video case."""
    covered = {Modality.parse(c.modality).tower for c in _cases()}
    for name in REDUCED:
        assert dtypes.OFFERED[name] <= covered
    kinds = {c.raw["input"]["kind"] for c in _cases()}
    assert {"video_index", "official_video_preprocessing"} <= kinds


def test_retrieval_top10_overlap_with_fp32() -> None:
    """Text queries over every other modality of the demo world, demo model: top-10 vs fp32."""
    from bench.dtypes import retrieval_overlap

    overlap = retrieval_overlap(("bfloat16", "int8"), n=48)
    assert overlap["bfloat16"] >= 0.95, overlap
    assert overlap["int8"] >= 0.9, overlap
