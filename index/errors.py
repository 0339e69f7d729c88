"""Errors raised by the index package: one base class, one line of text each."""

from __future__ import annotations


class IndexStoreError(Exception):
    """Base class of every error this package raises on purpose (the CLI prints its text)."""


class IndexNotFound(IndexStoreError, FileNotFoundError):
    """No index at the given path."""


class IndexIncomplete(IndexStoreError):
    """The index exists but a build or update did not finish; rerunning it completes it."""


class IndexCorrupt(IndexStoreError):
    """Vectors, metadata and manifest disagree, or a checksum does not match."""


class ModelMismatch(IndexStoreError):
    """The index was built with another model (checkpoint, config or preprocessing)."""


class SettingsMismatch(IndexStoreError, ValueError):
    """A build was resumed with settings that change the vectors (e.g. the segment window)."""


class CorpusError(IndexStoreError, ValueError):
    """The corpus argument itself is unusable (not its files: those are rejected one by one)."""


class DimensionMismatch(IndexStoreError, ValueError):
    """Query vectors of the wrong width for this index."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"query vectors have {got} dimensions; this index has {expected}")
        self.expected, self.got = expected, got
