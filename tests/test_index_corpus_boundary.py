"""The corpus boundary at build time, and bad names that never end a build (issue #17, 2 and 3).

A folder's symlinks are not followed unless ``--follow-symlinks`` (and then only inside the
root); a manifest names files inside its own folder unless ``--allow-outside``; a name that is
not UTF-8, a NUL byte, a name too long, a FIFO or a vanished file is a rejected file, recorded
escaped, and the build, add and sync go on to exit 0.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from bindsearch.cli import app
from encoders.config import resolve_config
from index._decode import DecodeTask, decode
from index.corpus import NOT_FOLLOWED, escape_path, recorded_path, scan_corpus

MODEL = ["--checkpoint", "none", "--config", "imagebind_test", "--workers", "0"]
BAD = b"bad\xff\x1b[31m.txt"  # not UTF-8, with an escape sequence a terminal would obey
BAD_SHOWN = "bad\\xff\\x1b[31m.txt"


def text(path: Path, words: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(words, encoding="utf-8")
    return path


def cli(*args: str) -> str:
    """Run ``bindsearch ARGS``: it must succeed; its stdout."""
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    return r.stdout


def files(idx: Path) -> dict[str, tuple[str, str | None]]:
    """path -> (status, error) of every file the index recorded."""
    with sqlite3.connect(idx / "meta.sqlite") as conn:
        rows = conn.execute("SELECT path, status, error FROM files").fetchall()
    return {str(p): (str(s), e) for p, s, e in rows}


def indexed(idx: Path) -> set[str]:
    """Names of the files whose items are in the index."""
    with sqlite3.connect(idx / "meta.sqlite") as conn:
        rows = conn.execute("SELECT DISTINCT path FROM items WHERE deleted = 0").fetchall()
    return {Path(str(p)).name for (p,) in rows}


def rejected(idx: Path) -> dict[str, str]:
    """Name -> reason of the files recorded as rejected."""
    return {Path(p).name: str(e) for p, (s, e) in files(idx).items() if s == "rejected"}


def build(corpus: Path, idx: Path, *extra: str) -> str:
    return cli("index", "build", str(corpus), "-o", str(idx), *MODEL, *extra)


def test_a_symlink_out_of_the_folder_is_not_indexed(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    text(corpus / "a.txt", "a cat on a mat")
    (corpus / "p.txt").symlink_to("/etc/passwd")
    (corpus / "etc").symlink_to("/etc", target_is_directory=True)
    out = build(corpus, tmp_path / "idx")
    assert indexed(tmp_path / "idx") == {"a.txt"}
    assert rejected(tmp_path / "idx") == {"p.txt": NOT_FOLLOWED, "etc": NOT_FOLLOWED}
    assert "p.txt: a symlink (not followed" in out
    info = cli("index", "info", str(tmp_path / "idx"))
    assert f"{corpus.resolve() / 'p.txt'}: {NOT_FOLLOWED}" in info


def test_follow_symlinks_takes_links_inside_the_root_only(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    text(corpus / "a.txt", "a cat on a mat")
    text(corpus / ".store" / "b.txt", "a dog in the fog")  # hidden: reached only by a link
    text(corpus / "notes" / "c.txt", "a bird with a word")
    text(tmp_path / "secret" / "s.txt", "the secret outside")
    (corpus / "b.txt").symlink_to(corpus / ".store" / "b.txt")
    (corpus / "again").symlink_to(corpus / "notes", target_is_directory=True)  # c.txt twice
    (corpus / "notes" / "loop").symlink_to(corpus, target_is_directory=True)  # a cycle
    (corpus / "p.txt").symlink_to("/etc/passwd")
    (corpus / "s.txt").symlink_to(tmp_path / "secret" / "s.txt")
    (corpus / "secret").symlink_to(tmp_path / "secret", target_is_directory=True)
    (corpus / "broken.txt").symlink_to(corpus / "nowhere.txt")
    idx = tmp_path / "idx"
    build(corpus, idx, "--follow-symlinks")
    assert indexed(idx) == {"a.txt", "b.txt", "c.txt"}
    rows = files(idx)
    # A followed link is recorded by its target: the one real path of the file, inside the root.
    assert rows[str(corpus.resolve() / ".store" / "b.txt")][0] == "indexed"
    assert str(corpus.resolve() / "b.txt") not in rows
    why = rejected(idx)
    assert set(why) == {"p.txt", "s.txt", "secret", "broken.txt"}
    assert why["p.txt"].startswith("a symlink leaving the corpus (to /etc/passwd)")
    assert why["secret"].startswith("a symlink leaving the corpus")
    assert "broken symlink" in why["broken.txt"]
    assert not any("the secret" in p for p in indexed(idx))


def test_manifest_rows_outside_its_folder_need_allow_outside(tmp_path: Path) -> None:
    root = tmp_path / "set"
    text(root / "in.txt", "inside the folder")
    inside_abs = text(root / "sub" / "abs.txt", "inside, named absolutely")
    outside = text(tmp_path / "out.txt", "outside the folder")
    elsewhere = text(tmp_path / "far" / "far.txt", "far away")
    (root / "link.txt").symlink_to(tmp_path / "far" / "far.txt")  # inside by name only
    rows = [
        {"path": "in.txt"},
        {"path": str(inside_abs)},
        {"path": "../out.txt"},
        {"path": str(elsewhere)},
        {"path": "link.txt", "modality": "text"},
    ]
    manifest = root / "list.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    idx = tmp_path / "idx"
    out = build(manifest, idx)
    assert indexed(idx) == {"in.txt", "abs.txt"}
    why = rejected(idx)
    assert set(why) == {"out.txt", "far.txt"}  # link.txt is recorded as its target, far.txt
    assert why["out.txt"] == (
        "list.jsonl:3: outside the manifest's folder (--allow-outside to index files elsewhere)"
    )
    assert "--allow-outside" in out
    assert str(outside) in files(idx) or str(outside.resolve()) in files(idx)

    idx2 = tmp_path / "idx2"
    build(manifest, idx2, "--allow-outside")
    assert indexed(idx2) == {"in.txt", "abs.txt", "out.txt", "far.txt"}
    assert rejected(idx2) == {}


def test_bad_names_are_rejected_and_the_build_goes_on(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    text(corpus / "a.txt", "a cat on a mat")
    text(corpus / "z.txt", "a zebra at the zoo")
    with open(os.fsencode(corpus) + b"/" + BAD, "wb") as f:
        f.write(b"a file whose name is not UTF-8")
    os.makedirs(os.fsencode(corpus) + b"/dir\xfe")
    with open(os.fsencode(corpus) + b"/dir\xfe/inner.txt", "wb") as f:
        f.write(b"a good name in a bad folder")
    idx = tmp_path / "idx"
    out = build(corpus, idx)
    assert indexed(idx) == {"a.txt", "z.txt"}
    rows = files(idx)
    bad = recorded_path(str(corpus.resolve()) + "/" + os.fsdecode(BAD))
    assert bad == f"{corpus.resolve()}/{BAD_SHOWN}"
    assert rows[bad] == (
        "rejected",
        "the name is not valid UTF-8 (shown escaped; rename the file to index it)",
    )
    assert rows[f"{corpus.resolve()}/dir\\xfe/inner.txt"][0] == "rejected"
    for shown in (out, cli("index", "info", str(idx))):
        assert BAD_SHOWN in shown and "\x1b" not in shown
    # --json keeps the recorded (escaped) path; a second run records the same rows again.
    info = json.loads(cli("index", "info", str(idx), "--json"))
    assert bad in [r["path"] for r in info["rejected"]]
    build(corpus, idx)
    assert files(idx) == rows


def test_a_fifo_does_not_hang_the_build(tmp_path: Path) -> None:
    """Before: the scan opened the FIFO to sniff it and waited for a writer for ever."""
    corpus = tmp_path / "corpus"
    text(corpus / "a.txt", "a cat on a mat")
    os.mkfifo(corpus / "b.txt")
    idx = tmp_path / "idx"
    cmd = "from bindsearch.cli import main; main()"
    args = ["index", "build", str(corpus), "-o", str(idx), *MODEL]
    r = subprocess.run(  # a subprocess: a hang must end in a failure, not a stuck suite
        [sys.executable, "-c", cmd, *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert indexed(idx) == {"a.txt"}
    assert rejected(idx) == {"b.txt": "not a regular file (a FIFO, socket or device)"}


def test_bad_manifest_paths_are_rejected_rows(tmp_path: Path) -> None:
    root = tmp_path / "set"
    text(root / "good.txt", "a good row")
    (root / "folder").mkdir()
    rows = [
        "path,modality,caption",
        "good.txt,,fine",
        "with\x00nul.txt,text,a NUL byte",
        f"{'x' * 300}.txt,text,too long",
        f"{'d' * 200}/{'e' * 200}/{'f' * 200}/{'g' * 4000}.txt,,path too long",
        "folder,text,a folder",
        "gone.txt,text,no such file",
        "gone.txt,,no such file either",
    ]
    manifest = root / "list.csv"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    idx = tmp_path / "idx"
    out = build(manifest, idx)
    assert indexed(idx) == {"good.txt"}
    why = {p: e for p, (s, e) in files(idx).items() if s == "rejected"}
    nul = f"{root.resolve()}/with\\x00nul.txt"
    assert why[nul] == "list.csv:3: the name holds a NUL byte (no file can have it)"
    assert any("File name too long" in str(e) for e in why.values())
    assert why[str(root.resolve() / "folder")] == "a folder, not a file"
    assert why[str(root.resolve() / "gone.txt")] == "no such file"
    assert len(why) == 5  # gone.txt once
    assert "with\\x00nul.txt" in out and "\x00" not in out


def test_sync_and_add_reject_bad_names_and_links_and_go_on(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    text(corpus / "a.txt", "a cat on a mat")
    victim = text(corpus / "b.txt", "a dog in the fog")
    idx = tmp_path / "idx"
    build(corpus, idx)
    assert indexed(idx) == {"a.txt", "b.txt"}

    # sync: a new bad name, a new link out, and an indexed file swapped for a link out.
    with open(os.fsencode(corpus) + b"/" + BAD, "wb") as f:
        f.write(b"a file whose name is not UTF-8")
    (corpus / "p.txt").symlink_to("/etc/passwd")
    victim.unlink()
    victim.symlink_to("/etc/passwd")
    text(corpus / "c.txt", "a bird with a word")
    out = cli("index", "sync", str(idx), str(corpus))
    assert indexed(idx) == {"a.txt", "c.txt"}  # b.txt lost its old vectors, gained none
    why = rejected(idx)
    assert why["p.txt"] == why["b.txt"] == NOT_FOLLOWED
    assert BAD_SHOWN in out and "\x1b" not in out
    assert len(why) == 3
    again = files(idx)
    cli("index", "sync", str(idx), str(corpus))  # stable: the same records, nothing removed
    assert files(idx) == again

    # add: a folder with a bad name and a link; a manifest with a NUL byte and a row outside.
    extra = tmp_path / "extra"
    text(extra / "d.txt", "a dolphin in the ocean")
    with open(os.fsencode(extra) + b"/x\xe9.txt", "wb") as f:
        f.write(b"latin-1 name")
    (extra / "q.txt").symlink_to("/etc/hostname")
    man = tmp_path / "more" / "m.jsonl"
    text(tmp_path / "more" / "e.txt", "an eagle in the sky")
    rows = [
        {"path": "e.txt", "caption": "a lone \ud800", "tags": ["ok", "\udcff"]},
        {"path": "bad\x00.txt"},
        {"path": "../extra/d.txt"},
    ]
    man.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = cli("index", "add", str(idx), str(extra), str(man))
    assert indexed(idx) == {"a.txt", "c.txt", "d.txt", "e.txt"}
    why = rejected(idx)
    assert why["q.txt"] == NOT_FOLLOWED
    assert why["x\\xe9.txt"].startswith("the name is not valid UTF-8")
    assert why["bad\\x00.txt"].startswith("m.jsonl:2: the name holds a NUL byte")
    assert "x\\xe9.txt" in out
    with sqlite3.connect(idx / "meta.sqlite") as conn:  # text SQLite cannot hold, escaped
        caption, tags = conn.execute(
            "SELECT caption, tags FROM items WHERE path = ?", (str(man.parent.resolve() / "e.txt"),)
        ).fetchone()
    assert (caption, json.loads(tags)) == ("a lone \\ud800", ["ok", "\\xff"])


def test_add_follow_symlinks_inside_the_folder(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    text(corpus / "a.txt", "a cat on a mat")
    idx = tmp_path / "idx"
    build(corpus, idx)
    extra = tmp_path / "extra"
    text(extra / "real" / "d.txt", "a dolphin in the ocean")
    (extra / "d-link.txt").symlink_to(extra / "real" / "d.txt")
    (extra / "p.txt").symlink_to("/etc/passwd")
    os.mkfifo(tmp_path / "fifo.txt")  # named on the command line: rejected, not "no such file"
    cli("index", "add", str(idx), str(extra), str(tmp_path / "fifo.txt"), "--follow-symlinks")
    assert indexed(idx) == {"a.txt", "d.txt"}
    why = rejected(idx)
    assert why["p.txt"].startswith("a symlink leaving the corpus (to /etc/passwd)")
    assert why["fifo.txt"] == "not a regular file (a FIFO, socket or device)"


def test_decode_refuses_a_file_swapped_for_a_link_after_the_scan(tmp_path: Path) -> None:
    target = text(tmp_path / "outside.txt", "outside the corpus")
    link = tmp_path / "corpus" / "a.txt"
    link.parent.mkdir()
    link.symlink_to(target)
    cfg = resolve_config("imagebind_test").preprocess
    res = decode(DecodeTask(0, str(link), "text", cfg, 10.0, True))
    assert res.error == "no longer a regular file (replaced since the scan)"
    assert res.items == [] and res.sha256 is None


def test_escape_path_is_stable_and_printable() -> None:
    name = os.fsdecode(b"/m/\xff\x00a\nb\x1b\x7f\xc2\x9f-\xc3\xa9-\xe7\x8c\xab.txt")
    shown = escape_path(name)
    assert shown == "/m/\\xff\\x00a\\nb\\x1b\\x7f\\x9f-\u00e9-\u732b.txt"
    assert escape_path(shown) == shown
    assert shown.encode("utf-8") and shown.isprintable()
    assert recorded_path("/m/caf\u00e9.txt") == "/m/caf\u00e9.txt"  # a good name stays as is
    assert recorded_path("/m/a\nb.txt") == "/m/a\nb.txt"  # valid: indexed, escaped when shown
    assert recorded_path(name) == shown


def test_scan_records_the_link_not_its_target_by_default(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    text(corpus / "a.txt", "a")
    (corpus / "b.txt").symlink_to(corpus / "a.txt")
    entries = scan_corpus(corpus)
    assert [(e.path.name, e.error) for e in entries] == [("a.txt", None), ("b.txt", NOT_FOLLOWED)]
    followed = scan_corpus(corpus, follow_symlinks=True)
    assert [(e.path.name, e.error) for e in followed] == [("a.txt", None)]  # one file, once
