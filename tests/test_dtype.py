"""The dtype chosen for the machine: the probe, its overrides, and every command that uses it.

The probe's answer is forced (``BINDSEARCH_NATIVE_BF16``, or a fake ``/proc/cpuinfo``) so the
logic is checked on any CPU: fp32 stays the default without native bf16, bf16 is picked with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import DtypeChoice, Modality, choose_dtype, cpu_has_native_bf16, load_encoder
from encoders import dtype as dtypes
from encoders.config import resolve_config

X86_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n"
X86_BF16 = (
    "processor\t: 0\nmodel name\t: AMD EPYC 9B14\n"
    "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n"
)
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd4f\n"


@pytest.fixture
def auto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No dtype in the environment (conftest pins fp32), a private probe cache."""
    monkeypatch.delenv(dtypes.DTYPE_ENV, raising=False)
    monkeypatch.delenv(dtypes.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setenv("BINDSEARCH_CACHE", str(tmp_path / "cache"))
    return monkeypatch


def _cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(dtypes, "CPUINFO", path)


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("fp32", "float32"),
        ("BF16", "bfloat16"),
        ("bfloat16", "bfloat16"),
        ("fp16", "float16"),
        ("int8", "int8"),
        ("auto", "auto"),
        (None, "auto"),
        (torch.bfloat16, "bfloat16"),
    ],
)
def test_parse_dtype(given: str | torch.dtype | None, name: str) -> None:
    assert dtypes.parse_dtype(given) == name


@pytest.mark.parametrize("bad", ["bf17", "float64", "", "int4"])
def test_parse_dtype_refuses_in_one_line(bad: str) -> None:
    with pytest.raises(ValueError, match="not one of fp32, bf16, fp16, int8 or auto") as e:
        dtypes.parse_dtype(bad)
    assert "\n" not in str(e.value)


def test_int8_is_cpu_only() -> None:
    with pytest.raises(ValueError, match="int8 runs on CPU only"):
        choose_dtype("int8", "cuda")


# --- the probe -----------------------------------------------------------------------------------


def test_no_native_bf16_keeps_fp32(auto: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _cpuinfo(auto, tmp_path, X86_AVX2)
    assert not cpu_has_native_bf16()
    choice = choose_dtype(None, "cpu")
    assert choice == DtypeChoice("float32", choice.reason)
    assert "no native bf16" in choice.reason


@pytest.mark.parametrize("text", [X86_BF16, ARM_BF16], ids=["avx512_bf16", "arm_bf16"])
def test_native_bf16_picks_bf16(auto: pytest.MonkeyPatch, tmp_path: Path, text: str) -> None:
    _cpuinfo(auto, tmp_path, text)
    auto.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu_has_native_bf16()
    choice = choose_dtype(None, "cpu")
    assert (choice.name, choice.torch_dtype) == ("bfloat16", torch.bfloat16)
    assert "bf16" in choice.reason


def test_unvectorised_torch_keeps_fp32(auto: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ATEN_CPU_CAPABILITY=default: bf16 would run in scalar kernels."""
    _cpuinfo(auto, tmp_path, X86_BF16)
    auto.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert choose_dtype(None, "cpu").name == "float32"


@pytest.mark.parametrize(("forced", "name"), [("1", "bfloat16"), ("0", "float32")])
def test_env_forces_the_probe(auto: pytest.MonkeyPatch, forced: str, name: str) -> None:
    auto.setenv(dtypes.NATIVE_BF16_ENV, forced)
    assert choose_dtype(None, "cpu").name == name
    assert choose_dtype("auto", "cpu").name == name
    assert choose_dtype("fp32", "cpu").name == "float32"  # a named dtype is never overridden


def test_env_dtype_is_every_default(auto: pytest.MonkeyPatch) -> None:
    auto.setenv(dtypes.DTYPE_ENV, "int8")
    auto.setenv(dtypes.NATIVE_BF16_ENV, "1")
    assert choose_dtype(None, "cpu").name == "int8"
    assert choose_dtype("auto", "cpu").name == "bfloat16"  # "auto" asks the probe itself
    auto.setenv(dtypes.DTYPE_ENV, "bf17")
    with pytest.raises(ValueError, match=r"\$BINDSEARCH_DTYPE: dtype 'bf17' is not one of"):
        choose_dtype(None, "cpu")


def test_measured_probe_is_cached_per_cpu_and_torch(auto: pytest.MonkeyPatch) -> None:
    """Without CPU flags (no /proc/cpuinfo) a matmul probe decides, once per machine."""
    auto.setattr(dtypes, "CPUINFO", Path("/nonexistent/cpuinfo"))
    first = dtypes.measured_bf16_speedup(size=64, reps=1)
    cache = json.loads(dtypes.probe_cache_file().read_text(encoding="utf-8"))
    ((key, value),) = cache.items()
    assert torch.__version__ in key and dtypes.cpu_model() in key
    assert value == round(first, 3) and first > 0
    # The cached answer is used from now on: set it either side of the threshold.
    for speedup, native in [(4.0, True), (0.5, False)]:
        dtypes.probe_cache_file().write_text(json.dumps({key: speedup}), encoding="utf-8")
        assert dtypes.measured_bf16_speedup() == speedup
        assert cpu_has_native_bf16() is native
        assert "(measured)" in dtypes.native_bf16_reason()


# --- load_encoder --------------------------------------------------------------------------------


@pytest.mark.parametrize(("forced", "want"), [("0", torch.float32), ("1", torch.bfloat16)])
def test_load_encoder_default_follows_the_probe(
    auto: pytest.MonkeyPatch, forced: str, want: torch.dtype
) -> None:
    auto.setenv(dtypes.NATIVE_BF16_ENV, forced)
    enc = load_encoder(config="imagebind_test", modalities=["vision"])
    assert enc.dtype == want and enc.precision == str(want).removeprefix("torch.")
    assert {p.dtype for p in enc.model.parameters()} == {want}
    v = enc.embed("vision", torch.randn(2, 3, 224, 224))
    assert v.dtype == np.float32 and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)


def test_int8_quantises_every_trunk_linear() -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from encoders.model import Attention

    enc = load_encoder(config="imagebind_test", modalities=["vision", "text"], dtype="int8")
    assert (enc.precision, enc.dtype) == ("int8", torch.float32)
    for m in ("vision", "text"):
        trunk = enc.model.modality_trunks[m]
        assert not any(type(mod) is torch.nn.Linear for mod in trunk.modules())
        attn = [mod for mod in trunk.modules() if isinstance(mod, Attention)]
        assert attn and all(isinstance(a.in_proj, DynamicLinear) for a in attn)
        assert not any(hasattr(a, "in_proj_weight") for a in attn)  # fp32 copy freed
    ref = load_encoder(config="imagebind_test", modalities=["vision", "text"], dtype="fp32")
    x = torch.randn(3, 3, 224, 224)
    cos = (enc.embed("vision", x) * ref.embed("vision", x)).sum(1)
    assert cos.min() > 0.99


def test_a_tower_not_offered_runs_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """A modality that failed its fidelity bound is not run in that dtype: fp32, with a note."""
    offered = dict(dtypes.OFFERED)
    offered["bfloat16"] = offered["bfloat16"] - {Modality.AUDIO}
    monkeypatch.setattr(dtypes, "OFFERED", offered)
    enc = load_encoder(config="imagebind_test", modalities=["vision", "audio"], dtype="bf16")
    assert enc.precision == "bfloat16"
    assert "audio not offered in bfloat16" in enc.dtype_note
    trunks = enc.model.modality_trunks
    assert {p.dtype for p in trunks["audio"].parameters()} == {torch.float32}
    assert {p.dtype for p in trunks["vision"].parameters()} == {torch.bfloat16}
    fp32 = load_encoder(config="imagebind_test", modalities=["vision", "audio"], dtype="fp32")
    x = torch.randn(2, 1, 128, 204)
    np.testing.assert_array_equal(enc.embed("audio", x), fp32.embed("audio", x))


# --- the commands --------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bindsearch", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize(
    "args",
    [
        ["embed", "-m", "text", "--json", "--dtype", "bf17", "hello"],
        ["index", "build", ".", "-o", "never", "--dtype", "bf17"],
        ["serve", "--random-weights", "--config", "imagebind_test", "--dtype", "bf17"],
    ],
    ids=["embed", "index-build", "serve"],
)
def test_bad_dtype_is_one_line(args: list[str], tmp_path: Path) -> None:
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: dtype 'bf17' is not one of fp32, bf16, fp16, int8 or auto"
    assert not (tmp_path / "never").exists()


def test_embed_dtype_flag(parity_dir: Path) -> None:
    """--dtype bf16 (the CLI) and int8 (its function): within their bounds of fp32."""
    from encoders.embed_cli import embed_files

    ckpt, cfg = parity_dir / "checkpoint.pth", parity_dir / "config.json"
    texts = ["a red ring", "a blue star"]
    proc = _cli("embed", "-m", "text", "--json", "--checkpoint", str(ckpt), "--config", str(cfg),
                "--dtype", "bf16", *texts)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    bf16 = np.array(json.loads(proc.stdout))
    fp32 = embed_files("text", texts, ckpt, str(cfg), dtype="fp32")
    int8 = embed_files("text", texts, ckpt, str(cfg), dtype="int8")
    assert (fp32 * bf16).sum(1).min() >= 0.999
    assert (fp32 * int8).sum(1).min() >= 0.99
    assert not np.array_equal(fp32, bf16) and not np.array_equal(fp32, int8)  # flag reached


# --- the index and the service -------------------------------------------------------------------


def test_index_records_dtype_and_any_dtype_searches_it(tmp_path: Path) -> None:
    """Built in bf16, searched with fp32 query vectors (and vice versa): same model, same hits."""
    from encoders import resolve_model
    from index import ModelSource, build_index, open_index
    from service.searchers import check_index_model

    from .test_index_media import image

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = [image(corpus / f"img{i}.png", seed=i) for i in range(5)]
    ref = resolve_model(resolve_config("imagebind_test"), random_weights=True)
    vectors = {"bf16": tmp_path / "idx_bf16", "fp32": tmp_path / "idx_fp32"}
    proc = _cli(
        "index", "build", str(corpus), "-o", str(vectors["bf16"]), "--config", "imagebind_test",
        "--checkpoint", "none", "--workers", "0", "--dtype", "bf16",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    build_index(corpus, vectors["fp32"], ModelSource.from_ref(ref, dtype="fp32"))
    encoders_ = {n: load_encoder(ref, dtype=n) for n in ("bf16", "fp32")}
    for built, query_dtype in [("bf16", "fp32"), ("fp32", "bf16")]:
        with open_index(vectors[built]) as searcher:
            want = {"bf16": "bfloat16", "fp32": "float32"}[built]
            assert searcher.manifest.dtype == want
            manifest = json.loads((vectors[built] / "manifest.json").read_text(encoding="utf-8"))
            assert manifest["dtype"] == want
            assert "dtype" not in json.dumps(manifest["model"])  # not part of the fingerprint
            check_index_model(searcher, ref)  # the other dtype serves it
            enc = encoders_[query_dtype]
            q = enc.embed_items("vision", [str(f) for f in files])
            # Each image finds itself at cosine >= 0.999 (the tiny random model maps
            # images close together, so the top-1 may be a near-tie: within 1e-3 of it).
            for f, row in zip(files, searcher.search(q, k=len(files)), strict=True):
                own = next(h.score for h in row if Path(h.item.path).name == f.name)
                assert own >= 0.999 and own >= row[0].score - 1e-3


def test_service_settings_and_info_report_the_dtype(auto: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.embedders import TorchEmbedder, load_torch_embedder
    from service.settings import ServiceSettings

    assert ServiceSettings().dtype == "auto"
    auto.setenv(dtypes.DTYPE_ENV, "BF16")
    assert ServiceSettings().dtype == "bfloat16"
    assert ServiceSettings(dtype="int8").dtype == "int8"
    with pytest.raises(ValidationError, match="not one of fp32, bf16, fp16, int8 or auto"):
        ServiceSettings(dtype="bf17")
    auto.setenv(dtypes.NATIVE_BF16_ENV, "0")
    emb = load_torch_embedder(config="imagebind_test", random_weights=True, dtype="auto")
    assert emb.info.dtype == "float32"
    emb = load_torch_embedder(config="imagebind_test", random_weights=True, dtype="int8")
    assert emb.info.dtype == "int8"
    enc = load_encoder(config="imagebind_test", modalities=["text"], dtype="bf16")
    assert TorchEmbedder(enc).info.dtype == "bfloat16"


def test_v1_info_reports_the_dtype_served() -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.embedders import TorchEmbedder
    from service.settings import ServiceSettings

    from .test_service import wait_ready

    enc = load_encoder(config="imagebind_test", modalities=["text"], dtype="int8")
    app = create_app(ServiceSettings(dtype="int8"), TorchEmbedder(enc), None)
    with TestClient(app) as client:
        wait_ready(app)
        r = client.get("/v1/info")
        assert r.status_code == 200 and r.json()["model"]["dtype"] == "int8"
        r = client.post("/v1/embed", json={"text": ["a red ring"]})
        assert r.status_code == 200, r.text
