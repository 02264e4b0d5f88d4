"""Physical cues of tampering, fitted on genuine scans only (issue 12, item 2). numpy/scipy, no torch.

Each cue turns a slice (with its neighbours or its series where it needs them) into an anomaly map whose
maximum over the lungs is the cue's raw slice score; `models.cues.fusion` makes raw scores comparable
(relative to the series, scaled by what genuine series show) and fuses them into one calibrated score.

- noise: local noise texture (band energies in sliding windows) against the slice's own, per tissue;
- continuity: the slice against a prediction from its two neighbours with local displacement allowed
  (only where the slice spacing is fine enough: see continuity.MAX_SPACING_MM);
- copymove: patches whose noise texture duplicates another place of the series;
- header: file meta and pixel encoding of each instance against the rest of its series.
The BTD residual cue lives in models.anomaly (it needs the diffusion model's residual).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.window import Window


@dataclass
class CueMap:
    """A cue's answer for one slice: its map (higher = more unusual) and raw score, or why there is none."""

    name: str
    amap: np.ndarray | None
    score: float | None
    reason: str | None = None

    @property
    def peak(self) -> tuple[int, int] | None:
        """(row, column) of the map's maximum."""
        if self.amap is None:
            return None
        y, x = np.unravel_index(int(np.argmax(self.amap)), self.amap.shape)
        return int(y), int(x)


def masked_max(amap: np.ndarray, search: np.ndarray, window: Window | None = None) -> tuple[np.ndarray, float]:
    """The map with everything outside `search` pushed below its minimum inside, and the maximum inside.

    window: `amap` covers only this part of the slice (which holds all of `search`); the map returned covers
    the whole slice."""
    # Outside the window is outside `search`: set below with the rest. A copy either way: `amap` is kept intact.
    out = (window or Window.whole(amap.shape)).pasted(amap, 0.0)
    if not search.any():
        return out, float("nan")
    floor = float(out[search].min())
    out[~search] = min(floor, 0.0) - 1.0
    return out, float(out[search].max())
