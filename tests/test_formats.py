"""The format registry (``encoders.formats``), and the agreement the issue asks for: every file
gets the same modality, or the same refusal, from ``index build``, ``/v1/search``, ``bindsearch
embed`` and ``bindsearch index query``, none of them told the modality."""

from __future__ import annotations

import base64
import io
import json
from fractions import Fraction
from pathlib import Path

import av
import av.audio.stream
import av.video.stream
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from bindsearch.cli import app
from encoders import Encoder, Modality, load_encoder
from encoders.config import resolve_config
from encoders.formats import (
    Detection,
    UnsupportedFormat,
    audio_demuxer,
    content_format,
    detect,
    name_hint,
    video_demuxer,
)
from index import open_index
from service import FakeEmbedder, Item, MemorySearcher

from .test_index_media import audio, image, imu_csv, tone, video, write_test_checkpoint
from .test_service import serve

runner = CliRunner()


def npy(shape: tuple[int, ...], dtype: str = "float32", fill: float = 1.5) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.full(shape, fill, dtype))
    return buf.getvalue()


def png(mode: str, size: int = 32, seed: int = 0) -> bytes:
    """A PNG of a Pillow mode: RGB, P (palette), L (8-bit grey), I;16 (16-bit grey)."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(500, 5000, (size, size)).astype(np.uint16))
    else:
        im = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def ftyp(brand: bytes, compatible: bytes = b"") -> bytes:
    body = brand + b"\x00\x00\x00\x00" + compatible
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\x00" * 64


# --- the registry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "fmt", "modality"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg", "vision"),
        (png("RGB"), "png", "vision"),
        (b"GIF89a", "gif", "vision"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp", "vision"),
        (b"BM" + b"\x00" * 12 + b"\x28\x00\x00\x00", "bmp", "vision"),
        (b"II*\x00", "tiff", "vision"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "wav", "audio"),
        (b"fLaC\x00", "flac", "audio"),
        (b"OggS\x00", "ogg", "audio"),
        (b"ID3\x03", "mp3", "audio"),
        (b"\xff\xfb\x90\x00", "mp3", "audio"),
        (b"\xff\xf1\x50\x80", "aac", "audio"),
        (b"FORM\x00\x00\x00\x00AIFF", "aiff", "audio"),
        (ftyp(b"M4A "), "m4a", "audio"),
        (ftyp(b"isom", b"iso2mp41"), "mp4", "video"),
        (b"\x00\x00\x00\x08moov", "mp4", "video"),
        (b"\x1a\x45\xdf\xa3\x00", "matroska", "video"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "avi", "video"),
    ],
)
def test_content_decides_the_family(head: bytes, fmt: str, modality: str) -> None:
    data = head + b"\x01" * 32
    assert content_format(data) == fmt
    assert detect(data) == Detection(Modality(modality), fmt)
    assert detect(data, "misleading.txt").modality == modality  # the extension never decides


def test_png_rule_and_name_hints(tmp_path: Path) -> None:
    assert detect(png("I;16")).modality is Modality.DEPTH
    for mode in ("RGB", "P", "L"):
        assert detect(png(mode)).modality is Modality.VISION
    grey = png("L")
    assert detect(grey, "scan.depth.png").modality is Modality.DEPTH
    assert detect(grey, "night.thermal.png").modality is Modality.THERMAL
    assert detect(png("I;16"), "night.thermal.png").modality is Modality.THERMAL
    assert detect(grey, "photo.imu.png").modality is Modality.VISION  # imu: .npy and CSV only
    # Folders: below the root for a corpus, the file's own folder otherwise.
    (tmp_path / "thermal" / "a").mkdir(parents=True)
    deep = tmp_path / "thermal" / "a" / "x.png"
    deep.write_bytes(grey)
    assert detect(deep, root=tmp_path).modality is Modality.THERMAL
    assert detect(deep).modality is Modality.VISION
    assert detect(deep, root=tmp_path / "thermal").modality is Modality.VISION
    assert name_hint("thermal/x.png") is Modality.THERMAL
    assert name_hint("walk.IMU.csv") is Modality.IMU
    assert name_hint("depth.png") is None  # a stem is not a hint


def test_npy_rule() -> None:
    assert detect(npy((32, 32))).modality is Modality.DEPTH
    assert detect(npy((1, 32, 32))).modality is Modality.DEPTH
    assert detect(npy((32, 32, 1))).modality is Modality.DEPTH
    for shape in ((2000, 6), (6, 500), (300, 7), (7, 300), (9, 6)):
        assert detect(npy(shape)).modality is Modality.IMU, shape
    assert detect(npy((8, 6))).modality is Modality.DEPTH  # too short for a trace
    assert detect(npy((32, 32)), "frame.thermal.npy").modality is Modality.THERMAL
    assert detect(npy((300, 6)), "imu/trace.npy").modality is Modality.IMU
    refused = detect(npy((2, 2, 2)))
    assert refused.modality is None and refused.format == "npy"
    assert "(2, 2, 2)" in str(refused.reason) and "(T, 6)" in str(refused.reason)
    with pytest.raises(UnsupportedFormat, match=r"unsupported \.npy shape"):
        refused.require()
    assert "malformed .npy header" in str(detect(b"\x93NUMPY\x01\x00garbage").reason)


def test_text_rule() -> None:
    csv_text = b"t,ax,ay,az,gx,gy,gz\n0,1,2,3,4,5,6\n"
    assert detect(b"a red ring", "caption.txt").modality is Modality.TEXT
    assert detect(b"# notes", "README.md").modality is Modality.TEXT
    assert detect(csv_text, "walk.csv").modality is Modality.IMU
    assert detect(csv_text, "imu/walk.dat").modality is Modality.IMU
    manifest = detect(b"path,caption\na.png,a cat\n", "list.csv")
    assert manifest.modality is None and "manifest" in str(manifest.reason)
    for name in (None, "notes.xyz", "noext"):
        found = detect(csv_text, name)
        assert found.modality is None and "unsupported file type (text" in str(found.reason)
    # A UTF-8 character cut at the end of the head is still text.
    assert content_format(("é" * 3000).encode()[:4095]) == "text"
    assert content_format(b"\x00\x01binary") == "unknown"
    assert content_format(b"BMW cars are fast") == "text"  # not a BMP: no info header


def test_iso_bmff_audio_video_and_images() -> None:
    assert detect(ftyp(b"isom"), "song.m4a").modality is Modality.AUDIO
    assert detect(ftyp(b"M4B ")).modality is Modality.AUDIO
    assert detect(b"\x1a\x45\xdf\xa3\x00" * 8, "song.mka").modality is Modality.AUDIO
    assert detect(b"\x1a\x45\xdf\xa3\x00" * 8, "song.weba").modality is Modality.AUDIO
    # HEIC/HEIF and AVIF are images, never video: vision only where the image loader reads them.
    from encoders.transforms.vision import ACCEPTED_FORMATS

    for brand, compatible, fmt in (
        (b"heic", b"mif1heic", "heif"),
        (b"mif1", b"mif1heic", "heif"),
        (b"avif", b"avifmif1", "avif"),
    ):
        found = detect(ftyp(brand, compatible), "photo.mp4")
        assert found.format == fmt
        assert found.modality is not Modality.VIDEO
        if fmt.upper() not in ACCEPTED_FORMATS:
            assert found.modality is None
            assert "image format is not supported" in str(found.reason)
        assert video_demuxer(ftyp(brand, compatible)) is None


def test_demuxers_and_empty_or_unreadable(tmp_path: Path) -> None:
    assert audio_demuxer(ftyp(b"M4A ")) == "mov"
    assert audio_demuxer(b"RIFF\x00\x00\x00\x00WAVEfmt ") == "wav"
    assert audio_demuxer(b"\xff\xf1\x50\x80") == "aac"
    assert audio_demuxer(b"\xff\xfb\x90\x00") == "mp3"
    assert audio_demuxer(b"#EXTM3U\nhttp://example.com/x.ts\n") is None  # never a playlist
    assert video_demuxer(ftyp(b"isom")) == "mov"
    assert video_demuxer(b"RIFF\x00\x00\x00\x00AVI LIST") == "avi"
    assert video_demuxer(b"\x1a\x45\xdf\xa3") == "matroska"
    assert video_demuxer(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert detect(b"").reason == "the file is empty (0 bytes)"
    assert "cannot read the file" in str(detect(tmp_path / "missing.png").reason)
    pdf = detect(b"%PDF-1.7\n\x00\x01")
    assert pdf.modality is None and "a PDF document" in str(pdf.reason)
    assert "accepted: images" in str(pdf.reason)


# --- the agreement ------------------------------------------------------------------------------


def _write_audio(path: Path, fmt: str, subtype: str | None = None) -> Path:
    sf.write(path, tone(len(path.name), 2.0), 16000, format=fmt, subtype=subtype)
    return path


def _av_audio(path: Path, container: str, codec: str, seed: int) -> Path:
    """Audio only, encoded by FFmpeg (M4A as `ipod`, audio-only Matroska)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        st = out.add_stream(codec, rate=48000 if codec == "libopus" else 16000, layout="mono")
        assert isinstance(st, av.audio.stream.AudioStream)
        rate = st.codec_context.sample_rate
        wave = tone(seed, 2.0, rate)[None]
        fmt = "flt" if codec == "libopus" else "fltp"
        for k in range(0, wave.shape[1], 960):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(wave[:, k : k + 960]), format=fmt, layout="mono"
            )
            frame.sample_rate, frame.time_base, frame.pts = rate, Fraction(1, rate), k
            out.mux(st.encode(frame))
        out.mux(st.encode())
    path.write_bytes(buf.getvalue())
    return path


def _av_video(path: Path, container: str, codec: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    base = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        vs = out.add_stream(codec, rate=5)
        assert isinstance(vs, av.video.stream.VideoStream)
        vs.width, vs.height, vs.pix_fmt = 48, 48, "yuv420p"
        for i in range(10):
            img = np.asarray(Image.fromarray(np.roll(base, i // 5, axis=1)).resize((48, 48)))
            out.mux(vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), "rgb24")))
        out.mux(vs.encode())
    path.write_bytes(buf.getvalue())
    return path


def _image(path: Path, fmt: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    grid = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(grid).resize((64, 64), Image.Resampling.BICUBIC).save(path, fmt)
    return path


def agreement_corpus(root: Path) -> None:
    """One file of every kind the project accepts, the ambiguous ones, and refusals."""
    root.mkdir()
    for i, (name, fmt) in enumerate(
        [
            ("photo.jpg", "JPEG"),
            ("anim.gif", "GIF"),
            ("pic.webp", "WEBP"),
            ("pic.bmp", "BMP"),
            ("pic.tiff", "TIFF"),
        ]
    ):
        _image(root / name, fmt, seed=i)
    image(root / "rgb.png", seed=10)
    for mode, name in (("P", "palette.png"), ("L", "grey8.png"), ("I;16", "grey16.png")):
        (root / name).write_bytes(png(mode, size=64, seed=len(name)))
    (root / "scan.depth.png").write_bytes(png("L", size=64, seed=11))
    (root / "night.thermal.png").write_bytes(png("L", size=64, seed=12))
    (root / "lying.wav").write_bytes(png("RGB", size=64, seed=13))  # a PNG named .wav
    audio(root / "snd.wav", seed=20)
    _write_audio(root / "snd.flac", "FLAC")
    _write_audio(root / "snd.ogg", "OGG", "VORBIS")
    _write_audio(root / "snd.mp3", "MP3")
    _av_audio(root / "snd.m4a", "ipod", "aac", seed=21)
    _av_audio(root / "snd.mka", "matroska", "libopus", seed=22)
    video(root / "clip.mp4", seed=30)
    _av_video(root / "clip.webm", "webm", "libvpx", seed=31)
    _av_video(root / "clip.mkv", "matroska", "mpeg4", seed=32)
    _av_video(root / "clip.avi", "avi", "mpeg4", seed=33)
    rng = np.random.default_rng(40)
    np.save(root / "map_hw.npy", rng.uniform(0.5, 5.0, (32, 32)).astype(np.float32))
    np.save(root / "map_1hw.npy", rng.uniform(0.5, 5.0, (1, 32, 40)).astype(np.float32))
    np.save(root / "trace_t6.npy", rng.normal(size=(300, 6)).astype(np.float32))
    np.save(root / "trace_6t.npy", rng.normal(size=(6, 400)).astype(np.float32))
    np.save(root / "cube.npy", rng.normal(size=(2, 2, 2)).astype(np.float32))
    imu_csv(root / "walk.csv", seed=41)
    (root / "caption.txt").write_text("a red ring in the snow", encoding="utf-8")
    _image(root / "photo.avif", "AVIF", seed=50)  # Pillow writes AVIF; HEIC is made by hand
    (root / "photo.heic").write_bytes(ftyp(b"heic", b"mif1heic") + b"\x00" * 200)
    (root / "list.csv").write_text("path,caption\nphoto.jpg,a photo\n", encoding="utf-8")
    (root / "notes.xyz").write_text("some text without a known name", encoding="utf-8")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02 not a format")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Encoder]:
    """(corpus, index, checkpoint, encoder): the corpus built by ``bindsearch index build``."""
    tmp = tmp_path_factory.mktemp("agree")
    checkpoint = write_test_checkpoint(tmp / "test.safetensors")
    corpus, idx = tmp / "corpus", tmp / "idx"
    agreement_corpus(corpus)
    r = runner.invoke(
        app,
        [
            "index",
            "build",
            str(corpus),
            "-o",
            str(idx),
            "--checkpoint",
            str(checkpoint),
            "--config",
            "imagebind_test",
            "--workers",
            "0",
            "--no-soundtrack",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    return (
        corpus,
        idx,
        checkpoint,
        load_encoder(checkpoint, config=resolve_config("imagebind_test")),
    )


def _index_view(idx: Path) -> tuple[dict[str, str], dict[str, str], dict[str, np.ndarray]]:
    """path name -> modality (indexed), -> rejection reason, -> stored vector."""
    info = json.loads(runner.invoke(app, ["index", "info", str(idx), "--json"]).stdout)
    rejected = {Path(r["path"]).name: r["error"] for r in info["rejected"]}
    with open_index(idx) as s:
        rows = s.get(list(range(info["counts"]["items"])), ["id", "path", "modality"])
        found: dict[str, str] = {}
        vectors: dict[str, np.ndarray] = {}
        for row in rows:
            name = Path(row["path"]).name
            assert name not in found, f"{name}: more than one item"
            found[name] = row["modality"]
            vectors[name] = s.vector(int(row["id"]))
    return found, rejected, vectors


def test_every_path_gets_the_same_answer_everywhere(
    built: tuple[Path, Path, Path, Encoder],
) -> None:
    corpus, idx, checkpoint, encoder = built
    indexed, rejected, stored = _index_view(idx)
    names = sorted(p.name for p in corpus.iterdir())
    assert sorted([*indexed, *rejected]) == names  # every file is either indexed or rejected
    expected = {
        **dict.fromkeys(["photo.jpg", "anim.gif", "pic.webp", "pic.bmp", "pic.tiff"], "vision"),
        **dict.fromkeys(["rgb.png", "palette.png", "grey8.png", "lying.wav"], "vision"),
        **dict.fromkeys(["grey16.png", "scan.depth.png", "map_hw.npy", "map_1hw.npy"], "depth"),
        "night.thermal.png": "thermal",
        **dict.fromkeys(["snd.wav", "snd.flac", "snd.ogg", "snd.mp3", "snd.m4a"], "audio"),
        "snd.mka": "audio",
        **dict.fromkeys(["clip.mp4", "clip.webm", "clip.mkv", "clip.avi"], "video"),
        **dict.fromkeys(["trace_t6.npy", "trace_6t.npy", "walk.csv"], "imu"),
        "caption.txt": "text",
    }
    assert indexed == expected
    refused = {"cube.npy", "photo.avif", "photo.heic", "list.csv", "notes.xyz", "blob.bin"}
    assert set(rejected) == refused
    for name in refused:  # the index recorded the registry's own reason
        assert rejected[name] == detect(corpus / name, root=corpus).reason

    # (b) /v1/search, multipart, no modality: the upload's file name is the only hint.
    fake = FakeEmbedder(8)
    searcher = MemorySearcher(np.eye(8, dtype=np.float32)[:1], [Item(0, Modality.VISION, None)])
    with serve(searcher, fake, max_upload_bytes=1 << 24) as c:
        for name in names:
            data = (corpus / name).read_bytes()
            r = c.post("/v1/search", files={"file": (name, data)})
            if name in expected:
                assert r.status_code == 200, (name, r.text)
                assert r.json()["query"]["terms"][0]["modality"] == expected[name], name
            else:
                assert r.status_code == 415, (name, r.text)
                assert rejected[name] in r.json()["error"]["message"], name
            # The web page sends base64 JSON with the file name: the same answer.
            body = {"data": base64.b64encode(data).decode(), "filename": name}
            rj = c.post("/v1/search", json=body)
            assert rj.status_code == r.status_code, (name, rj.text)

    # (c) bindsearch embed, no -m: all accepted files in one call (mixed modalities, in order),
    # each vector the one the index stored for that file; each refusal the same reason.
    accepted = sorted(expected)
    embed = ["embed", "--checkpoint", str(checkpoint), "--config", "imagebind_test", "--json"]
    r = runner.invoke(app, [*embed, "--", *[str(corpus / n) for n in accepted]])
    assert r.exit_code == 0, r.output
    vectors = np.asarray(json.loads(r.stdout), np.float32)
    for name, v in zip(accepted, vectors, strict=True):
        np.testing.assert_allclose(v, stored[name], atol=2e-5, err_msg=name)
    for name in sorted(refused):
        r = runner.invoke(app, [*embed, "--", str(corpus / name)])
        assert r.exit_code == 1, (name, r.output)
        assert rejected[name] in r.output.replace("\n", " "), name

    # (d) bindsearch index query, no -m: the top hit is the file itself, at score 1.
    with open_index(idx) as s:
        ids_by_name = {Path(row["path"]).name: row["id"] for row in s.get(list(range(len(stored))))}
    for name in names:
        r = runner.invoke(
            app, ["index", "query", str(idx), str(corpus / name), "-k", "1", "--json"]
        )
        if name in refused:
            assert r.exit_code == 1, (name, r.output)
            assert rejected[name] in r.output.replace("\n", " "), name
            continue
        assert r.exit_code == 0, (name, r.output)
        (hit,) = json.loads(r.stdout)
        assert hit["id"] == ids_by_name[name] and hit["score"] == pytest.approx(1.0, abs=1e-4)
    assert encoder.dim == vectors.shape[1]


def test_index_query_photo_without_modality(built: tuple[Path, Path, Path, Encoder]) -> None:
    corpus, idx, _, _ = built
    r = runner.invoke(app, ["index", "query", str(idx), str(corpus / "photo.jpg"), "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)
    assert Path(hits[0]["path"]).name == "photo.jpg"
    r = runner.invoke(app, ["index", "query", str(idx), str(corpus / "nothere.png")])
    assert r.exit_code == 1 and "no such file" in r.output
    for cmd in (["index", "query"], ["index", "build"], ["embed"]):
        r = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
        text = " ".join(r.output.replace("│", " ").split())
        assert "16-bit greyscale PNG is depth" in text, cmd


def test_uploads_use_the_registry_with_their_names() -> None:
    searcher = MemorySearcher(np.eye(8, dtype=np.float32)[:1], [Item(0, Modality.VISION, None)])
    with serve(searcher, FakeEmbedder(8)) as c:

        def modality(**kwargs: object) -> str:
            r = c.post("/v1/search", **kwargs)  # type: ignore[arg-type]
            assert r.status_code == 200, r.text
            return str(r.json()["query"]["terms"][0]["modality"])

        grey = png("L")
        assert modality(files={"file": ("x.png", grey)}) == "vision"
        assert modality(files={"file": ("x.thermal.png", grey)}) == "thermal"
        b64 = base64.b64encode(grey).decode()
        assert modality(json={"data": b64, "filename": "x.thermal.png"}) == "thermal"
        assert modality(json={"data": b64, "filename": "x.png", "modality": "depth"}) == "depth"
        # A text file is text, as in the index; its content is what gets embedded.
        assert modality(files={"file": ("note.txt", b"a red ring")}) == "text"
        r = c.post("/v1/embed", files={"file": ("note.txt", b"a red ring")})
        assert r.status_code == 200, r.text
        want = FakeEmbedder(8).vector_for("text", "a red ring")
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], want, atol=1e-6)
        r = c.post("/v1/search", files={"file": ("note.txt", b"\x00\x01bad")})
        assert r.status_code == 415  # not text at all: refused by the registry
        r = c.post("/v1/search", files={"file": ("note.txt", b"   ")})
        assert r.status_code == 422 and "holds no text" in r.text
        # A data URI's MIME type does not pick the modality: the content does.
        uri = "data:image/png;base64," + base64.b64encode(png("I;16")).decode()
        r = c.post("/v1/embeddings", json={"input": [uri], "model": "m"})
        assert r.status_code == 200, r.text
        r = c.post("/v1/embed", json={"inputs": [{"data": base64.b64encode(png("I;16")).decode()}]})
        assert r.json()["data"][0]["modality"] == "depth"
        # No name, text content: nothing says what it is.
        r = c.post("/v1/embed", json={"inputs": [{"data": base64.b64encode(b"hello").decode()}]})
        assert r.status_code == 415 and "give `modality`" in r.text
