"""The online half: FastAPI search service and the ``bindsearch`` command line."""

__all__: list[str] = []
