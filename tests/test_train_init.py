"""``bindsearch train --init``: only the named towers learn; the rest stay bit-identical."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from encoders import load_encoder, resolve_model
from encoders.checkpoint import sha256_file
from encoders.config import resolve_config
from encoders.models import GIVEN_LICENCE
from encoders.weights import BUNDLED_LICENCE, bundled_weights
from train.init import is_tower_key, reinit_towers, run_train_init, sidecar_path
from train.recipe import TrainConfig, export_weights, from_world, train

DEMO = "imagebind_demo"
SHIPPED = bundled_weights(DEMO)
# Small and fast: 48 demo-world rows, batches of 16, a handful of steps.
SMALL = {"world": 48, "batch_size": 16, "checkpoint_every": 0, "progress": False}


def _tower_of(key: str) -> str:
    return key.split(".")[1]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("init")
    card = run_train_init(DEMO, out, "audio,imu", steps=4, **SMALL)  # type: ignore[arg-type]
    return card


def test_frozen_towers_bit_identical_named_towers_changed(trained: dict[str, object]) -> None:
    assert SHIPPED is not None
    init = load_file(str(SHIPPED))
    got = load_file(str(trained["path"]))
    assert got.keys() == init.keys()
    changed = {_tower_of(k) for k in init if not _same(init[k], got[k])}
    assert changed == {"audio", "imu"}
    for k in init:
        if _tower_of(k) not in ("audio", "imu"):
            assert _same(init[k], got[k]), k
    # Every weight matrix of the trained towers moved, not just one stray tensor.
    trunk = [k for k in init if k.startswith("modality_trunks.audio.") and init[k].ndim == 2]
    assert trunk and all(not torch.equal(init[k], got[k]) for k in trunk)
    # The exported model loads like any other and embeds.
    enc = load_encoder(resolve_model(DEMO, trained["path"]), dtype="fp32")  # type: ignore[arg-type]
    assert enc.model.cfg == resolve_config(DEMO)


def test_sidecar_says_what_the_model_is(trained: dict[str, object]) -> None:
    assert SHIPPED is not None
    path = Path(str(trained["path"]))
    card = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path) == path.with_suffix(".json")
    assert resolve_config(card["config"]) == resolve_config(DEMO)
    assert card["init_sha256"] == sha256_file(SHIPPED)
    assert card["init"]["name"] == DEMO
    assert card["towers_changed"] == ["audio", "imu"]
    assert card["towers_frozen"] == ["vision", "text", "depth", "thermal"]
    assert card["reinit"] is False
    assert card["data_source"] == {"kind": "demo world", "n": 48, "seed": 0}
    assert card["steps"] == 4
    # The demo towers are Apache-2.0, so the model made from them is too.
    assert card["licence"] == BUNDLED_LICENCE and card["licence"].startswith("Apache-2.0")
    assert card["sha256"] == sha256_file(path) and card["weights"] == path.name
    # The same description travels inside the weights file.
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    inner = json.loads(meta["init"])
    assert inner["init_sha256"] == card["init_sha256"]
    assert inner["towers_changed"] == card["towers_changed"]
    assert resolve_config(json.loads(meta["config"])) == resolve_config(DEMO)


def test_licence_follows_the_init_weights(tmp_path: Path) -> None:
    # A checkpoint the project cannot name has an unknown licence, and so has its child; a
    # model trained from a model that `train --init` exported keeps the first one's licence.
    assert SHIPPED is not None
    own = tmp_path / "own.safetensors"
    torch.manual_seed(0)
    sd = load_file(str(SHIPPED))
    sd["modality_heads.audio.2.weight"] = sd["modality_heads.audio.2.weight"] * 0.5
    from encoders.checkpoint import save_safetensors

    save_safetensors(sd, own)
    a = run_train_init(str(own), tmp_path / "a", "depth", config=DEMO, steps=0, **SMALL)  # type: ignore[arg-type]
    assert a["licence"] == GIVEN_LICENCE
    b = run_train_init(str(a["path"]), tmp_path / "b", "depth", config=DEMO, steps=0, **SMALL)  # type: ignore[arg-type]
    assert b["licence"] == GIVEN_LICENCE
    c0 = run_train_init(DEMO, tmp_path / "c0", "thermal", steps=0, **SMALL)  # type: ignore[arg-type]
    c = run_train_init(str(c0["path"]), tmp_path / "c", "depth", config=DEMO, steps=0, **SMALL)  # type: ignore[arg-type]
    assert c["licence"] == BUNDLED_LICENCE
    assert c["init_sha256"] == c0["sha256"]


def test_frozen_parameters_have_no_gradient_and_no_optimizer_state(tmp_path: Path) -> None:
    model = load_encoder(resolve_model(DEMO), dtype="fp32").model
    data = from_world(48, model.cfg, seed=0, progress=False)
    tc = TrainConfig(
        preset=DEMO,
        stage1_steps=0,
        stage2_steps=3,
        batch_size=16,
        warmup=1,
        checkpoint_every=0,
        modalities=("audio",),
        init="test",
    )
    # stop_after checkpoints the optimizer as it stands after the last step.
    train(data, tc, tmp_path, progress=False, init=model, stop_after=3)
    named = dict(model.named_parameters())
    audio = {n for n in named if is_tower_key(n, ("audio",))}
    assert audio and len(audio) < len(named)
    for n, p in named.items():
        if n in audio:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    opt = ckpt["optimizer"]
    in_opt = [i for g in opt["param_groups"] for i in g["params"]]
    assert len(in_opt) == len(audio) == len(opt["state"])
    got_shapes = Counter(tuple(s["exp_avg"].shape) for s in opt["state"].values())
    assert got_shapes == Counter(tuple(named[n].shape) for n in audio)


def test_reinit_replaces_the_towers_before_training(tmp_path: Path) -> None:
    assert SHIPPED is not None
    init = load_file(str(SHIPPED))
    # Zero steps: what comes out is what training would have started from.
    card = run_train_init(DEMO, tmp_path, "audio", reinit=True, steps=0, **SMALL)  # type: ignore[arg-type]
    got = load_file(str(card["path"]))
    assert card["reinit"] is True and card["steps"] == 0
    for k in init:
        if is_tower_key(k, ("audio",)):
            continue
        assert _same(init[k], got[k]), k
    trunk = [k for k in init if k.startswith("modality_trunks.audio.") and init[k].ndim == 2]
    assert trunk and all(not torch.equal(init[k], got[k]) for k in trunk)
    # ... and it is the model's own random initialisation of that tower (seed 0).
    model = load_encoder(resolve_model(DEMO), dtype="fp32").model
    reinit_towers(model, ["audio"], seed=0)
    for k, v in model.state_dict().items():
        if is_tower_key(k, ("audio",)):
            assert torch.equal(v.to(got[k].dtype), got[k]), k
    # Without --reinit and no steps the model is the init model, bit for bit.
    same = run_train_init(DEMO, tmp_path / "same", "audio", steps=0, **SMALL)  # type: ignore[arg-type]
    kept = load_file(str(same["path"]))
    assert all(_same(init[k], kept[k]) for k in init)


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    whole = run_train_init(DEMO, tmp_path / "whole", "depth", steps=4, **SMALL)  # type: ignore[arg-type]
    run_train_init(DEMO, tmp_path / "part", "depth", steps=4, stop_after=2, **SMALL)  # type: ignore[arg-type]
    resumed = run_train_init(DEMO, tmp_path / "part", "depth", steps=4, resume=True, **SMALL)  # type: ignore[arg-type]
    a, b = load_file(str(whole["path"])), load_file(str(resumed["path"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A resume from other init weights (here: re-initialised towers) is refused.
    with pytest.raises(ValueError, match="different training config"):
        run_train_init(DEMO, tmp_path / "part", "depth", reinit=True, steps=4, resume=True, **SMALL)  # type: ignore[arg-type]


def test_checkpoint_file_with_config_trains_the_tiny_preset(tmp_path: Path) -> None:
    # The tiny test preset, from a checkpoint file and --config, through the CLI; fp32 weights
    # come out fp32 and the frozen ones bit-identical.
    from bindsearch.cli import app

    model = load_encoder(None, "imagebind_test", dtype="fp32", seed=3).model
    ckpt = export_weights(model, tmp_path / "tiny.safetensors", dtype=torch.float32)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "train", "-o", str(out), "--init", str(ckpt), "--config", "imagebind_test",
            "--train-towers", "thermal", "--world", "32", "--stage2-steps", "2",
            "--batch-size", "8", "--checkpoint-every", "0",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    got = load_file(str(out / "imagebind_test.safetensors"))
    init = load_file(str(ckpt))
    assert {_tower_of(k) for k in init if not _same(init[k], got[k])} == {"thermal"}
    card = json.loads((out / "imagebind_test.json").read_text())
    assert card["init_sha256"] == sha256_file(ckpt)
    assert card["licence"] == GIVEN_LICENCE


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--init", DEMO, "--train-towers", "vision"], "frozen anchor"),
        (["--init", DEMO, "--train-towers", "video"], "frozen anchor"),
        (["--init", DEMO, "--train-towers", "text"], "stage 1"),
        (["--init", DEMO, "--train-towers", "audio,smell"], "unknown modality 'smell'"),
        (["--init", DEMO, "--train-towers", " , "], "empty"),
        (["--init", DEMO], "--init needs --train-towers"),
        (["--train-towers", "audio"], "need --init"),
        (["--init", "no_such_model", "--train-towers", "audio"], "neither a weights file"),
        (["--init", DEMO, "--config", DEMO, "--train-towers", "audio"], "brings its own"),
    ],
)
def test_bad_options_are_one_error_line(tmp_path: Path, args: list[str], says: str) -> None:
    from bindsearch.cli import app

    res = CliRunner().invoke(app, ["train", "-o", str(tmp_path), "--world", "8", *args])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert says in lines[0]
    assert "accepted" in lines[0] or "--" in lines[0]


def test_every_command_reads_the_licence_of_an_exported_model(tmp_path: Path) -> None:
    # resolve_model (what embed, index, serve and /v1/info use) reads the card beside weights
    # that train --init exported: a re-bound demo tower stays Apache-2.0, not "unknown".
    out = run_train_init(DEMO, tmp_path / "r", "depth", reinit=True, steps=0, **SMALL)  # type: ignore[arg-type]
    path = Path(out["path"])
    assert SHIPPED is not None and out["sha256"] != resolve_model(DEMO).sha256  # new weights
    assert resolve_model(DEMO, path).licence == BUNDLED_LICENCE
    card = sidecar_path(path)
    card.write_text(json.dumps({**json.loads(card.read_text()), "sha256": "0" * 64}))
    assert resolve_model(DEMO, path).licence == GIVEN_LICENCE  # a card of another file
    card.unlink()
    assert resolve_model(DEMO, path).licence == GIVEN_LICENCE
