"""Generated media for the index tests (images, audio, video, IMU, depth, thermal, text, junk),
and the tests of corpus scanning: modality from content and name, manifests, order."""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import av
import av.video.stream
import numpy as np
import pytest
import soundfile as sf
from PIL import Image, ImageEnhance

from encoders import Modality
from index import CorpusError, scan_corpus, scan_paths

# --- media -------------------------------------------------------------------------------------


def image(path: Path, seed: int, size: int = 96) -> Path:
    """A smooth random picture (an 8x8 colour grid, upscaled): distinct per seed."""
    rng = np.random.default_rng(seed)
    grid = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC).save(path)
    return path


def altered_copy(src: Path, dst: Path) -> Path:
    """The same picture, slightly brighter and re-encoded as JPEG: other bytes, same scene."""
    with Image.open(src) as im:
        ImageEnhance.Brightness(im.convert("RGB")).enhance(1.04).save(dst, quality=92)
    return dst


def tone(seed: int, seconds: float, rate: int = 16000) -> np.ndarray:
    """A chord of three random partials with a slow tremolo: distinct per seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    freqs = rng.uniform(150, 3000, 3)
    wave = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs)
    wave = wave * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    return (0.2 * wave).astype(np.float32)


def audio(path: Path, seed: int, seconds: float = 3.0, rate: int = 16000) -> Path:
    sf.write(path, tone(seed, seconds, rate), rate)
    return path


def reencoded_audio(src: Path, dst: Path) -> Path:
    """The same clip re-encoded as Ogg Vorbis (lossy): other bytes, same sound."""
    wave, rate = sf.read(src, dtype="float32")
    sf.write(dst, wave, rate, format="OGG", subtype="VORBIS")
    return dst


def video(
    path: Path,
    seed: int,
    seconds: float = 2.0,
    fps: int = 5,
    size: int = 48,
    audio_seed: int | None = None,
) -> Path:
    """A small MP4 (H.264) of a drifting colour field, with an AAC soundtrack if asked."""
    rng = np.random.default_rng(seed)
    base = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps)
        assert isinstance(vs, av.video.stream.VideoStream)
        vs.width, vs.height, vs.pix_fmt = size, size, "yuv420p"
        aus = out.add_stream("aac", rate=16000, layout="mono") if audio_seed is not None else None
        for i in range(int(seconds * fps)):
            img = np.asarray(Image.fromarray(np.roll(base, i // fps, axis=1)).resize((size, size)))
            out.mux(vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), "rgb24")))
        out.mux(vs.encode())
        if aus is not None and audio_seed is not None:
            wave = tone(audio_seed, seconds)[None]
            for k in range(0, wave.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(wave[:, k : k + 1024]), format="fltp", layout="mono"
                )
                af.sample_rate = 16000
                af.time_base = Fraction(1, 16000)
                af.pts = k
                out.mux(aus.encode(af))
            out.mux(aus.encode())
    path.write_bytes(buf.getvalue())
    return path


def imu_csv(path: Path, seed: int, rows: int = 400) -> Path:
    rng = np.random.default_rng(seed)
    data = np.cumsum(rng.normal(size=(rows, 6)), axis=0) * 0.05
    t = np.arange(rows) / 200.0
    lines = ["t,ax,ay,az,gx,gy,gz"] + [
        ",".join(f"{v:.5f}" for v in (ti, *row)) for ti, row in zip(t, data, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def depth_png(path: Path, seed: int, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    grid = rng.uniform(500, 5000, (4, 4))
    im = Image.fromarray(grid.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    Image.fromarray(np.asarray(im).astype(np.uint16)).save(path)
    return path


def thermal_png(path: Path, seed: int, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    grid = (rng.random((4, 4)) * 255).astype(np.uint8)
    Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR).save(path)
    return path


def junk(folder: Path) -> dict[str, str]:
    """Bad files, and a word each that their rejection reason must contain."""
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.xyz").write_bytes(b"\x00\x01\x02binary stuff")
    (folder / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return {"broken.jpg": "", "empty.wav": "empty", "notes.xyz": "unsupported", "cut.png": ""}


def mixed_corpus(root: Path, with_junk: bool = True) -> dict[str, Path]:
    """Images (one with an altered copy and one exact duplicate), audio (one re-encoded copy),
    text, IMU, depth and thermal files, and junk."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "photos").mkdir()
    (root / "sounds").mkdir()
    (root / "depth").mkdir()
    (root / "thermal").mkdir()
    f: dict[str, Path] = {}
    for i in range(6):
        f[f"img{i}"] = image(root / "photos" / f"img{i}.png", seed=i)
    f["img0_altered"] = altered_copy(f["img0"], root / "photos" / "zz_img0_altered.jpg")
    f["img1_dup"] = root / "photos" / "zz_img1_copy.png"
    f["img1_dup"].write_bytes(f["img1"].read_bytes())
    for i in range(4):
        f[f"snd{i}"] = audio(root / "sounds" / f"snd{i}.wav", seed=100 + i)
    f["snd0_reenc"] = reencoded_audio(f["snd0"], root / "sounds" / "zz_snd0.ogg")
    f["txt"] = root / "caption.txt"
    f["txt"].write_text("a photo of a red square")
    f["imu"] = imu_csv(root / "walk.imu.csv", seed=7)
    f["depth"] = depth_png(root / "depth" / "room.png", seed=8)
    f["thermal"] = thermal_png(root / "thermal" / "night.png", seed=9)
    if with_junk:
        (root / "junk").mkdir()
        junk(root / "junk")
    return f


# --- scanning -----------------------------------------------------------------------------------


def test_folder_scan_sniffs_modalities_in_sorted_order(tmp_path: Path) -> None:
    files = mixed_corpus(tmp_path / "c")
    (tmp_path / "c" / ".hidden.png").write_bytes(files["img0"].read_bytes())
    entries = scan_corpus(tmp_path / "c")
    by_name = {e.path.name: e for e in entries}
    assert ".hidden.png" not in by_name
    rel = [e.path.relative_to((tmp_path / "c").resolve()).as_posix() for e in entries]
    assert rel == sorted(rel)
    assert by_name["img0.png"].modality is Modality.VISION
    assert by_name["zz_img0_altered.jpg"].modality is Modality.VISION
    assert by_name["snd0.wav"].modality is Modality.AUDIO
    assert by_name["zz_snd0.ogg"].modality is Modality.AUDIO
    assert by_name["caption.txt"].modality is Modality.TEXT
    assert by_name["walk.imu.csv"].modality is Modality.IMU
    assert by_name["room.png"].modality is Modality.DEPTH  # depth/ folder (and 16-bit grey)
    assert by_name["night.png"].modality is Modality.THERMAL  # thermal/ folder
    assert by_name["notes.xyz"].modality is None
    assert "unsupported" in str(by_name["notes.xyz"].error)
    assert "empty" in str(by_name["empty.wav"].error)


def test_content_wins_over_extension(tmp_path: Path) -> None:
    png = image(tmp_path / "a.png", 1)
    fake = tmp_path / "really_a_png.wav"
    fake.write_bytes(png.read_bytes())
    vid = video(tmp_path / "clip.bin", 1)
    arr = tmp_path / "trace.npy"
    np.save(arr, np.zeros((300, 6), np.float32))
    grey16 = depth_png(tmp_path / "anywhere.png", 2)
    got = {e.path.name: e.modality for e in scan_paths([fake, vid, arr, grey16])}
    assert got == {
        "really_a_png.wav": Modality.VISION,
        "clip.bin": Modality.VIDEO,
        "trace.npy": Modality.IMU,
        "anywhere.png": Modality.DEPTH,
    }


def test_manifests_csv_and_jsonl(tmp_path: Path) -> None:
    image(tmp_path / "a.png", 1)
    audio(tmp_path / "b.wav", 2)
    (tmp_path / "m.csv").write_text(
        "path,modality,caption,tags\n"
        "a.png,vision,a red thing,red;thing\n"
        "b.wav,,some chord,music|chord\n"
        "missing.png,vision,,\n"
        "a.png,vision,again,\n"
        "b.wav,smell,,\n"
    )
    e = scan_corpus(tmp_path / "m.csv")
    assert [x.path.name for x in e] == ["a.png", "b.wav", "missing.png"]  # first row wins
    assert e[0].caption == "a red thing" and e[0].tags == ("red", "thing")
    assert e[1].modality is Modality.AUDIO and e[1].tags == ("music", "chord")
    assert e[2].error == "no such file"
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "a.png", "modality": "vision", "tags": ["x"]})
        + "\n"
        + "{not json\n"
        + json.dumps({"path": "b.wav", "modality": "smell"})
        + "\n"
    )
    e = scan_corpus(tmp_path / "m.jsonl")
    assert e[0].tags == ("x",) and e[0].modality is Modality.VISION
    assert "not valid JSON" in str(e[1].error)
    assert "unknown modality 'smell'" in str(e[2].error)


def test_unusable_corpus_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        scan_corpus(tmp_path / "nope")
    (tmp_path / "plain.csv").write_text("1,2,3\n")
    with pytest.raises(CorpusError, match="neither a folder nor a manifest"):
        scan_corpus(tmp_path / "plain.csv")


# --- the test model -----------------------------------------------------------------------------


def write_test_checkpoint(path: Path) -> Path:
    """``imagebind_test`` random weights with position embeddings and class tokens zeroed.

    Plain random weights map every input of a modality to nearly the same vector (position
    embeddings dominate the tiny towers); without them the towers see the content, so distinct
    files get distinct vectors and near-duplicates stay close: what search tests need.
    """
    import torch
    from safetensors.torch import save_file

    from encoders import load_encoder

    enc = load_encoder(config="imagebind_test")
    with torch.no_grad():
        for name, p in enc.model.named_parameters():
            if name.endswith(("pos_embed", "cls_token")):
                p.zero_()
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(path))
    return path
