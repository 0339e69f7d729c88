"""``index verify``: checksums, and vectors and metadata that agree, item by item."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .ondisk import list_ids, quiet_stdout
from .spec import IndexSpec, index_ids
from .store import (
    META,
    IndexManifest,
    IndexStore,
    chunks_digest,
    items_digest,
    read_manifest,
    sha256_path,
)

SAMPLE = 2000  # vectors compared between FAISS and the chunks, per modality
_LOSSY = ("PQ", "SQ", "LSH", "RQ", "LSQ")


@dataclass
class VerifyReport:
    """What was checked and every problem found (empty ``problems``: the index is sound)."""

    problems: list[str] = field(default_factory=list)
    checked: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_index(path: str | Path) -> VerifyReport:
    """Check every checksum and that FAISS ids, vectors and metadata rows agree.

    Raises ``IndexStoreError`` when there is nothing to check against: no index, or a
    manifest that is missing, unreadable or malformed (one line naming the file).
    """
    root = Path(path)
    manifest = read_manifest(root)
    report = VerifyReport()
    try:
        with IndexStore.open_readonly(root) as store:
            _check(root, manifest, store, report)
    except sqlite3.DatabaseError as e:  # not a database, or a damaged one: a problem found
        report.problems.append(f"{META} cannot be read ({e})")
    return report


def _check(root: Path, manifest: IndexManifest, store: IndexStore, report: VerifyReport) -> None:
    bad = report.problems.append
    dim = manifest.dim
    if store.generation != manifest.generation:
        bad("the database changed after the manifest was written (an interrupted update)")
    # Chunks: each file present, its sha256 as recorded, (count, dim) float32.
    chunk_rows = store.chunk_rows()
    vectors: dict[int, np.ndarray] = {}
    for chunk, _first, count, digest in chunk_rows:
        file = store.chunk_path(chunk)
        if not file.is_file():
            bad(f"chunk file {file.name} is missing")
            continue
        if sha256_path(file) != digest:
            bad(f"chunk file {file.name} does not match its sha256")
            continue
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
        if arr.shape != (count, dim) or arr.dtype != np.float32:
            bad(f"chunk file {file.name} holds {arr.shape} {arr.dtype}, expected ({count}, {dim})")
            continue
        vectors[chunk] = arr
    report.checked["chunks"] = len(chunk_rows)
    # Items: each row's vector lies in its chunk.
    spans = {c: (f, n) for c, f, n, _ in chunk_rows}
    orphans = 0
    for i, c in store.item_chunks():
        f, n = spans.get(c, (0, 0))
        if not f <= i < f + n:
            orphans += 1
    if orphans:
        bad(f"{orphans} item rows have no vector in their chunk")
    # Checksums recorded in the manifest.
    sums = manifest.checksums
    if items_digest(store.conn) != sums.get("items_sha256"):
        bad("the item rows do not match the manifest's items_sha256")
    if chunks_digest(store.conn) != sums.get("chunks_sha256"):
        bad("the chunk table does not match the manifest's chunks_sha256")
    # One FAISS file per modality: checksum, ids == rows, vectors == chunk vectors.
    firsts = {c: f for c, f, _, _ in chunk_rows}
    for name, entry in manifest.modalities.items():
        file = root / entry.file
        if not file.is_file():
            bad(f"{file.name} is missing")
            continue
        if sha256_path(file) != entry.sha256:
            bad(f"{file.name} does not match its sha256 in the manifest")
            continue
        if entry.data_file is not None:
            data = root / entry.data_file
            if not data.is_file() or sha256_path(data) != entry.data_sha256:
                bad(f"{entry.data_file} is missing or does not match its sha256 in the manifest")
                continue
            with quiet_stdout():
                index = faiss.read_index(str(file), faiss.IO_FLAG_ONDISK_SAME_DIR)
            present = list_ids(index)
        else:
            index = faiss.read_index(str(file))
            present = index_ids(index)
        rows = store.modality_rows(name)
        live = np.array([r[0] for r in rows if not r[2]], dtype=np.int64)
        dead = np.array([r[0] for r in rows if r[2]], dtype=np.int64)
        missing = np.setdiff1d(live, present)
        extra = np.setdiff1d(present, np.union1d(live, dead))
        if len(missing):
            bad(f"{name}: {len(missing)} items have no vector in {file.name}")
        if len(extra):
            bad(f"{name}: {file.name} holds {len(extra)} vectors with no item row")
        if index.ntotal != entry.ntotal or len(live) != entry.count:
            bad(f"{name}: counts differ from the manifest")
        report.checked[name] = {"items": len(live), "ntotal": int(index.ntotal)}
        _compare_vectors(name, index, entry.spec, rows, firsts, vectors, report)


def _compare_vectors(
    name: str,
    index: faiss.Index,
    spec: IndexSpec,
    rows: list[tuple[int, int, bool]],
    firsts: dict[int, int],
    vectors: dict[int, np.ndarray],
    report: VerifyReport,
) -> None:
    live = [(int(r[0]), int(r[1])) for r in rows if not r[2] and r[1] in vectors]
    if not live:
        return
    rng = np.random.default_rng(0)
    pick = rng.choice(len(live), size=min(SAMPLE, len(live)), replace=False)
    try:
        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
    except RuntimeError:
        pass
    lossy = any(t in spec.factory.upper() for t in _LOSSY)
    worst = 1.0
    for p in pick:
        i, c = live[p]
        stored = np.asarray(vectors[c][i - firsts[c]], dtype=np.float32)
        try:
            got = index.reconstruct(i)
        except RuntimeError:
            report.checked[f"{name}_vectors"] = "not reconstructible (skipped)"
            return
        worst = min(worst, float(np.dot(stored, got) / max(np.linalg.norm(got), 1e-12)))
    limit = 0.5 if lossy else 1 - 1e-5
    if worst < limit:
        bad = "differs from" if not lossy else "is far from"
        report.problems.append(
            f"{name}: a vector in FAISS {bad} the one stored for its id (cosine {worst:.4f})"
        )
    report.checked[f"{name}_vectors"] = {"compared": len(pick), "min_cosine": round(worst, 6)}
