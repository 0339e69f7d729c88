"""Building models: the two-stage ImageBind recipe and the demo decoder, trained on ``world``."""

__all__: list[str] = []
