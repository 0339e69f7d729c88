"""Per-tower fingerprints: which indexes a model with retrained towers still serves.

Unit tests of the digest (tower-local, cached) and of the rule (``check_fingerprint``), then
end to end on the demo model: an image+text index stays valid for a model whose audio tower was
re-bound (``index query`` and the service accept it, an audio upload searches it), an index
holding audio is refused naming the audio tower, and an index built before per-tower digests
keeps the whole-model rule.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import encoders.models
from encoders import load_encoder, resolve_model
from encoders.checkpoint import save_safetensors
from encoders.config import resolve_config
from encoders.models import tower_config, tower_hashes, weights_card
from encoders.weights import bundled_weights
from index import BuildOptions, ModelMismatch, ModelSource, build_index
from index.fingerprint import check_fingerprint, model_fingerprint, ref_fingerprint
from index.search import open_index
from index.store import IndexManifest, IndexStore, read_manifest
from train.init import run_train_init

DEMO = "imagebind_demo"
SHIPPED = bundled_weights(DEMO)
TOWER_NAMES = {"vision", "text", "audio", "depth", "thermal", "imu"}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("BINDSEARCH_CACHE", str(root))
    return root


def _edited(tmp: Path, key: str, name: str) -> Path:
    """The shipped demo weights with one tensor changed."""
    assert SHIPPED is not None
    sd = load_file(str(SHIPPED))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] += 1
    path = tmp / f"{name}.safetensors"
    save_safetensors(sd, path)
    return path


def _differ(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {t for t in a["towers"] if a["towers"][t] != b["towers"][t]}


# ------------------------------------------------------------------------------ the digest


def test_changing_one_audio_weight_changes_only_the_audio_digest(tmp_path: Path) -> None:
    shipped = ref_fingerprint(resolve_model(DEMO))
    assert set(shipped["towers"]) == TOWER_NAMES
    path = _edited(tmp_path, "modality_trunks.audio.blocks.0.attn.in_proj_weight", "a")
    edited = ref_fingerprint(resolve_model(DEMO, path))
    assert _differ(shipped, edited) == {"audio"}
    assert edited["digest"] != shipped["digest"]
    path = _edited(tmp_path, "modality_heads.text.proj.1.weight", "t")
    assert _differ(shipped, ref_fingerprint(resolve_model(DEMO, path))) == {"text"}


def test_a_towers_config_is_part_of_its_digest_only() -> None:
    base = resolve_config(DEMO)
    tensors = {t: "x" * 64 for t in TOWER_NAMES}
    fp = model_fingerprint(base, "sha256:0", tensors)
    cfg = base.to_dict()
    cfg["audio"]["depth"] += 1
    cfg["preprocess"]["audio_mel_bins"] = 64
    assert _differ(fp, model_fingerprint(resolve_config(cfg), "sha256:0", tensors)) == {"audio"}
    cfg = base.to_dict()
    cfg["preprocess"]["video_frames"] = 4  # video is embedded by the vision tower
    assert _differ(fp, model_fingerprint(resolve_config(cfg), "sha256:0", tensors)) == {"vision"}
    cfg = base.to_dict()
    cfg["embed_dim"] = 32  # the shared space: every tower
    assert _differ(fp, model_fingerprint(resolve_config(cfg), "sha256:0", tensors)) == TOWER_NAMES
    assert tower_config(base, "video") == tower_config(base, "vision")
    # The whole-model digest is computed as before per-tower digests (old indexes match it).
    assert fp["digest"] == model_fingerprint(base, "sha256:0")["digest"]
    assert "towers" not in model_fingerprint(base, "sha256:0")


def test_tower_hashes_are_computed_once_per_file_content(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SHIPPED is not None
    path = tmp_path / "big.safetensors"
    shutil.copy(SHIPPED, path)
    monkeypatch.setattr(encoders.models, "_PERSIST_SHA_BYTES", 0)  # treat it as a big file
    monkeypatch.setattr(encoders.models, "_TOWER_HASHES", {})
    first = tower_hashes(path)
    assert set(first) == TOWER_NAMES and len(set(first.values())) == 6
    assert list((cache / "towers").glob("*.json"))  # kept beside the sha256 cache

    def boom(p: Path) -> dict[str, str]:
        raise AssertionError("re-hashed")

    monkeypatch.setattr(encoders.models, "_TOWER_HASHES", {})  # a new process
    monkeypatch.setattr(encoders.models, "_hash_towers", boom)
    assert tower_hashes(path) == first


# ------------------------------------------------------------------------------ the rule


def test_the_rule_only_the_towers_of_held_vectors_must_match() -> None:
    cfg = resolve_config(DEMO)
    old = {t: hashlib.sha256(t.encode()).hexdigest() for t in TOWER_NAMES}
    new = {**old, "audio": "f" * 64}
    a, b = model_fingerprint(cfg, "sha256:a", old), model_fingerprint(cfg, "sha256:b", new)
    assert check_fingerprint(a, b, "X", holds=["vision", "text"]) == {"audio"}
    assert check_fingerprint(a, a, "X", holds=["audio"]) == frozenset()
    for holds in (["vision", "audio"], ["video"]):
        b2 = model_fingerprint(cfg, "sha256:b", {**new, "vision": "e" * 64})
        with pytest.raises(ModelMismatch, match="tower") as err:
            check_fingerprint(a, b2, "X", holds=holds)
        named = str(err.value).split("(towers that differ")[0]
        assert ("audio" in named) == ("audio" in holds) and "vision" in named
    with pytest.raises(ModelMismatch, match=r"another model.*towers that differ: audio"):
        check_fingerprint(a, b, "X")  # no holds: the whole-model rule
    before = {k: v for k, v in a.items() if k != "towers"}  # an index built before them
    with pytest.raises(ModelMismatch, match="predates per-tower"):
        check_fingerprint(before, b, "X", holds=["vision"])


def test_the_manifest_validates_its_tower_digests(tmp_path: Path) -> None:
    out = _build(tmp_path, {"red.png": _png((200, 40, 40))}, "idx")
    data = json.loads((out / "manifest.json").read_text())
    assert set(data["model"]["towers"]) == TOWER_NAMES
    data["model"]["towers"]["smell"] = "0" * 64
    with pytest.raises(Exception, match=r"model\.towers\.smell is not a tower"):
        IndexManifest.from_dict(data)


# ------------------------------------------------------------------------------ end to end


def _png(rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (64, 64), rgb)


def _tone(path: Path, freq: float) -> None:
    t = np.arange(16000) / 16000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)


def _build(tmp: Path, files: dict[str, Any], name: str, ref: Any = None) -> Path:
    corpus = tmp / f"{name}-corpus"
    corpus.mkdir()
    for fname, what in files.items():
        if isinstance(what, Image.Image):
            what.save(corpus / fname)
        elif isinstance(what, str):
            (corpus / fname).write_text(what)
        else:
            _tone(corpus / fname, float(what))
    out = tmp / name
    model = ModelSource.from_ref(ref if ref is not None else resolve_model(DEMO))
    build_index(corpus, out, model, BuildOptions(workers=0, progress=False))
    return out


def _before_tower_digests(index: Path, out: Path) -> Path:
    """A copy of ``index`` as an older bindsearch wrote it: no per-tower digests."""
    shutil.copytree(index, out)
    data = json.loads((out / "manifest.json").read_text())
    del data["model"]["towers"]
    (out / "manifest.json").write_text(json.dumps(data))
    with IndexStore.open(out) as store, store.transaction():
        store.set_meta("fingerprint", data["model"])
    return out


@pytest.fixture(scope="module")
def rebound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with its audio tower re-bound from scratch (a few steps)."""
    out = tmp_path_factory.mktemp("rebind")
    card = run_train_init(
        DEMO, out, "audio", reinit=True, steps=2, world=48, batch_size=16, checkpoint_every=0,
        progress=False,
    )  # fmt: skip
    return Path(str(card["path"]))


def test_a_model_with_a_rebound_audio_tower_serves_image_and_text_indexes(
    tmp_path: Path, rebound: Path
) -> None:
    from bindsearch.cli import app as cli
    from service import ServiceSettings, create_app
    from service.embedders import load_torch_embedder
    from service.searchers import check_index_model, load_searcher

    files = {"red.png": _png((200, 40, 40)), "blue.png": _png((30, 40, 220))}
    files |= {"red.txt": "a red square", "blue.txt": "a blue square"}
    images = _build(tmp_path, files, "images")
    old = _before_tower_digests(images, tmp_path / "old")
    sounds = _build(tmp_path, {"red.png": _png((200, 40, 40)), "hum.wav": 220}, "sounds")
    wav = tmp_path / "query.wav"
    _tone(wav, 330)
    new = resolve_model(DEMO, rebound)
    # The card says which towers changed and records their tensors' hashes.
    card = weights_card(rebound)
    assert card is not None and card["towers_changed"] == ["audio"]
    assert card["towers"] == encoders.models._hash_towers(rebound)

    runner = CliRunner()
    ck = ["--checkpoint", str(rebound), "--config", DEMO]
    r = runner.invoke(cli, ["index", "query", str(images), str(wav), *ck, "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 4  # audio -> every image and text item
    r = runner.invoke(cli, ["index", "query", str(images), "--text", "red", *ck])
    assert r.exit_code == 0, r.output
    for args in (
        ["index", "query", str(sounds), "--text", "red", *ck],
        ["index", "add", str(sounds), str(wav), *ck],
    ):
        r = runner.invoke(cli, args)
        assert r.exit_code != 0
        line = r.output.strip().splitlines()[-1]
        assert line.startswith("error: ") and "audio tower" in line and "vision" not in line

    # The service: checked like `serve` does, then an audio upload and /v1/info.
    searcher = load_searcher(images, check=lambda s: check_index_model(s, new))
    check_index_model(searcher, new)
    app = create_app(ServiceSettings(), load_torch_embedder(ref=new), searcher)
    with TestClient(app) as c:
        for _ in range(6000):  # warm-up runs in the background
            if app.state.bindsearch.ready:
                break
            time.sleep(0.005)
        info = c.get("/v1/info").json()
        assert info["model"]["sha256"] == new.sha256 != resolve_model(DEMO).sha256
        res = c.post("/v1/search", files={"file": ("q.wav", wav.read_bytes())}, data={"k": "4"})
        assert res.status_code == 200, res.text
        assert len(res.json()["results"]) == 4
    searcher.close()
    with pytest.raises(ModelMismatch, match="audio tower"):
        check_index_model(load_searcher(sounds), new)

    # Writing: an index whose item towers are unchanged takes the new model's vectors (its
    # manifest then records the new model); one holding audio refuses them (above).
    r = runner.invoke(cli, ["index", "sync", str(images), str(tmp_path / "images-corpus"), *ck])
    assert r.exit_code == 0, r.output
    assert read_manifest(images).model["digest"] == ref_fingerprint(new)["digest"]
    with open_index(images, load_encoder(resolve_model(DEMO), modalities=["text"])) as s:
        assert s.stale_towers == {"audio"}  # and the shipped model still serves it

    # An index built before per-tower digests: any change of model is refused, as before.
    for args in (
        ["index", "query", str(old), "--text", "red", *ck],
        ["index", "sync", str(old), str(tmp_path / "images-corpus"), *ck],
    ):
        r = runner.invoke(cli, args)
        assert r.exit_code != 0 and "predates per-tower" in r.output, r.output
    r = runner.invoke(cli, ["index", "query", str(old), "--text", "red", "--config", DEMO])
    assert r.exit_code == 0, r.output  # its own model still serves it


def test_a_changed_query_tower_marks_its_calibration_stale_until_sync(tmp_path: Path) -> None:
    """An image-only index and a model whose text tower differs: text queries are accepted,
    their (text, vision) calibration is stale (raw cosine, said in the note) until a sync
    with the new model measures it again."""
    files = {f"{i}.png": _png((40 * i, 200 - 30 * i, 90)) for i in range(5)}
    images = _build(tmp_path, files, "images")
    path = _edited(tmp_path, "modality_heads.text.proj.1.weight", "text")
    new = resolve_model(DEMO, path)
    enc = load_encoder(new, modalities=["text"])
    with open_index(images, enc) as s:
        assert s.stale_towers == {"text"}
        assert (
            s.manifest.calibration is not None
            and ("text", "vision") in s.manifest.calibration.pairs
        )
        assert s.calibration is not None and ("text", "vision") not in s.calibration.pairs
        assert s.calibration_note is not None and "text->vision" in s.calibration_note
        assert s.calibration_note.count("stale") == 1
        # About one search: only its query modalities' stale pairs to its targets.
        assert s.calibration_note_for(["text"], ["vision"]) == s.calibration_note
        assert s.calibration_note_for(["vision"]) is None
        assert s.calibration_note_for(["text"], ["audio"]) is None
    from index.pipeline import sync_index

    corpus = tmp_path / "images-corpus"
    sync_index(images, corpus, ModelSource.from_ref(new), BuildOptions(workers=0, progress=False))
    with open_index(images, enc) as s:
        assert s.stale_towers == frozenset() and s.calibration_note is None
        assert s.calibration is not None and ("text", "vision") in s.calibration.pairs


def test_the_weights_card_is_read_once_per_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tower_hashes`` asks for the card on every fingerprint: the file is read again only
    when it changed (mtime, size), and then its new adapters change the hashes."""
    import os

    from encoders.models import card_path, file_sha256

    from .test_index_media import write_test_checkpoint

    weights = write_test_checkpoint(tmp_path / "w.safetensors")
    sha = file_sha256(weights)
    plain = tower_hashes(weights, sha)
    card = card_path(weights)

    def write(adapters: str) -> None:
        body = {"sha256": sha, "adapters_sha256": adapters, "towers_changed": ["audio"]}
        card.write_text(json.dumps(body), encoding="utf-8")

    reads: list[Path] = []
    real = Path.read_text

    def counted(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.name == card.name:
            reads.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    write("a" * 64)
    first = tower_hashes(weights, sha)
    assert first["audio"] != plain["audio"] and first["vision"] == plain["vision"]
    assert tower_hashes(weights, sha) == first and weights_card(weights, sha) is not None
    assert len(reads) == 1  # three asks, one read
    st = card.stat()
    write("b" * 64)  # same size: a new mtime tells it apart
    os.utime(card, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = tower_hashes(weights, sha)
    assert len(reads) == 2
    assert second["audio"] not in (first["audio"], plain["audio"])
    assert second["vision"] == plain["vision"]
    got = weights_card(weights, sha)
    assert got is not None
    got["towers_changed"] = []  # a caller's copy: the next one is unchanged
    assert tower_hashes(weights, sha) == second and len(reads) == 2
    card.unlink()
    assert tower_hashes(weights, sha) == plain
