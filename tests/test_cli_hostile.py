"""The command line over the project's hostile files and damaged indexes (issue #17).

``bindsearch embed``, ``index build``, ``index query/verify/info`` and ``serve``, run as a
user runs them: in a fresh Python process through the console entry point, reading the
process's real stderr (file descriptor 2), so a line that a C library (FFmpeg, libpng, FAISS,
SQLite) writes there counts too. To keep the cost to two processes, each process runs its
cases one after the other through ``bindsearch.cli.main`` (the ``bindsearch`` command's entry
point), with a marker line on stderr between them. Each case: exactly one ``error: ...``
line (``embed``, a damaged index) or one rejected-file line in the build's summary, no
traceback, and the exit status README.md documents ("Exit status": 1 for a refused input).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from index.corpus import escape_path
from index.store import IndexStore, chunk_file

from .test_embed_bad_inputs import BAD
from .test_index_media import image, write_test_checkpoint
from .test_index_snapshot import make_index
from .test_service_e2e import REPO

# Runs each case (a JSON list of argument lists) through the CLI's entry point, in order.
DRIVER = """
import json, os, sys
from bindsearch.cli import main
for name, argv in json.load(open(sys.argv[1])):
    os.write(2, ("@@case " + name + "\\n").encode())
    sys.argv = ["bindsearch", *[os.fsdecode(a.encode("utf-8", "surrogateescape")) for a in argv]]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush(); sys.stderr.flush()
    os.write(2, ("@@exit " + str(code) + "\\n").encode())
"""


def run_cases(tmp: Path, cases: list[tuple[str, list[str]]]) -> dict[str, tuple[int, list[str]]]:
    """name -> (exit status, the stderr lines it wrote), from one fresh process."""
    spec = tmp / "cases.json"
    spec.write_text(json.dumps(cases))
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, str(spec)],
        capture_output=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "BINDSEARCH_TORCH_THREADS": "1"},
    )
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, err[-3000:]
    out: dict[str, tuple[int, list[str]]] = {}
    name, lines = "", []
    for line in err.splitlines():
        if line.startswith("@@case "):
            name, lines = line[len("@@case ") :], []
        elif line.startswith("@@exit "):
            out[name] = (int(line[len("@@exit ") :]), lines)
        elif line.strip():
            lines.append(line)
    assert sorted(out) == sorted(n for n, _ in cases), err[-3000:]
    return out


# --------------------------------------------------------------------- the hostile-file set


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def pixel_bomb() -> bytes:
    """A PNG that says 60000 x 60000 (3.6 G pixels) and holds a few bytes: refused unread."""
    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    sig = b"\x89PNG\r\n\x1a\n"
    return sig + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def playlist(target: Path) -> bytes:
    """An HLS playlist naming a local file: never followed."""
    return (
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{target}\n#EXT-X-ENDLIST\n"
    ).encode()


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


def hostile_files(folder: Path, outside: Path) -> dict[str, bytes]:
    """The set, as name -> bytes (names as the CLI shows them); written into ``folder``."""
    secret = outside / "secret.png"
    secret.write_bytes(_png((32, 32)))
    files = {
        **BAD,
        "bomb.png": pixel_bomb(),
        "list.m3u8": playlist(secret),
        "fake.mp4": b"\x00\x00\x00\x18ftypmp42" + b"\xff" * 2000,  # a header, then garbage
        "fake.wav": b"RIFF\xff\xff\xff\x7fWAVEfmt " + b"\x01" * 200,
        "html.png": b"<html><script>alert(1)</script></html>",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


# ------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_checkpoint(tmp_path_factory.mktemp("model") / "test.safetensors")


def test_embed_and_build_over_the_hostile_files(tmp_path: Path, checkpoint: Path) -> None:
    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    corpus.mkdir()
    outside.mkdir()
    files = hostile_files(corpus, outside)
    image(corpus / "good.png", seed=3)
    # What only a folder walk meets: a name that is not UTF-8, a FIFO, a symlink out.
    bad_name = os.fsdecode(b"bad-\xff\x1b[2J.png")
    (corpus / bad_name).write_bytes(_png((16, 16)))
    os.mkfifo(corpus / "pipe.png")
    (corpus / "link.png").symlink_to(outside / "secret.png")
    model = ["--checkpoint", str(checkpoint), "--config", "imagebind_test"]

    cases: list[tuple[str, list[str]]] = []
    for name in sorted(set(files) - {"text.txt"}):  # text.txt is a sound text file
        cases.append((f"embed {name}", ["embed", *model, "--json", str(corpus / name)]))
    forced = [("random.bin", "vision"), ("list.m3u8", "audio"), ("empty.bin", "imu")]
    forced += [("html.png", "video"), ("fake.wav", "depth"), ("pipe.png", "vision")]
    for name, modality in forced:
        argv = ["embed", "-m", modality, *model, "--json", str(corpus / name)]
        cases.append((f"embed -m {modality} {name}", argv))
    idx = tmp_path / "idx"
    build = [
        "index",
        "build",
        str(corpus),
        "-o",
        str(idx),
        *model,
        "--workers",
        "0",
        "--no-progress",
    ]
    cases.append(("build", build))
    results = run_cases(tmp_path, cases)

    for name, (code, lines) in results.items():
        if name == "build":
            continue
        assert code == 1, (name, lines)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, lines)
        file = name.rsplit(" ", 1)[1]
        assert lines[0].count(file) == 1, (name, lines)  # named once
        assert "[Errno" not in lines[0] and "<_io." not in lines[0], (name, lines)  # no internals
    code, lines = results["build"]
    text = "\n".join(lines)
    assert code == 0, text
    assert "Traceback" not in text and "PICKLE-RAN" not in text, text
    # The summary goes to stdout; stderr holds only progress and what the build says.
    assert not [line for line in lines if line.startswith("error")], text
    with IndexStore.open_readonly(idx) as store:
        rows = store.file_rows("rejected")
        indexed = {Path(r["path"]).name for r in store.file_rows("indexed")}
    rejected = {Path(r["path"]).name: r["error"] for r in rows}
    expected = {*files, "pipe.png", "link.png", escape_path(bad_name)} - {"text.txt"}
    assert set(rejected) == expected, (expected ^ set(rejected), rejected)
    for name, why in rejected.items():
        assert "\n" not in why and "Traceback" not in why, (name, why)
    assert indexed == {"good.png", "text.txt"}


# ------------------------------------------------------------------- damaged indexes


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path, at: int = -5) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 0xFF
    p.write_bytes(bytes(data))


DAMAGED: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated-faiss": (lambda r: _truncate(r / "vision.faiss"), "vision.faiss"),
    "flipped-faiss": (lambda r: _flip(r / "vision.faiss"), "vision.faiss"),
    "flipped-chunk": (lambda r: _flip(chunk_file(r, 1), -1), "c00000001.npy"),
    "pickle-chunk": (
        lambda r: chunk_file(r, 1).write_bytes(pickle.dumps({"not": "vectors"})),
        "c00000001.npy",
    ),
    "missing-chunk": (lambda r: chunk_file(r, 1).unlink(), "c00000001.npy"),
    "corrupt-sqlite": (
        lambda r: (r / "meta.sqlite").write_bytes(b"\x00garbage" * 512),
        "meta.sqlite",
    ),
    "manifest-not-an-object": (
        lambda r: (r / "manifest.json").write_text("[1, 2, 3]"),
        "manifest.json",
    ),
    "manifest-not-json": (lambda r: (r / "manifest.json").write_text("{"), "manifest.json"),
}
SERVE = ["serve", "--random-weights", "--config", "imagebind_test", "--port", "9"]


def test_damaged_indexes_are_one_line_each(tmp_path: Path) -> None:
    """``index query``, ``index verify``, ``serve`` (and ``index info``, which reads the
    manifest and the database and checks the FAISS files) over each damage: one line that names
    the damaged file."""
    good = tmp_path / "good"
    make_index(good, 12)
    cases: list[tuple[str, list[str]]] = []
    for case, (damage, _) in DAMAGED.items():
        root = tmp_path / case
        shutil.copytree(good, root)
        damage(root)
        cases += [
            (f"{case} query", ["index", "query", str(root), "--text", "a red ring"]),
            (f"{case} verify", ["index", "verify", str(root)]),
            (f"{case} serve", [*SERVE, "--index", str(root)]),
        ]
        if case.startswith(("corrupt-sqlite", "manifest")) or case.endswith("-faiss"):
            cases.append((f"{case} info", ["index", "info", str(root)]))
    results = run_cases(tmp_path, cases)
    for name, (code, lines) in results.items():
        case, command = name.rsplit(" ", 1)
        named = DAMAGED[case][1]
        assert code == 1, (name, code, lines)
        assert not [line for line in lines if "Traceback" in line], (name, lines)
        if command == "verify" and len(lines) > 1:  # one line per problem, then the count
            *problems, last = lines
            assert last.startswith("error: ") and "problems found" in last, (name, lines)
            assert all(p.startswith("problem: ") for p in problems), (name, lines)
            assert named in problems[0], (name, lines)
            continue
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, lines)
        assert named in lines[0], (name, lines)
        if not case.startswith("manifest"):  # a manifest names its own fault
            assert "index verify" in lines[0], (name, lines)
