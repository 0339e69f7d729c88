"""Malformed and hostile uploads against the app with the real (tiny, random) model.

Each one must get a 200 or a 4xx whose JSON body says what was wrong; never a 5xx; and the
service must still answer afterwards. Every file is sent with each modality declared (and
sniffed), as multipart and as base64 JSON.
"""

from __future__ import annotations

import base64
import io
import struct
import wave
import zlib
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from fastapi.testclient import TestClient
from PIL import Image

from encoders import Modality, load_encoder
from service.app import create_app
from service.embedders import TorchEmbedder
from service.searchers import Item, MemorySearcher
from service.settings import ServiceSettings

from .test_service import wait_ready

MODALITIES = [None, "vision", "video", "audio", "depth", "thermal", "imu"]


def _png(w: int, h: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, fmt)
    return buf.getvalue()


def _png_claiming(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels over a tiny compressed body (a pixel bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * (1 << 16), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _wav(rate: int = 16000, n: int = 16000, channels: int = 1, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(b"\x00" * (n * channels * width))
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def _mp4(w: int, h: int, frames: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"  # type: ignore[union-attr]
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.zeros((h, w, 3), np.uint8), format="rgb24")
            out.mux(s.encode(frame))  # type: ignore[union-attr]
        out.mux(s.encode())  # type: ignore[union-attr]
    return buf.getvalue()


def _sound(fmt: str, subtype: str, rate: int, nan: bool = False) -> bytes:
    x = np.full((rate // 2, 1), np.nan if nan else 0.0, np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _lying_wav() -> bytes:
    data = bytearray(_wav())
    data[40:44] = struct.pack("<I", 0xFFFFFFF0)  # the data chunk claims 4 GB
    return bytes(data)


def _huge_npy_header() -> bytes:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000, 6), }"
    header = header.ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()


HOSTILE: dict[str, bytes] = {
    "zeros": b"\x00" * 1000,
    "random": np.random.default_rng(0).bytes(5000),
    "truncated_png": _png(64, 64)[:50],
    "pixel_bomb_png": _png_claiming(100_000, 100_000),
    "png_1x1": _png(1, 1),
    "png_20000x1": _png(20_000, 1),
    "png_la": _png(8, 8, "LA"),
    "png_16bit": _png(8, 8, "I;16"),
    "cmyk_jpeg": _png(16, 16, "CMYK", "JPEG"),
    "gif": _png(16, 16, "P", "GIF"),
    "tiff_float": _png(8, 8, "F", "TIFF"),
    "wav_header_only": _wav(n=0),
    "wav_4mhz": _wav(rate=4_000_000, n=10),
    "wav_8ch": _wav(channels=8),
    "wav_truncated": _wav()[:60],
    "wav_1_sample": _wav(n=1),
    "wav_24bit": _wav(width=3),
    "wav_lying_size": _lying_wav(),
    "wav_float_nan": _sound("WAV", "FLOAT", 16000, nan=True),
    "ogg": _sound("OGG", "VORBIS", 22050),
    "npy_object_pickle": _npy(np.array([{"a": 1}], dtype=object)),
    "npy_nan": _npy(np.full((200, 6), np.nan, np.float32)),
    "npy_inf": _npy(np.full((32, 32), np.inf, np.float32)),
    "npy_4d": _npy(np.zeros((2, 2, 2, 2), np.float32)),
    "npy_empty": _npy(np.zeros((0, 6), np.float32)),
    "npy_complex": _npy(np.zeros((200, 6), np.complex64)),
    "npy_huge_shape": _huge_npy_header(),
    "csv_bad": b"a,b\nx,y\n",
    "mp4_truncated": _mp4(64, 64, 3)[:400],
    "mp4_no_frames": _mp4(64, 64, 0),
    "mp4_2px": _mp4(2, 2, 3),
    "hls_playlist": b"#EXTM3U\n#EXT-X-TARGETDURATION:10\nfile:///etc/passwd\n",
    "svg": b"<svg xmlns='http://www.w3.org/2000/svg'></svg>",
    "utf16_text": "hello".encode("utf-16"),
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    enc = load_encoder(None, config="imagebind_test")
    items = [Item(0, Modality.VISION, None), Item(1, Modality.AUDIO, None)]
    vectors = np.random.default_rng(0).standard_normal((2, enc.dim))
    searcher = MemorySearcher(vectors, items, root=tmp_path_factory.mktemp("media"))
    settings = ServiceSettings(max_pixels=4_000_000, max_audio_seconds=60, decode_workers=2)
    app = create_app(settings, TorchEmbedder(enc, "test", "none"), searcher)
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(app)
        yield c


def _check(r: object, what: str) -> None:
    status = r.status_code  # type: ignore[attr-defined]
    assert status < 500, (what, status, r.text)  # type: ignore[attr-defined]
    if status >= 400:
        err = r.json()["error"]  # type: ignore[attr-defined]
        assert len(err["message"]) >= 15, (what, err)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_upload_is_answered(client: TestClient, name: str) -> None:
    data = HOSTILE[name]
    for m in MODALITIES:
        form = {"modality": m} if m else {}
        _check(client.post("/v1/search", files={"file": (name, data)}, data=form), f"{m} mp")
        body = {"data": base64.b64encode(data).decode(), "modality": m or "vision"}
        _check(client.post("/v1/search", json=body), f"{m} json")
    assert client.get("/healthz").status_code == 200


BAD_JSON = [
    b'{"text": "' + b"a" * 100_000 + b'"}',
    b"[" * 50_000 + b"]" * 50_000,
    b'{"item_id": 99999999999999999999999}',
    b'{"item_id": -1}',
    b'{"terms": [{"text": "a", "weight": "nan"}]}',
    b'{"text": "a", "k": 0}',
    b'{"text": "\\ud800"}',
    b'{"data": "!!!", "modality": "audio"}',
    b'{"terms": [{"data": "AAAA", "modality": "smell"}]}',
    b'{"text": "a", "target": ["smell"]}',
    b"null",
    b"{" * 10,
]


@pytest.mark.parametrize("body", BAD_JSON, ids=range(len(BAD_JSON)))
def test_hostile_json_is_answered(client: TestClient, body: bytes) -> None:
    for path in ("/v1/search", "/v1/embed", "/v1/embeddings"):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)


def test_media_of_impossible_ids(client: TestClient, tmp_path: Path) -> None:
    for item in ("-1", str(1 << 63), "1e9", "..%2F..%2Fetc%2Fpasswd"):
        r = client.get(f"/v1/items/{item}/media")
        assert 400 <= r.status_code < 500, (item, r.status_code)
