"""The public surface of each package is pinned: changing it is a deliberate act."""

from __future__ import annotations

import encoders
import generate
import world


def test_encoders_exports() -> None:
    assert sorted(encoders.__all__) == sorted(
        [
            "DEFAULT_MODEL",
            "PRESETS",
            "WEIGHTS",
            "CheckpointError",
            "DownloadError",
            "DtypeChoice",
            "Encoder",
            "EncoderError",
            "InputLimits",
            "InvalidInput",
            "Modality",
            "ModelConfig",
            "ModelRef",
            "PreprocessConfig",
            "TrunkConfig",
            "UnknownWeights",
            "WeightsSpec",
            "choose_dtype",
            "cpu_has_native_bf16",
            "download_weights",
            "list_presets",
            "load_encoder",
            "preprocess",
            "read_state_dict",
            "remap_imagebind_keys",
            "resolve_model",
            "sha256_file",
        ]
    )
    for name in encoders.__all__:
        assert hasattr(encoders, name), name


def test_generate_exports() -> None:
    assert sorted(generate.__all__) == [
        "GENERATORS",
        "GeneratorInfo",
        "ImageGenerator",
        "check_embeddings",
        "check_generator_dim",
        "load_generator",
        "load_named_generator",
    ]
    for name in generate.__all__:
        assert hasattr(generate, name), name


def test_world_exports() -> None:
    assert sorted(world.__all__) == ["World", "generate", "write_demo_world", "write_world"]
    for name in world.__all__:
        assert hasattr(world, name), name


def test_encoders_import_no_web_or_index_libraries() -> None:
    import subprocess
    import sys

    code = (
        "import sys, encoders; "
        "bad = [m for m in ('fastapi', 'faiss', 'pydantic_settings', 'uvicorn') "
        "if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
