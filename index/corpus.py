"""Corpus scanning: a folder (walked recursively) or a CSV/JSONL manifest -> entries in order.

The modality of a file without one comes from ``encoders.formats.detect`` (content, helped by
a ``depth``/``thermal``/``imu`` folder below the corpus root or a double extension; the rule is
in docs/modalities.md). A file it cannot place is rejected with its reason, not silently
skipped: ``index info`` lists it.

Order is the id contract: entries come sorted by relative path (folders) or in row order
(manifests), so a rebuild or a resumed build gives every item the same id.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from encoders import Modality
from encoders.formats import detect

from .errors import CorpusError

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class CorpusEntry:
    """One corpus file: where it is, what it holds, what the user said about it."""

    path: Path  # absolute
    modality: Modality | None  # None: unusable, see ``error``
    caption: str | None = None
    tags: tuple[str, ...] = ()
    error: str | None = None  # why it cannot be indexed (recorded as rejected)


def scan_corpus(corpus: str | Path, exclude: Sequence[Path] = ()) -> list[CorpusEntry]:
    """Entries of a folder or manifest; ``CorpusError`` if ``corpus`` itself is unusable.

    Args:
        exclude: folders to leave out (the index being built, when it sits inside the corpus).
    """
    root = Path(corpus)
    if root.is_dir():
        return list(_walk(root.resolve(), [p.resolve() for p in exclude]))
    if root.is_file() and is_manifest(root):
        return read_manifest_file(root)
    if root.is_file():
        raise CorpusError(
            f"{root} is neither a folder nor a manifest (.csv with a 'path' column, or .jsonl)"
        )
    raise CorpusError(f"corpus {root} does not exist")


def scan_paths(paths: Iterable[str | Path], exclude: Sequence[Path] = ()) -> list[CorpusEntry]:
    """``index add PATH...``: folders are walked, manifests read, other files taken as they are."""
    out: list[CorpusEntry] = []
    for p in paths:
        path = Path(p)
        if path.is_dir() or (path.is_file() and is_manifest(path)):
            out += scan_corpus(path, exclude)
        elif path.is_file():
            out.append(entry_for(path.resolve()))
        else:
            raise CorpusError(f"{path} does not exist")
    return _dedupe(out)


def is_manifest(path: Path) -> bool:
    """A ``.jsonl``/``.ndjson`` file, or a ``.csv`` whose header has a ``path`` column."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return True
    if suffix != ".csv":
        return False
    try:
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader([f.readline()]), [])
    except (OSError, UnicodeDecodeError):
        return False
    return "path" in [h.strip().lower() for h in header]


def entry_for(
    path: Path,
    modality: Modality | None = None,
    caption: str | None = None,
    tags: tuple[str, ...] = (),
    root: Path | None = None,
) -> CorpusEntry:
    """An entry for one file: the modality given, or the one its content and name say."""
    if modality is not None:
        if not path.is_file():
            return CorpusEntry(path, None, caption, tags, "no such file")
        return CorpusEntry(path, modality, caption, tags)
    found = detect(path, root=root)
    return CorpusEntry(path, found.modality, caption, tags, found.reason)


def read_manifest_file(path: Path) -> list[CorpusEntry]:
    """Rows of a CSV (header: path, modality, caption, tags) or JSONL manifest, in order.

    Paths are relative to the manifest's folder. Tags: a JSON list, or a string split on ``;``
    or ``|``. A row without a usable path or modality becomes a rejected entry naming the row.
    """
    base = path.parent.resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read manifest {path}: {e}") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        if "path" not in fields:
            raise CorpusError(f"manifest {path} has no 'path' column (header: {fields})")
        rows: list[tuple[int, dict[str, object] | str]] = [
            (n, {str(k).strip().lower(): v for k, v in row.items() if k is not None})
            for n, row in enumerate(reader, start=2)
        ]
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((n, f"not valid JSON ({e.msg})"))
                continue
            rows.append((n, obj if isinstance(obj, dict) else "not a JSON object"))
    out = [_manifest_entry(base, path, n, row) for n, row in rows]
    return _dedupe(out)


def _manifest_entry(
    base: Path, manifest: Path, line: int, row: dict[str, object] | str
) -> CorpusEntry:
    where = f"{manifest.name}:{line}"
    if isinstance(row, str):
        return CorpusEntry(manifest.resolve() / f"#{line}", None, error=f"{where}: {row}")
    raw = row.get("path")
    if not isinstance(raw, str) or not raw.strip():
        return CorpusEntry(manifest.resolve() / f"#{line}", None, error=f"{where}: no path")
    p = Path(raw.strip())
    file = (p if p.is_absolute() else base / p).resolve()
    caption = row.get("caption")
    caption = str(caption).strip() if caption not in (None, "") else None
    tags = _tags(row.get("tags"))
    modality: Modality | None = None
    name = row.get("modality")
    if isinstance(name, str) and name.strip():
        try:
            modality = Modality.parse(name)
        except ValueError as e:
            return CorpusEntry(file, None, caption, tags, f"{where}: {e}")
    return entry_for(file, modality, caption, tags)


def _tags(value: object) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, list):
        return tuple(str(v).strip() for v in value if str(v).strip())
    parts = str(value).replace("|", ";").split(";")
    return tuple(p.strip() for p in parts if p.strip())


def _walk(root: Path, exclude: list[Path]) -> Iterator[CorpusEntry]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in exclude
        ]
        found += [here / f for f in filenames if not f.startswith(".")]
    for path in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        yield entry_for(path, root=root)


def _dedupe(entries: list[CorpusEntry]) -> list[CorpusEntry]:
    seen: set[Path] = set()
    out = []
    for e in entries:
        if e.path not in seen:
            seen.add(e.path)
            out.append(e)
    return out
