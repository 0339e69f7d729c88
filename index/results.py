"""What a search returns: ``Hit(item, score, relevance)`` with its ``Item``; ``IndexInfo``.

The index produces these and the service returns them as they are (``service.Searcher``), so
a result is translated nowhere. No FAISS here: the service imports these without the extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from encoders import Modality


@dataclass(frozen=True)
class Item:
    """One indexed item (a file, or a segment of one between ``start`` and ``end`` seconds)."""

    id: int
    modality: Modality
    path: str | None = None
    start: float | None = None
    end: float | None = None
    caption: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hit:
    """One search result: the item, its cosine ``score`` and its calibrated ``relevance``.

    ``relevance``: the estimated probability that the item truly matches the query, from the
    index's calibration of this (query modality, item modality) pair (``index.calibration``);
    comparable across modalities, unlike ``score``. None: the same as ``score`` (no
    calibration).
    """

    item: Item
    score: float
    relevance: float | None = None

    @property
    def calibrated(self) -> float:
        """``relevance``, or the raw ``score`` where there is none."""
        return self.score if self.relevance is None else self.relevance

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON (``index query --json``): id, score, modality, path, start, end, ..."""
        it = self.item
        return {
            "id": it.id,
            "score": self.score,
            "relevance": self.calibrated,
            "modality": it.modality.value,
            "path": it.path,
            "start": it.start,
            "end": it.end,
            "caption": it.caption,
            "tags": list(it.tags),
        }


@dataclass(frozen=True)
class IndexInfo:
    """One searchable collection: a modality's vectors with their count and index recipe."""

    name: str
    modality: Modality
    count: int
    recipe: dict[str, Any] = field(default_factory=dict)
