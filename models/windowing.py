"""Intensity windows: modality units (HU for CT) -> the model's input range.

BTD was trained on CT clipped to [-700, 2000] HU and mapped to [0, 1], then normalised to [-1, 1]
inside the diffusion model. The published weights must keep that window; our own models may use
other windows (one per input channel), which is why a window list is part of every model's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """A linear map of [low, high] modality units onto [0, 1], clipping outside."""

    low: float
    high: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        scaled = (values.astype(np.float32) - self.low) / (self.high - self.low)
        return np.clip(scaled, 0.0, 1.0)

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Window:
        return cls(low=float(data["low"]), high=float(data["high"]))


# The window the BTD authors trained their CT model with.
BTD_CT_WINDOW = Window(-700.0, 2000.0)


def to_unit_channels(values: np.ndarray, windows: Sequence[Window]) -> np.ndarray:
    """Stack one [0, 1] channel per window: (H, W) -> (C, H, W), float32."""
    return np.stack([window.apply(values) for window in windows], axis=0)


def unit_to_model(unit: np.ndarray) -> np.ndarray:
    """[0, 1] -> [-1, 1], the normalisation the diffusion model applies to its input."""
    return unit * 2.0 - 1.0
