"""The online service: a FastAPI app over an ``Embedder`` and a ``Searcher``.

from service import create_app, ServiceSettings, FakeEmbedder, MemorySearcher
app = create_app(ServiceSettings(), FakeEmbedder(dim=8), MemorySearcher(vectors, items))
"""

from .app import create_app
from .embedders import Embedder, FakeEmbedder, ModelInfo, TorchEmbedder
from .errors import ServiceError
from .searchers import Hit, IndexInfo, Item, MemorySearcher, Searcher, load_searcher
from .settings import ServiceSettings

__all__ = [
    "Embedder",
    "FakeEmbedder",
    "Hit",
    "IndexInfo",
    "Item",
    "MemorySearcher",
    "ModelInfo",
    "Searcher",
    "ServiceError",
    "ServiceSettings",
    "TorchEmbedder",
    "create_app",
    "load_searcher",
]
