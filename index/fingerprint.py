"""The model fingerprint an index records: which vectors it holds, so it never mixes models.

fingerprint = checkpoint identity (``sha256:<hex>`` of the weights file, or ``random:<seed>``
for the seeded random weights the tests use) + the model config + ``PREPROCESS_VERSION``.
The identity comes from the model's ``encoders.ModelRef``: nothing here hashes it again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from encoders import ModelConfig, ModelRef
from encoders.models import file_sha256

# Bump whenever decoding, segmenting or item choice in index/ changes the vectors of a file:
# an index built by an older version then refuses to mix in new vectors.
PREPROCESS_VERSION = "1"


def checkpoint_identity(checkpoint: str | Path | None, seed: int = 0) -> str:
    """``sha256:<hex>`` of a weights file, or ``random:<seed>`` without one."""
    if checkpoint is None:
        return f"random:{seed}"
    return f"sha256:{file_sha256(checkpoint)}"


def model_fingerprint(config: ModelConfig, checkpoint: str) -> dict[str, Any]:
    """The fingerprint dict stored in ``manifest.json``; ``digest`` summarises the rest."""
    body: dict[str, Any] = {
        "checkpoint": checkpoint,
        "config": config.to_dict(),
        "preprocess_version": PREPROCESS_VERSION,
    }
    body["digest"] = _digest(body)
    return body


def ref_fingerprint(ref: ModelRef) -> dict[str, Any]:
    """The fingerprint of a resolved model (``encoders.resolve_model``)."""
    return model_fingerprint(ref.config, ref.identity)


VECTORS_ONLY = "vectors-only"


def vectors_fingerprint(dim: int) -> dict[str, Any]:
    """The fingerprint of imported vectors without a model (``index import --dim``).

    Such an index can be searched by vector only: nothing can embed a query for it.
    """
    body: dict[str, Any] = {
        "checkpoint": VECTORS_ONLY,
        "config": None,
        "dim": int(dim),
        "preprocess_version": None,
    }
    body["digest"] = _digest(body)
    return body


def has_model(fingerprint: dict[str, Any]) -> bool:
    """Whether an index's vectors come from a known model (False: imported with ``--dim``)."""
    return fingerprint.get("checkpoint") != VECTORS_ONLY


def check_fingerprint(stored: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raise ``ModelMismatch`` naming what differs between two fingerprints."""
    from .errors import ModelMismatch

    if stored.get("digest") == current.get("digest"):
        return
    diffs = [
        key
        for key in ("checkpoint", "config", "preprocess_version")
        if stored.get(key) != current.get(key)
    ]
    what = ", ".join(diffs) or "digest"
    raise ModelMismatch(
        f"the index at {where} was built with another model ({what} differs: index has "
        f"checkpoint {stored.get('checkpoint')!r}, preprocessing "
        f"v{stored.get('preprocess_version')}; this model has checkpoint "
        f"{current.get('checkpoint')!r}, preprocessing "
        f"v{current.get('preprocess_version')}); use the same model or rebuild the index"
    )


def _digest(body: dict[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def encoder_fingerprint(encoder: Any, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """The fingerprint of a loaded ``encoders.Encoder`` (from its ``ref``).

    Args:
        checkpoint: overrides the weights' identity, for an encoder-like object without a
            ``ref``: a weights file (hashed here), ``sha256:<hex>``, or ``random:<seed>``.
    """
    if checkpoint is None:
        ref = getattr(encoder, "ref", None)
        if not isinstance(ref, ModelRef):
            raise ValueError(
                "the encoder carries no model reference (encoder.ref): load it with "
                "encoders.load_encoder, or pass checkpoint= (a file, or 'random:<seed>')"
            )
        return model_fingerprint(encoder.config, ref.identity)
    if isinstance(checkpoint, str) and checkpoint.startswith(("sha256:", "random:")):
        identity = checkpoint
    else:
        identity = checkpoint_identity(checkpoint)
    return model_fingerprint(encoder.config, identity)
