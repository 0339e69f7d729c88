"""Errors raised by the input transforms (one hierarchy: see ``encoders.errors``)."""

from __future__ import annotations

from encoders.errors import InvalidInput

__all__ = ["InvalidInput"]
