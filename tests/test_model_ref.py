"""One model reference: ``encoders.resolve_model`` and everything that reports it.

The resolution rules (presets, shipped and downloaded weights, JSON configs, given files,
random weights, clear errors), and that the index fingerprint, ``/v1/info`` and the generator
all name the same model (sha256, name) for the demo default and for a tiny model in a file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

import encoders.models
from encoders import (
    DEFAULT_MODEL,
    PRESETS,
    CheckpointError,
    DownloadError,
    ModelRef,
    UnknownWeights,
    load_encoder,
    resolve_model,
    sha256_file,
)
from encoders.weights import BUNDLED, BUNDLED_DECODERS, BUNDLED_LICENCE, META_SHA256, META_URL
from encoders.weights import WEIGHTS as WEIGHTS_REGISTRY
from generate.decoder import DecoderConfig, ImageDecoder, demo_decoder_path, save_decoder


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty weights cache: nothing downloaded unless a test puts it there."""
    root = tmp_path / "cache"
    monkeypatch.setenv("BINDSEARCH_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded random ``imagebind_test`` weights written to a safetensors file."""
    enc = load_encoder(None, config="imagebind_test")
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(path))
    return path


def tiny_decoder(path: Path, trained_for: str) -> Path:
    """A random 16-d decoder recorded as made for the encoder weights ``trained_for``."""
    torch.manual_seed(0)
    cfg = DecoderConfig(dim=PRESETS["imagebind_test"].embed_dim, image_size=8, channels=(8,))
    return save_decoder(ImageDecoder(cfg), path, trained_for=trained_for)


def fake_download(cache: Path, name: str = "imagebind_huge") -> Path:
    """A converted download in the cache: a safetensors file with our source metadata."""
    spec = WEIGHTS_REGISTRY[name]
    folder = cache / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.stem}.safetensors"
    meta = {META_SHA256: "ab" * 32, META_URL: spec.url, "format": "pt"}
    save_file({"x": torch.zeros(1)}, str(path), metadata=meta)
    return path


# ------------------------------------------------------------------------------ resolution


def test_default_is_the_shipped_demo_model_with_its_decoder() -> None:
    ref = resolve_model()
    assert ref == resolve_model(DEFAULT_MODEL)
    assert ref.config_name == DEFAULT_MODEL and ref.config == PRESETS[DEFAULT_MODEL]
    assert ref.source == "shipped" and ref.weights is not None and ref.weights.is_file()
    assert ref.sha256 == sha256_file(ref.weights) and ref.identity == f"sha256:{ref.sha256}"
    assert ref.name == DEFAULT_MODEL and ref.licence == BUNDLED_LICENCE
    assert ref.decoder == demo_decoder_path() and ref.decoder.is_file()


def test_preset_without_weights_and_json_without_checkpoint_say_what_to_pass(
    tmp_path: Path,
) -> None:
    with pytest.raises(
        UnknownWeights, match=r"no weights for config 'imagebind_test'.*--checkpoint"
    ):
        resolve_model("imagebind_test")
    cfg = tmp_path / "mine.json"
    cfg.write_text(json.dumps(PRESETS["imagebind_test"].to_dict()))
    with pytest.raises(UnknownWeights, match="--checkpoint"):
        resolve_model(cfg)
    with pytest.raises(ValueError, match=r"unknown config 'nope'.*imagebind_huge"):
        resolve_model("nope")


def test_huge_uses_the_downloaded_weights_or_says_how_to_get_them(cache: Path) -> None:
    with pytest.raises(DownloadError, match="bindsearch weights download imagebind_huge"):
        resolve_model("imagebind_huge")
    path = fake_download(cache)
    ref = resolve_model("imagebind_huge")
    assert (ref.source, ref.weights, ref.sha256) == ("downloaded", path, sha256_file(path))
    assert ref.name == "imagebind_huge" and ref.decoder is None
    # The CC-BY-NC 4.0 terms travel with the official weights, wherever they are served.
    assert ref.licence == "CC-BY-NC 4.0"
    assert ref.licence_url == "https://creativecommons.org/licenses/by-nc/4.0/"
    # Given under another name, a file converted from the official weights keeps their licence.
    moved = cache / "elsewhere.safetensors"
    shutil.copy(path, moved)
    given = resolve_model("imagebind_huge", moved)
    assert (given.source, given.name, given.licence) == ("given", "imagebind_huge", ref.licence)


def test_given_checkpoint_and_json_configs(tiny: Path, tmp_path: Path) -> None:
    ref = resolve_model("imagebind_test", tiny)
    assert (ref.source, ref.weights, ref.sha256) == ("given", tiny, sha256_file(tiny))
    assert ref.name == "tiny" and ref.licence.startswith("unknown") and ref.decoder is None
    # Our own JSON form and the official constructor kwargs give the same architecture.
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps(PRESETS["imagebind_test"].to_dict()))
    by_json = resolve_model(ours, tiny)
    assert by_json.config == ref.config and by_json.config_name == str(ours)
    official = tmp_path / "official.json"
    official.write_text(json.dumps({"out_embed_dim": 32, "vision_num_blocks": 2}))
    assert resolve_model(official, tiny).config.embed_dim == 32
    # A copy of the shipped weights is the shipped model: its name, licence and decoder.
    copy = tmp_path / "copy.safetensors"
    shutil.copy(resolve_model().weights or "", copy)
    same = resolve_model(DEFAULT_MODEL, copy)
    assert (same.source, same.weights) == ("given", copy)
    assert (same.name, same.sha256, same.decoder) == (
        DEFAULT_MODEL,
        resolve_model().sha256,
        resolve_model().decoder,
    )
    with pytest.raises(CheckpointError, match=r"missing\.pth does not exist.*\.safetensors"):
        resolve_model("imagebind_test", tmp_path / "missing.pth")


def test_random_weights() -> None:
    ref = resolve_model("imagebind_test", random_weights=True, seed=3)
    assert (ref.weights, ref.sha256, ref.identity) == (None, None, "random:3")
    assert ref.source == "random" and "random" in ref.name and "random" in ref.licence
    with pytest.raises(ValueError, match="random weights take no checkpoint"):
        resolve_model("imagebind_test", "x.pth", random_weights=True)


def test_encoder_carries_its_reference(tiny: Path, tmp_path: Path) -> None:
    ref = resolve_model("imagebind_test", tiny)
    enc = load_encoder(ref, modalities=["text"])
    assert enc.ref is ref and enc.checkpoint_sha256 == ref.sha256
    # The old signature resolves the same reference (the sha256 included).
    assert load_encoder(tiny, config="imagebind_test", modalities=["text"]).ref == ref
    assert load_encoder(config="imagebind_test").ref.identity == "random:0"
    with pytest.raises(CheckpointError, match="expected 00000"):
        load_encoder(tiny, config="imagebind_test", sha256="0" * 64)
    # Weights replaced after they were resolved are refused, not loaded under the old identity.
    moved = tmp_path / "moving.safetensors"
    shutil.copy(tiny, moved)
    stale = resolve_model("imagebind_test", moved)
    shutil.copy(resolve_model().weights or "", moved)
    os.utime(moved, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(CheckpointError, match="replaced"):
        load_encoder(stale)


def test_large_files_keep_their_sha256_between_runs(
    tiny: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoders.models, "_PERSIST_SHA_BYTES", 0)
    sha = encoders.models.file_sha256(tiny)
    [record] = (cache / "sha256").iterdir()
    assert record.read_text().strip() == sha == sha256_file(tiny)
    record.write_text("f" * 64)  # a later run reads the record instead of the file
    assert encoders.models.file_sha256(tiny) == "f" * 64


# ------------------------------------------------------------------ one reference, reported


def _corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(root / "red.png")
    t = np.arange(8000) / 8000
    soundfile.write(root / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000)
    return root


def _reported(ref: ModelRef, tmp_path: Path, **settings: object) -> dict[str, object]:
    """What the index fingerprint, ``/v1/info`` and the loaded generator say the model is."""
    from index import BuildOptions, ModelSource, build_index
    from index.store import read_manifest
    from service import ServiceSettings, create_app
    from service.embedders import load_torch_embedder
    from service.searchers import check_index_model, load_searcher

    out = tmp_path / "idx"
    build_index(
        _corpus(tmp_path / "corpus"),
        out,
        ModelSource.from_ref(ref),
        BuildOptions(workers=0, progress=False),
    )
    searcher = load_searcher(out)
    check_index_model(searcher, ref)  # the served model is the index's
    app = create_app(ServiceSettings(**settings), load_torch_embedder(ref=ref), searcher)
    with TestClient(app) as c:
        state = app.state.bindsearch
        slot = state.extra["generator"]
        for _ in range(6000):
            if state.ready and (slot.generator is not None or "loading" not in slot.reason):
                break
            time.sleep(0.005)
        info = c.get("/v1/info").json()
    assert info["generator"] is not None, slot.reason
    return {
        "index": read_manifest(out).model["checkpoint"],
        "info": (info["model"]["name"], f"sha256:{info['model']['sha256']}"),
        "generator": f"sha256:{info['generator']['model_sha256']}",
    }


def test_demo_default_is_reported_the_same_everywhere(tmp_path: Path) -> None:
    ref = resolve_model()
    assert _reported(ref, tmp_path) == {
        "index": ref.identity,
        "info": (DEFAULT_MODEL, ref.identity),
        "generator": ref.identity,  # the decoder chosen from ref.decoder, not by name
    }


def test_tiny_model_in_a_file_is_reported_the_same_everywhere(tiny: Path, tmp_path: Path) -> None:
    ref = resolve_model("imagebind_test", tiny)
    assert ref.sha256 is not None
    decoder = tiny_decoder(tmp_path / "dec.safetensors", ref.sha256)
    assert _reported(ref, tmp_path, generator=str(decoder)) == {
        "index": ref.identity,
        "info": ("tiny", ref.identity),
        "generator": ref.identity,
    }
    # A model the decoder was not made for is refused, by sha256.
    from service.generators import load_named_generator

    other = resolve_model()
    with pytest.raises(Exception, match="trained against encoder weights"):
        load_named_generator(str(decoder), 16, model_sha256=other.sha256)


def test_swapping_the_default_is_one_constant(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Name another default (shipping weights and a decoder for it): every path follows."""
    from typer.testing import CliRunner

    from encoders.embed_cli import embed_files
    from generate.cli import QueryTerm, generate_image
    from index.cli import index_app
    from index.store import read_manifest
    from service.embedders import load_torch_embedder
    from service.serve_cli import uses_demo_defaults
    from service.settings import ServiceSettings

    sha = sha256_file(tiny)
    monkeypatch.setitem(BUNDLED, "imagebind_test", str(tiny))  # absolute: used as is
    decoder = tiny_decoder(tmp_path / "dec.safetensors", sha)
    monkeypatch.setitem(BUNDLED_DECODERS, "imagebind_test", str(decoder))
    monkeypatch.setattr(encoders.models, "DEFAULT_MODEL", "imagebind_test")

    ref = resolve_model()
    assert (ref.config_name, ref.weights, ref.sha256) == ("imagebind_test", tiny, sha)
    assert embed_files("text", ["a dog"]).shape == (1, 16)
    out = tmp_path / "idx"
    args = ["build", str(_corpus(tmp_path / "corpus")), "-o", str(out), "--workers", "0"]
    r = CliRunner().invoke(index_app, [*args, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert read_manifest(out).model["checkpoint"] == f"sha256:{sha}"
    assert load_torch_embedder().info.sha256 == sha
    assert uses_demo_defaults(ServiceSettings()) and ServiceSettings().config is None
    info = generate_image([QueryTerm(encoders.Modality.TEXT, "a dog")], tmp_path / "g.png")
    assert info.model_sha256 == sha
    assert Image.open(io.BytesIO((tmp_path / "g.png").read_bytes())).size == (8, 8)
