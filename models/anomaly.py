"""From a BTD residual map to a map of how unusual each pixel is, and a slice score.

First version: local residual energy, log-scaled and standardised against reference statistics stored
with the model, restricted to the body. The forensic work (issue 6) replaces this with statistics
conditioned on tissue and position; the interface stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

BODY_HU_THRESHOLD = -500.0


@dataclass
class AnomalyModel:
    """Reference statistics of genuine residual energy, and how to turn deviations into scores."""

    energy_mean: float = 0.0
    energy_std: float = 1.0
    smoothing_px: int = 9
    region_threshold: float = 4.0

    @classmethod
    def from_metadata(cls, config: dict[str, Any] | None) -> AnomalyModel:
        if not config:
            return cls()
        known = {k: config[k] for k in ("energy_mean", "energy_std", "smoothing_px", "region_threshold") if k in config}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "log-energy-z",
            "energy_mean": self.energy_mean,
            "energy_std": self.energy_std,
            "smoothing_px": self.smoothing_px,
            "region_threshold": self.region_threshold,
        }

    def body_mask(self, hu: np.ndarray) -> np.ndarray:
        """Pixels inside the patient: air outside the body can hold no tampering worth flagging."""
        mask = hu > BODY_HU_THRESHOLD
        mask = ndimage.binary_opening(mask, iterations=2)
        return ndimage.binary_fill_holes(mask)

    def anomaly_map(self, residual: np.ndarray, hu: np.ndarray) -> np.ndarray:
        """residual: (C, H, W) or (H, W) float32; hu: (H, W). Returns (H, W) float32, higher = more unusual."""
        res = residual if residual.ndim == 2 else residual.mean(axis=0)
        energy = ndimage.uniform_filter(res.astype(np.float32) ** 2, size=self.smoothing_px)
        z = (np.log(energy + 1e-8) - self.energy_mean) / max(self.energy_std, 1e-6)
        z[~self.body_mask(hu)] = 0.0
        return z.astype(np.float32)

    def slice_score(self, amap: np.ndarray) -> float:
        return float(amap.max()) if amap.size else 0.0
