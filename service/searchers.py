"""The ``Searcher`` protocol the service searches through, an in-memory one, and the index adapter.

``MemorySearcher`` is exact cosine search in numpy over vectors held in memory: the oracle in
tests and the way to serve a small collection without building an index. It loads from a JSONL
file (one item a line, with its vector), a test and demo facility::

    {"id": 0, "modality": "vision", "path": "cat.jpg", "caption": "a cat",
     "tags": ["pets"], "start": null, "end": null, "vector": [0.1, ...]}

Relative paths are taken relative to the JSONL file. ``load_searcher`` opens either that or an
index directory built by the ``index`` package, through ``IndexAdapter``.

Tag filters keep the items that carry every given tag.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from encoders import Modality, ModelRef

from .embedders import unit


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
    item: Item
    score: float


@dataclass(frozen=True)
class IndexInfo:
    """One searchable collection: a modality's vectors with their count and index recipe."""

    name: str
    modality: Modality
    count: int
    recipe: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Searcher(Protocol):
    """What the service needs from an index. Vectors are float32 unit rows, scores cosines."""

    @property
    def dim(self) -> int: ...

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        targets: Sequence[Modality] | None = None,
        tags: Sequence[str] | None = None,
    ) -> list[list[Hit]]:
        """(N, D) queries -> N lists of up to ``k`` hits, best first, among ``targets``."""
        ...

    def get_item(self, item_id: int) -> Item | None: ...

    def item_vector(self, item_id: int) -> np.ndarray | None:
        """The stored (D,) unit vector of an item, for search by item id."""
        ...

    def item_media_path(self, item_id: int) -> Path | None:
        """The file an item came from, as stored at indexing time (never from a request)."""
        ...

    def info(self) -> list[IndexInfo]: ...


class MemorySearcher:
    """Exact cosine search over in-memory vectors; tag and modality filters apply first."""

    def __init__(
        self, vectors: np.ndarray, items: Sequence[Item], root: Path | None = None
    ) -> None:
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(items):
            raise ValueError(f"vectors of shape {vectors.shape} do not match {len(items)} items")
        self._vectors = unit(vectors)
        self._items = list(items)
        self._row = {it.id: i for i, it in enumerate(self._items)}
        if len(self._row) != len(self._items):
            raise ValueError("item ids must be unique")
        self._root = root
        self._dim = int(vectors.shape[1])
        self._modality = np.array([it.modality.value for it in self._items], dtype=object)

    @property
    def dim(self) -> int:
        return self._dim

    @classmethod
    def from_jsonl(cls, path: str | Path) -> MemorySearcher:
        """Load items and their vectors from a JSONL file (see the module docstring)."""
        path = Path(path)
        items: list[Item] = []
        vectors: list[list[float]] = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    vectors.append([float(x) for x in row.pop("vector")])
                    items.append(_item_from_row(row))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not an item row ({e})") from None
        if not items:
            raise ValueError(f"{path}: no items")
        if len({len(v) for v in vectors}) != 1:
            raise ValueError(f"{path}: vectors of different lengths")
        return cls(np.array(vectors, np.float32), items, root=path.parent)

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        targets: Sequence[Modality] | None = None,
        tags: Sequence[str] | None = None,
    ) -> list[list[Hit]]:
        q = np.asarray(vectors, np.float32)
        mask = np.ones(len(self._items), bool)
        if targets:
            mask &= np.isin(self._modality, [m.value for m in targets])
        if tags:
            want = set(tags)
            mask &= np.array([want.issubset(it.tags) for it in self._items], bool)
        rows = np.flatnonzero(mask)
        if rows.size == 0 or k <= 0:
            return [[] for _ in range(q.shape[0])]
        scores = q @ self._vectors[rows].T  # (N, M)
        k = min(k, rows.size)
        out: list[list[Hit]] = []
        for s in scores:
            top = np.argpartition(-s, k - 1)[:k]
            top = top[np.lexsort((rows[top], -s[top]))]  # best first, ties by row
            out.append([Hit(self._items[rows[j]], float(s[j])) for j in top])
        return out

    def get_item(self, item_id: int) -> Item | None:
        row = self._row.get(item_id)
        return None if row is None else self._items[row]

    def item_vector(self, item_id: int) -> np.ndarray | None:
        row = self._row.get(item_id)
        return None if row is None else self._vectors[row].copy()

    def item_media_path(self, item_id: int) -> Path | None:
        return _media_path(self.get_item(item_id), self._root)

    def info(self) -> list[IndexInfo]:
        counts: dict[Modality, int] = {}
        for it in self._items:
            counts[it.modality] = counts.get(it.modality, 0) + 1
        return [
            IndexInfo("memory", m, n, {"factory": "Flat", "metric": "ip", "exact": True})
            for m, n in sorted(counts.items())
        ]


def _item_from_row(row: dict[str, Any]) -> Item:
    def opt_float(x: Any) -> float | None:
        return None if x is None else float(x)

    tags = row.get("tags") or ()
    if isinstance(tags, str):
        tags = (tags,)
    return Item(
        id=int(row["id"]),
        modality=Modality.parse(row["modality"]),
        path=None if row.get("path") is None else str(row["path"]),
        start=opt_float(row.get("start")),
        end=opt_float(row.get("end")),
        caption=None if row.get("caption") is None else str(row["caption"]),
        tags=tuple(str(t) for t in tags),
    )


class IndexAdapter:
    """An ``index.IndexSearcher`` (``index.open_index``) behind the ``Searcher`` protocol.

    The index knows nothing of tags at search time, so with tag filters this over-fetches
    (growing k up to the collection size) and filters here.
    """

    _OVERFETCH_LIMIT = 1 << 16

    def __init__(self, searcher: Any) -> None:
        self._s = searcher

    @property
    def dim(self) -> int:
        return int(self._s.dim)

    @property
    def fingerprint(self) -> dict[str, Any]:
        value: dict[str, Any] = self._s.fingerprint
        return value

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        targets: Sequence[Modality] | None = None,
        tags: Sequence[str] | None = None,
    ) -> list[list[Hit]]:
        q = np.ascontiguousarray(vectors, np.float32)
        if not tags:
            return [[_hit(h) for h in hits] for hits in self._s.search(q, k, targets)]
        want = set(tags)
        total = sum(i.count for i in self.info()) or k
        out: list[list[Hit]] = []
        for row in q:
            fetch = k
            while True:
                hits = [_hit(h) for h in self._s.search(row[None], fetch, targets)[0]]
                kept = [h for h in hits if want.issubset(h.item.tags)]
                exhausted = len(hits) < fetch or fetch >= min(total, self._OVERFETCH_LIMIT)
                if len(kept) >= k or exhausted:
                    out.append(kept[:k])
                    break
                fetch = min(fetch * 4, total, self._OVERFETCH_LIMIT)
        return out

    def get_item(self, item_id: int) -> Item | None:
        rows = self._s.get([int(item_id)])
        if not rows or not rows[0] or rows[0].get("deleted"):
            return None
        row = dict(rows[0])
        # The store names segment bounds start_s/end_s.
        row.setdefault("start", row.get("start_s"))
        row.setdefault("end", row.get("end_s"))
        return _item_from_any(row)

    def item_vector(self, item_id: int) -> np.ndarray | None:
        try:
            v = self._s.vector(int(item_id))
        except (KeyError, IndexError):
            return None
        return unit(np.asarray(v, np.float32).reshape(-1))

    def item_media_path(self, item_id: int) -> Path | None:
        return _media_path(self.get_item(item_id), Path(self._s.root))

    def info(self) -> list[IndexInfo]:
        name = Path(self._s.root).name
        mods = self._s.manifest.get("modalities", {})
        return [
            IndexInfo(
                name,
                m,
                int(n),
                dict(mods.get(m.value, {}).get("spec", {})),
            )
            for m, n in sorted(self._s.counts().items())
        ]


def _media_path(item: Item | None, root: Path | None) -> Path | None:
    """An item's stored path; relative ones resolve against the index's folder."""
    if item is None or item.path is None:
        return None
    p = Path(item.path)
    return p if p.is_absolute() or root is None else root / p


def _get(obj: Any, key: str, default: Any) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _first_attr(obj: Any, names: Iterable[str], default: Any) -> Any:
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return default


def _as_dict(x: Any) -> dict[str, Any]:
    if isinstance(x, dict):
        return x
    if hasattr(x, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(x)
    return {"recipe": str(x)}


def _item_from_any(row: Any) -> Item:
    tags = _get(row, "tags", ()) or ()
    if isinstance(tags, str):
        tags = tuple(t for t in tags.split(",") if t)
    start, end = _get(row, "start", None), _get(row, "end", None)
    caption, path = _get(row, "caption", None), _get(row, "path", None)
    return Item(
        id=int(_get(row, "id", -1)),
        modality=Modality.parse(_get(row, "modality", "vision")),
        path=None if path is None else str(path),
        start=None if start is None or math.isnan(float(start)) else float(start),
        end=None if end is None or math.isnan(float(end)) else float(end),
        caption=None if caption is None else str(caption),
        tags=tuple(str(t) for t in tags),
    )


def _hit(h: Any) -> Hit:
    return Hit(_item_from_any(h), float(_get(h, "score", 0.0)))


def load_searcher(path: str | Path) -> Searcher:
    """Open what ``--index`` names: a ``.jsonl`` of items with vectors, or an index directory.

    Raises ValueError with one line when it cannot (missing file, no ``index`` package yet).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"index {path} does not exist")
    if path.suffix == ".jsonl":
        return MemorySearcher.from_jsonl(path)
    try:
        from index import open_index
    except ImportError:
        raise ValueError(
            "this install's `index` package has no open_index(): index directories cannot be "
            "served yet (a .jsonl of items with vectors can)"
        ) from None
    return IndexAdapter(open_index(path))


def check_index_model(searcher: Searcher, ref: ModelRef) -> None:
    """Refuse (one line) an index built with another model than the one being served."""
    if not isinstance(searcher, IndexAdapter):
        return  # a .jsonl of vectors carries no model fingerprint
    from index.fingerprint import check_fingerprint, ref_fingerprint

    check_fingerprint(searcher.fingerprint, ref_fingerprint(ref), "the index")
