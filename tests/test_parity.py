"""Numerical parity with the official ImageBind on the golden fixtures (random weights).

Every model case of the fixture is checked: the final output, the per-clip head output, and
the token and trunk sequences of the first item, each within the fixture's own tolerances.
The test reads the case list from the manifest, so other fixtures (configs, seeds) run as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import Encoder, Modality, load_encoder

from .parity import ModelCase, assert_within, model_cases, model_input


def _cases() -> list[ModelCase]:
    from .conftest import shared_dir

    root = shared_dir() / "fixtures" / "imagebind-parity"
    return model_cases(root) if (root / "manifest.json").is_file() else []


@pytest.fixture(scope="module")
def encoder(parity_dir: Path, test_device: torch.device) -> Encoder:
    return load_encoder(
        parity_dir / "checkpoint.pth",
        config=parity_dir / "config.json",
        device=test_device,
        dtype=torch.float32,
    )


@pytest.mark.parametrize(
    "case", [c for c in _cases() if c.kind != "official_video_preprocessing"], ids=lambda c: c.id
)
def test_model_case(case: ModelCase, encoder: Encoder, parity_dir: Path) -> None:
    x = model_input(parity_dir, case)
    assert x is not None
    outputs = case.raw["outputs"]
    tol = case.raw["tolerance"]
    m = Modality.parse(case.modality)

    got = encoder.forward({m: torch.from_numpy(x)})[m].cpu().numpy()
    assert_within(got, np.load(parity_dir / outputs["final"]["file"]), tol["final"], "final")

    # Per-clip pieces on the flattened (B*S, ...) batch.
    flat = torch.from_numpy(x).to(encoder.device)
    if flat.ndim >= 5:
        flat = flat.reshape(-1, *flat.shape[2:])
    model = encoder.model
    with torch.inference_mode():
        head = model.head_features(m, flat).cpu().numpy()
        tokens = model.tokens(m, flat[:1]).cpu().numpy()[0]
        trunk = model.trunk_output(m, flat[:1]).cpu().numpy()[0]
    assert_within(head, np.load(parity_dir / outputs["head"]["file"]), tol["head"], "head")
    inter = tol.get("intermediates_item0", tol["head"])
    assert_within(tokens, np.load(parity_dir / outputs["tokens_item0"]["file"]), inter, "tokens")
    assert_within(trunk, np.load(parity_dir / outputs["trunk_item0"]["file"]), inter, "trunk")


@pytest.mark.parametrize(
    "case", [c for c in _cases() if c.kind != "official_video_preprocessing"], ids=lambda c: c.id
)
def test_embed_is_unit_cosine_of_forward(
    case: ModelCase, encoder: Encoder, parity_dir: Path
) -> None:
    """``embed`` is the normalised official output: no logit scale, unit norm, float32."""
    x = model_input(parity_dir, case)
    assert x is not None
    m = Modality.parse(case.modality)
    emb = encoder.embed(m, x)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    final = np.load(parity_dir / case.raw["outputs"]["final"]["file"])
    ref = final / np.linalg.norm(final, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, ref, atol=1e-4)


def test_logit_scales_clamped(encoder: Encoder) -> None:
    """The text scale of the fixture exceeds 100 and is clamped, as officially."""
    scale = encoder.model.logit_scale("text")
    assert scale is not None and float(scale) == pytest.approx(100.0)
    assert encoder.model.logit_scale("vision") is None
