"""``bindsearch embed``: the fixture's media through our loaders and model, end to end.

For every model case whose inputs come from an official data function (images, audio, text,
video), the CLI with ``--official`` must reproduce the official outputs, L2-normalised.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bindsearch.cli import app

from .parity import ModelCase, load_manifest, model_cases

runner = CliRunner()


def _media_items(root: Path, case: ModelCase) -> tuple[str, list[str]] | None:
    """(modality, items) that the official data functions turned into this case's input."""
    man = load_manifest(root)
    by_expected: dict[str, dict] = {}
    for pre in man["preprocessing_cases"]:
        exp = pre["expected"]
        files = [exp["file"]] if isinstance(exp, dict) and "file" in exp else []
        for f in files:
            by_expected[f] = pre
    inp = case.raw["input"]
    if inp["kind"] == "official_video_preprocessing":
        pre = next(p for p in man["preprocessing_cases"] if p["id"] == inp["of"])
        return "video", [str(root / p) for p in pre["inputs"]]
    files = inp.get("files") or ([inp["file"]] if "file" in inp else [])
    if not files or not all(f in by_expected for f in files):
        return None
    pres = [by_expected[f] for f in files]
    if case.modality == "text":
        (texts_file,) = pres[0]["inputs"]
        return "text", json.loads((root / texts_file).read_text(encoding="utf-8"))
    return case.modality, [str(root / p) for pre in pres for p in pre["inputs"]]


def _cases() -> list[ModelCase]:
    from .conftest import shared_dir

    root = shared_dir() / "fixtures" / "imagebind-parity"
    return model_cases(root) if (root / "manifest.json").is_file() else []


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_embed_official_matches_fixture(case: ModelCase, parity_dir: Path, tmp_path: Path) -> None:
    media = _media_items(parity_dir, case)
    if media is None:
        pytest.skip("this case's input is a tensor, not media (no official loader exists)")
    modality, items = media
    if modality == "video":
        pytest.importorskip("encoders.transforms.video")
    out = tmp_path / "v.npy"
    result = runner.invoke(
        app,
        [
            "embed",
            "--modality",
            modality,
            "--official",
            "--checkpoint",
            str(parity_dir / "checkpoint.pth"),
            "--config",
            str(parity_dir / "config.json"),
            "-o",
            str(out),
            "--",
            *items,
        ],
    )
    assert result.exit_code == 0, result.output
    got = np.load(out)
    final = np.load(parity_dir / case.raw["outputs"]["final"]["file"])
    expected = final / np.linalg.norm(final, axis=1, keepdims=True)
    assert got.dtype == np.float32 and got.shape == expected.shape
    # Unit vectors: the final tolerance (stated for the logit-scaled outputs) is generous.
    tol = case.raw["tolerance"]["final"]
    np.testing.assert_allclose(got, expected, atol=tol["atol"], rtol=tol["rtol"])


def test_embed_json_output(parity_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "embed",
            "-m",
            "text",
            "--json",
            "--checkpoint",
            str(parity_dir / "checkpoint.pth"),
            "--config",
            str(parity_dir / "config.json"),
            "a dog",
            "a cat",
        ],
    )
    assert result.exit_code == 0, result.output
    vectors = np.array(json.loads(result.stdout))
    assert vectors.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line as a user runs it."""
    # `python -m bindsearch`: the console script's own entry point (bindsearch.cli:main, pinned
    # in tests/test_architecture.py), whatever script an older install left in the venv
    cmd = [sys.executable, "-m", "bindsearch"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("modality", "content", "expect"),
    [
        ("vision", b"", "empty"),
        ("vision", b"\x00garbage" * 50, "cannot decode image"),
        ("bogus", b"x", "unknown modality"),
    ],
)
def test_embed_bad_input_is_one_line(
    tmp_path: Path, parity_dir: Path, modality: str, content: bytes, expect: str
) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    proc = _cli(
        "embed",
        "-m",
        modality,
        "--checkpoint",
        str(parity_dir / "checkpoint.pth"),
        "--config",
        str(parity_dir / "config.json"),
        "-o",
        str(tmp_path / "o.npy"),
        str(bad),
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expect in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.npy").exists()


def test_embed_without_weights_says_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BINDSEARCH_CACHE", str(tmp_path))
    result = runner.invoke(
        app, ["embed", "-m", "text", "--config", "imagebind_huge", "--json", "hello"]
    )
    assert result.exit_code == 1
    assert "bindsearch weights download imagebind_huge" in result.output


def test_embed_defaults_to_the_shipped_demo_model() -> None:
    result = runner.invoke(app, ["embed", "-m", "text", "--json", "a red ring", "a blue star"])
    assert result.exit_code == 0, result.output
    vectors = np.array(json.loads(result.stdout))
    assert vectors.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_cli_without_faiss_embeds_and_says_how_to_get_index(tmp_path: Path) -> None:
    """FAISS comes from an extra: without it `embed` works and `index` says what to install."""
    code = (
        "import sys; sys.modules['faiss'] = None; from bindsearch.cli import main; "
        "sys.argv = ['bindsearch'] + sys.argv[1:]; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "index", "info", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: FAISS is not installed: install bindsearch with the 'cpu' extra (faiss-cpu), "
        "or 'gpu' on a CUDA machine (faiss-gpu); never both"
    ]
    proc = subprocess.run(
        [sys.executable, "-c", code, "embed", "-m", "text", "--json", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)[0]) == 64
