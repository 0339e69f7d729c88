"""Every kind of bad file, for every file modality: one line naming the file, exit 1, quickly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bindsearch.cli import app

runner = CliRunner()
MODALITIES = ["vision", "video", "audio", "depth", "thermal", "imu"]


def _png(size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _wav() -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(8000, np.float32), 8000, format="WAV")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("PICKLE-RAN",))


BAD: dict[str, bytes] = {
    "empty.bin": b"",
    "random.bin": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "truncated.png": _png()[:60],
    "nan.npy": _npy(np.full((6, 2000), np.nan, np.float32)),
    "object.npy": _npy(np.array([_Boom()], dtype=object)),
    "ragged.csv": b"t,ax,ay,az,gx,gy,gz\n0,1,2,3,4,5,6\n1,2,3\n",
    "text.txt": b"hello, this is not media at all\n" * 10,
}
WRONG: dict[str, tuple[str, bytes]] = {
    "vision": ("sound.wav", _wav()),
    "audio": ("picture.png", _png()),
    "video": ("picture.png", _png()),
    "imu": ("picture.png", _png()),
}


@pytest.fixture(scope="module")
def model_args(parity_dir: Path) -> list[str]:
    return [
        "--checkpoint",
        str(parity_dir / "checkpoint.pth"),
        "--config",
        str(parity_dir / "config.json"),
    ]


def _assert_one_line_error(result: object, name: str) -> None:
    out = result.output.strip()  # type: ignore[attr-defined]
    assert result.exit_code == 1, out  # type: ignore[attr-defined]
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("error: ") and name in lines[0], lines[0]
    assert lines[0].count(name) == 1, lines[0]  # named once (the decoders do not repeat it)
    assert "<_io." not in lines[0] and "'<none>'" not in lines[0]  # no internals


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("bad", sorted(BAD), ids=str)
def test_bad_file(
    modality: str,
    bad: str,
    tmp_path: Path,
    model_args: list[str],
    capfd: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / bad
    path.write_bytes(BAD[bad])
    result = runner.invoke(app, ["embed", "-m", modality, *model_args, "--json", str(path)])
    _assert_one_line_error(result, bad)
    assert "PICKLE-RAN" not in result.output + capfd.readouterr().out


@pytest.mark.parametrize("modality", sorted(WRONG))
def test_file_of_the_wrong_modality(modality: str, tmp_path: Path, model_args: list[str]) -> None:
    name, data = WRONG[modality]
    path = tmp_path / name
    path.write_bytes(data)
    result = runner.invoke(app, ["embed", "-m", modality, *model_args, "--json", str(path)])
    _assert_one_line_error(result, name)
