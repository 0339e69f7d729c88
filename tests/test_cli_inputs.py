"""The command line's inputs as a new user gives them (#17, the small items).

``bindsearch embed -m text`` reads a file it is given (refusing an empty or non-UTF-8 one in
one line) and notes on stderr a text longer than the model reads; ``index query`` filters by
``--tags`` (alias ``--tag``), as the service does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from bindsearch.cli import app
from encoders.transforms.text import count_tokens

runner = CliRunner()
LONG = "a yellow star in the snow, " * 40


def embed(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, ["embed", "-m", "text", "--json", *args])
    return r.exit_code, r.stdout, r.stderr


def test_embed_text_refuses_an_empty_or_non_utf8_file_in_one_line(tmp_path: Path) -> None:
    cases = {
        "empty.txt": (b"", "the text file holds no text"),
        "blank.txt": (b" \n\t\n", "the text file holds no text"),
        "latin1.txt": ("café crème".encode("latin-1"), "not UTF-8 text"),
        "photo.jpg": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)), "not UTF-8"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        code, out, err = embed(str(path))
        assert code == 1 and out == "", (name, err)
        assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and why in err, err


def test_embed_text_reads_a_file_it_is_given(tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("\ufeffa red square\n", encoding="utf-8")  # a BOM and a newline: stripped
    code, out, err = embed(str(note), "a red square")
    assert code == 0, err
    from_file, as_string = np.array(json.loads(out))
    np.testing.assert_allclose(from_file, as_string, atol=1e-6)


def test_embed_notes_a_text_longer_than_the_model_reads(tmp_path: Path) -> None:
    # The default model (the shipped demo) reads 14 tokens of a text (context 16).
    code, out, err = embed(LONG, "a red square")
    assert code == 0, err
    assert np.array(json.loads(out)).shape[0] == 2
    n = count_tokens(LONG)
    assert err == (
        f"note: text #0 ('a yellow star in the sno'...): {n} tokens; the model reads the "
        "first 14 (the rest is cut)\n"
    )
    long_file = tmp_path / "long.txt"
    long_file.write_text(LONG, encoding="utf-8")
    code, _, err = embed(str(long_file))
    assert code == 0 and err.startswith(f"note: {long_file}: {n} tokens;")


def test_index_query_tags_and_its_alias_tag(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = {"a.txt": "red;round", "b.txt": "red", "c.txt": "round", "d.txt": ""}
    for name in rows:
        (corpus / name).write_text(f"a caption of {name}", encoding="utf-8")
    lines = ["path,modality,caption,tags"] + [f"{n},text,,{t}" for n, t in rows.items()]
    (corpus / "list.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    idx = tmp_path / "idx"
    r = runner.invoke(
        app,
        [
            "index",
            "build",
            str(corpus / "list.csv"),
            "-o",
            str(idx),
            "--checkpoint",
            "none",
            "--config",
            "imagebind_test",
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output

    def names(*flags: str) -> set[str]:
        q = ["index", "query", str(idx), "--text", "a caption", "--json", *flags]
        r = runner.invoke(app, q)
        assert r.exit_code == 0, r.output
        return {Path(h["path"]).name for h in json.loads(r.stdout)}

    assert names() == set(rows)
    assert names("--tags", "red") == names("--tag", "red") == {"a.txt", "b.txt"}
    both = {"a.txt"}
    assert names("--tags", "red,round") == names("--tag", "red", "--tag", "round") == both
    assert names("--tags", "red", "--tag", "round") == both
    assert names("--tag", "blue") == set()
