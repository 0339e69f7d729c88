"""The public surface of each package is pinned: changing it is a deliberate act."""

from __future__ import annotations

import encoders


def test_encoders_exports() -> None:
    assert sorted(encoders.__all__) == sorted(
        [
            "DEFAULT_MODEL",
            "PRESETS",
            "WEIGHTS",
            "CheckpointError",
            "DownloadError",
            "Encoder",
            "EncoderError",
            "GeneratorInfo",
            "ImageGenerator",
            "InputLimits",
            "InvalidInput",
            "Modality",
            "ModelConfig",
            "ModelRef",
            "PreprocessConfig",
            "TrunkConfig",
            "UnknownWeights",
            "WeightsSpec",
            "download_weights",
            "list_presets",
            "load_encoder",
            "load_generator",
            "preprocess",
            "read_state_dict",
            "remap_imagebind_keys",
            "resolve_model",
            "sha256_file",
        ]
    )
    for name in encoders.__all__:
        assert hasattr(encoders, name), name


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
