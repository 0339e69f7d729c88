"""Weights download: local HTTP server (Range, dropped connections), checksums, conversion, CLI."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from bindsearch.cli import app
from encoders import CheckpointError, DownloadError, load_encoder
from encoders.weights import (
    WEIGHTS,
    UnknownWeights,
    WeightsSpec,
    cached_weights_path,
    download_weights,
    fetch_weights,
    resolve_weights,
)


@dataclass(frozen=True)
class Tiny:
    """A small real checkpoint and what the model it came from embeds."""

    payload: bytes
    sha256: str
    imu: np.ndarray
    embedding: np.ndarray


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    enc = load_encoder(config="imagebind_test", modalities=["imu"], seed=3)
    buf = io.BytesIO()
    torch.save(enc.model.state_dict(), buf)
    imu = np.random.default_rng(0).standard_normal((2, 6, 2000)).astype(np.float32)
    payload = buf.getvalue()
    return Tiny(payload, hashlib.sha256(payload).hexdigest(), imu, enc.embed("imu", imu))


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` by path; honours ``Range: bytes=N-``; can cut a response short."""

    files: dict[str, bytes]
    honour_range: bool
    drop_after: int | None  # the next response stops after this many body bytes
    requests: list[dict[str, str | None]]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append({"path": self.path, "range": rng})
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and srv.honour_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        drop, srv.drop_after = srv.drop_after, None
        # A dropped connection: the headers promised the whole body, the socket closes early.
        self.wfile.write(body if drop is None else body[:drop])

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests are recorded in server.requests instead


@pytest.fixture
def server(tiny: Tiny) -> Iterator[FileServer]:
    srv = FileServer(("127.0.0.1", 0), Handler)
    srv.files = {"/w/tiny.pth": tiny.payload}
    srv.honour_range = True
    srv.drop_after = None
    srv.requests = []
    # A short poll interval: shutdown() waits for the loop to look, 0.5 s by default.
    thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BINDSEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights"


def spec_for(server: FileServer, sha256: str | None = None) -> WeightsSpec:
    return replace(
        WEIGHTS["imagebind_huge"],
        name="tiny",
        config="imagebind_test",
        url=f"{server.url}/w/tiny.pth",
        filename="tiny.pth",
        sha256=sha256,
    )


def test_download_converts_to_safetensors_that_load(
    server: FileServer, tiny: Tiny, cache: Path
) -> None:
    path = download_weights(spec_for(server), progress=False)
    assert path == cache / "tiny.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["source_sha256"] == tiny.sha256
    enc = load_encoder(path, config="imagebind_test", modalities=["imu"])
    np.testing.assert_array_equal(enc.embed("imu", tiny.imu), tiny.embedding)
    # No official checksum: the computed one is recorded; the .pth and .part are gone.
    assert (cache / "tiny.pth.sha256").read_text().split()[0] == tiny.sha256
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.pth.sha256", "tiny.safetensors"]


def test_second_download_makes_no_request(server: FileServer) -> None:
    spec = spec_for(server)
    first = fetch_weights(spec, progress=False)
    assert first.checksum == "recorded"
    n = len(server.requests)
    again = fetch_weights(spec, progress=False)
    assert again.checksum == "cached"
    assert again.path == first.path
    assert len(server.requests) == n


def test_known_sha256_is_verified(server: FileServer, tiny: Tiny, cache: Path) -> None:
    res = fetch_weights(spec_for(server, sha256=tiny.sha256), progress=False)
    assert res.checksum == "verified"
    assert res.source_sha256 == tiny.sha256
    assert not (cache / "tiny.pth.sha256").exists()


def test_sha256_mismatch_leaves_nothing(server: FileServer, tiny: Tiny, cache: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(DownloadError, match=f"{tiny.sha256}.*expected {wrong}") as e:
        download_weights(spec_for(server), sha256=wrong, progress=False)
    assert "deleted" in str(e.value)
    assert list(cache.iterdir()) == []


def test_resume_after_dropped_connection(server: FileServer, tiny: Tiny, cache: Path) -> None:
    cut = len(tiny.payload) // 3
    server.drop_after = cut
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        fetch_weights(spec_for(server), progress=False, retries=0)
    assert (cache / "tiny.pth.part").stat().st_size == cut

    res = fetch_weights(spec_for(server), progress=False, retries=0)
    assert server.requests[-1]["range"] == f"bytes={cut}-"
    assert res.source_sha256 == tiny.sha256  # the hash covers the kept head and the tail
    enc = load_encoder(res.path, config="imagebind_test", modalities=["imu"])
    np.testing.assert_array_equal(enc.embed("imu", tiny.imu), tiny.embedding)
    assert not (cache / "tiny.pth.part").exists()


def test_dropped_connection_is_resumed_within_one_call(server: FileServer, tiny: Tiny) -> None:
    server.drop_after = 1000
    res = fetch_weights(spec_for(server), progress=False, retries=1)
    assert [r["range"] for r in server.requests] == [None, "bytes=1000-"]
    assert res.source_sha256 == tiny.sha256


def test_server_without_range_support_restarts(server: FileServer, tiny: Tiny) -> None:
    server.honour_range = False
    server.drop_after = 1000
    with pytest.raises(DownloadError):
        fetch_weights(spec_for(server), progress=False, retries=0)
    res = fetch_weights(spec_for(server), progress=False, retries=0)
    assert server.requests[-1]["range"] == "bytes=1000-"  # asked, got a 200: started over
    assert res.source_sha256 == tiny.sha256


def test_complete_part_is_not_downloaded_again(server: FileServer, tiny: Tiny, cache: Path) -> None:
    """A .part that is already whole (crash before rename): the server answers 416."""
    cache.mkdir(parents=True)
    (cache / "tiny.pth.part").write_bytes(tiny.payload)
    res = fetch_weights(spec_for(server), progress=False)
    assert server.requests == [{"path": "/w/tiny.pth", "range": f"bytes={len(tiny.payload)}-"}]
    assert res.source_sha256 == tiny.sha256


def test_recorded_checksum_guards_later_downloads(
    server: FileServer, tiny: Tiny, cache: Path
) -> None:
    spec = spec_for(server)
    fetch_weights(spec, progress=False)
    (cache / "tiny.safetensors").unlink()
    again = fetch_weights(spec, progress=False)
    assert again.checksum == "matched-record"

    (cache / "tiny.safetensors").unlink()
    changed = bytearray(tiny.payload)
    changed[len(changed) // 2] ^= 0xFF
    server.files["/w/tiny.pth"] = bytes(changed)
    with pytest.raises(DownloadError, match=f"expected {tiny.sha256}"):
        fetch_weights(spec, progress=False)


def test_not_a_checkpoint_is_neither_kept_nor_recorded(server: FileServer, cache: Path) -> None:
    server.files["/w/tiny.pth"] = b"<html>not found</html>"
    with pytest.raises(CheckpointError):
        fetch_weights(spec_for(server), progress=False)
    assert list(cache.iterdir()) == []


def test_http_error_names_url_and_way_out(server: FileServer) -> None:
    spec = replace(spec_for(server), url=f"{server.url}/missing.pth")
    with pytest.raises(DownloadError, match=r"missing\.pth: HTTP 404.*--checkpoint"):
        download_weights(spec, progress=False)


def test_unreachable_host(server: FileServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on that port any more: connection refused.
    spec = replace(spec_for(server), url=f"http://127.0.0.1:{port}/tiny.pth")
    with pytest.raises(DownloadError, match=r"could not reach http://127\.0\.0\.1.*--checkpoint"):
        download_weights(spec, progress=False)


def test_file_url_mirror(tiny: Tiny, tmp_path: Path) -> None:
    src = tmp_path / "mirror.pth"
    src.write_bytes(tiny.payload)
    spec = replace(WEIGHTS["imagebind_huge"], name="tiny", filename="tiny.pth")
    res = fetch_weights(spec, url=src.as_uri(), sha256=tiny.sha256, progress=False)
    assert res.checksum == "verified"


def test_registry() -> None:
    spec = resolve_weights("imagebind_huge")
    assert spec.url == "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
    assert spec.licence == "CC-BY-NC 4.0"
    assert spec.licence_url == "https://creativecommons.org/licenses/by-nc/4.0/"
    assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
    with pytest.raises(UnknownWeights, match="known: imagebind_huge"):
        resolve_weights("imagebind_giant")


def test_cli_download_prints_licence_then_path(server: FileServer, tmp_path: Path) -> None:
    cache_dir = tmp_path / "elsewhere"
    args = ["weights", "download", "imagebind_huge", "--url", f"{server.url}/w/tiny.pth"]
    result = CliRunner().invoke(app, [*args, "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    target = cache_dir / "weights" / "imagebind_huge.safetensors"
    assert "CC-BY-NC 4.0" in out
    assert "no published checksum" in out
    assert out.index("CC-BY-NC") < out.index("no published checksum")
    assert out.strip().splitlines()[-1] == str(target)
    assert target.is_file()

    result = CliRunner().invoke(
        app, ["weights", "path", "imagebind_huge", "--cache-dir", str(cache_dir)]
    )
    assert result.exit_code == 0
    assert result.stdout.strip() == str(target)
    assert cached_weights_path("imagebind_huge", cache_dir) == target


def test_cli_licence_comes_before_a_failed_download(server: FileServer) -> None:
    args = ["weights", "download", "imagebind_huge", "--url", f"{server.url}/missing.pth"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "CC-BY-NC" in result.stdout
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: could not download")
    assert "Traceback" not in result.output


def test_cli_unknown_name_is_one_line() -> None:
    result = CliRunner().invoke(app, ["weights", "download", "imagebind_giant"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: unknown weights 'imagebind_giant'; known: imagebind_huge, openclip_vit_h14"
    )


def test_cli_path_before_download() -> None:
    result = CliRunner().invoke(app, ["weights", "path", "imagebind_huge"])
    assert result.exit_code == 1
    assert "bindsearch weights download imagebind_huge" in result.stderr
    assert result.stderr.strip().count("\n") == 0
