"""Corpus scanning: a folder (walked recursively) or a CSV/JSONL manifest -> entries in order.

The modality of a file without one comes from ``encoders.formats.detect`` (content, helped by
a ``depth``/``thermal``/``imu`` folder below the corpus root or a double extension; the rule is
in docs/modalities.md). A file it cannot place is rejected with its reason, not silently
skipped: ``index info`` lists it.

The corpus boundary and bad names (docs/corpus.md): a walk follows no symlink unless asked,
and then only to targets inside its root; a manifest names files inside its own folder unless
``allow_outside``; a name SQLite cannot store (not UTF-8, a NUL byte) or a file that cannot be
opened is rejected with its reason, the name recorded escaped (``recorded_path``). Nothing a
file's name or state can be ends the scan.

Order is the id contract: entries come sorted by relative path (folders) or in row order
(manifests), so a rebuild or a resumed build gives every item the same id.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from encoders import Modality
from encoders.formats import detect

from .errors import CorpusError

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
NOT_FOLLOWED = "a symlink (not followed; --follow-symlinks to follow links inside the corpus)"
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


@dataclass(frozen=True)
class CorpusEntry:
    """One corpus file: where it is, what it holds, what the user said about it."""

    path: Path  # absolute
    modality: Modality | None  # None: unusable, see ``error``
    caption: str | None = None
    tags: tuple[str, ...] = ()
    error: str | None = None  # why it cannot be indexed (recorded as rejected)

    @property
    def key(self) -> str:
        """The path as the index records it (``recorded_path``)."""
        return recorded_path(self.path)


def name_problem(path: str | PurePath) -> str | None:
    """Why the index cannot record ``path`` as it is (None: it can).

    The store keeps paths as SQLite TEXT (UTF-8): a name that is not UTF-8 (Python holds
    its bytes as surrogate escapes) cannot be stored, nor opened again from what is stored,
    and a NUL byte cannot be part of any file name.
    """
    text = str(path)
    if "\x00" in text:
        return "the name holds a NUL byte (no file can have it)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not valid UTF-8 (shown escaped; rename the file to index it)"
    return None


def escape_path(path: str | PurePath) -> str:
    """``path`` with what a terminal or UTF-8 text cannot take written as escapes.

    A byte of a non-UTF-8 name becomes ``\\xff``, a control character ``\\n``, ``\\x1b``
    and the like; everything else stays as it is, so escaping twice changes nothing.
    """
    out = []
    for ch in str(path):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        elif code < 0x20 or 0x7F <= code <= 0x9F:
            out.append(_ESCAPES.get(ch, f"\\x{code:02x}"))
        else:
            out.append(ch)
    return "".join(out)


def recorded_path(path: str | PurePath) -> str:
    """The path as the index stores it: itself, or escaped when it cannot be stored.

    Only a rejected file can have an escaped path (``name_problem`` rejects it at the scan),
    so an indexed path always opens the file it names. Other text for the store (a caption,
    a tag, an error message) goes through it too.
    """
    return str(path) if name_problem(path) is None else escape_path(path)


def scan_corpus(
    corpus: str | Path,
    exclude: Sequence[Path] = (),
    follow_symlinks: bool = False,
    allow_outside: bool = False,
) -> list[CorpusEntry]:
    """Entries of a folder or manifest; ``CorpusError`` if ``corpus`` itself is unusable.

    Args:
        exclude: folders to leave out (the index being built, when it sits inside the corpus).
        follow_symlinks: a folder's symlinks lead to their targets inside the folder (others
            are rejected); by default every symlink is rejected.
        allow_outside: a manifest may name files outside its own folder.
    """
    root = Path(corpus)
    if root.is_dir():
        return _walk(root.resolve(), [p.resolve() for p in exclude], follow_symlinks)
    if root.is_file() and is_manifest(root):
        return read_manifest_file(root, allow_outside)
    if root.is_file():
        raise CorpusError(
            f"{root} is neither a folder nor a manifest (.csv with a 'path' column, or .jsonl)"
        )
    raise CorpusError(f"corpus {root} does not exist")


def scan_paths(
    paths: Iterable[str | Path],
    exclude: Sequence[Path] = (),
    follow_symlinks: bool = False,
    allow_outside: bool = False,
) -> list[CorpusEntry]:
    """``index add PATH...``: folders are walked, manifests read, other files taken as they are.

    A file named here is the user's own choice: a symlink given as PATH is taken as its target.
    """
    out: list[CorpusEntry] = []
    for p in paths:
        path = Path(p)
        if path.is_dir() or (path.is_file() and is_manifest(path)):
            out += scan_corpus(path, exclude, follow_symlinks, allow_outside)
        elif path.exists():  # a file, or a FIFO or device that entry_for rejects
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
    """An entry for one file: the modality given, or the one its content and name say.

    A name the index cannot record, or a path that is not a readable regular file, gives a
    rejected entry with the reason.
    """
    problem = name_problem(path) or _file_problem(path)
    if problem is not None:
        return CorpusEntry(path, None, caption, tags, problem)
    if modality is not None:
        return CorpusEntry(path, modality, caption, tags)
    found = detect(path, root=root)
    return CorpusEntry(path, found.modality, caption, tags, found.reason)


def read_manifest_file(path: Path, allow_outside: bool = False) -> list[CorpusEntry]:
    """Rows of a CSV (header: path, modality, caption, tags) or JSONL manifest, in order.

    Paths are relative to the manifest's folder, and must lead inside it (symlinks resolved)
    unless ``allow_outside``. Tags: a JSON list, or a string split on ``;`` or ``|``. A row
    without a usable path or modality becomes a rejected entry naming the row.
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
    out = [_manifest_entry(base, path, n, row, allow_outside) for n, row in rows]
    return _dedupe(out)


def _manifest_entry(
    base: Path, manifest: Path, line: int, row: dict[str, object] | str, allow_outside: bool
) -> CorpusEntry:
    where = f"{manifest.name}:{line}"
    if isinstance(row, str):
        return CorpusEntry(manifest.resolve() / f"#{line}", None, error=f"{where}: {row}")
    raw = row.get("path")
    if not isinstance(raw, str) or not raw.strip():
        return CorpusEntry(manifest.resolve() / f"#{line}", None, error=f"{where}: no path")
    p = Path(raw.strip())
    given = p if p.is_absolute() else base / p
    caption = row.get("caption")
    # JSON may hold lone surrogates ("\\ud800"), which SQLite text cannot: stored escaped.
    caption = recorded_path(str(caption).strip()) if caption not in (None, "") else None
    tags = tuple(recorded_path(t) for t in _tags(row.get("tags")))
    problem = name_problem(given)
    if problem is not None:
        return CorpusEntry(given, None, caption, tags, f"{where}: {problem}")
    try:
        file = given.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
        why = e.strerror if isinstance(e, OSError) and e.strerror else "a symlink loop"
        return CorpusEntry(given, None, caption, tags, f"{where}: cannot resolve the path ({why})")
    if not allow_outside and not _is_under(file, base):
        why = "outside the manifest's folder (--allow-outside to index files elsewhere)"
        return CorpusEntry(file, None, caption, tags, f"{where}: {why}")
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


def _file_problem(path: Path) -> str | None:
    """Why ``path`` is not a file the build can read (None: it is one)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except OSError as e:  # a name too long, a folder that cannot be searched
        return f"cannot open the file ({e.strerror or type(e).__name__})"
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        # Reading a FIFO would block the build for ever; a device has no end.
        return "not a regular file (a FIFO, socket or device)"
    if not os.access(path, os.R_OK):
        return "cannot open the file (permission denied)"
    return None


def _walk(root: Path, exclude: list[Path], follow: bool) -> list[CorpusEntry]:
    found: list[Path] = []
    refused: list[CorpusEntry] = []
    seen: set[Path] = {root}  # folders walked (real paths): a link cycle ends here

    def link_target(link: Path) -> Path | None:
        """The target of a link the walk may follow, or None (recorded as rejected)."""
        if not follow:
            refused.append(CorpusEntry(link, None, error=NOT_FOLLOWED))
            return None
        try:
            target = link.resolve(strict=True)
        except (OSError, RuntimeError):
            refused.append(CorpusEntry(link, None, error="a broken symlink (or a symlink loop)"))
            return None
        if not _is_under(target, root):
            why = f"a symlink leaving the corpus (to {escape_path(target)}); not followed"
        elif any(_is_under(target, x) for x in exclude):
            why = "a symlink into the index being built; not followed"
        else:
            return target
        refused.append(CorpusEntry(link, None, error=why))
        return None

    def on_error(e: OSError) -> None:
        where = Path(str(e.filename)) if e.filename else root
        why = f"cannot list the folder ({e.strerror or type(e).__name__})"
        refused.append(CorpusEntry(where, None, error=why))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=follow):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            sub = here / d
            if d.startswith("."):
                continue
            real = link_target(sub) if sub.is_symlink() else sub.resolve()
            if real is None or real in exclude or real in seen:
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            path = here / f
            if f.startswith("."):
                continue
            if path.is_symlink():
                target = link_target(path)
                if target is not None:
                    found.append(target)
            else:
                # Below a followed link the real path is the file's one name in the index.
                found.append(path.resolve() if follow else path)
    entries = [entry_for(p, root=root) for p in found] + refused
    entries.sort(key=lambda e: _relative(e.path, root))
    return _dedupe(entries)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _is_under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _dedupe(entries: list[CorpusEntry]) -> list[CorpusEntry]:
    seen: set[Path] = set()
    out = []
    for e in entries:
        if e.path not in seen:
            seen.add(e.path)
            out.append(e)
    return out
