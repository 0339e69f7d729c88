"""The model fingerprint an index records: which vectors it holds, so it never mixes models.

fingerprint = checkpoint identity (``sha256:<hex>`` of the weights file, or ``random:<seed>``
for the seeded random weights the tests use) + the model config + ``PREPROCESS_VERSION``,
summarised by ``digest``; and ``towers``: one digest per tower (its tensors' hash from
``encoders.models.tower_hashes`` + ``tower_config`` + ``PREPROCESS_VERSION``), so that a model
whose other towers were retrained still serves the index (docs/training.md, "Which indexes stay
valid"). The identity comes from the model's ``encoders.ModelRef``: nothing here hashes it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from encoders import Modality, ModelConfig, ModelRef
from encoders.modality import TOWERS
from encoders.models import file_sha256, tower_config, tower_hashes

# Bump whenever decoding, segmenting or item choice in index/ changes the vectors of a file:
# an index built by an older version then refuses to mix in new vectors.
PREPROCESS_VERSION = "1"


def checkpoint_identity(checkpoint: str | Path | None, seed: int = 0) -> str:
    """``sha256:<hex>`` of a weights file, or ``random:<seed>`` without one."""
    if checkpoint is None:
        return f"random:{seed}"
    return f"sha256:{file_sha256(checkpoint)}"


def model_fingerprint(
    config: ModelConfig, checkpoint: str, tensors: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The fingerprint dict stored in ``manifest.json``; ``digest`` summarises the whole model.

    Args:
        tensors: per tower, the hash of its weights (``ModelRef.towers``); None: from
            ``checkpoint`` when it is ``random:<seed>``, else no per-tower digests (the index
            then keeps the whole-model rule).
    """
    body: dict[str, Any] = {
        "checkpoint": checkpoint,
        "config": config.to_dict(),
        "preprocess_version": PREPROCESS_VERSION,
    }
    # ``digest`` covers what it covered before per-tower digests: old indexes still match it.
    body["digest"] = _digest(body)
    if tensors is None and checkpoint.startswith("random:"):
        tensors = {t.value: checkpoint for t in TOWERS}
    if tensors is not None:
        body["towers"] = {
            t.value: _digest(
                {
                    "tensors": tensors[t.value],
                    "config": tower_config(config, t),
                    "preprocess_version": PREPROCESS_VERSION,
                }
            )
            for t in TOWERS
            if t.value in tensors
        }
    return body


def ref_fingerprint(ref: ModelRef) -> dict[str, Any]:
    """The fingerprint of a resolved model (``encoders.resolve_model``), with its towers."""
    return model_fingerprint(ref.config, ref.identity, ref.towers)


def towers_of(modalities: Iterable[Modality | str]) -> frozenset[str]:
    """The towers that embed ``modalities`` (video: the vision tower)."""
    return frozenset(Modality.parse(m).tower.value for m in modalities)


def changed_towers(stored: Mapping[str, Any], current: Mapping[str, Any]) -> frozenset[str] | None:
    """The towers whose digests differ between two fingerprints; None when either has none."""
    a, b = stored.get("towers"), current.get("towers")
    if not isinstance(a, Mapping) or not isinstance(b, Mapping) or not a or not b:
        return None
    return frozenset(t for t in set(a) | set(b) if a.get(t) != b.get(t))


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


def check_fingerprint(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    where: str,
    holds: Iterable[Modality | str] | None = None,
) -> frozenset[str]:
    """Raise ``ModelMismatch`` unless the index's vectors are the current model's.

    With ``holds`` (the item modalities the index holds) and per-tower digests on both sides,
    only the towers that made those vectors must match; the message names the ones that do
    not. Otherwise (an index from before per-tower digests, or ``holds`` None) any difference
    is refused. Returns the towers that differ (the index's calibration of queries by them is
    stale); empty when the models are the same.
    """
    from .errors import ModelMismatch

    if stored.get("digest") == current.get("digest"):
        return frozenset()
    changed = changed_towers(stored, current)
    if holds is not None and changed is not None:
        needed = towers_of(holds)
        bad = sorted(changed & needed)
        if not bad:
            return changed
        names = ", ".join(bad)
        s = "s" if len(bad) > 1 else ""
        raise ModelMismatch(
            f"the index at {where} was built with another model: its vectors come from the "
            f"{names} tower{s}, and this model's {names} tower{s} differ{'' if s else 's'} "
            f"(towers that differ: {', '.join(sorted(changed))}); use a model whose {names} "
            f"tower{s} {'are' if s else 'is'} unchanged, or rebuild the index"
        )
    diffs = [
        key
        for key in ("checkpoint", "config", "preprocess_version")
        if stored.get(key) != current.get(key)
    ]
    what = ", ".join(diffs) or "digest"
    if changed:
        what += f"; towers that differ: {', '.join(sorted(changed))}"
    elif changed is None and holds is not None and not stored.get("towers"):
        what += "; the index predates per-tower fingerprints, so any change is refused"
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
        return ref_fingerprint(ref)
    ref = getattr(encoder, "ref", None)
    if isinstance(ref, ModelRef) and checkpoint == ref.identity:
        return ref_fingerprint(ref)  # the identity of its own weights: their towers too
    if isinstance(checkpoint, str) and checkpoint.startswith(("sha256:", "random:")):
        return model_fingerprint(encoder.config, checkpoint)
    identity = checkpoint_identity(checkpoint)
    if checkpoint is None:
        return model_fingerprint(encoder.config, identity)
    return model_fingerprint(encoder.config, identity, tower_hashes(checkpoint))
