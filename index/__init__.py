"""Offline indexing: corpus scan -> decode -> embed -> FAISS + metadata on disk.

Built in issue #5; this package is declared now so the distribution layout is final.
"""

__all__: list[str] = []
