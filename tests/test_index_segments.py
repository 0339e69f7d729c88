"""Long audio and video become time segments; a video's soundtrack is audio of the same file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from bindsearch.cli import app
from encoders import Encoder, load_encoder
from encoders.config import resolve_config
from encoders.transforms.audio import load_audio
from encoders.transforms.video import iter_video_segments, load_video
from index import BuildOptions, ModelSource, build_index, open_index, verify_index
from index._decode import segment_spans

from .test_index_media import tone, video, write_test_checkpoint

CONFIG = resolve_config("imagebind_test")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_checkpoint(tmp_path_factory.mktemp("model") / "test.safetensors")


@pytest.fixture(scope="module")
def encoder(checkpoint: Path) -> Encoder:
    return load_encoder(checkpoint, config=CONFIG)


def test_segment_spans() -> None:
    assert segment_spans(14.9, 10) == [(0.0, 14.9)]  # up to 1.5 windows: one item
    assert segment_spans(25.0, 10) == [(0, 10), (10, 20), (20, 25.0)]
    assert segment_spans(24.0, 10) == [(0, 10), (10, 24.0)]  # a short tail joins the last
    assert segment_spans(100.0, 0) == [(0.0, 100.0)]  # window 0: never split


def test_whole_video_segment_equals_load_video(tmp_path: Path) -> None:
    path = video(tmp_path / "v.mp4", seed=3, seconds=3.0)
    cfg = CONFIG.preprocess
    whole = load_video(path, cfg)
    from encoders.transforms.video import probe_video

    (seg,) = iter_video_segments(path, cfg, [(0.0, probe_video(path).duration)])
    assert torch.equal(seg, whole)


def test_long_audio_and_video_become_segments(
    tmp_path: Path, checkpoint: Path, encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One video segment per decode task: film.mp4's second segment comes from a later part.
    monkeypatch.setattr("index._decode.VIDEO_SEGMENTS_PER_PART", 1)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rate = 16000
    parts = [tone(200 + i, 2.0) for i in range(3)]  # three distinct 2 s sounds
    sf.write(corpus / "long.wav", np.concatenate(parts), rate)
    video(corpus / "film.mp4", seed=5, seconds=4.0, audio_seed=300)
    video(corpus / "mute.mp4", seed=6, seconds=1.0)
    summary = build_index(
        corpus,
        tmp_path / "idx",
        ModelSource(CONFIG, checkpoint, encoder=encoder),
        BuildOptions(segment_seconds=2.0, batch_size=4),
    )
    assert summary.items_by_modality == {"audio": 5, "video": 3}
    with open_index(tmp_path / "idx") as s:
        rows = s.get(range(8), ["path", "modality", "start_s", "end_s", "duration_s"])
        by = [(Path(r["path"]).name, r["modality"], r["start_s"], r["end_s"]) for r in rows]
        assert by == [
            ("film.mp4", "video", 0.0, 2.0),  # the video's segments, then its soundtrack's
            ("film.mp4", "video", 2.0, 4.0),
            ("film.mp4", "audio", 0.0, 2.0),
            ("film.mp4", "audio", 2.0, pytest.approx(4.0, abs=0.1)),
            ("long.wav", "audio", 0.0, 2.0),
            ("long.wav", "audio", 2.0, 4.0),
            ("long.wav", "audio", 4.0, 6.0),
            ("mute.mp4", "video", 0.0, 1.0),
        ]
        assert rows[4]["duration_s"] == 6.0
        assert rows[0]["duration_s"] == rows[1]["duration_s"] == 4.0
        # The middle sound of long.wav finds its own segment first.
        q = encoder.embed("audio", load_audio((parts[1], rate), CONFIG.preprocess)[None])
        hit = s.search(q, 1, targets=["audio"])[0][0]
        it = hit.item
        assert (Path(str(it.path)).name, it.start, it.end) == ("long.wav", 2.0, 4.0)
    assert verify_index(tmp_path / "idx").ok
    sf.write(tmp_path / "q.wav", parts[2], rate)
    r = CliRunner().invoke(
        app,
        [
            "index",
            "query",
            str(tmp_path / "idx"),
            str(tmp_path / "q.wav"),
            "-m",
            "audio",
            "-k",
            "1",
            "--target",
            "audio",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "long.wav  00:04–00:06" in r.stdout


def test_segment_window_is_fixed_for_an_index(
    tmp_path: Path, checkpoint: Path, encoder: Encoder
) -> None:
    from index import SettingsMismatch

    (tmp_path / "c").mkdir()
    sf.write(tmp_path / "c" / "a.wav", tone(1, 1.0), 16000)
    m = ModelSource(CONFIG, checkpoint, encoder=encoder)
    build_index(tmp_path / "c", tmp_path / "idx", m, BuildOptions(segment_seconds=2.0))
    with pytest.raises(SettingsMismatch, match=r"segment_seconds=2\.0"):
        build_index(tmp_path / "c", tmp_path / "idx", m, BuildOptions(segment_seconds=5.0))
