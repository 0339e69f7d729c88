"""Building models: the demo world, the two-stage ImageBind recipe, the demo decoder."""

__all__: list[str] = []
