"""Offline indexing: corpus scan -> decode workers -> embed -> FAISS + SQLite metadata on disk.

    from index import open_index
    searcher = open_index("my-index")
    hits = searcher.search(query_vectors, k=10, targets=["vision", "audio"], tags=["pets"])

One FAISS index per item modality, all in one embedding space (any query searches any of
them); vector id == metadata row id; see ``index.store`` for the on-disk layout.

FAISS comes from an extra: the errors and the result types (``Hit``, ``Item``, ``IndexInfo``,
which the service returns as they are) import without it; the rest loads on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    CorpusError,
    DimensionMismatch,
    IndexCorrupt,
    IndexIncomplete,
    IndexNotFound,
    IndexStoreError,
    ModelMismatch,
    SettingsMismatch,
)
from .results import Hit, IndexInfo, Item

if TYPE_CHECKING:
    from .corpus import CorpusEntry, scan_corpus, scan_paths
    from .fingerprint import PREPROCESS_VERSION, encoder_fingerprint, model_fingerprint
    from .pipeline import (
        BuildOptions,
        BuildSummary,
        ModelSource,
        add_to_index,
        build_index,
        remove_from_index,
        sync_index,
    )
    from .search import IndexSearcher, MetadataStore, open_index
    from .spec import IndexSpec, RecallReport, choose_spec, recall_at_k
    from .store import IndexManifest, ModalityManifest
    from .verify import VerifyReport, verify_index

_LAZY = {
    **dict.fromkeys(["CorpusEntry", "scan_corpus", "scan_paths"], ".corpus"),
    **dict.fromkeys(
        ["PREPROCESS_VERSION", "encoder_fingerprint", "model_fingerprint"], ".fingerprint"
    ),
    **dict.fromkeys(
        [
            "BuildOptions",
            "BuildSummary",
            "ModelSource",
            "add_to_index",
            "build_index",
            "remove_from_index",
            "sync_index",
        ],
        ".pipeline",
    ),
    **dict.fromkeys(["IndexSearcher", "MetadataStore", "open_index"], ".search"),
    **dict.fromkeys(["IndexSpec", "RecallReport", "choose_spec", "recall_at_k"], ".spec"),
    **dict.fromkeys(["IndexManifest", "ModalityManifest"], ".store"),
    **dict.fromkeys(["VerifyReport", "verify_index"], ".verify"),
}


def __getattr__(name: str) -> Any:
    """The names that need FAISS (or torch), imported when first asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
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
