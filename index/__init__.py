"""Offline indexing: corpus scan -> decode workers -> embed -> FAISS + SQLite metadata on disk.

    from index import open_index
    searcher = open_index("my-index")
    hits = searcher.search(query_vectors, k=10, targets=["vision", "audio"])

One FAISS index per item modality, all in one embedding space (any query searches any of
them); vector id == metadata row id; see ``index.store`` for the on-disk layout.
"""

from .corpus import CorpusEntry, scan_corpus, scan_paths
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
from .search import Hit, IndexSearcher, MetadataStore, open_index
from .spec import IndexSpec, RecallReport, choose_spec, recall_at_k
from .verify import VerifyReport, verify_index

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
    "IndexNotFound",
    "IndexSearcher",
    "IndexSpec",
    "IndexStoreError",
    "MetadataStore",
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
