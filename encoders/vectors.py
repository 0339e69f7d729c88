"""Arithmetic on contract vectors (unit float32 rows), shared by the service and generation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InvalidInput


def unit(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
    v = np.asarray(v, np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    out: np.ndarray = (v / np.maximum(n, 1e-12)).astype(np.float32)
    return out


def mix(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Embedding arithmetic: normalise each term, weight, sum, normalise -> (D,).

    Raises ``InvalidInput`` when the weighted terms cancel out.
    """
    w = np.asarray(weights, np.float64)
    top = float(np.abs(w).max(initial=0.0))
    if top > 0:
        w = w / top  # the direction is all that counts; this keeps 1e308-sized weights finite
    total = (unit(vectors).astype(np.float64) * w[:, None]).sum(axis=0)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise InvalidInput(
            "the weighted terms cancel out (their sum is zero): nothing to search for; "
            "change the weights"
        )
    out: np.ndarray = (total / norm).astype(np.float32)
    return out
