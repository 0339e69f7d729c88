"""Corpus scanning: a folder (walked recursively) or a CSV/JSONL manifest -> entries in order.

The modality of a file comes from its content (magic bytes, PNG and ``.npy`` headers), helped
by its name where content cannot tell: a ``depth``/``thermal``/``imu`` folder on the way or a
double extension (``scan.depth.png``, ``frame.thermal.npy``, ``walk.imu.csv``) names depth,
thermal or IMU data, which are otherwise PNG images or arrays like any other. A 16-bit
greyscale PNG is read as depth; a ``.npy`` of shape (T, 6 or 7) or (6, T) as IMU, any other 2-D
array as depth; a ``.csv`` as IMU; ``.txt``/``.md`` as text. A file that is none of these is
rejected ("unsupported file type"), not silently skipped: ``index info`` lists it.

Order is the id contract: entries come sorted by relative path (folders) or in row order
(manifests), so a rebuild or a resumed build gives every item the same id.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy.lib.format as npformat

from encoders import Modality

from .errors import CorpusError

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt", ".md", ".text")
_HINTS = {"depth": Modality.DEPTH, "thermal": Modality.THERMAL, "imu": Modality.IMU}
_AUDIO_CONTAINERS = (".m4a", ".m4b", ".mka", ".weba", ".aac")
_HEAD = 4096


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
    found, why = sniff_modality(path, root)
    return CorpusEntry(path, found, caption, tags, why)


def sniff_modality(path: Path, root: Path | None = None) -> tuple[Modality | None, str | None]:
    """(modality, None) for a usable file, (None, reason) otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
    except OSError as e:
        return None, f"cannot read the file ({e.strerror or e})"
    if not head:
        return None, "the file is empty (0 bytes)"
    hint = _name_hint(path, root)
    suffix = path.suffix.lower()
    kind = _content_kind(head, suffix)
    if hint is not None:
        if kind in ("png", "npy") and hint in (Modality.DEPTH, Modality.THERMAL):
            return hint, None
        if kind in ("npy", "text") and hint is Modality.IMU:
            return hint, None
    if kind == "png":
        # IHDR: bit depth at byte 24, colour type at 25 (0 = greyscale).
        depth_bits, colour = struct.unpack(">BB", head[24:26]) if len(head) >= 26 else (8, 2)
        return (Modality.DEPTH if depth_bits == 16 and colour == 0 else Modality.VISION), None
    if kind in ("jpeg", "gif", "bmp", "tiff", "webp"):
        return Modality.VISION, None
    if kind == "audio":
        return Modality.AUDIO, None
    if kind == "video":
        return Modality.VIDEO, None
    if kind == "npy":
        return _npy_modality(head)
    if kind == "text":
        if suffix == ".csv":
            return Modality.IMU, None
        if suffix in TEXT_SUFFIXES:
            return Modality.TEXT, None
        return None, f"unsupported file type (text file with extension {suffix or 'none'!r})"
    return None, f"unsupported file type ({_describe(head)})"


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


def _name_hint(path: Path, root: Path | None) -> Modality | None:
    parts = path.name.lower().split(".")
    for part in parts[1:-1]:  # double extension: name.depth.png
        if part in _HINTS:
            return _HINTS[part]
    folders = path.parent.relative_to(root).parts if root is not None else path.parent.parts[-1:]
    for folder in reversed(folders):
        if folder.lower() in _HINTS:
            return _HINTS[folder.lower()]
    return None


def _content_kind(head: bytes, suffix: str) -> str:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"GIF8"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"RIFF"):
        return {b"WEBP": "webp", b"WAVE": "audio", b"AVI ": "video"}.get(head[8:12], "unknown")
    if head.startswith((b"fLaC", b"OggS", b"ID3")) or (
        head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC")
    ):
        return "audio"
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] != 0xFF:
        return "audio"  # an MPEG audio frame (MP3 without an ID3 tag) or ADTS AAC
    if head[4:8] == b"ftyp":
        return "audio" if head[8:11] in (b"M4A", b"M4B") else "video"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "audio" if suffix in _AUDIO_CONTAINERS else "video"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "text"
        except UnicodeDecodeError as e:
            if e.start >= len(head) - 3:  # a character cut at the end of the head
                return "text"
    return "unknown"


def _npy_modality(head: bytes) -> tuple[Modality | None, str | None]:
    try:
        fp = io.BytesIO(head)
        major, _ = npformat.read_magic(fp)
        read = npformat.read_array_header_1_0 if major == 1 else npformat.read_array_header_2_0
        shape, _, _ = read(fp)
    except (ValueError, OSError, SyntaxError) as e:
        return None, f"malformed .npy header ({e})"
    if len(shape) == 2 and (shape[1] in (6, 7) or shape[0] == 6) and max(shape) > 8:
        return Modality.IMU, None
    if len(shape) == 2:
        return Modality.DEPTH, None
    return None, f"unsupported .npy shape {tuple(shape)} (depth/thermal: (H, W); IMU: (T, 6))"


def _describe(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    return "unrecognised binary data"
