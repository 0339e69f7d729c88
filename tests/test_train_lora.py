"""``train --init --lora-rank R``: adapters, their export and load, gradient checkpointing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from encoders import CheckpointError, load_encoder, resolve_model
from encoders.checkpoint import sha256_file
from encoders.config import resolve_config
from encoders.model import ImageBind
from encoders.models import tower_hashes
from encoders.weights import bundled_weights
from train.init import is_tower_key, run_train_init, sidecar_path
from train.lora import (
    add_adapters,
    count_trainable,
    full_parts,
    parse_targets,
    set_lora_trainable,
)
from train.recipe import TrainConfig, from_world, info_nce, train, trainable_optimizer

DEMO = "imagebind_demo"
SHIPPED = bundled_weights(DEMO)
SMALL = {"world": 24, "batch_size": 8, "checkpoint_every": 0, "progress": False}
PROJ = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _is_projection(key: str) -> bool:
    return key.startswith("modality_trunks.") and key.endswith(PROJ)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    out = tmp_path_factory.mktemp("lora")
    kw = {"steps": 2, "lora_rank": 4, **SMALL}
    merged = run_train_init(DEMO, out / "merged", "audio", **kw)  # type: ignore[arg-type]
    kept = run_train_init(DEMO, out / "kept", "audio", keep_adapters=True, **kw)  # type: ignore[arg-type]
    return {"merged": merged, "kept": kept}


def test_merged_export_changes_only_the_tower_and_its_projections(
    runs: dict[str, dict[str, object]],
) -> None:
    assert SHIPPED is not None
    init = load_file(str(SHIPPED))
    got = load_file(str(runs["merged"]["path"]))
    assert got.keys() == init.keys()  # a normal model: no adapter keys
    changed = {k for k in init if not _same(init[k], got[k])}
    assert changed and all(is_tower_key(k, ("audio",)) for k in changed)
    # Every adapted projection moved (W + s B A), and nothing the LoRA run keeps frozen did.
    proj = {k for k in init if is_tower_key(k, ("audio",)) and _is_projection(k)}
    assert len(proj) == 8 and proj <= changed
    model = ImageBind(resolve_config(DEMO), ["audio"], device="meta")
    add_adapters(model, ["audio"], 4, 16.0)
    allowed = proj | set(full_parts(model, ["audio"]))
    assert changed <= allowed
    for k in ("pos_embedding_helper.pos_embed", "rgbt_stem.proj.weight", "cls_token"):
        key = f"modality_preprocessors.audio.{k}"
        assert _same(init[key], got[key]), key
    assert _same(init["modality_heads.audio.2.weight"], got["modality_heads.audio.2.weight"])
    card = json.loads(sidecar_path(Path(str(runs["merged"]["path"]))).read_text())
    assert card["lora_rank"] == 4 and card["lora_alpha"] == 16.0 and "adapters" not in card
    counts = card["trainable_params"]
    assert counts["full_finetune"] == sum(
        v.numel()
        for k, v in init.items()
        if is_tower_key(k, ("audio",)) and not k.startswith("modality_postprocessors.")
    )
    # Rank 4 on the demo audio tower (width 64, 2 blocks): 2 x 4 x (64 + 192 + 64 + 64 + 64 +
    # 256 + 256 + 64) adapter weights.
    assert counts["adapters"] == 2 * 4 * (64 + 192 + 64 + 64 + 64 + 256 + 256 + 64)
    assert counts["trainable"] < 0.1 * counts["full_finetune"]


def test_kept_adapters_load_to_the_merged_model(
    runs: dict[str, dict[str, object]], tmp_path: Path
) -> None:
    assert SHIPPED is not None
    init = load_file(str(SHIPPED))
    path = Path(str(runs["kept"]["path"]))
    got = load_file(str(path))
    card = json.loads(sidecar_path(path).read_text())
    adapters = path.parent / card["adapters"]
    assert card["adapters"] == "imagebind_demo.adapters.safetensors" and adapters.is_file()
    assert card["adapters_sha256"] == sha256_file(adapters)
    # The weights file is the init's but for the parts that trained in full.
    changed = {k for k in init if not _same(init[k], got[k])}
    model = ImageBind(resolve_config(DEMO), ["audio"], device="meta")
    add_adapters(model, ["audio"], 4, 16.0)
    assert changed and changed <= set(full_parts(model, ["audio"]))
    assert not any(_is_projection(k) for k in changed)
    # Loaded through its card, it is the merged export, weight for weight and vector for vector
    # (embed, index build, serve and demo eval all load through load_encoder).
    merged = Path(str(runs["merged"]["path"]))
    a = load_encoder(resolve_model(DEMO, merged), dtype="fp32")
    b = load_encoder(resolve_model(DEMO, path), dtype="fp32")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(3, *_audio_shape(), generator=torch.Generator().manual_seed(0))
    assert (a.embed("audio", x) == b.embed("audio", x)).all()
    plain = load_encoder(resolve_model(DEMO), dtype="fp32")
    assert not (plain.embed("audio", x) == b.embed("audio", x)).all()
    # The adapters are part of what the audio tower is: an index fingerprints them with it.
    kept_ref, plain_ref = resolve_model(DEMO, path), resolve_model(DEMO)
    alone = tmp_path / path.name  # the same file without its card: no adapters
    shutil.copyfile(path, alone)
    assert kept_ref.towers["audio"] != tower_hashes(alone)["audio"]
    assert {t for t, h in kept_ref.towers.items() if h != plain_ref.towers[t]} == {"audio"}
    # Adapters that are not the card's are refused, in one line.
    adapters.write_bytes(adapters.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_encoder(resolve_model(DEMO, path), dtype="fp32")
    adapters.unlink()
    with pytest.raises(CheckpointError, match="not beside it"):
        load_encoder(resolve_model(DEMO, path), dtype="fp32")


def _audio_shape() -> tuple[int, ...]:
    p = resolve_config(DEMO).preprocess
    return (1, p.audio_mel_bins, p.audio_target_length)


def test_lora_trains_only_adapters_and_declared_parts_and_lowers_the_loss(tmp_path: Path) -> None:
    # The demo audio tower with its trunk projections perturbed: there is something to learn.
    model = load_encoder(resolve_model(DEMO), dtype="fp32").model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_tower_key(n, ("audio",)) and _is_projection(n):
                p.add_(2.5 * p.std() * torch.randn(p.shape, generator=g))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = from_world(32, model.cfg, seed=0, progress=False)
    tc = TrainConfig(
        preset=DEMO,
        stage1_steps=0,
        stage2_steps=8,
        batch_size=32,
        lr=3e-3,
        stage2_lr=3e-3,
        warmup=1,
        checkpoint_every=0,
        modalities=("audio",),
        init="test",
        lora_rank=4,
    )
    res = train(data, tc, tmp_path, progress=False, init=model, stop_after=8)
    losses = res.losses["stage2/audio"]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    named = dict(model.named_parameters())
    adapters = {n for n in named if n.endswith(("lora_A", "lora_B"))}
    full = set(full_parts(model, ["audio"]))
    assert len(adapters) == 16 and full
    for n, p in named.items():
        assert (p.grad is not None) == (n in adapters or n in full), n
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    opt = ckpt["optimizer"]
    in_opt = [i for grp in opt["param_groups"] for i in grp["params"]]
    assert len(in_opt) == len(opt["state"]) == len(adapters | full)
    # The base projections stayed what they were; only their adapters learned.
    sd = model.state_dict()
    for k, v in before.items():
        if _is_projection(k) and is_tower_key(k, ("audio",)):
            owner, name = k.rsplit(".", 1)
            assert torch.equal(sd[f"{owner}.parametrizations.{name}.original"], v), k
        elif not is_tower_key(k, ("audio",)):
            assert torch.equal(sd[k], v), k


def test_resume_with_lora_continues_where_it_stopped(tmp_path: Path) -> None:
    kw = {"steps": 2, "lora_rank": 2, **SMALL}
    whole = run_train_init(DEMO, tmp_path / "whole", "depth", **kw)  # type: ignore[arg-type]
    run_train_init(DEMO, tmp_path / "part", "depth", stop_after=1, **kw)  # type: ignore[arg-type]
    ckpt = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert any(k.endswith("lora_A") for k in ckpt["model"]) and ckpt["optimizer"]["state"]
    resumed = run_train_init(DEMO, tmp_path / "part", "depth", resume=True, **kw)  # type: ignore[arg-type]
    a, b = load_file(str(whole["path"])), load_file(str(resumed["path"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Resuming a LoRA run as a full fine-tune, at another rank, on other projections or with
    # the norms frozen is refused.
    changes = (
        {"lora_rank": 0},
        {"lora_rank": 4},
        {"lora_targets": "qkv,fc1"},
        {"lora_norms": False},
    )
    for other in changes:
        with pytest.raises(ValueError, match="different training config"):
            run_train_init(DEMO, tmp_path / "part", "depth", resume=True, **{**kw, **other})  # type: ignore[arg-type]


def _tiny_loss(model: ImageBind, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    emb = model.embed_one("audio", x, scaled=False)
    scale = model.logit_scale("audio")
    assert scale is not None
    return info_nce(emb, anchor, scale)


def test_grad_checkpointing_gives_the_same_loss_and_gradients() -> None:
    model = load_encoder(None, "imagebind_test", dtype="fp32", seed=1).model
    add_adapters(model, ["audio"], 2, 4.0, seed=1)
    with torch.no_grad():  # B != 0, so that the adapters' A gets a gradient too
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    set_lora_trainable(model, ["audio"])
    model.train()
    g = torch.Generator().manual_seed(0)
    p = model.cfg.preprocess
    x = torch.randn(4, 1, p.audio_mel_bins, p.audio_target_length, generator=g)
    anchor = torch.nn.functional.normalize(torch.randn(4, model.cfg.embed_dim, generator=g), dim=-1)
    results = []
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        model.modality_trunks["audio"].grad_checkpointing = on  # type: ignore[assignment]
        loss = _tiny_loss(model, x, anchor)
        loss.backward()  # type: ignore[no-untyped-call]
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0)
    assert g0.keys() == g1.keys() and any(n.endswith("lora_A") for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


def test_one_step_on_the_tiny_preset_with_grad_checkpointing(tmp_path: Path) -> None:
    # A 1-step train --init (the real training loop) with checkpointing on: frozen towers have
    # no gradients and no optimizer state; only adapters and the declared parts are in it.
    from train.recipe import export_weights

    model = load_encoder(None, "imagebind_test", dtype="fp32", seed=3).model
    ckpt = export_weights(model, tmp_path / "tiny.safetensors", dtype=torch.float32)
    out = tmp_path / "out"
    card = run_train_init(
        str(ckpt), out, "audio", config="imagebind_test", steps=1, lora_rank=2,
        grad_checkpointing=True, stop_after=1, world=16, batch_size=8, checkpoint_every=0,
        progress=False,
    )  # fmt: skip
    assert card["steps"] == 1 and card["lora_rank"] == 2
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    opt = state["optimizer"]
    in_opt = [i for grp in opt["param_groups"] for i in grp["params"]]
    m = load_encoder(None, "imagebind_test", dtype="fp32", seed=3).model
    add_adapters(m, ["audio"], 2, 16.0)
    expected = len(full_parts(m, ["audio"])) + 2 * 4 * len(m.modality_trunks["audio"].blocks)
    assert len(in_opt) == len(opt["state"]) == expected


def test_huge_layout_one_step_on_meta_with_grad_checkpointing() -> None:
    # The imagebind_huge audio tower (86 M parameters) with rank-8 adapters, a depth tower
    # frozen beside it, all on the meta device: one step with gradient checkpointing.
    cfg = resolve_config("imagebind_huge")
    model = ImageBind(cfg, ["audio", "depth"], device="meta")
    add_adapters(model, ["audio"], 8, 16.0)
    set_lora_trainable(model, ["audio"])
    counts = count_trainable(model, ["audio"])
    # The bound: rank 8 trains under 10 % of a full fine-tune (here 1.5 %).
    assert counts.full_finetune > 80_000_000 and counts.trainable < 0.1 * counts.full_finetune
    model.train()
    model.modality_trunks["audio"].grad_checkpointing = True  # type: ignore[assignment]
    p = cfg.preprocess
    x = torch.empty(2, 1, p.audio_mel_bins, p.audio_target_length, device="meta")
    anchor = torch.empty(2, cfg.embed_dim, device="meta")
    opt = trainable_optimizer(model, 1e-3, 0.05)
    _tiny_loss(model, x, anchor).backward()  # type: ignore[no-untyped-call]
    opt.step()
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    declared = set(full_parts(model, ["audio"]))
    assert {n for n in trained if not n.endswith(("lora_A", "lora_B"))} == declared
    for n, q in model.named_parameters():
        assert (q.grad is not None) == (n in trained), n
        if n.startswith("modality_trunks.depth.") or ".original" in n:
            assert q.grad is None and q not in opt.state, n
    assert len(opt.state) == len(trained) == 4 * 2 * 12 + len(declared)


@pytest.mark.parametrize(
    ("preset", "rank", "trainable", "full"),
    [
        ("imagebind_huge", 8, 1_320_960, 86_235_648),
        ("imagebind_huge", 4, 731_136, 86_235_648),
        ("imagebind_demo", 8, 18_560, 111_872),
        ("imagebind_demo", 4, 10_368, 111_872),
    ],
)
def test_trainable_counts_in_the_docs(preset: str, rank: int, trainable: int, full: int) -> None:
    # docs/training.md's table: the demo tower is so narrow (width 64) that rank 8 on all four
    # projections is 1/6 of their weights (over the 10 % bound); rank 4 is under it, as is the
    # huge tower.
    model = ImageBind(resolve_config(preset), ["audio"], device="meta")
    add_adapters(model, ["audio"], rank, 16.0)
    counts = count_trainable(model, ["audio"])
    assert (counts.trainable, counts.full_finetune) == (trainable, full)
    assert (counts.fraction > 0.1) is (preset == "imagebind_demo" and rank == 8)


@pytest.mark.parametrize(
    ("targets", "norms", "adapters", "trainable"),
    [
        # Per block: qkv 8 x (64 + 192), out_proj 8 x (64 + 64), fc1 8 x (64 + 256), fc2
        # 8 x (256 + 64); two blocks. The norms and biases are 2,176 parameters.
        ("qkv,fc1", False, 2 * 8 * (256 + 320), 9_216),
        ("qkv,fc1", True, 9_216, 9_216 + 2_176),
        ("fc1,out_proj", True, 2 * 8 * (128 + 320), 7_168 + 2_176),
        (" fc2 ", False, 2 * 8 * 320, 5_120),
    ],
)
def test_lora_targets_and_norms_choose_what_learns(
    targets: str, norms: bool, adapters: int, trainable: int
) -> None:
    model = ImageBind(resolve_config(DEMO), ["audio"], device="meta")
    n = add_adapters(model, ["audio"], 8, 16.0, targets=parse_targets(targets))
    assert n == 2 * len(parse_targets(targets))
    counts = count_trainable(model, ["audio"], norms=norms)
    assert (counts.adapters, counts.trainable, counts.full_finetune) == (
        adapters,
        trainable,
        111_872,
    )
    set_lora_trainable(model, ["audio"], norms=norms)
    learns = {k for k, p in model.named_parameters() if p.requires_grad}
    adapted = {k.split(".parametrizations.")[0] for k in learns if "lora_" in k}
    want = {
        "qkv": "attn",
        "out_proj": "attn.out_proj",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    }
    expect = {
        f"modality_trunks.audio.blocks.{b}.{want[t]}"
        for b in range(2)
        for t in parse_targets(targets)
    }
    assert adapted == expect
    assert (learns - {k for k in learns if "lora_" in k}) == (
        set(full_parts(model, ["audio"])) if norms else set()
    )
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_huge_count_of_the_narrow_tower_setting_in_the_docs() -> None:
    # docs/training.md: rank 8 on qkv,fc1, adapters only, is 663,552 parameters of the huge
    # audio tower (0.77 %): 12 blocks x 8 x ((768 + 2304) + (768 + 3072)).
    model = ImageBind(resolve_config("imagebind_huge"), ["audio"], device="meta")
    add_adapters(model, ["audio"], 8, 16.0, targets=("qkv", "fc1"))
    counts = count_trainable(model, ["audio"], norms=False)
    assert counts.trainable == counts.adapters == 12 * 8 * (768 + 2304 + 768 + 3072) == 663_552


def test_parse_targets_orders_and_refuses() -> None:
    assert parse_targets("fc2,qkv,qkv") == ("qkv", "fc2")
    assert parse_targets(["out_proj"]) == ("out_proj",)
    with pytest.raises(ValueError, match="unknown --lora-targets q_proj; accepted: a comma list"):
        parse_targets("q_proj,fc1")
    with pytest.raises(ValueError, match="no --lora-targets"):
        parse_targets(" , ")


def test_adapters_only_keep_the_init_weights_bit_for_bit(tmp_path: Path) -> None:
    # --no-lora-norms --keep-adapters: the weights file is the init's, byte for byte in every
    # tensor; only the adapters (on the named projections) learned, and the card says so.
    assert SHIPPED is not None
    card = run_train_init(
        DEMO,
        tmp_path,
        "audio",
        steps=2,
        lora_rank=8,
        lora_targets="fc1,qkv",
        lora_norms=False,
        keep_adapters=True,
        **SMALL,  # type: ignore[arg-type]
    )
    init, got = load_file(str(SHIPPED)), load_file(str(card["path"]))
    assert got.keys() == init.keys() and all(_same(init[k], got[k]) for k in init)
    assert card["lora_targets"] == ["qkv", "fc1"] and card["lora_norms"] is False
    assert card["trainable_params"]["trainable"] == card["trainable_params"]["adapters"] == 9_216
    adapters = load_file(str(Path(str(card["path"])).parent / card["adapters"]))
    adapted = {k.rsplit(".", 1)[0] for k in adapters}  # "<weight>.lora_A" -> "<weight>"
    assert adapted == {
        f"modality_trunks.audio.blocks.{b}.{w}"
        for b in range(2)
        for w in ("attn.in_proj_weight", "mlp.fc1.weight")
    }
    assert len(adapters) == 2 * len(adapted)  # A and B of each


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--init", DEMO, "--train-towers", "audio", "--lora-rank", "4", "--reinit"], "frozen"),
        (["--init", DEMO, "--train-towers", "audio", "--keep-adapters"], "needs --lora-rank"),
        (["--lora-rank", "4"], "are for --init"),
        (["--grad-checkpointing"], "are for --init"),
        (["--lora-targets", "qkv"], "are for --init"),
        (["--init", DEMO, "--train-towers", "audio", "--lora-targets", "qkv"], "need --lora-rank"),
        (["--init", DEMO, "--train-towers", "audio", "--no-lora-norms"], "need --lora-rank"),
        (
            ["--init", DEMO, "--train-towers", "audio", "--lora-rank", "8", "--lora-targets", "k"],
            "unknown --lora-targets k; accepted: a comma list of qkv, out_proj, fc1, fc2",
        ),
    ],
)
def test_bad_lora_options_are_one_error_line(tmp_path: Path, args: list[str], says: str) -> None:
    from bindsearch.cli import app

    res = CliRunner().invoke(app, ["train", "-o", str(tmp_path), "--world", "8", *args])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert says in lines[0]
