"""The model's structure and loading: official layout, partial loading, bad checkpoints, dtypes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import CheckpointError, Modality, ModelConfig, load_encoder, read_state_dict
from encoders.config import PRESETS, resolve_config
from encoders.model import ImageBind

from .parity import model_cases, model_input


@pytest.fixture(scope="module")
def huge_shapes(fixtures_dir: Path) -> dict[str, object]:
    return json.loads((fixtures_dir / "imagebind_huge_state_dict_shapes.json").read_text())  # type: ignore[no-any-return]


def test_huge_preset_has_official_keys_and_shapes(huge_shapes: dict) -> None:
    model = ImageBind(PRESETS["imagebind_huge"], device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == huge_shapes["shapes"]
    buffers = {k for k, _ in model.named_buffers()}
    assert buffers == set(huge_shapes["buffers"])
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == huge_shapes["total_parameters"]


def test_huge_from_official_kwargs_equals_preset(huge_shapes: dict) -> None:
    cfg = ModelConfig.from_official_kwargs(huge_shapes["constructor_kwargs"])
    assert cfg == PRESETS["imagebind_huge"]


def test_huge_strict_load_of_official_shapes(huge_shapes: dict) -> None:
    """A state dict with exactly the official keys and shapes loads strictly (on meta)."""
    model = ImageBind(PRESETS["imagebind_huge"], device="meta")
    sd = {k: torch.empty(s, device="meta") for k, s in huge_shapes["shapes"].items()}
    model.load_state_dict(sd, strict=True, assign=True)


def test_huge_per_modality_parameter_counts(huge_shapes: dict) -> None:
    for m, count in huge_shapes["parameters_per_modality"].items():
        model = ImageBind(PRESETS["imagebind_huge"], [m], device="meta")
        assert sum(p.numel() for p in model.parameters()) == count, m


def test_from_official_kwargs_fixture_config(parity_dir: Path) -> None:
    kwargs = json.loads((parity_dir / "config.json").read_text())
    cfg = ModelConfig.from_official_kwargs(kwargs)
    assert cfg.embed_dim == kwargs["out_embed_dim"]
    assert cfg.vision.width == kwargs["vision_embed_dim"]
    assert cfg.imu.depth == kwargs["imu_num_blocks"]
    assert resolve_config(parity_dir / "config.json") == cfg
    # Our own JSON form round-trips.
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_official_kwargs_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown ImageBindModel arguments"):
        ModelConfig.from_official_kwargs({"vision_embed_dim": 64, "vison_num_blocks": 2})


def test_unknown_config_name() -> None:
    with pytest.raises(ValueError, match="not a preset"):
        resolve_config("imagebind_giant")


def test_load_only_requested_modalities(parity_dir: Path) -> None:
    """A {vision, text} encoder allocates no parameter or buffer of the other towers."""
    full = read_state_dict(parity_dir / "checkpoint.pth")
    enc = load_encoder(
        parity_dir / "checkpoint.pth",
        config=parity_dir / "config.json",
        modalities=["vision", "text"],
    )
    names = [n for n, _ in enc.model.named_parameters()] + [n for n, _ in enc.model.named_buffers()]
    towers = {n.split(".")[1] for n in names}
    assert towers == {"vision", "text"}
    expected = sum(v.numel() for k, v in full.items() if k.split(".")[1] in {"vision", "text"})
    got = sum(p.numel() for p in enc.model.parameters()) + sum(
        b.numel() for b in enc.model.buffers()
    )
    assert got == expected
    assert set(enc.modalities) == {Modality.VISION, Modality.TEXT, Modality.VIDEO}
    with pytest.raises(KeyError, match="no audio tower"):
        enc.embed("audio", np.zeros((1, 1, 128, 204), np.float32))


def test_partial_load_matches_full_model(parity_dir: Path) -> None:
    cases = {c.id: c for c in model_cases(parity_dir)}
    x = model_input(parity_dir, cases["depth/all"])
    full = load_encoder(parity_dir / "checkpoint.pth", config=parity_dir / "config.json")
    only = load_encoder(
        parity_dir / "checkpoint.pth", config=parity_dir / "config.json", modalities=["depth"]
    )
    np.testing.assert_array_equal(full.embed("depth", x), only.embed("depth", x))


# ----------------------------------------------------------------------------- bad checkpoints


@pytest.fixture(scope="module")
def fixture_sd(parity_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in read_state_dict(parity_dir / "checkpoint.pth").items()}


def _load(path: Path, parity_dir: Path, **kw: object) -> None:
    load_encoder(path, config=parity_dir / "config.json", **kw)  # type: ignore[arg-type]


def test_missing_key(tmp_path: Path, parity_dir: Path, fixture_sd: dict) -> None:
    sd = dict(fixture_sd)
    del sd["modality_heads.audio.2.weight"]
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \(modality_heads.audio.2.weight\)"):
        _load(tmp_path / "c.pth", parity_dir)


def test_extra_key(tmp_path: Path, parity_dir: Path, fixture_sd: dict) -> None:
    sd = dict(fixture_sd)
    sd["modality_trunks.vision.blocks.9.norm_1.weight"] = torch.zeros(64)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*blocks\.9\.norm_1\.weight"):
        _load(tmp_path / "c.pth", parity_dir)


def test_foreign_key(tmp_path: Path, parity_dir: Path, fixture_sd: dict) -> None:
    sd = dict(fixture_sd)
    sd["visual.proj"] = torch.zeros(3)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"not ImageBind keys.*visual\.proj"):
        _load(tmp_path / "c.pth", parity_dir)


def test_wrong_shape(tmp_path: Path, parity_dir: Path, fixture_sd: dict) -> None:
    sd = dict(fixture_sd)
    sd["modality_heads.text.proj.1.weight"] = torch.zeros(16, 32)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch.*text.proj.1.weight: checkpoint "
        r"\(16, 32\) vs model \(32, 32\)",
    ):
        _load(tmp_path / "c.pth", parity_dir)


def test_wrong_config_for_weights(parity_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="does not match the model config"):
        load_encoder(parity_dir / "checkpoint.pth", config="imagebind_test")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path: Path, parity_dir: Path, fixture_sd: dict, suffix: str) -> None:
    path = tmp_path / f"c{suffix}"
    if suffix == ".pth":
        torch.save(fixture_sd, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in fixture_sd.items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated|not a readable"):
        _load(path, parity_dir)


def test_wrong_sha256(parity_dir: Path) -> None:
    with pytest.raises(CheckpointError, match=r"has sha256 0ae42b59.*expected 00000"):
        _load(parity_dir / "checkpoint.pth", parity_dir, sha256="0" * 64)


def test_right_sha256(parity_dir: Path) -> None:
    sha = json.loads((parity_dir / "manifest.json").read_text())["checkpoint"]["sha256"]
    _load(parity_dir / "checkpoint.pth", parity_dir, sha256=sha, modalities=["imu"])


class _Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(
    tmp_path: Path, parity_dir: Path, fixture_sd: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    sd: dict[str, object] = dict(fixture_sd)
    sd["evil"] = _Payload()
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="pickled code"):
        _load(tmp_path / "c.pth", parity_dir)
    assert "pwned" not in capsys.readouterr().out
    # A raw pickle file (not a torch zip) is refused too.
    with open(tmp_path / "raw.pth", "wb") as f:
        pickle.dump(_Payload(), f)
    with pytest.raises(CheckpointError):
        _load(tmp_path / "raw.pth", parity_dir)
    assert "pwned" not in capsys.readouterr().out


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(tmp_path / "nope.pth", config="imagebind_test")


def test_safetensors_roundtrip(tmp_path: Path, parity_dir: Path, fixture_sd: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in fixture_sd.items()}, str(tmp_path / "c.safetensors"))
    a = load_encoder(
        parity_dir / "checkpoint.pth", config=parity_dir / "config.json", modalities=["imu"]
    )
    b = load_encoder(
        tmp_path / "c.safetensors", config=parity_dir / "config.json", modalities=["imu"]
    )
    x = np.random.default_rng(0).standard_normal((2, 6, 2000)).astype(np.float32)
    np.testing.assert_array_equal(a.embed("imu", x), b.embed("imu", x))


def test_wrapper_prefixes_are_stripped(tmp_path: Path, parity_dir: Path, fixture_sd: dict) -> None:
    torch.save({"module." + k: v for k, v in fixture_sd.items()}, tmp_path / "ddp.pth")
    _load(tmp_path / "ddp.pth", parity_dir, modalities=["thermal"])


# ----------------------------------------------------------------------------- dtypes, inputs


def _half_dtypes() -> list[torch.dtype]:
    import os

    on_gpu = os.environ.get("BINDSEARCH_TEST_DEVICE", "cpu").startswith("cuda")
    return [torch.bfloat16, torch.float16] if on_gpu else [torch.bfloat16]


@pytest.mark.parametrize("dtype", _half_dtypes(), ids=str)
def test_half_precision_cosine(
    parity_dir: Path, dtype: torch.dtype, test_device: torch.device
) -> None:
    """Half precision keeps cosine >= 0.999 to fp32 on every fixture case (bf16 on CPU too)."""
    ckpt, cfg = parity_dir / "checkpoint.pth", parity_dir / "config.json"
    ref = load_encoder(ckpt, config=cfg)
    half = load_encoder(ckpt, config=cfg, dtype=dtype, device=test_device)
    assert next(half.model.parameters()).dtype == dtype
    for case in model_cases(parity_dir):
        x = model_input(parity_dir, case)
        if x is None:
            continue
        a, b = ref.embed(case.modality, x), half.embed(case.modality, x)
        assert b.dtype == np.float32
        cos = (a * b).sum(axis=1)
        assert cos.min() >= 0.999, (case.id, cos.min())


def test_random_init_is_seeded_and_finite() -> None:
    a = load_encoder(config="imagebind_test", modalities=["vision"], seed=1)
    b = load_encoder(config="imagebind_test", modalities=["vision"], seed=1)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ea, eb = a.embed("vision", x), b.embed("vision", x)
    assert np.isfinite(ea).all()
    np.testing.assert_array_equal(ea, eb)


def test_bad_input_rank() -> None:
    enc = load_encoder(config="imagebind_test", modalities=["audio"])
    with pytest.raises(ValueError, match="audio input must have 4 or 5 dims"):
        enc.embed("audio", np.zeros((128, 204), np.float32))


def test_video_modality_uses_vision_tower() -> None:
    enc = load_encoder(config="imagebind_test", modalities=["video"])
    clips = np.random.default_rng(0).standard_normal((1, 2, 3, 2, 224, 224)).astype(np.float32)
    v = enc.embed("video", clips)
    per_clip = np.stack([enc.embed("vision", clips[:, i : i + 1])[0] for i in range(2)])
    mean = per_clip.mean(0)
    np.testing.assert_allclose(v[0], mean / np.linalg.norm(mean), atol=1e-5)


# ----------------------------------------------------------------------------- stems as GEMMs


@pytest.mark.parametrize(
    ("shape", "kernel", "stride"),
    [
        ((2, 1, 128, 204), (16, 16), (10, 10)),  # audio: overlapping patches
        ((2, 1, 230, 227), (16, 16), (16, 16)),  # depth, with trailing pixels a conv drops
        ((2, 3, 2, 56, 42), (2, 14, 14), (2, 14, 14)),  # video clip
    ],
)
def test_patch_proj_equals_convolution(shape: tuple, kernel: tuple, stride: tuple) -> None:
    from encoders.model import PatchProj

    torch.manual_seed(0)
    proj = PatchProj(shape[1], 8, kernel, stride)
    torch.nn.init.normal_(proj.weight)
    x = torch.randn(shape)
    conv = torch.nn.functional.conv2d if len(kernel) == 2 else torch.nn.functional.conv3d
    ref = conv(x, proj.weight, stride=stride).flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj(x), ref, rtol=1e-5, atol=1e-4)


def test_still_image_summed_kernel_equals_repeated_clip() -> None:
    """A still image embeds exactly like the 2-frame clip that repeats it (official behaviour)."""
    enc = load_encoder(config="imagebind_test", modalities=["vision"], seed=3)
    x = torch.randn(2, 3, 224, 224)
    clip = x.unsqueeze(2).expand(-1, -1, 2, -1, -1)  # (B, 3, 2, H, W)
    with torch.inference_mode():
        a = enc.model.tokens("vision", x)
        b = enc.model.tokens("vision", clip)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sha256_file_memo_follows_rewrites(tmp_path: Path) -> None:
    import hashlib
    import os

    from encoders import sha256_file

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 10)
    assert sha256_file(f) == hashlib.sha256(b"a" * 10).hexdigest()
    f.write_bytes(b"b" * 10)  # same size: the new mtime makes it a new key
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(f) == hashlib.sha256(b"b" * 10).hexdigest()
