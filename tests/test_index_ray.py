"""``index build --engine ray`` on a local Ray instance: four actors staging shards give the same
index as the local build; it survives an embedding actor killed mid-build (Ray restarts it and
redoes its shard) and a driver killed while embedding (the rerun reuses the complete shards) or
while merging (the rerun resumes after the committed files); the driver's peak memory stays far
below the corpus's vectors; without Ray, a one-line error."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray  # the dev extra has ray[serve] (Ray core with it): CI runs these tests
from PIL import Image
from typer.testing import CliRunner

from encoders import Encoder, load_encoder
from encoders.config import resolve_config
from index import (
    BuildOptions,
    IndexStoreError,
    ModelSource,
    build_index,
    open_index,
    verify_index,
)
from index.cli import index_app
from index.ray_engine import RayOptions, RayUnavailable, build_index_ray

from .test_index_media import audio, mixed_corpus, video, write_test_checkpoint

CONFIG = resolve_config("imagebind_test")
REPO = Path(__file__).resolve().parents[1]
# chunk_items 5 commits several chunks; 2 s windows cut the long audio and the video in segments.
OPTIONS = {"chunk_items": 5, "batch_size": 4, "segment_seconds": 2.0, "workers": 0}
SHARD_FILES = 3  # the corpus's 20-odd files make several shards per actor


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One local Ray instance for the module (2 CPUs, a small object store); its GCS address."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 << 20,
        logging_level="WARNING",
        configure_logging=False,
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_checkpoint(tmp_path_factory.mktemp("model") / "test.safetensors")


@pytest.fixture(scope="module")
def encoder(checkpoint: Path) -> Encoder:
    return load_encoder(checkpoint, config=CONFIG)


def make_corpus(root: Path) -> Path:
    """Every modality, a duplicate, junk, a video with a soundtrack and a segmented long sound."""
    mixed_corpus(root)
    (root / "clips").mkdir()
    video(root / "clips" / "walk.mp4", seed=3, seconds=3.0, audio_seed=5)
    audio(root / "sounds" / "long.wav", seed=9, seconds=7.0)
    return root


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, encoder: Encoder
) -> tuple[Path, Path]:
    """The corpus and its local build (the oracle)."""
    root = tmp_path_factory.mktemp("ref")
    corpus = make_corpus(root / "corpus")
    build_index(
        corpus,
        root / "local",
        ModelSource(CONFIG, checkpoint, encoder=encoder),
        BuildOptions(**OPTIONS),
    )
    return corpus, root / "local"


def items(idx: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(idx / "meta.sqlite") as conn:
        return conn.execute(
            "SELECT id, path, modality, sha256, start_s, end_s, duration_s, chunk FROM items "
            "ORDER BY id"
        ).fetchall()


def files(idx: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(idx / "meta.sqlite") as conn:
        return conn.execute(
            "SELECT path, status, sha256, duplicate_of, error, chunk, modality FROM files "
            "ORDER BY path"
        ).fetchall()


def assert_same_index(idx: Path, ref: Path, chunks: bool = True) -> None:
    """Same ids -> paths, segments and chunks, same file records, same vectors (float tolerance).

    ``chunks=False``: a build with another chunk size (where its chunks begin) is compared.
    """
    rows = items(idx)
    if chunks:
        assert rows == items(ref)
        assert files(idx) == files(ref)
    else:
        assert [r[:-1] for r in rows] == [r[:-1] for r in items(ref)]
        assert [f[:5] + f[6:] for f in files(idx)] == [f[:5] + f[6:] for f in files(ref)]
    assert not (idx / "shards").exists()  # the staged shards go once merged and committed
    with open_index(idx) as a, open_index(ref) as b:
        assert a.counts() == b.counts()
        for i, *_ in rows:
            np.testing.assert_allclose(a.vector(int(i)), b.vector(int(i)), atol=1e-5)
    assert verify_index(idx).ok


class DiesOnce:
    """An encoder whose process kills itself (SIGKILL) at its ``at``-th batch, once per marker."""

    def __init__(self, encoder: Encoder, marker: Path, at: int) -> None:
        self.encoder, self.marker, self.at, self.calls = encoder, marker, at, 0

    def embed(self, modality: Any, x: Any) -> Any:
        self.calls += 1
        if self.calls == self.at and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.encoder.embed(modality, x)


class Slow:
    """An encoder that takes its time, so that a test can kill the build between two chunks."""

    def __init__(self, encoder: Encoder, seconds: float) -> None:
        self.encoder, self.seconds = encoder, seconds

    def embed(self, modality: Any, x: Any) -> Any:
        time.sleep(self.seconds)
        return self.encoder.embed(modality, x)


# --- the same index as the local build ------------------------------------------------------------


def test_ray_build_equals_local_build(
    cluster: str, reference: tuple[Path, Path], checkpoint: Path, encoder: Encoder, tmp_path: Path
) -> None:
    corpus, ref = reference
    idx = tmp_path / "ray"
    summary = build_index_ray(
        corpus,
        idx,
        ModelSource(CONFIG, checkpoint, encoder=encoder),
        BuildOptions(**OPTIONS),
        RayOptions(num_actors=4, shard_files=SHARD_FILES),
    )
    assert summary.embedded_items == len(items(ref)) and summary.chunks > 2
    assert summary.shards_built >= 4 and summary.shards_reused == 0
    assert summary.duplicates == 1 and len(summary.rejected) == 4
    assert {m for _, _, m, *_ in items(idx)} == {
        "vision",
        "audio",
        "text",
        "imu",
        "depth",
        "thermal",
        "video",
    }
    assert_same_index(idx, ref)
    # The usual commands work on it unchanged; a rerun finds everything done.
    runner = CliRunner()
    for args in (
        ["info", str(idx)],
        ["verify", str(idx)],
        ["query", str(idx), "--text", "a photo of a red square", "-k", "1"],
    ):
        r = runner.invoke(index_app, args)
        assert r.exit_code == 0, r.output
    assert "caption.txt" in r.stdout
    again = build_index_ray(
        corpus, idx, ModelSource(CONFIG, checkpoint, encoder=encoder), BuildOptions(**OPTIONS)
    )
    assert again.embedded_items == 0 and again.already == summary.embedded_files + 5
    assert_same_index(idx, ref)


# --- killed workers -------------------------------------------------------------------------------


def test_an_actor_killed_mid_build_is_restarted_by_ray(
    cluster: str, reference: tuple[Path, Path], checkpoint: Path, encoder: Encoder, tmp_path: Path
) -> None:
    corpus, ref = reference
    marker = tmp_path / "killed"
    dying = ModelSource(CONFIG, checkpoint, encoder=DiesOnce(encoder, marker, at=3))  # type: ignore[arg-type]
    ropts = RayOptions(shard_files=SHARD_FILES)
    build_index_ray(corpus, tmp_path / "ray", dying, BuildOptions(**OPTIONS), ropts)
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # an actor died
    assert_same_index(tmp_path / "ray", ref)


def committed_chunks(idx: Path) -> int:
    """Chunks whose rows are committed (a chunk's .npy is written before its transaction)."""
    if not (idx / "meta.sqlite").is_file():
        return 0
    with sqlite3.connect(idx / "meta.sqlite", timeout=30) as conn:
        try:
            return int(conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
        except sqlite3.OperationalError:  # the schema is not there yet
            return 0


def staged_shards(idx: Path) -> int:
    """Shards complete in the staging folder (renamed into place, marker inside): not a
    ``.<name>.<id>.tmp`` folder whose marker is written but which is not renamed yet (its
    files are being fsync-ed; a driver killed then has staged nothing)."""
    return sum(not p.parent.name.startswith(".") for p in (idx / "shards").glob("*/done.json"))


def run_driver(corpus: str, out: str, checkpoint: str, address: str, options: str) -> None:
    """The driver a test kills: a Ray build with a slow encoder (run in a subprocess)."""
    import json

    import torch

    torch.set_num_threads(1)
    enc = Slow(load_encoder(Path(checkpoint), config=CONFIG), 0.15)
    build_index_ray(
        corpus,
        out,
        ModelSource(CONFIG, Path(checkpoint), encoder=enc),  # type: ignore[arg-type]
        BuildOptions(**json.loads(options)),
        RayOptions(address=address, num_actors=2, shard_files=SHARD_FILES),
        log=lambda line: sys.stderr.write(line + "\n") and sys.stderr.flush(),
    )


def kill_driver_when(
    corpus: Path, idx: Path, checkpoint: Path, address: str, options: dict[str, Any], until: Any
) -> str:
    """Start ``run_driver`` in a subprocess, SIGKILL it once ``until(idx)`` holds; its stderr."""
    import json

    code = (
        "from tests.test_index_ray import run_driver; "
        f"run_driver({str(corpus)!r}, {str(idx)!r}, {str(checkpoint)!r}, {address!r}, "
        f"{json.dumps(options)!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while proc.poll() is None and not until(idx):
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        err = proc.stderr.read().decode() if proc.stderr is not None else ""
        if proc.stderr is not None:
            proc.stderr.close()
    assert not (idx / "manifest.json").exists()  # killed before it finished
    return err


def test_a_driver_killed_while_embedding_then_while_merging_loses_and_repeats_nothing(
    cluster: str, reference: tuple[Path, Path], checkpoint: Path, encoder: Encoder, tmp_path: Path
) -> None:
    corpus, ref = reference
    idx = tmp_path / "ray"
    # 1. Killed once a shard is staged, before anything is committed (one chunk for the whole
    # build: the writer commits only at the end).
    once = {**OPTIONS, "chunk_items": 10_000}
    kill_driver_when(corpus, idx, checkpoint, cluster, once, lambda i: staged_shards(i) >= 1)
    assert committed_chunks(idx) == 0
    staged = staged_shards(idx)
    # 2. The rerun embeds only the shards not staged, and is killed mid-merge, once a chunk is
    # committed (the chunk size is not part of a shard: the same shards are planned).
    log = kill_driver_when(
        corpus, idx, checkpoint, cluster, OPTIONS, lambda i: committed_chunks(i) >= 1
    )
    plan = re.search(r"in (\d+) shards \((\d+) to embed\)", log)
    assert plan is not None, log
    assert int(plan[1]) - int(plan[2]) >= staged >= 1  # the staged shards were not redone
    done = committed_chunks(idx)
    assert 1 <= done < len({c for *_, c in items(ref)})
    # 3. The last rerun skips the committed files and finishes: the local build's index.
    again = build_index_ray(
        corpus,
        idx,
        ModelSource(CONFIG, checkpoint, encoder=encoder),
        BuildOptions(**OPTIONS),
        RayOptions(shard_files=SHARD_FILES),
    )
    assert again.already > 0  # the committed files were skipped, not embedded again
    assert_same_index(idx, ref)
    assert not list(idx.glob("**/*.tmp"))


# --- what the driver holds -----------------------------------------------------------------------

# A wide test model: 65536-d vectors (256 KB each) from a tiny text tower, so that the corpus's
# vectors (WIDE_FILES texts: 131 MB) dwarf whatever else the driver's memory does.
WIDE = dataclasses.replace(CONFIG, embed_dim=65536)
WIDE_FILES = 500


def status_kb(field: str) -> int:
    """A line of /proc/self/status in KB (VmRSS: resident now; VmHWM: the peak so far)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def run_wide_driver(corpus: str, out: str, address: str, record: str) -> None:
    """A Ray build with the wide model (run in a subprocess); records the driver's memory.

    The baseline is the resident size once everything is imported, Ray connected and one actor
    called (Ray's fixed cost in the driver, whatever the corpus: about 30 MB); the peak is
    VmHWM when the writer has merged and committed every shard. The driver then exits: the
    FAISS index built from the committed chunks reads them all, as for any build, and is not
    what this measures.
    """
    import json

    import torch

    from index import pipeline

    torch.set_num_threads(1)
    ray.init(address=address, logging_level="WARNING", configure_logging=False)
    write = pipeline.IndexWriter.write

    def measured(self: Any, entries: Any, engine: Any) -> None:
        write(self, entries, engine)
        Path(record).write_text(json.dumps({"base": base, "peak": status_kb("VmHWM")}))
        os._exit(0)

    class Warm:  # defined here, so that its worker does not import this module
        def ping(self) -> int:
            return os.getpid()

    pipeline.IndexWriter.write = measured  # type: ignore[method-assign]
    warm = ray.remote(Warm).options(num_cpus=0).remote()
    ray.get(warm.ping.remote())
    ray.kill(warm)
    base = status_kb("VmRSS")
    build_index_ray(
        corpus,
        out,
        ModelSource(WIDE, None),
        BuildOptions(chunk_items=16, batch_size=16, workers=0),
        RayOptions(address=address, num_actors=2, shard_files=25),
    )


def test_the_driver_never_holds_the_corpus_vectors(cluster: str, tmp_path: Path) -> None:
    import json

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(WIDE_FILES):
        (corpus / f"t{i:05d}.txt").write_text(f"caption number {i}", encoding="utf-8")
    idx, record = tmp_path / "idx", tmp_path / "memory.json"
    code = (
        "from tests.test_index_ray import run_wide_driver; "
        f"run_wide_driver({str(corpus)!r}, {str(idx)!r}, {cluster!r}, {str(record)!r})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(idx / "meta.sqlite") as conn:  # every item merged and committed
        assert conn.execute("SELECT COUNT(*), MAX(id) FROM items").fetchone() == (500, 499)
    vector_bytes = WIDE_FILES * WIDE.embed_dim * 4
    memory = json.loads(record.read_text())
    growth = (memory["peak"] - memory["base"]) * 1024
    # A driver that received the vectors, or read the staged shards at once, would grow by
    # the corpus's 131 MB; this one holds one shard (6.5 MB of vectors) and a chunk (4 MB):
    # about 27 MB measured (allocator slack included).
    assert growth < vector_bytes / 3, (growth, vector_bytes)


# --- what a user reads ---------------------------------------------------------------------------


def test_cli_output_has_no_ray_chatter_and_a_real_model_busy_figure(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (100 * i, 200, 30)).save(corpus / f"img{i}.png")
    (corpus / "caption.txt").write_text("a red square", encoding="utf-8")
    # RAY_ADDRESS=local: a new local instance, whatever runs on the machine (so Ray's notice
    # about token authentication is due too).
    env = {**os.environ, "RAY_ADDRESS": "local"}
    cmd = [sys.executable, "-m", "bindsearch", "index", "build", str(corpus)]
    cmd += ["-o", str(tmp_path / "idx"), "--engine", "ray", "--checkpoint", "none"]
    cmd += ["--config", "imagebind_test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "embedded 3 items from 3 files" in out
    assert re.search(r"^shards: [1-9]\d* built, 0 reused$", out, re.MULTILINE), out
    assert "core_worker" not in out and "Token authentication" not in out, out
    busy = re.search(r"model busy ([0-9.]+) s", out)
    assert busy is not None and float(busy[1]) > 0, out  # the actors' time in Encoder.embed


# --- without Ray ----------------------------------------------------------------------------------


def test_without_ray_the_engine_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, reference: tuple[Path, Path]
) -> None:
    corpus, _ = reference
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    r = CliRunner().invoke(
        index_app,
        [
            "build",
            str(corpus),
            "-o",
            str(tmp_path / "idx"),
            "--engine",
            "ray",
            "--checkpoint",
            "none",
            "--config",
            "imagebind_test",
        ],
    )
    assert r.exit_code == 1
    assert r.stderr.startswith("error: the ray engine needs Ray: pip install 'bindsearch[ray]'")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.output
    assert not (tmp_path / "idx").exists()
    with pytest.raises(RayUnavailable, match=r"bindsearch\[ray\]"):
        build_index_ray(corpus, tmp_path / "idx", ModelSource(CONFIG, None))


def test_a_gpu_model_on_a_cluster_without_gpus_is_refused(
    cluster: str, reference: tuple[Path, Path], checkpoint: Path, tmp_path: Path
) -> None:
    corpus, _ = reference
    with pytest.raises(IndexStoreError, match="has no GPUs"):
        build_index_ray(corpus, tmp_path / "idx", ModelSource(CONFIG, checkpoint, device="cuda"))


def test_ray_options_need_the_ray_engine(tmp_path: Path, reference: tuple[Path, Path]) -> None:
    corpus, _ = reference
    for extra in (["--address", "auto"], ["--ray-num-actors", "2"], ["--shard-files", "8"]):
        r = CliRunner().invoke(
            index_app,
            [
                "build",
                str(corpus),
                "-o",
                str(tmp_path / "i"),
                "--checkpoint",
                "none",
                "--config",
                "imagebind_test",
                *extra,
            ],
        )
        assert r.exit_code == 1 and "need --engine ray" in r.stderr
    r = CliRunner().invoke(
        index_app, ["build", str(corpus), "-o", str(tmp_path / "i"), "--engine", "spark"]
    )
    assert r.exit_code == 2 and "local" in r.output and "ray" in r.output
