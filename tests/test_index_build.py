"""The index, end to end with the tiny model: build, search any-to-any, resume after SIGKILL,
refuse another model, catch disagreeing vectors and metadata, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bindsearch.cli import app
from encoders import Encoder, Modality, load_encoder
from encoders.config import resolve_config
from index import (
    BuildOptions,
    IndexCorrupt,
    IndexIncomplete,
    ModelMismatch,
    ModelSource,
    build_index,
    open_index,
    verify_index,
)

from .test_index_media import (
    altered_copy,
    audio,
    image,
    mixed_corpus,
    reencoded_audio,
    write_test_checkpoint,
)

CONFIG = resolve_config("imagebind_test")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_checkpoint(tmp_path_factory.mktemp("model") / "test.safetensors")


@pytest.fixture(scope="session")
def encoder(checkpoint: Path) -> Encoder:
    return load_encoder(checkpoint, config=CONFIG)


def model(checkpoint: Path, encoder: Encoder) -> ModelSource:
    return ModelSource(CONFIG, checkpoint, encoder=encoder)


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, encoder: Encoder
) -> tuple[Path, dict[str, Path], object]:
    root = tmp_path_factory.mktemp("built")
    files = mixed_corpus(root / "corpus")
    summary = build_index(
        root / "corpus",
        root / "idx",
        model(checkpoint, encoder),
        BuildOptions(chunk_items=5, batch_size=4),
    )
    return root, files, summary


def _ids_by_path(idx: Path) -> dict[str, int]:
    with sqlite3.connect(idx / "meta.sqlite") as conn:
        return {p: i for i, p in conn.execute("SELECT id, path FROM items WHERE deleted = 0")}


# --- build and search ----------------------------------------------------------------------------


def test_build_summary_counts_duplicates_and_rejections(
    built: tuple[Path, dict[str, Path], object],
) -> None:
    root, _, summary = built
    lines = "\n".join(summary.lines())  # type: ignore[attr-defined]
    assert "embedded 16 items from 16 files" in lines
    assert "skipped 1 duplicates" in lines
    assert "rejected 4 files" in lines
    rejected = dict(summary.rejected)  # type: ignore[attr-defined]
    assert {Path(p).name for p in rejected} == {"broken.jpg", "empty.wav", "notes.xyz", "cut.png"}
    assert "empty" in rejected[str((root / "corpus/junk/empty.wav").resolve())]
    assert "unsupported" in rejected[str((root / "corpus/junk/notes.xyz").resolve())]


def test_planted_near_duplicates_are_rank_one(
    built: tuple[Path, dict[str, Path], object], encoder: Encoder, tmp_path: Path
) -> None:
    root, files, _ = built
    # The corpus holds an altered copy of img0 and a re-encoded snd0: querying with each
    # original (by its stored vector) finds its copy right after itself...
    with open_index(root / "idx") as s:
        ids = _ids_by_path(root / "idx")
        for a, b in (("img0", "img0_altered"), ("snd0", "snd0_reenc")):
            hits = s.search(s.vector(ids[str(files[a].resolve())])[None], 3)[0]
            want_paths = [str(files[a].resolve()), str(files[b].resolve())]
            assert [h.item.path for h in hits[:2]] == want_paths
        # ... and fresh copies made outside the corpus find their originals at rank 1.
        q_img = altered_copy(files["img3"], tmp_path / "q.jpg")
        q_snd = reencoded_audio(files["snd2"], tmp_path / "q.ogg")
        for m, q, want in (("vision", q_img, "img3"), ("audio", q_snd, "snd2")):
            hit = s.search(encoder.embed_items(m, [q]), 1)[0][0]
            assert hit.item.path == str(files[want].resolve())
            assert hit.item.modality == m and hit.score > 0.9


def test_any_to_any_on_one_index(
    built: tuple[Path, dict[str, Path], object], encoder: Encoder
) -> None:
    root, files, _ = built
    queries = {
        Modality.TEXT: encoder.embed_items("text", ["a photo of a red square"]),
        Modality.VISION: encoder.embed_items("vision", [files["img2"]]),
        Modality.AUDIO: encoder.embed_items("audio", [files["snd1"]]),
        Modality.IMU: encoder.embed_items("imu", [files["imu"]]),
    }
    with open_index(root / "idx") as s:
        assert set(s.modalities) == {
            Modality.VISION,
            Modality.AUDIO,
            Modality.TEXT,
            Modality.IMU,
            Modality.DEPTH,
            Modality.THERMAL,
        }
        for qm, q in queries.items():
            everything = s.search(q, 30, merge="raw")[0]  # by cosine (default: calibrated)
            assert everything[0].item.modality == qm and everything[0].score > 0.999
            assert len({h.item.modality for h in everything}) == 6  # every modality is reachable
            scores = [h.score for h in everything]
            assert scores == sorted(scores, reverse=True)
            for target in s.modalities:
                hits = s.search(q, 2, targets=[target])[0]
                assert hits and {h.item.modality for h in hits} == {target}
        # Metadata by id, and the stored vector of an item.
        i = _ids_by_path(root / "idx")[str(files["txt"].resolve())]
        assert s.get([i, 10**9], ["path", "modality"]) == [
            {"path": str(files["txt"].resolve()), "modality": "text"},
            {},
        ]
        np.testing.assert_allclose(s.vector(i), queries[Modality.TEXT][0], atol=1e-5)
        with pytest.raises(KeyError):
            s.vector(10**9)
        with pytest.raises(ValueError, match="dimensions"):
            s.search(np.ones((1, 7), np.float32), 3)


def test_rerun_is_idempotent(
    built: tuple[Path, dict[str, Path], object], checkpoint: Path, encoder: Encoder
) -> None:
    root, _, _ = built
    before = _ids_by_path(root / "idx")
    again = build_index(
        root / "corpus",
        root / "idx",
        model(checkpoint, encoder),
        BuildOptions(chunk_items=5, batch_size=4),
    )
    assert again.embedded_items == 0 and again.already == 21
    assert _ids_by_path(root / "idx") == before
    assert verify_index(root / "idx").ok


def test_another_model_is_refused(
    built: tuple[Path, dict[str, Path], object], tmp_path: Path
) -> None:
    root, _, _ = built
    other = load_encoder(config="imagebind_test")  # plain random weights: another model
    with pytest.raises(ModelMismatch, match="another model"):
        open_index(root / "idx", other, checkpoint="random:0")
    with pytest.raises(ModelMismatch, match="another model"):
        build_index(root / "corpus", root / "idx", ModelSource(CONFIG, None, encoder=other))


def test_vectors_and_metadata_must_agree(
    built: tuple[Path, dict[str, Path], object], tmp_path: Path
) -> None:
    import shutil

    root, _, _ = built
    idx = tmp_path / "idx"
    shutil.copytree(root / "idx", idx)
    with sqlite3.connect(idx / "meta.sqlite") as conn:  # a row vanishes, nothing else changes
        conn.execute("DELETE FROM items WHERE id = (SELECT MAX(id) FROM items)")
    with pytest.raises(IndexCorrupt, match="disagree"):
        with sqlite3.connect(idx / "meta.sqlite") as conn:  # even with the generation faked
            gen = json.loads((idx / "manifest.json").read_text())["generation"]
            conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen),))
        open_index(idx)
    report = verify_index(idx)
    assert any("items_sha256" in p for p in report.problems)
    assert any("vectors with no item row" in p for p in report.problems)
    # A flipped byte in a chunk file is caught by its checksum.
    chunk = sorted((idx / "chunks").glob("*.npy"))[0]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert any("does not match its sha256" in p for p in verify_index(idx).problems)
    # An update that did not finish: refused until rerun.
    with sqlite3.connect(idx / "meta.sqlite") as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'generation'")
    with pytest.raises(IndexIncomplete, match="interrupted"):
        open_index(idx)


# --- resume after SIGKILL ------------------------------------------------------------------------

BUILD_ARGS = [
    "--config",
    "imagebind_test",
    "--chunk-size",
    "3",
    "--batch-size",
    "4",
    "--no-progress",
]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from bindsearch.cli import main; main()", *args]


def _chunks(idx: Path) -> int:
    return len(list((idx / "chunks").glob("c*.npy"))) if (idx / "chunks").is_dir() else 0


def test_sigkill_at_random_moments_then_rerun_equals_uninterrupted_build(
    tmp_path: Path, checkpoint: Path, encoder: Encoder
) -> None:
    corpus = tmp_path / "corpus"
    mixed_corpus(corpus)
    for i in range(10):
        image(corpus / "photos" / f"more{i:02d}.png", seed=50 + i)
    for i in range(3):
        audio(corpus / "sounds" / f"more{i}.wav", seed=60 + i, seconds=2.0)
    ref = build_index(
        corpus,
        tmp_path / "ref",
        model(checkpoint, encoder),
        BuildOptions(chunk_items=3, batch_size=4),
    )
    idx = tmp_path / "idx"
    cmd = _cli(
        "index", "build", str(corpus), "-o", str(idx), "--checkpoint", str(checkpoint), *BUILD_ARGS
    )
    rng = np.random.default_rng(0)
    kills = 0
    for attempt in range(4):
        workers = "1" if attempt % 2 else "0"
        proc = subprocess.Popen(
            [*cmd, "--workers", workers],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=Path(__file__).parents[1],
        )
        # Wait for the build to commit a random number of new chunks, then a random moment more.
        target = _chunks(idx) + int(rng.integers(1, 4))
        while proc.poll() is None and _chunks(idx) < target:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0, 0.15)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2  # the build was really cut short, more than once
    done = subprocess.run(
        [*cmd, "--workers", "0"], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert done.returncode == 0, done.stderr
    assert "already indexed" in done.stdout

    # Same ids -> same paths and segments, same vectors, same file records.
    def rows(p: Path) -> list[tuple[object, ...]]:
        with sqlite3.connect(p / "meta.sqlite") as conn:
            return conn.execute(
                "SELECT id, path, modality, sha256, start_s, end_s FROM items ORDER BY id"
            ).fetchall()

    def files(p: Path) -> list[tuple[object, ...]]:
        with sqlite3.connect(p / "meta.sqlite") as conn:
            return conn.execute(
                "SELECT path, status, sha256, duplicate_of, error FROM files ORDER BY path"
            ).fetchall()

    assert rows(idx) == rows(tmp_path / "ref")
    assert files(idx) == files(tmp_path / "ref")
    assert ref.embedded_items == len(rows(idx))
    with open_index(idx) as a, open_index(tmp_path / "ref") as b:
        for i, *_rest in rows(idx):
            np.testing.assert_allclose(a.vector(int(i)), b.vector(int(i)), atol=1e-5)
        assert a.counts() == b.counts()
    assert verify_index(idx).ok
    assert not list(idx.glob("**/*.tmp"))


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_build_info_query_verify(tmp_path: Path, checkpoint: Path) -> None:
    files = mixed_corpus(tmp_path / "corpus")
    idx = tmp_path / "idx"
    runner = CliRunner()
    ck = ["--checkpoint", str(checkpoint)]
    r = runner.invoke(
        app,
        [
            "index",
            "build",
            str(tmp_path / "corpus"),
            "-o",
            str(idx),
            *ck,
            *BUILD_ARGS,
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "rejected 4 files" in r.stdout and "embedded 16 items" in r.stdout

    r = runner.invoke(app, ["index", "info", str(idx)])
    assert r.exit_code == 0, r.output
    assert "broken.jpg:" in r.stdout and "empty.wav: the file is empty" in r.stdout
    assert "vision" in r.stdout and "Flat" in r.stdout
    info = json.loads(runner.invoke(app, ["index", "info", str(idx), "--json"]).stdout)
    assert info["counts"] == {"items": 16, "files": 16, "duplicates": 1, "rejected": 4}
    assert info["model"]["preprocess_version"] and info["model"]["checkpoint"].startswith("sha256:")
    assert len(info["rejected"]) == 4 and all(r["error"] for r in info["rejected"])

    q = altered_copy(files["img4"], tmp_path / "q.jpg")
    r = runner.invoke(
        app, ["index", "query", str(idx), str(q), "-m", "vision", "-k", "3", "--json"]
    )
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)
    assert hits[0]["path"] == str(files["img4"].resolve()) and len(hits) == 3
    assert set(hits[0]) == {
        "id",
        "score",
        "relevance",
        "modality",
        "path",
        "start",
        "end",
        "caption",
        "tags",
    }
    r = runner.invoke(
        app,
        [
            "index",
            "query",
            str(idx),
            "--text",
            "a photo of a red square",
            "--target",
            "text",
            "--target",
            "vision",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "caption.txt" in r.stdout.splitlines()[0]

    r = runner.invoke(app, ["index", "verify", str(idx)])
    assert r.exit_code == 0 and r.stdout.strip().endswith("ok")


def test_cli_errors_are_one_line(tmp_path: Path, checkpoint: Path) -> None:
    runner = CliRunner()
    image(tmp_path / "a.png", 1)
    cases = [
        [
            "index",
            "build",
            str(tmp_path / "nope"),
            "-o",
            str(tmp_path / "i"),
            "--checkpoint",
            "none",
            "--config",
            "imagebind_test",
        ],
        [
            "index",
            "build",
            str(tmp_path),
            "-o",
            str(tmp_path / "i2"),
            "--checkpoint",
            "none",
            "--config",
            "imagebind_test",
            "--factory",
            "IVF-nonsense",
        ],
        ["index", "info", str(tmp_path / "nothing")],
        ["index", "query", str(tmp_path / "nothing"), "--text", "x"],
        [
            "index",
            "build",
            str(tmp_path),
            "-o",
            str(tmp_path / "a.png"),
            "--checkpoint",
            "none",
            "--config",
            "imagebind_test",
        ],
    ]
    for args in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.output
    # An index built with random weights refuses a query embedded by another model.
    idx = tmp_path / "idx"
    r = runner.invoke(
        app,
        [
            "index",
            "build",
            str(tmp_path),
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
    r = runner.invoke(
        app,
        [
            "index",
            "query",
            str(idx),
            "--text",
            "x",
            "--checkpoint",
            str(checkpoint),
            "--config",
            "imagebind_test",
        ],
    )
    assert r.exit_code == 1 and "another model" in r.stderr
    r = runner.invoke(app, ["index", "query", str(idx), "--text", "x"])  # the index's own model
    assert r.exit_code == 0, r.output
    assert os.path.basename(str(tmp_path / "a.png")) in r.stdout
