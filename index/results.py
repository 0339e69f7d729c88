"""What a search returns: ``Hit(item, score)`` with the ``Item`` it found, and ``IndexInfo``.

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
    """One search result: the item and its cosine score."""

    item: Item
    score: float

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON (``index query --json``): id, score, modality, path, start, end, ..."""
        it = self.item
        return {
            "id": it.id,
            "score": self.score,
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
