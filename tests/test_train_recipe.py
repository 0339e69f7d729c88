"""The two-stage recipe: loss falls on a tiny world, resume is exact, any manifest trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from encoders.config import resolve_config
from encoders.encoder import load_encoder
from train.recipe import PairedData, TrainConfig, export_weights, from_manifest, from_world, train
from world.world import write_world

CFG = resolve_config("imagebind_demo")


@pytest.fixture(scope="module")
def tiny() -> PairedData:
    return from_world(48, CFG, seed=0, progress=False)


def _tc(**kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "stage1_steps": 30,
        "stage2_steps": 20,
        "batch_size": 16,
        "warmup": 5,
        "checkpoint_every": 0,
        "lr": 1e-3,
    }
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_loss_falls_in_both_stages(tiny: PairedData, tmp_path: Path) -> None:
    r = train(tiny, _tc(), tmp_path, progress=False)
    s1 = r.losses["stage1"]
    assert len(s1) == 30
    assert np.mean(s1[-5:]) < np.mean(s1[:5]) - 0.3
    for m in ("audio", "depth", "thermal", "imu"):
        ls = r.losses[f"stage2/{m}"]
        assert len(ls) == 20
        assert np.mean(ls[-5:]) < np.mean(ls[:5]), m
    # Stage 2 never touched the image or text towers: they stay as stage 1 left them.
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["stage"] == 3


def test_stage2_freezes_vision_and_text(tiny: PairedData, tmp_path: Path) -> None:
    a = train(tiny, _tc(stage2_steps=0), tmp_path / "a", progress=False).model
    b = train(tiny, _tc(), tmp_path / "b", progress=False).model
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if ".vision." in k or ".text." in k:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if ".audio." in k)


def test_resume_gives_the_uninterrupted_result(tiny: PairedData, tmp_path: Path) -> None:
    tc = _tc(stage1_steps=6, stage2_steps=4, checkpoint_every=2)
    full = train(tiny, tc, tmp_path / "full", progress=False).model.state_dict()
    for stop in (3, 8):  # once in each stage
        out = tmp_path / f"cut{stop}"
        train(tiny, tc, out, progress=False, stop_after=stop)
        resumed = train(tiny, tc, out, resume=True, progress=False).model.state_dict()
        for k, v in full.items():
            torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_resume_refuses_another_config(tiny: PairedData, tmp_path: Path) -> None:
    train(tiny, _tc(stage1_steps=2, stage2_steps=0), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different training config"):
        train(tiny, _tc(stage1_steps=3, stage2_steps=0), tmp_path, resume=True, progress=False)


def test_manifest_of_pairs_trains_and_exports(tmp_path: Path) -> None:
    manifest = write_world(tmp_path / "w", 6, CFG.preprocess, seed=2, progress=False)
    # A manifest may hold any subset of columns per row.
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    del rows[0]["audio"], rows[0]["video"]  # (a video alone would give its soundtrack)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = from_manifest(manifest, CFG, progress=False)
    assert data.present["audio"].sum() == 5 and len(data.rows("vision", "text")) == 6
    r = train(
        data, _tc(stage1_steps=2, stage2_steps=2, batch_size=4), tmp_path / "o", progress=False
    )
    path = export_weights(r.model, tmp_path / "demo.safetensors")
    enc = load_encoder(path, config="imagebind_demo")
    emb = enc.embed_items("text", ["a red star"])
    assert emb.shape == (1, CFG.embed_dim)
    assert abs(float(np.linalg.norm(emb)) - 1) < 1e-5


def _silent_mp4(path: Path, frames: np.ndarray) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        vs = container.add_stream("libx264", rate=10)
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuv444p"
        for fr in frames:
            container.mux(vs.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")))
        container.mux(vs.encode())


def test_a_video_alone_pairs_its_soundtrack_with_its_frames(tmp_path: Path) -> None:
    # {"video": path}: the video's frames anchor its soundtrack in stage 2, as ImageBind pairs
    # AudioSet's sounds with their frames. The row's audio is the soundtrack through the audio
    # loader, exactly (the demo world's videos carry its audio files' sound, AAC-coded with the
    # encoder's priming samples kept: close to the audio file, not equal to it).
    from encoders.transforms.audio import load_audio
    from encoders.transforms.video import extract_audio
    from train.recipe import _anchor_takes, anchor_rows

    manifest = write_world(tmp_path / "w", 6, CFG.preprocess, seed=3, progress=False)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    only = tmp_path / "w" / "videos.jsonl"
    only.write_text("".join(json.dumps({"video": r["video"]}) + "\n" for r in rows))
    data = from_manifest(only, CFG, progress=False)
    assert set(data.tensors) == {"video", "audio"} and data.present["audio"].all()
    for i, r in enumerate(rows):
        track = extract_audio(tmp_path / "w" / r["video"])
        assert track is not None
        want = load_audio((torch.from_numpy(track[0]), track[1]), CFG.preprocess)
        assert torch.equal(data.tensors["audio"][i], want)
    assert [t for t, _ in _anchor_takes("audio", data)] == ["video"]
    assert list(anchor_rows("audio", data)) == list(range(6))

    # A mixed manifest: rows with an image anchor on it, video-only rows on their frames; a
    # video without a soundtrack gives no audio.
    silent = tmp_path / "w" / "silent.mp4"
    _silent_mp4(silent, np.full((12, 32, 32, 3), 90, np.uint8))
    mixed = [
        *({"image": r["image"], "audio": r["audio"]} for r in rows[:3]),
        *({"video": r["video"]} for r in rows[3:]),
        {"video": silent.name, "image": rows[0]["image"]},
    ]
    only.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    data = from_manifest(only, CFG, progress=False)
    assert list(data.present["audio"]) == [True] * 6 + [False]
    takes = {a: list(np.flatnonzero(t)) for a, t in _anchor_takes("audio", data)}
    assert takes == {"vision": [0, 1, 2], "video": [3, 4, 5]}
    tc = _tc(stage1_steps=0, stage2_steps=3, batch_size=6, modalities=("audio",))
    from encoders import resolve_model

    model = load_encoder(resolve_model("imagebind_demo"), dtype="fp32").model
    res = train(data, tc, tmp_path / "o", progress=False, init=model)
    assert len(res.losses["stage2/audio"]) == 3


def test_anchors_read_as_embeddings_keep_no_inputs(tmp_path: Path) -> None:
    # train --init reads a manifest's anchors (images, videos) as their frozen embeddings,
    # a few rows at a time, and keeps no input of them; stage 2 trains on those embeddings
    # as it would on the ones it computes (cache_embeddings) from the inputs.
    from encoders import resolve_model
    from train.init import run_train_init
    from train.recipe import cache_embeddings, unit_embeddings

    manifest = write_world(tmp_path / "w", 10, CFG.preprocess, seed=6, progress=False)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    mixed = tmp_path / "w" / "mixed.jsonl"
    lines = [{"image": r["image"], "audio": r["audio"]} for r in rows[:4]]
    lines += [{"video": r["video"]} for r in rows[4:]]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in lines))
    model = load_encoder(resolve_model("imagebind_demo"), dtype="fp32").model
    calls: list[int] = []

    def embed(key: str, x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return unit_embeddings(model, key, x)

    keys = ["audio", "vision", "video"]
    lazy = from_manifest(mixed, CFG, keys=keys, progress=False, embed=embed)
    full = from_manifest(mixed, CFG, keys=keys, progress=False)
    assert set(lazy.tensors) == {"audio"} and set(lazy.embedded) == {"vision", "video"}
    assert max(calls) <= 8 and sum(calls) == 10  # 4 images, 6 videos, in batches of <= 8
    for key in ("vision", "video"):
        assert (lazy.present[key] == full.present[key]).all()
        got = cache_embeddings(model, lazy, key)
        want = cache_embeddings(model, full, key)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert list(lazy.rows("audio", "video")) == [4, 5, 6, 7, 8, 9]

    # The whole path: a tower bound from such a manifest.
    card = run_train_init(
        "imagebind_demo", tmp_path / "o", "audio", manifest=mixed, steps=2, batch_size=4,
        checkpoint_every=0, progress=False,
    )  # fmt: skip
    assert card["towers_changed"] == ["audio"] and card["data_source"]["kind"] == "manifest"


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        ('{"image": "a.png", "audio": "s.wav"}\nnot json\n', "line 2 is not JSON"),
        ("[1, 2]\n", "line 1 is a JSON list, not an object"),
        ('\n{"img": "a.png"}\n', "line 2 names none of the columns image, video, audio"),
        ('{"image": 3, "audio": "s.wav"}\n', "line 1: image is 3, not a string"),
        ('{"image": "a.png", "audio": "missing.wav"}\n', "line 1, audio: "),
        ('{"image": "a.png", "audio": "a.png"}\n', "line 1, audio: "),
        ("\n\n", "has no rows: one JSON object per line"),
    ],
)
def test_a_bad_manifest_is_one_error_line_naming_its_line(
    tmp_path: Path, lines: str, says: str
) -> None:
    import soundfile as sf
    from PIL import Image

    from bindsearch.cli import app

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    sf.write(tmp_path / "s.wav", np.zeros(8000, np.float32), 8000)
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(lines)
    args = ["--init", "imagebind_demo", "--train-towers", "audio", "--manifest", str(manifest)]
    res = CliRunner().invoke(app, ["train", "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == 1, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and f"manifest {manifest} " in errors[0], res.output
    assert says in errors[0], errors[0]


def test_train_init_says_which_pairs_are_missing(tmp_path: Path) -> None:
    from train.init import run_train_init

    manifest = write_world(tmp_path / "w", 2, CFG.preprocess, seed=4, progress=False)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({"depth": r["depth"]}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"no \(image or video, audio\) pairs"):
        run_train_init("imagebind_demo", tmp_path / "o", "audio", manifest=manifest, steps=1)


def test_train_cli(tmp_path: Path) -> None:
    from bindsearch.cli import app

    res = CliRunner().invoke(
        app,
        [
            "train",
            "-o",
            str(tmp_path),
            "--world",
            "24",
            "--stage1-steps",
            "2",
            "--stage2-steps",
            "1",
            "--batch-size",
            "8",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "imagebind_demo.safetensors").is_file()
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["train_config"]["stage1_steps"] == 2
    bad = CliRunner().invoke(
        app, ["train", "-o", str(tmp_path), "--resume", "--world", "24", "--stage1-steps", "3"]
    )
    assert bad.exit_code == 1


def test_hard_negative_batches_are_whole_groups() -> None:
    from train.recipe import _mixed_batch

    rows = np.arange(400)
    groups = rows % 20  # 20 groups of 20 rows
    rng = np.random.default_rng(0)
    b = _mixed_batch(rows, 64, rng, groups, hard=0.5, group_size=8)
    assert len(b) == 64 and len(set(b.tolist())) == 64
    _, counts = np.unique(groups[b[:32]], return_counts=True)
    assert (counts % 8 == 0).all()  # the hard half: four groups of eight
    plain = _mixed_batch(rows, 64, rng, None, hard=0.5, group_size=8)
    assert len(set(plain.tolist())) == 64


def test_world_data_has_groups_and_factor_captions(tiny: PairedData) -> None:
    from world.world import CLASSES, DISTANCES

    assert tiny.groups is not None and len(tiny.groups) == len(tiny)
    assert {"text_short", "video_text_short"} <= set(tiny.tensors)
    # Factor-level captions name class and distance only: few distinct ones, shorter ones.
    short = tiny.tensors["text_short"]
    assert len({tuple(r) for r in short.tolist()}) <= len(CLASSES) * len(DISTANCES)
    assert int((short > 0).sum()) < int((tiny.tensors["text"] > 0).sum())
    with pytest.raises(ValueError, match="hard_negatives"):
        TrainConfig(hard_negatives=1.5)
    # Clips have their own groups (class, colour and scene shared): motion must be seen.
    assert set(tiny.key_groups) == {"video"} and len(tiny.key_groups["video"]) == len(tiny)
    with pytest.raises(ValueError, match="video groups have 3 rows"):
        PairedData(dict(tiny.tensors), key_groups={"video": np.zeros(3, np.int64)})


def test_clip_groups_share_class_colour_scene_and_differ_in_motion() -> None:
    from world.world import CLIP_SHARED, motion_groups, sample_factors

    f = sample_factors(2000, np.random.default_rng(0), "train")
    gid = motion_groups(f)
    for g in np.unique(gid)[:20]:
        sel = gid == g
        for k in CLIP_SHARED:
            assert len(np.unique(f[k][sel])) == 1, k
        assert len(np.unique(f["motion"][sel])) > 1
    assert len(np.unique(gid)) == len({tuple(f[k][i] for k in CLIP_SHARED) for i in range(2000)})


def test_video_batches_come_from_their_own_groups(tiny: PairedData) -> None:
    from train.recipe import _mixed_batch

    rows = tiny.rows("video", "video_text")
    g = tiny.key_groups["video"]
    b = _mixed_batch(rows, 8, np.random.default_rng(1), g, hard=1.0, group_size=2)
    _, counts = np.unique(g[b], return_counts=True)
    assert (counts % 2 == 0).all()


def test_train_cli_refuses_an_unknown_device(tmp_path: Path) -> None:
    from bindsearch.cli import app

    res = CliRunner().invoke(
        app, ["train", "-o", str(tmp_path), "--world", "8", "--device", "tpu:x"]
    )
    assert res.exit_code == 1
    assert "--device" in res.output


def test_choice_captions_vary_one_factor(tiny: PairedData) -> None:
    from encoders.transforms.text import get_tokenizer
    from train.recipe import _choice_names
    from world.world import CHOICES, FACTORS

    tok = get_tokenizer(CFG.preprocess.vocab_size)
    for key, varied in CHOICES.items():
        assert _choice_names(tiny, key) == sorted(varied)
        for factor in varied:
            choices = tiny.tensors[f"{key}:choices:{factor}"]
            own = tiny.tensors[f"{key}:choice:{factor}"]
            values = FACTORS[factor]
            assert choices.shape[:2] == (len(tiny), len(values))
            for i in range(4):
                texts = [tok.decode(r[r > 0]) for r in choices[i]]  # zeros pad
                # Choice v names value v and only the word(s) of the factor change.
                for v, t in enumerate(texts):
                    assert f" {values[v]} " in t, (t, values[v])
                    assert t.replace(f" {values[v]} ", " _ ") == texts[0].replace(
                        f" {values[0]} ", " _ "
                    )
                assert 0 <= int(own[i]) < len(values)


def test_choice_term_scores_the_own_caption() -> None:
    from encoders.model import ImageBind, init_weights
    from train.recipe import _encode_distinct, choice_nce

    model = ImageBind(resolve_config("imagebind_test"))
    init_weights(model, seed=0)
    ids = torch.randint(1, 300, (6, 8))
    ids[:, -1] = 49407  # end of text: the pooled position
    choices = ids[torch.tensor([[0, 1, 2], [3, 1, 2], [4, 5, 1]])]  # (3, 3, 8), repeats
    own = torch.tensor([0, 1, 2])
    (enc,) = _encode_distinct(model, [choices], torch.device("cpu"))
    direct = model.embed_one("text", choices.reshape(9, 8), scaled=False).reshape(3, 3, -1)
    torch.testing.assert_close(enc, direct, atol=1e-5, rtol=1e-5)
    # An embedding equal to its own caption's scores better than one equal to another choice's.
    right = choice_nce([enc[torch.arange(3), own]], [enc], [own], 20.0)
    with torch.no_grad():
        wrong = choice_nce([enc[torch.arange(3), (own + 1) % 3]], [enc], [own], 20.0)
    assert right.item() < wrong.item()
    # The image side gets the gradient (training passes the captions' embeddings detached).
    emb = enc[torch.arange(3), own].detach().requires_grad_(True)
    choice_nce([emb], [enc.detach()], [own], 20.0).backward()
    assert emb.grad is not None and bool(emb.grad.abs().sum() > 0)


def test_swapped_captions_name_the_opposite_motion(tiny: PairedData) -> None:
    from encoders.transforms.text import get_tokenizer
    from world.world import MOTIONS, OPPOSITE

    tok = get_tokenizer(CFG.preprocess.vocab_size)
    named = tiny.present["video_text_neg"]
    assert named.any() and named.mean() < 1  # 20 % of the captions drop their motion
    for i in range(12):
        own = tok.decode(tiny.tensors["video_text"][i][tiny.tensors["video_text"][i] > 0])
        neg = tok.decode(tiny.tensors["video_text_neg"][i][tiny.tensors["video_text_neg"][i] > 0])
        said = [m for m, w in enumerate(MOTIONS) if f" {w} " in own]
        assert bool(said) == named[i]
        if said:
            other = OPPOSITE.get(said[0])
            swapped = [m for m, w in enumerate(MOTIONS) if f" {w} " in neg]
            assert swapped != said and (other is None or swapped == [other])
            assert neg.replace(MOTIONS[swapped[0]], MOTIONS[said[0]]) == own


def test_info_nce_extra_candidates() -> None:
    from train.recipe import info_nce

    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    b = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    base = info_nce(a, b, 10.0)
    # A candidate that is far from every row barely matters; one equal to a row's own
    # embedding competes with its caption; marked as that row's positive, it helps instead.
    far = info_nce(a, b, 10.0, extra=-a.mean(0, keepdim=True) / a.mean(0).norm())
    near = info_nce(a, b, 10.0, extra=a[:1])
    pos = torch.zeros(4, 1, dtype=torch.bool)
    pos[0, 0] = True
    marked = info_nce(a, b, 10.0, extra=a[:1], extra_pos=pos)
    assert base.item() < far.item() < base.item() + 0.05
    assert near.item() > base.item() + 0.1
    assert marked.item() < near.item()


def test_exported_weights_are_readable_as_the_umask_says(tmp_path: Path) -> None:
    # safetensors writes 0600: trained weights in a shared folder were readable by one user only.
    import os

    from encoders.model import ImageBind, init_weights
    from generate.decoder import DecoderConfig, ImageDecoder, save_decoder

    model = ImageBind(resolve_config("imagebind_test"))
    init_weights(model, seed=0)
    old = os.umask(0o022)
    try:
        weights = export_weights(model, tmp_path / "w" / "model.safetensors")
        decoder = save_decoder(ImageDecoder(DecoderConfig(dim=16)), tmp_path / "d.st", "sha")
    finally:
        os.umask(old)
    for path in (weights, decoder):
        assert path.stat().st_mode & 0o777 == 0o644, oct(path.stat().st_mode)
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary file left
    assert load_encoder(weights, config="imagebind_test").dim == 16
