"""The public surface of ``index`` is pinned; it imports no web framework."""

from __future__ import annotations

import subprocess
import sys

import index


def test_index_exports() -> None:
    assert sorted(index.__all__) == sorted(
        [
            "PREPROCESS_VERSION",
            "BuildOptions",
            "BuildSummary",
            "CorpusEntry",
            "CorpusError",
            "DimensionMismatch",
            "Hit",
            "IndexCorrupt",
            "IndexIncomplete",
            "IndexInfo",
            "IndexManifest",
            "IndexNotFound",
            "IndexSearcher",
            "IndexSpec",
            "IndexStoreError",
            "Item",
            "MetadataStore",
            "ModalityManifest",
            "ModelMismatch",
            "ModelSource",
            "RecallReport",
            "SettingsMismatch",
            "VerifyReport",
            "add_to_index",
            "build_index",
            "choose_spec",
            "encoder_fingerprint",
            "model_fingerprint",
            "open_index",
            "recall_at_k",
            "remove_from_index",
            "scan_corpus",
            "scan_paths",
            "sync_index",
            "verify_index",
        ]
    )
    for name in index.__all__:
        assert hasattr(index, name), name


def test_index_imports_no_service_libraries() -> None:
    code = (
        "import sys, index; "
        "print(','.join(m for m in ('fastapi', 'uvicorn', 'service') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
