"""The ``Searcher`` protocol the service searches through, and an in-memory one.

``MemorySearcher`` is exact cosine search in numpy over vectors held in memory: the oracle in
tests and the way to serve a small collection without building an index. It loads from a JSONL
file (one item a line, with its vector), a test and demo facility::

    {"id": 0, "modality": "vision", "path": "cat.jpg", "caption": "a cat",
     "tags": ["pets"], "start": null, "end": null, "vector": [0.1, ...]}

Relative paths are taken relative to the JSONL file. ``load_searcher`` opens either that or an
index directory built by the ``index`` package (``index.IndexSearcher`` is a ``Searcher``: its
results are the ``Hit``/``Item`` types the service returns, tag filters applied inside it).

Tag filters keep the items that carry every given tag.

An index directory is served through ``IndexSnapshots``: a consistent, read-only snapshot of
the index (a private copy of its database, its FAISS files, its chunks) that ``refresh`` swaps
for a new one atomically once the index's committed generation changes on disk (``index
sync/add/remove``, a rebuild renamed into place). Requests in flight finish on the snapshot they
started on. While no sound index is on disk (removed, being rebuilt, damaged), the last good
snapshot stays in service and ``stale`` says why (``/readyz`` shows it). A folder that holds
no index yet (missing or empty: a fresh Docker volume) is waited for: until a build commits one
there, ``missing`` says so, ``/readyz`` and every index route answer 503 with that reason, and
the first index built there is swapped in like any later one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from encoders import Modality, ModelRef
from index.calibration import merge_ranked
from index.results import Hit, IndexInfo, Item

from .embedders import unit
from .errors import IndexDamaged, NoIndex

if TYPE_CHECKING:
    from index.search import IndexSearcher

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "Hit",
    "IndexInfo",
    "IndexSnapshots",
    "Item",
    "MemorySearcher",
    "Searcher",
    "calibration_note",
    "check_index_model",
    "load_searcher",
]


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
        merge: str = "calibrated",
        query_modalities: Mapping[str, float] | None = None,
    ) -> list[list[Hit]]:
        """(N, D) queries -> N lists of up to ``k`` hits, best first, among ``targets``.

        ``merge`` and ``query_modalities`` as ``index.IndexSearcher.search``.
        """
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
        merge: str = "calibrated",
        query_modalities: Mapping[str, float] | None = None,
    ) -> list[list[Hit]]:
        """Exact search; no calibration here, so ``relevance`` is the cosine (``raw``)."""
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
        mods = self._modality[rows]
        for s in scores:
            lists = []
            for m in dict.fromkeys(mods.tolist()):
                sub = np.flatnonzero(mods == m)
                top = sub[np.argsort(-s[sub], kind="stable")[:k]]  # best first, ties by row
                lists.append((str(m), s[top], top))
            ranked = merge_ranked(lists, k, merge, None, {})
            out.append([Hit(self._items[rows[r.id]], r.score, r.relevance) for r in ranked])
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


def _media_path(item: Item | None, root: Path | None) -> Path | None:
    """An item's stored path; relative ones resolve against the JSONL file's folder."""
    if item is None or item.path is None:
        return None
    p = Path(item.path)
    return p if p.is_absolute() or root is None else root / p


class IndexSnapshots:
    """An index directory served as consistent snapshots that follow it (a ``Searcher``).

    ``refresh()`` (the service calls it every ``index_poll_seconds``, off the event loop) looks
    at the manifest on disk; when it changed, it opens a new snapshot and swaps it in. A
    snapshot that cannot be opened (no index, an update or rebuild in progress, damaged files,
    another model) leaves the current one in service and says why in ``stale``. With
    ``wait=True`` a folder that holds no index yet is waited for (``missing`` says why nothing
    is served; reading raises ``NoIndex`` with that reason) until one is built there.
    """

    RETIRE_S = 60.0  # a replaced snapshot is closed this long after the swap (requests in flight)

    def __init__(
        self,
        root: str | Path,
        check: Callable[[IndexSearcher], None] | None = None,
        opener: Callable[[Path], IndexSearcher] | None = None,
        wait: bool = False,
    ) -> None:
        """Open the first snapshot; raises ``index.IndexStoreError`` (one line) if it cannot.

        Args:
            check: run on every new snapshot before it is served (e.g. the model check);
                an exception refuses the snapshot.
            opener: how a snapshot is opened (default: ``index.open_index(root, snapshot=True)``).
            wait: when ``root`` holds no index yet (no folder, or no manifest in it), start
                with none and serve the first one ``refresh`` finds instead of raising.
        """
        self.root = Path(root)
        self._check = check
        self._open = opener or _open_snapshot
        self._lock = threading.Lock()  # one refresh at a time
        self._retired: list[tuple[float, IndexSearcher]] = []
        self.expected_dim: int | None = None  # the served model's, for a first snapshot
        self.stale: str | None = None  # why the snapshot served is not what is on disk
        self._seen = self._probe()
        self._current: IndexSearcher | None = None
        # Why no snapshot is served (only while waiting for a first index); None once one is.
        self.missing: str | None = None
        if wait and self._seen is None and not (self.root / "manifest.json").exists():
            self.missing = no_index_yet(self.root)
            log.warning("%s", self.missing)
        else:
            self._current = self._load()

    @property
    def current(self) -> IndexSearcher:
        """The snapshot in service; ``NoIndex`` (503, with the reason) while there is none."""
        if self._current is None:
            raise NoIndex(self.missing or no_index_yet(self.root))
        return self._current

    @property
    def generation(self) -> int:
        """The committed generation of the snapshot being served."""
        return self.current.manifest.generation

    @property
    def dim(self) -> int:
        if self._current is None and self.expected_dim is not None:
            return self.expected_dim
        return self.current.dim

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.current.fingerprint

    def refresh(self) -> bool:
        """Swap in a new snapshot if the index on disk changed; True when one was swapped in."""
        with self._lock:
            self._close_retired()
            seen = self._probe()
            if seen is None and self._current is None:
                self._seen = None
                return False  # still no index: ``missing`` keeps saying so
            if seen is None:
                self.stale = (
                    f"no index at {self.root} (removed, or being rebuilt): serving the last good "
                    f"snapshot (generation {self.generation})"
                )
                self._seen = None
                return False
            if seen == self._seen:
                return False
            try:
                new = self._load()
            except Exception as e:
                if self._current is None:
                    self.missing = (
                        f"the index at {self.root} cannot be opened ({_one_line(e)}): nothing "
                        "to serve yet; run `bindsearch index verify` on it, or build it again"
                    )
                    log.warning("%s", self.missing)
                else:
                    self.stale = (
                        f"the index at {self.root} cannot be opened ({_one_line(e)}): serving "
                        f"the last good snapshot (generation {self.generation})"
                    )
                    log.warning("%s", self.stale)
                # Retry when the files change again (an update still running commits more).
                self._seen = seen if self._probe() == seen else None
                return False
            old, self._current = self._current, new
            if old is not None:
                self._retired.append((time.monotonic(), old))
            self._seen, self.stale, self.missing = seen, None, None
            log.info(
                "index %s: now serving generation %d (%s)",
                self.root,
                new.manifest.generation,
                ", ".join(f"{m.value} {n}" for m, n in sorted(new.counts().items())),
            )
            return True

    def close(self) -> None:
        with self._lock:
            for _, s in self._retired:
                s.close()
            self._retired.clear()
            if self._current is not None:
                self._current.close()

    # --- the Searcher protocol, on the snapshot current when the call starts ---------------

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        targets: Sequence[Modality] | None = None,
        tags: Sequence[str] | None = None,
        merge: str = "calibrated",
        query_modalities: Mapping[str, float] | None = None,
    ) -> list[list[Hit]]:
        return self._reading(
            lambda s: s.search(vectors, k, targets, tags, merge, query_modalities),
            "the index is damaged",
        )

    def get_item(self, item_id: int) -> Item | None:
        return self.current.get_item(item_id)

    def get(self, ids: Sequence[int], cols: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Stored metadata rows by id (``index.MetadataStore``: sizes and hashes for media)."""
        return self.current.get(ids, cols)

    def item_vector(self, item_id: int) -> np.ndarray | None:
        return self._reading(
            lambda s: s.item_vector(item_id),
            f"the stored vector of item {item_id} cannot be read",
        )

    def item_media_path(self, item_id: int) -> Path | None:
        return self.current.item_media_path(item_id)

    def info(self) -> list[IndexInfo]:
        return [] if self._current is None else self._current.info()

    def calibration_note_for(
        self,
        query_modalities: Iterable[Modality | str] | None = None,
        targets: Iterable[Modality | str] | None = None,
    ) -> str | None:
        """``IndexSearcher.calibration_note_for`` of the snapshot in service (None: none is)."""
        current = self._current
        return None if current is None else current.calibration_note_for(query_modalities, targets)

    # --- helpers ------------------------------------------------------------------------------

    def _reading(self, read: Callable[[IndexSearcher], T], what: str) -> T:
        """``read`` on the current snapshot; a chunk file that is damaged or gone (the index was
        replaced under it) first swaps in the index now on disk, if sound, and reads again."""
        from index.errors import IndexCorrupt

        current = self.current
        try:
            return read(current)
        except IndexCorrupt as e:
            error = e
        if self._current is not current or self.refresh():
            try:
                return read(self.current)
            except IndexCorrupt as e:
                error = e
        raise IndexDamaged(f"{what}: {_one_line(error)}") from None

    def _load(self) -> IndexSearcher:
        new = self._open(self.root)
        try:
            want = self._current.dim if self._current is not None else self.expected_dim
            if want is not None and new.dim != want:
                raise ValueError(
                    f"it now holds {new.dim}-d vectors, the served model makes {want}-d ones"
                )
            if self._check is not None:
                self._check(new)
        except BaseException:
            new.close()
            raise
        return new

    def _probe(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime) of the manifest; None when there is no index.

        Every committed change (build, add, remove, sync, a replacement) ends by writing the
        manifest, so the database's own commits in between are not looked at (a long sync
        does not cost a snapshot attempt per poll).
        """
        try:
            st = os.stat(self.root / "manifest.json")
            os.stat(self.root / "meta.sqlite")
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _close_retired(self) -> None:
        now = time.monotonic()
        keep = []
        for t, s in self._retired:
            if now - t >= self.RETIRE_S:
                s.close()
            else:
                keep.append((t, s))
        self._retired = keep


def no_index_yet(root: Path) -> str:
    """Why a service waiting for its index serves none (``/readyz`` and the index routes)."""
    if (root / "meta.sqlite").is_file():  # a first build running, or interrupted
        return (
            f"no index yet at {root}: its build has not finished (rerun it if it was "
            "interrupted); it is served as soon as the build ends, no restart needed"
        )
    return (
        f"no index yet at {root}; build one with `bindsearch index build CORPUS -o {root}` "
        "(it is served as soon as the build ends, no restart needed)"
    )


def _open_snapshot(root: Path) -> IndexSearcher:
    from index.search import open_index

    return open_index(root, snapshot=True)


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].strip("'\"")


def load_searcher(
    path: str | Path,
    check: Callable[[IndexSearcher], None] | None = None,
    wait: bool = False,
) -> Searcher:
    """Open what ``--index`` names: a ``.jsonl`` of items with vectors, or an index directory.

    An index directory is served as ``IndexSnapshots`` (it follows the index on disk; ``check``
    runs on every snapshot before it is served). With ``wait``, a directory that holds no index
    yet (missing, empty, a first build unfinished) is waited for instead of refused
    (``IndexSnapshots.missing``). Raises ValueError with one line when it cannot (a missing
    .jsonl, FAISS not installed), and ``index.IndexStoreError`` (one line) for an index
    directory that is not a sound index.
    """
    path = Path(path)
    if not path.exists() and not (wait and path.suffix != ".jsonl"):
        raise ValueError(f"index {path} does not exist")
    if path.suffix == ".jsonl" or path.is_file():
        if path.suffix != ".jsonl":
            raise ValueError(
                f"index {path} is a file: give an index directory (bindsearch index build "
                "-o DIR) or a .jsonl of items with vectors"
            )
        return MemorySearcher.from_jsonl(path)
    try:
        import index.search  # noqa: F401
    except ImportError as e:
        if "faiss" not in str(e):
            raise
        raise ValueError(
            f"serving the index directory {path} needs FAISS: install bindsearch with the 'cpu' "
            "extra (faiss-cpu), or 'gpu' on a CUDA machine (faiss-gpu); never both"
        ) from None
    return IndexSnapshots(path, check, wait=wait)


def calibration_note(
    searcher: Searcher | IndexSearcher,
    merge: str = "calibrated",
    query_modalities: Iterable[Modality | str] | None = None,
    targets: Iterable[Modality | str] | None = None,
) -> str | None:
    """Why a search's results are not ranked by the index's calibration, or None.

    Only a ``calibrated`` merge uses the calibration; the note is the index's (no calibration
    at all, or stale pairs from one of ``query_modalities`` to one of ``targets``: None, any).
    A searcher without calibration notes (a ``.jsonl`` of vectors) has none.
    """
    if merge != "calibrated":
        return None
    note_for = getattr(searcher, "calibration_note_for", None)
    if note_for is None:
        return None
    note: str | None = note_for(query_modalities, targets)
    return note


def searcher_has_model(searcher: Searcher | IndexSearcher) -> bool:
    """False for an index of imported vectors without a model (``index import --dim``): the
    served model cannot embed queries for it; it is searched by ``vector`` or ``item_id``."""
    fingerprint = getattr(searcher, "fingerprint", None)
    if not isinstance(fingerprint, dict):
        return True  # a .jsonl of vectors: searched with the served model
    from index.fingerprint import has_model

    return has_model(fingerprint)


def check_index_model(searcher: Searcher | IndexSearcher, ref: ModelRef) -> None:
    """Refuse (one line) an index whose vectors another model made (``check_fingerprint``)."""
    from index.search import IndexSearcher

    if not isinstance(searcher, IndexSearcher | IndexSnapshots):
        return  # a .jsonl of vectors carries no model fingerprint
    if isinstance(searcher, IndexSnapshots) and searcher.missing is not None:
        return  # no index yet: each snapshot is checked as it comes (``check``)
    if not searcher_has_model(searcher):
        return  # imported vectors without a model: searched by vector only
    from index.fingerprint import check_fingerprint, ref_fingerprint

    # Accepted when the towers that made the index's vectors are the model's: a model whose
    # other towers were retrained serves it, its stale calibration pairs left out.
    served = searcher.current if isinstance(searcher, IndexSnapshots) else searcher
    served.stale_towers = check_fingerprint(
        served.fingerprint, ref_fingerprint(ref), "the index", holds=served.modalities
    )
