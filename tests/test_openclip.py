"""OpenCLIP ViT-H-14 as the image and text towers: the key mapping, proven on random weights.

The reference below is written here from open_clip's documented architecture (open_clip and
timm cannot be installed next to this torch): a 2-D convolution patchifies, a class token and
a learned positional embedding are added, LayerNorm (eps 1e-5) before and after a stack of
pre-norm blocks (``nn.MultiheadAttention`` with a packed qkv, a GELU MLP), the class token
projected by ``x @ proj``; the text tower adds ``positional_embedding`` to token embeddings,
runs the blocks under a causal mask, applies ``ln_final`` and projects the end-of-text token
(the argmax of the ids) by ``x @ text_projection``.
"""

from __future__ import annotations

import dataclasses
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from typer.testing import CliRunner

from bindsearch.cli import app
from encoders import CheckpointError, load_encoder, resolve_model
from encoders.checkpoint import save_safetensors
from encoders.config import PRESETS, ModelConfig, TrunkConfig
from encoders.model import ClipPatchProj, ImageBind, PatchProj, RepeatFrames
from encoders.openclip import openclip_shapes, openclip_to_bindsearch
from encoders.weights import WEIGHTS, resolve_weights

PRESET = "openclip_vit_h14_bind"
EPS = 1e-5  # open_clip's LayerNorm: torch's default


def openclip_layout(
    *,
    embed: int,
    image: int,
    patch: int,
    width: int,
    layers: int,
    context: int,
    vocab: int,
    text_width: int,
    text_layers: int,
) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of an open_clip CLIP model, from its config (ViT-H-14.json form)."""

    def blocks(prefix: str, n: int, d: int) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for i in range(n):
            p = f"{prefix}.resblocks.{i}."
            out |= {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.in_proj_weight": (3 * d, d),
                p + "attn.in_proj_bias": (3 * d,),
                p + "attn.out_proj.weight": (d, d),
                p + "attn.out_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (4 * d, d),
                p + "mlp.c_fc.bias": (4 * d,),
                p + "mlp.c_proj.weight": (d, 4 * d),
                p + "mlp.c_proj.bias": (d,),
            }
        return out

    grid = (image // patch) ** 2
    return {
        "visual.class_embedding": (width,),
        "visual.positional_embedding": (grid + 1, width),
        "visual.proj": (width, embed),
        "visual.conv1.weight": (width, 3, patch, patch),
        "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,),
        **blocks("visual.transformer", layers, width),
        "visual.ln_post.weight": (width,),
        "visual.ln_post.bias": (width,),
        "positional_embedding": (context, text_width),
        "text_projection": (text_width, embed),
        "logit_scale": (),
        "token_embedding.weight": (vocab, text_width),
        **blocks("transformer", text_layers, text_width),
        "ln_final.weight": (text_width,),
        "ln_final.bias": (text_width,),
    }


def random_openclip(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Tensor]:
    """Random weights of every key, at scales where every part of the forward matters."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if k == "logit_scale":
            t = torch.tensor(float(np.log(1 / 0.07)))
        elif k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")) or (
            k == "ln_final.weight"
        ):
            t = 1 + 0.1 * t
        elif k in ("visual.class_embedding", "visual.positional_embedding"):
            t = t * shape[-1] ** -0.5
        else:
            t = 0.05 * t
        sd[k] = t.contiguous()
    return sd


# --------------------------------------------------------------- the reference (open_clip's)


def _block(x: Tensor, sd: dict[str, Tensor], p: str, heads: int, mask: Tensor | None) -> Tensor:
    d = x.shape[-1]
    y = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], EPS)
    yt = y.transpose(0, 1)  # (L, B, D): nn.MultiheadAttention's default layout
    att, _ = F.multi_head_attention_forward(
        yt, yt, yt, d, heads,
        sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"],
        None, None, False, 0.0,
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"],
        training=False, need_weights=False, attn_mask=mask,
    )  # fmt: skip
    x = x + att.transpose(0, 1)
    y = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], EPS)
    y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                 sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])  # fmt: skip
    return x + y


def reference_image(sd: dict[str, Tensor], img: Tensor, heads: int, layers: int) -> Tensor:
    w = sd["visual.conv1.weight"]
    d, patch = w.shape[0], w.shape[-1]
    x = F.conv2d(img, w, stride=patch)  # (B, D, g, g)
    x = x.reshape(x.shape[0], d, -1).permute(0, 2, 1)  # (B, N, D)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, d)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (d,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], EPS)
    for i in range(layers):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}.", heads, None)
    x = F.layer_norm(x, (d,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], EPS)
    return x[:, 0] @ sd["visual.proj"]


def reference_text(sd: dict[str, Tensor], ids: Tensor, heads: int, layers: int) -> Tensor:
    L = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:L]
    d = x.shape[-1]
    causal = torch.full((L, L), float("-inf")).triu(1)
    for i in range(layers):
        x = _block(x, sd, f"transformer.resblocks.{i}.", heads, causal)
    x = F.layer_norm(x, (d,), sd["ln_final.weight"], sd["ln_final.bias"], EPS)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


# --------------------------------------------------------------- a small ViT of the family

# Width 64, 2 layers, 4 heads, patch 14 on 56-pixel images; the real text context (77).
SMALL = dict(embed=32, image=56, patch=14, width=64, layers=2, context=77, vocab=500,
             text_width=48, text_layers=2)  # fmt: skip
HEADS, TEXT_HEADS = 4, 4


def small_config() -> ModelConfig:
    base = PRESETS["imagebind_test"]
    return dataclasses.replace(
        base,
        embed_dim=32,
        vision=TrunkConfig(64, 2, HEADS, norm_eps=EPS),
        text=TrunkConfig(48, 2, TEXT_HEADS, norm_eps=EPS),
        preprocess=dataclasses.replace(base.preprocess, image_size=56, vocab_size=500),
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Tensor], Path]:
    """open_clip-layout random weights, and the file of them converted by our mapping."""
    sd = random_openclip(openclip_layout(**SMALL))
    path = tmp_path_factory.mktemp("oc") / "small.safetensors"
    save_safetensors(openclip_to_bindsearch(sd, small_config()), path)
    return sd, path


def test_mapped_towers_compute_open_clip_forward(small: tuple[dict[str, Tensor], Path]) -> None:
    sd, path = small
    cfg = small_config()
    enc = load_encoder(path, config=cfg, dtype="fp32")
    # The file holds the vision and text towers only, and that is what loads.
    assert [m.value for m in enc.model.modalities] == ["vision", "text"]
    g = torch.Generator().manual_seed(1)
    img = torch.randn(3, 3, 56, 56, generator=g)
    ids = torch.randint(1, 400, (3, 77), generator=g)
    ids[0, 5], ids[1, 76], ids[2, 0] = 499, 499, 499  # the EOT (largest id) anywhere
    with torch.no_grad():
        ours_img = enc.model.head_features("vision", img)
        ours_txt = enc.model.head_features("text", ids)
        ref_img = reference_image(sd, img, HEADS, 2)
        ref_txt = reference_text(sd, ids, TEXT_HEADS, 2)
    torch.testing.assert_close(ours_img, ref_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_txt, ref_txt, rtol=1e-5, atol=1e-5)
    # embed: the unit vectors of the same features; the logit scale is open_clip's.
    np.testing.assert_allclose(enc.embed("vision", img), F.normalize(ref_img, dim=-1), atol=1e-5)
    np.testing.assert_allclose(enc.embed("text", ids), F.normalize(ref_txt, dim=-1), atol=1e-5)
    scale = enc.model.logit_scale("text")
    assert scale is not None and torch.isclose(scale, sd["logit_scale"].exp())


def test_imagebind_layernorm_eps_would_not_match(small: tuple[dict[str, Tensor], Path]) -> None:
    # Why the preset carries open_clip's epsilon: with ImageBind's 1e-6 the same weights
    # compute something else (small LayerNorm weights make the difference visible).
    sd, _ = small
    # Tokens of variance ~1e-6 meet ln_pre: there the epsilon is not negligible.
    tiny = ("visual.class_embedding", "visual.positional_embedding")
    sd = {k: (v * 1e-3 if k in tiny else v) for k, v in sd.items()}
    img = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2)) * 1e-3
    for eps, close in ((EPS, True), (1e-6, False)):
        cfg = small_config()
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, norm_eps=eps))
        model = ImageBind(cfg, ["vision"], device="meta")
        mapped = {k: v for k, v in openclip_to_bindsearch(sd, cfg).items() if "vision" in k}
        model.load_state_dict(mapped, strict=True, assign=True)
        with torch.no_grad():
            got = model.head_features("vision", img)
        ref = reference_image(sd, img, HEADS, 2)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5) is close


def test_still_image_through_mapped_3d_kernel_equals_the_2d_one() -> None:
    g = torch.Generator().manual_seed(3)
    w2d = 0.05 * torch.randn(64, 3, 14, 14, generator=g)
    sd = random_openclip(openclip_layout(**SMALL))
    sd["visual.conv1.weight"] = w2d
    w3d = openclip_to_bindsearch(sd, small_config())[
        "modality_preprocessors.vision.rgbt_stem.proj.1.weight"
    ]
    assert w3d.shape == (64, 3, 2, 14, 14)
    assert torch.equal(w3d[:, :, 0], w2d / 2) and torch.equal(w3d[:, :, 1], w2d / 2)
    assert torch.equal(w3d.sum(dim=2), w2d)  # halves are exact: the same kernel, bit for bit
    img = torch.randn(2, 3, 56, 56, generator=g)
    want = F.conv2d(img, w2d, stride=14).flatten(2).transpose(1, 2)  # (B, N, D)
    # A 3-D convolution of the image repeated into 2 frames (ImageBind's stem) ...
    clip = img.unsqueeze(2).expand(-1, -1, 2, -1, -1)
    conv3d = F.conv3d(clip, w3d, stride=(2, 14, 14)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(conv3d, want, rtol=1e-5, atol=1e-5)
    # ... and our stem, on both of its paths (a still image, and a clip of it).
    stem = ClipPatchProj(RepeatFrames(2), PatchProj(3, 64, (2, 14, 14), (2, 14, 14)))
    stem[1].weight.data = w3d
    with torch.no_grad():
        torch.testing.assert_close(stem(img), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stem(clip), want, rtol=1e-5, atol=1e-5)


def test_still_image_embeds_the_same_as_a_clip_of_it(small: tuple[dict[str, Tensor], Path]) -> None:
    sd, path = small
    enc = load_encoder(path, config=small_config(), dtype="fp32")
    img = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    clip = img[:, None, :, None].expand(-1, 1, -1, 2, -1, -1)  # (B, S=1, 3, T=2, H, W)
    np.testing.assert_allclose(enc.embed("vision", clip), enc.embed("vision", img), atol=1e-5)
    ref = F.normalize(reference_image(sd, img, HEADS, 2), dim=-1)
    np.testing.assert_allclose(enc.embed("vision", clip), ref, atol=1e-5)


# --------------------------------------------------------------- the full-size key set


def test_vit_h14_state_dict_maps_onto_exactly_our_vision_and_text_keys() -> None:
    # open_clip's ViT-H-14.json: embed 1024; vision 224 px, 32 layers, width 1280, head width
    # 80, patch 14; text context 77, vocab 49408, width 1024, 16 heads, 24 layers.
    shapes = openclip_layout(embed=1024, image=224, patch=14, width=1280, layers=32,
                             context=77, vocab=49408, text_width=1024, text_layers=24)  # fmt: skip
    cfg = PRESETS[PRESET]
    assert openclip_shapes(cfg) == shapes
    assert (cfg.vision.heads, cfg.text.heads) == (1280 // 80, 16)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    mapped = openclip_to_bindsearch(sd, cfg)
    ours = ImageBind(cfg, ["vision", "text"], device="meta").state_dict()
    assert mapped.keys() == ours.keys()
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
    # ImageBind-huge's architecture for every tower, with open_clip's LayerNorm epsilon for
    # the two towers that are open_clip's.
    huge = PRESETS["imagebind_huge"]
    for m in ("vision", "text"):
        assert dataclasses.replace(getattr(cfg, m), norm_eps=1e-6) == getattr(huge, m)
        assert getattr(cfg, m).norm_eps == EPS
    assert dataclasses.replace(cfg, vision=huge.vision, text=huge.text) == huge
    model = ImageBind(cfg, ["vision", "text"], device="meta")
    eps = {n.eps for n in model.modules() if isinstance(n, torch.nn.LayerNorm)}
    assert eps == {EPS}
    # ImageBind's own towers keep ImageBind's epsilon (parity with the official model).
    model = ImageBind(huge, ["vision", "text"], device="meta")
    assert {n.eps for n in model.modules() if isinstance(n, torch.nn.LayerNorm)} == {1e-6}
    # A config written before the field existed reads and hashes the same.
    assert "norm_eps" not in huge.to_dict()["vision"]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda sd: sd.pop("visual.ln_post.bias"), "lacks key 'visual.ln_post.bias'"),
        (
            lambda sd: sd.__setitem__("visual.proj", torch.zeros(32, 64)),
            "has 'visual.proj' of shape (32, 64), expected (64, 32)",
        ),
        (
            lambda sd: sd.__setitem__("visual.transformer.resblocks.2.ln_1.weight", torch.ones(64)),
            "unexpected key 'visual.transformer.resblocks.2.ln_1.weight'",
        ),
        (
            lambda sd: sd.__setitem__(
                "modality_trunks.vision.blocks.0.norm_1.weight", torch.ones(64)
            ),
            "unexpected key 'modality_trunks.vision.blocks.0.norm_1.weight'",
        ),
    ],
)
def test_wrong_or_missing_key_is_one_line(change: object, says: str) -> None:
    sd = random_openclip(openclip_layout(**SMALL))
    change(sd)  # type: ignore[operator]
    with pytest.raises(CheckpointError) as e:
        openclip_to_bindsearch(sd, small_config())
    assert says in str(e.value) and "\n" not in str(e.value)


def test_the_text_mask_buffer_some_files_carry_is_accepted() -> None:
    sd = random_openclip(openclip_layout(**SMALL))
    plain = openclip_to_bindsearch(sd, small_config())
    sd["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
    assert openclip_to_bindsearch(sd, small_config()).keys() == plain.keys()


# --------------------------------------------------------------- download, load, train --init

# The preset at toy widths and the demo world's geometry (image 64, patch 16, context 16), put
# in the registry's place for these tests: the real file is 3.9 GB.
TINY = dataclasses.replace(
    PRESETS["imagebind_demo"],
    embed_dim=16,
    vision=TrunkConfig(32, 1, 2, norm_eps=EPS),
    text=TrunkConfig(32, 1, 2, norm_eps=EPS),
    audio=TrunkConfig(32, 1, 2),
    depth=TrunkConfig(32, 1, 2),
    thermal=TrunkConfig(32, 1, 2),
    imu=TrunkConfig(32, 1, 2),
)
TINY_LAYOUT = dict(embed=16, image=64, patch=16, width=32, layers=1, context=16, vocab=49408,
                   text_width=32, text_layers=1)  # fmt: skip


@pytest.fixture
def tiny_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Tensor]]:
    """The preset shrunk to TINY, a fresh cache, and a tiny open_clip file to download."""
    monkeypatch.setitem(PRESETS, PRESET, TINY)
    monkeypatch.setenv("BINDSEARCH_CACHE", str(tmp_path / "cache"))
    sd = random_openclip(openclip_layout(**TINY_LAYOUT), seed=5)
    src = tmp_path / "open_clip_model.safetensors"
    save_safetensors(sd, src)
    return src, sd


def _download(src: Path) -> object:
    return CliRunner().invoke(
        app, ["weights", "download", "openclip_vit_h14", "--url", src.as_uri()]
    )


def test_registry_entry() -> None:
    spec = resolve_weights("openclip_vit_h14")
    assert spec.config == PRESET and spec.layout == "open_clip"
    assert spec.url == (
        "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/resolve/main/"
        "open_clip_model.safetensors"
    )
    assert spec.licence == "MIT" and "MIT" in spec.licence_notice
    assert WEIGHTS["imagebind_huge"].layout == "imagebind"


def test_download_checks_converts_and_names_the_licence(
    tiny_preset: tuple[Path, dict[str, Tensor]], tmp_path: Path
) -> None:
    src, sd = tiny_preset
    res = _download(src)
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    out = res.stdout  # type: ignore[attr-defined]
    assert "Licence of openclip_vit_h14: MIT" in out and "no published checksum" in out
    target = tmp_path / "cache" / "weights" / "openclip_vit_h14.safetensors"
    assert out.strip().splitlines()[-1] == str(target)
    got = load_file(str(target))
    want = openclip_to_bindsearch(sd, TINY)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # Only the converted file stays (and the checksum recorded on first use).
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "openclip_vit_h14.open_clip_model.safetensors.sha256",
        "openclip_vit_h14.safetensors",
    ]
    # The preset resolves to it, under its licence: what /v1/info and every command show.
    ref = resolve_model(PRESET)
    assert (ref.weights, ref.source, ref.name, ref.licence) == (
        target,
        "downloaded",
        "openclip_vit_h14",
        "MIT",
    )
    listed = CliRunner().invoke(app, ["weights", "list"]).stdout
    line = next(ln for ln in listed.splitlines() if ln.startswith(PRESET))
    assert "weights=openclip_vit_h14" in line and "licence=MIT" in line
    # Loading the preset gives its bound towers; an unbound one is refused in one line.
    enc = load_encoder(ref, dtype="fp32")
    assert [m.value for m in enc.model.modalities] == ["vision", "text"]
    with pytest.raises(CheckpointError) as e:
        load_encoder(ref, modalities=["audio"])
    assert str(e.value).startswith(
        "the audio tower of openclip_vit_h14_bind is not bound yet"
    ) and "`bindsearch train --init openclip_vit_h14_bind --train-towers audio --reinit" in str(
        e.value
    )
    # So does the CLI: text embeds, audio is one error line.
    wav = tmp_path / "tone.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((np.sin(np.arange(8000) * 0.3) * 8000).astype("<i2").tobytes())
    emb = CliRunner().invoke(
        app, ["embed", "--config", PRESET, "--json", "-m", "text", "a red cube"]
    )
    assert emb.exit_code == 0, emb.output
    emb = CliRunner().invoke(app, ["embed", "--config", PRESET, "--json", "-m", "audio", str(wav)])
    assert emb.exit_code == 1 and emb.stderr.count("\n") == 1, emb.output
    assert emb.stderr.startswith("error: the audio tower of openclip_vit_h14_bind is not bound")


def test_download_of_a_file_in_another_layout_is_refused(
    tiny_preset: tuple[Path, dict[str, Tensor]], tmp_path: Path
) -> None:
    src, sd = tiny_preset
    del sd["visual.ln_pre.weight"]
    save_safetensors(sd, src)
    res = _download(src)
    assert res.exit_code == 1  # type: ignore[attr-defined]
    # The last line of stderr (the download's progress bar goes there before it).
    err = res.stderr.strip().splitlines()[-1].split("\r")[-1]  # type: ignore[attr-defined]
    assert err.startswith("error: not an open_clip checkpoint"), res.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in res.output  # type: ignore[attr-defined]
    assert "lacks key 'visual.ln_pre.weight'" in err
    # Nothing vouches for it: neither kept nor recorded.
    assert list((tmp_path / "cache" / "weights").iterdir()) == []


def test_train_init_binds_an_audio_tower_to_the_open_clip_towers(
    tiny_preset: tuple[Path, dict[str, Tensor]], tmp_path: Path
) -> None:
    from train.init import run_train_init

    src, _ = tiny_preset
    assert _download(src).exit_code == 0  # type: ignore[attr-defined]
    converted = load_file(str(resolve_model(PRESET).weights))
    small = {"world": 48, "batch_size": 16, "checkpoint_every": 0, "progress": False}
    with pytest.raises(ValueError, match=r"no audio tower to fine-tune.*--reinit"):
        run_train_init(PRESET, tmp_path / "no", "audio", steps=2, **small)  # type: ignore[arg-type]
    card = run_train_init(PRESET, tmp_path / "o", "audio", reinit=True, steps=3, **small)  # type: ignore[arg-type]
    got = load_file(str(card["path"]))
    # The open_clip towers come out bit-identical; the audio tower is new and trained.
    for k, v in converted.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    audio = {k for k in got if k.split(".")[1] == "audio"}
    assert audio and set(got) == set(converted) | audio
    assert card["towers_changed"] == ["audio"] and card["towers_frozen"] == ["vision", "text"]
    assert card["steps"] == 3 and card["reinit"] is True
    assert card["licence"] == "MIT" and card["init"]["name"] == "openclip_vit_h14"
    from train.init import reinit_towers

    fresh = ImageBind(TINY, ["audio"], device="meta").to_empty(device="cpu")
    reinit_towers(fresh, ["audio"], seed=0)
    start = fresh.state_dict()
    moved = [k for k in audio if got[k].ndim == 2 and not torch.equal(got[k], start[k])]
    assert moved, "the audio tower did not train"
    # The exported model loads with all three towers and keeps the MIT licence.
    ref = resolve_model(PRESET, card["path"])
    assert ref.licence == "MIT"
    enc = load_encoder(ref, dtype="fp32")
    assert [m.value for m in enc.model.modalities] == ["vision", "text", "audio"]
    # One tower after another: the export is the next --init (a file, with its config).
    more = run_train_init(
        str(card["path"]), tmp_path / "d", "depth", config=PRESET, reinit=True, steps=0, **small
    )  # type: ignore[arg-type]
    again = load_file(str(more["path"]))
    assert {k.split(".")[1] for k in again} == {"vision", "text", "audio", "depth"}
    assert all(torch.equal(again[k], got[k]) for k in got)
    assert more["licence"] == "MIT" and more["towers_frozen"] == ["vision", "text", "audio"]


def test_norm_eps_defaults_to_imagebinds_and_must_be_positive() -> None:
    assert TrunkConfig(8, 1, 1).norm_eps == 1e-6
    with pytest.raises(ValueError, match="norm_eps must be positive"):
        TrunkConfig(8, 1, 1, norm_eps=0.0)
