"""The modalities of the shared embedding space."""

from __future__ import annotations

from enum import StrEnum


class Modality(StrEnum):
    """An input modality. Values are the official ImageBind names where they exist.

    ``video`` is ours: the official code folds video into ``vision`` (same tower, 6-D input).
    """

    VISION = "vision"
    VIDEO = "video"
    TEXT = "text"
    AUDIO = "audio"
    DEPTH = "depth"
    THERMAL = "thermal"
    IMU = "imu"

    @property
    def tower(self) -> Modality:
        """The model tower that embeds this modality (video uses the vision tower)."""
        return Modality.VISION if self is Modality.VIDEO else self

    @classmethod
    def parse(cls, value: str | Modality) -> Modality:
        """Parse a modality name, with an error that lists the accepted names."""
        if isinstance(value, Modality):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            accepted = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown modality {value!r}; accepted: {accepted}") from None


# The six towers of the model, in the official order.
TOWERS: tuple[Modality, ...] = (
    Modality.VISION,
    Modality.TEXT,
    Modality.AUDIO,
    Modality.DEPTH,
    Modality.THERMAL,
    Modality.IMU,
)
