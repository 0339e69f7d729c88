"""Errors raised by the encoders package."""

from __future__ import annotations


class EncoderError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(EncoderError, ValueError):
    """A checkpoint file cannot be used: unreadable, unsafe, or not this architecture."""


class DownloadError(EncoderError):
    """Weights could not be fetched or failed their checksum."""


class InvalidInput(EncoderError, ValueError):
    """An input that cannot be decoded or is out of range; the message says what is accepted."""


class UnknownWeights(EncoderError, ValueError):
    """A weights name that is not in the registry; the message lists the known ones."""
