"""``bindsearch index import``: an index from precomputed embeddings (docs/scale.md).

Two layouts are read:

    clip-retrieval   EMB_DIR/img_emb/img_emb_{i}.npy (text: text_emb/text_emb_{i}.npy), (N, D)
                     floats, and EMB_DIR/metadata/metadata_{i}.parquet, one row per vector in
                     the same order: ``image_path`` or ``path``, optional ``caption``
    ours             EMB_DIR/<stem>.npy beside EMB_DIR/<stem>.jsonl: rows with ``path``,
                     optional ``caption``, ``tags``, ``start``, ``end``

Each shard is cut into slices of ``slice_rows`` vectors; a slice is one "file" of the build
(recorded as ``<shard>#<first>-<last>``) and one committed chunk, written by the build's own
``IndexWriter`` into the same store. A rerun after a kill skips the committed slices, so
nothing is lost or duplicated. Only the current shard's metadata and one slice's vectors
(read from the memory-mapped ``.npy``) are held at once. Vectors are checked (finite, not
zero, of the index's dimension) and L2-normalised on import: the index holds unit vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encoders import Modality

from ._decode import DecodedItem
from .corpus import CorpusEntry, recorded_path
from .engine import EmbeddedFile, EmbeddedItem
from .errors import IndexStoreError
from .fingerprint import vectors_fingerprint
from .pipeline import BuildOptions, BuildSummary, IndexWriter, Log, ModelSource
from .store import IndexStore, move_into_place, replacement_dir

__all__ = [
    "SLICE_ROWS",
    "EmbeddingImportError",
    "Shard",
    "check_vectors",
    "find_shards",
    "import_embeddings",
    "read_metadata",
]

SLICE_ROWS = 16384  # vectors per committed slice (the resume unit): 64 MB at 1024-d
PATH_COLUMNS = ("image_path", "path")  # clip-retrieval's column first, then ours
PYARROW_MISSING = (
    "reading clip-retrieval's metadata_*.parquet needs pyarrow: "
    "pip install 'bindsearch[import]' (or pyarrow>=15)"
)
_CLIP_SHARD = re.compile(r"^(img|text)_emb_(\d+)\.npy$")


class EmbeddingImportError(IndexStoreError):
    """Embeddings that cannot be imported: one line naming the file and what is accepted."""


@dataclass(frozen=True)
class Shard:
    """One ``.npy`` of vectors and the metadata file whose rows match them in order."""

    vectors: Path
    metadata: Path
    rows: int
    dim: int


@dataclass(frozen=True)
class SliceEntry(CorpusEntry):
    """Rows ``start`` .. ``stop - 1`` of a shard: one unit of the import's writer."""

    start: int = 0
    stop: int = 0
    shard_index: int = 0

    @property
    def key(self) -> str:
        return f"{recorded_path(self.path)}#{self.start}-{self.stop - 1}"


def find_shards(emb_dir: str | Path, modality: Modality) -> list[Shard]:
    """The shards of ``emb_dir`` in order (clip-retrieval's layout, else ours), checked."""
    root = Path(emb_dir)
    if not root.is_dir():
        raise EmbeddingImportError(f"{root} is not a folder of embeddings")
    clip_dirs = [d for d in ("img_emb", "text_emb") if (root / d).is_dir()]
    if clip_dirs:
        sub = "text_emb" if modality is Modality.TEXT else "img_emb"
        if sub not in clip_dirs:
            if len(clip_dirs) != 1 or modality is Modality.VISION:
                raise EmbeddingImportError(
                    f"{root} has no {sub}/ folder for --modality {modality.value} "
                    f"(clip-retrieval's layout: img_emb/ for images, text_emb/ for text)"
                )
            sub = clip_dirs[0]  # e.g. audio embeddings laid out as img_emb/
        shards = _clip_shards(root, sub)
    else:
        shards = _our_shards(root)
    if not shards:
        raise EmbeddingImportError(
            f"no embeddings in {root}: expected img_emb/img_emb_0.npy with "
            "metadata/metadata_0.parquet (clip-retrieval), or <name>.npy beside <name>.jsonl"
        )
    dims = {s.dim for s in shards}
    if len(dims) != 1:
        raise EmbeddingImportError(
            f"the shards of {root} have different dimensions: {sorted(dims)}"
        )
    return shards


def _clip_shards(root: Path, sub: str) -> list[Shard]:
    found: list[tuple[int, Path]] = []
    for p in (root / sub).iterdir():
        m = _CLIP_SHARD.match(p.name)
        if m and p.name.startswith(sub.split("_")[0]):
            found.append((int(m.group(2)), p))
    out = []
    for i, p in sorted(found):
        meta = root / "metadata" / f"metadata_{i}.parquet"
        if not meta.is_file():
            raise EmbeddingImportError(
                f"{p} has no metadata file {meta} (one row per vector, in order)"
            )
        out.append(_shard(p, meta))
    return out


def _our_shards(root: Path) -> list[Shard]:
    out = []
    for p in sorted(root.glob("*.npy")):
        meta = p.with_suffix(".jsonl")
        if not meta.is_file():
            raise EmbeddingImportError(
                f"{p} has no {meta.name} beside it (rows with path, optional caption, tags, "
                "start, end; one per vector, in order)"
            )
        out.append(_shard(p, meta))
    return out


def _shard(path: Path, meta: Path) -> Shard:
    arr = _open_vectors(path)
    return Shard(path.resolve(), meta.resolve(), int(arr.shape[0]), int(arr.shape[1]))


def _open_vectors(path: Path) -> np.ndarray:
    """A shard's vectors, memory-mapped (nothing is read until a slice is taken)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise EmbeddingImportError(f"{path} is not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind != "f":
        what = getattr(arr, "shape", "?"), getattr(arr, "dtype", "?")
        raise EmbeddingImportError(
            f"{path} holds {what[0]} {what[1]}; expected (N, D) float32 vectors"
        )
    return arr


# --- metadata -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One vector's metadata."""

    path: str
    caption: str | None = None
    tags: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None


def read_metadata(shard: Shard) -> list[Row]:
    """A shard's metadata rows, checked: one per vector, each with a path."""
    if shard.metadata.suffix == ".parquet":
        rows = _parquet_rows(shard.metadata)
    else:
        rows = _jsonl_rows(shard.metadata)
    if len(rows) != shard.rows:
        raise EmbeddingImportError(
            f"{shard.metadata} has {len(rows)} rows but {shard.vectors} holds {shard.rows} "
            "vectors: one metadata row per vector, in the same order"
        )
    return rows


def _parquet_rows(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EmbeddingImportError(PYARROW_MISSING) from None
    try:
        names = pq.read_schema(path).names
        column = next((c for c in PATH_COLUMNS if c in names), None)
        if column is None:
            raise EmbeddingImportError(
                f"{path} has no image_path or path column (its columns: {', '.join(names)})"
            )
        cols = [column] + (["caption"] if "caption" in names else [])
        table = pq.read_table(path, columns=cols)
    except EmbeddingImportError:
        raise
    except Exception as e:  # pyarrow's own errors (ArrowInvalid, OSError, ...)
        raise EmbeddingImportError(f"{path} is not a readable parquet file ({e})") from None
    paths = table.column(column).to_pylist()
    captions = table.column("caption").to_pylist() if "caption" in cols else [None] * len(paths)
    out = []
    for i, (p, c) in enumerate(zip(paths, captions, strict=True)):
        out.append(Row(_path_text(p, path, i), None if c is None else str(c)))
    return out


def _jsonl_rows(path: Path) -> list[Row]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EmbeddingImportError(
                        f"{path} line {i + 1} is not JSON ({e.msg})"
                    ) from None
                out.append(_json_row(d, path, i + 1))
    except UnicodeDecodeError:
        raise EmbeddingImportError(f"{path} is not UTF-8 text") from None
    return out


def _json_row(d: Any, path: Path, line: int) -> Row:
    where = f"{path} line {line}"
    if not isinstance(d, dict):
        raise EmbeddingImportError(f"{where} is not a JSON object with a path")
    tags = d.get("tags") or []
    if isinstance(tags, str):
        tags = [t for t in tags.split(",") if t.strip()]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise EmbeddingImportError(
            f"{where}: tags must be a list of strings or a comma-separated string"
        )
    start, end = _seconds(d.get("start"), where, "start"), _seconds(d.get("end"), where, "end")
    if start is not None and end is not None and end < start:
        raise EmbeddingImportError(f"{where}: end ({end}) is before start ({start})")
    caption = d.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise EmbeddingImportError(f"{where}: caption must be a string")
    return Row(
        _path_text(d.get("path"), path, line - 1),
        caption,
        tuple(t.strip() for t in tags),
        start,
        end,
    )


def _seconds(value: Any, where: str, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise EmbeddingImportError(f"{where}: {name} must be a number of seconds, got {value!r}")
    return float(value)


def _path_text(value: Any, source: Path, row: int) -> str:
    if not isinstance(value, str) or not value:
        raise EmbeddingImportError(f"{source} row {row} has no path (a non-empty string)")
    return recorded_path(value)


# --- the import ---------------------------------------------------------------------------------


def check_vectors(x: np.ndarray, where: str, first: int = 0) -> np.ndarray:
    """(n, d) float32 unit vectors from ``x`` (rows ``first``.. of ``where``), checked.

    Raises ``EmbeddingImportError`` naming the row for NaN, infinity or an all-zero row.
    """
    x = np.asarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise EmbeddingImportError(
            f"{where} row {first + int(np.argmax(bad))} has NaN or infinite values"
        )
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise EmbeddingImportError(
            f"{where} row {first + int(np.argmax(zero))} is all zeros (no direction)"
        )
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def import_embeddings(
    emb_dir: str | Path,
    out: str | Path,
    modality: Modality | str,
    model: ModelSource | None = None,
    dim: int | None = None,
    options: BuildOptions | None = None,
    slice_rows: int = SLICE_ROWS,
    log: Log | None = None,
) -> BuildSummary:
    """Build (or finish building) the index ``out`` from the embeddings in ``emb_dir``.

    Args:
        model: the model that made the vectors (the index records its fingerprint, so the
            service can embed queries for it); None with ``dim``: a vectors-only index.
        dim: the vectors' dimension when there is no model (checked against the shards).
        options: ``factory``, ``memory_budget``, ``target_recall`` and ``progress`` apply.
    """
    opts = options or BuildOptions()
    opts.check()
    if slice_rows < 1:
        raise ValueError(f"slice size must be >= 1 vector, got {slice_rows}")
    m = Modality.parse(modality) if isinstance(modality, str) else modality
    if (model is None) == (dim is None):
        raise ValueError("give the model that made the vectors (--config/--checkpoint) or --dim")
    want = model.config.embed_dim if model is not None else int(dim or 0)
    if want < 1:
        raise ValueError(f"--dim must be a positive number of dimensions, got {dim}")
    shards = find_shards(emb_dir, m)
    if shards[0].dim != want:
        source = "the model makes" if model is not None else "--dim says"
        raise EmbeddingImportError(
            f"the vectors in {emb_dir} are {shards[0].dim}-d but {source} {want}-d "
            f"({shards[0].vectors})"
        )
    fingerprint = model.fingerprint() if model is not None else vectors_fingerprint(want)
    t0 = time.perf_counter()
    target = Path(out)
    work = replacement_dir(target)
    store = IndexStore.create(work, fingerprint, want, {"imported": True})
    with store:
        entries = list(_entries(shards, m, slice_rows))
        _check_unchanged(store, entries)
        with store.transaction():
            store.set_meta("imported_from", str(Path(emb_dir).resolve()))
            if model is not None and model.checkpoint is not None:
                store.set_meta("checkpoint_path", str(Path(model.checkpoint).resolve()))
        summary = BuildSummary(scanned=len(entries))
        opts.chunk_items = slice_rows  # every slice is committed as it comes
        reader = _SliceReader(shards, m)
        IndexWriter(store, opts, summary, log).write_loaded(entries, reader.load)
        summary.manifest = store.refresh(
            opts.factory, opts.memory_budget, opts.target_recall, log=log
        )
    move_into_place(work, target)
    summary.wall_s = time.perf_counter() - t0
    return summary


def _entries(shards: Sequence[Shard], m: Modality, slice_rows: int) -> Iterator[SliceEntry]:
    for n, s in enumerate(shards):
        for start in range(0, s.rows, slice_rows):
            stop = min(s.rows, start + slice_rows)
            yield SliceEntry(s.vectors, m, start=start, stop=stop, shard_index=n)


def _check_unchanged(store: IndexStore, entries: Sequence[SliceEntry]) -> None:
    """A resumed import whose shards changed since would mix two versions: refuse it."""
    stats: dict[Path, tuple[int, int]] = {}
    for e in entries:
        row = store.file_row(e.key)
        if row is None:
            continue
        st = stats.get(e.path)
        if st is None:
            info = e.path.stat()
            st = stats[e.path] = (info.st_size, info.st_mtime_ns)
        if (row["size"], row["mtime_ns"]) != st:
            raise EmbeddingImportError(
                f"{e.path} changed since this import began (its slice {e.start}-{e.stop - 1} "
                "is already in the index): import into a new -o"
            )


class _SliceReader:
    """Loads one slice at a time: its vectors from the mapped shard, rows from its metadata."""

    def __init__(self, shards: Sequence[Shard], modality: Modality) -> None:
        self.shards = shards
        self.modality = modality
        self._shard = -1
        self._rows: list[Row] = []
        self._vectors: np.ndarray | None = None

    def _open(self, n: int) -> None:
        if n != self._shard:
            self._rows = []  # the previous shard's rows go before the next are read
            self._vectors = None
            shard = self.shards[n]
            self._rows = read_metadata(shard)
            self._vectors = _open_vectors(shard.vectors)
            self._shard = n

    def load(self, entry: CorpusEntry) -> EmbeddedFile:
        if not isinstance(entry, SliceEntry):
            raise TypeError("index import loads SliceEntry rows only")
        self._open(entry.shard_index)
        vecs = self._vectors
        if vecs is None:
            raise EmbeddingImportError(f"internal: {entry.path} is not open")
        vectors = check_vectors(vecs[entry.start : entry.stop], str(entry.path), entry.start)
        h = hashlib.sha256(entry.key.encode())
        h.update(vectors.tobytes())
        st = entry.path.stat()
        f = EmbeddedFile(0, sha256=h.hexdigest(), size=st.st_size, mtime_ns=st.st_mtime_ns)
        mod = self.modality.value
        for i, (row, v) in enumerate(
            zip(self._rows[entry.start : entry.stop], vectors, strict=True)
        ):
            d = DecodedItem(
                mod,
                np.empty(0, np.float32),
                row.start,
                row.end,
                None,
                (i, 0.0),
                path=row.path,
                caption=row.caption,
                tags=row.tags,
            )
            f.items.append(EmbeddedItem(d, vector=v))
        return f
