"""3-D continuity: is the slice what its two neighbours predict, allowing anatomy to move a little?

Why: at slice spacings of 2.5 mm or less, anything of 3 mm or more appears on a neighbouring slice. A
structure present on a slice but on neither neighbour anywhere nearby (a pasted 2-D nodule), or present on
both neighbours but missing between them (an erased lesion), breaks continuity; vessels that run obliquely
only move. So the prediction is not an interpolation: each neighbour is turned into an envelope by grey-
value dilation / erosion over the displacement anatomy can make between slices (a local registration that
takes the best match within `reach`), and the slice is judged by how far it leaves the band spanned by
both neighbours' envelopes, in units of the slice's own noise (robust spread of slice - mean of neighbours).
Coarser series (or a slice without both neighbours) get no map and a reason: "too coarse".
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.cues import CueMap, masked_max

MAX_SPACING_MM = 2.5
SMOOTH_SIGMA_PX = 1.2
REGION_PX = 5


def reach_px(spacing_mm: float, pixel_mm: float) -> int:
    """How far (px) a structure may move between adjacent slices: about the slice spacing, at least 2 px."""
    return int(np.clip(round(1.2 * spacing_mm / max(pixel_mm, 0.2)), 2, 8))


def continuity_map(
    hu: np.ndarray,
    before: np.ndarray | None,
    after: np.ndarray | None,
    search: np.ndarray,
    spacing_mm: float | None,
    pixel_mm: float,
    max_spacing_mm: float = MAX_SPACING_MM,
) -> CueMap:
    """The cue's map (slice outside its neighbours' envelope, in noise units) and raw score, or a reason."""
    if spacing_mm is None:
        return CueMap("continuity", None, None, "no slice geometry: continuity not assessed")
    if spacing_mm > max_spacing_mm + 1e-6:
        return CueMap("continuity", None, None, f"too coarse: slice spacing {spacing_mm:.2g} mm > {max_spacing_mm} mm")
    if before is None or after is None or before.shape != hu.shape or after.shape != hu.shape:
        return CueMap("continuity", None, None, "no adjacent slice on both sides")
    if not search.any():
        return CueMap("continuity", None, None, "no lungs")
    smooth = [
        ndimage.gaussian_filter(np.clip(a, -1024, 400).astype(np.float32), SMOOTH_SIGMA_PX) for a in (before, hu, after)
    ]
    size = 2 * reach_px(spacing_mm, pixel_mm) + 1
    footprint = np.hypot(*np.mgrid[-(size // 2) : size // 2 + 1, -(size // 2) : size // 2 + 1]) <= size // 2
    upper = np.maximum(
        ndimage.maximum_filter(smooth[0], footprint=footprint), ndimage.maximum_filter(smooth[2], footprint=footprint)
    )
    lower = np.minimum(
        ndimage.minimum_filter(smooth[0], footprint=footprint), ndimage.minimum_filter(smooth[2], footprint=footprint)
    )
    outside = np.maximum(smooth[1] - upper, 0.0) + np.maximum(lower - smooth[1], 0.0)
    difference = smooth[1] - 0.5 * (smooth[0] + smooth[2])
    inner = search & (smooth[1] > -1000)
    values = difference[inner]
    spread = float(np.median(np.abs(values - np.median(values))) * 1.4826) if values.size else 1.0
    amap = ndimage.uniform_filter(outside / max(spread, 1.0), REGION_PX)
    amap, score = masked_max(amap, search)
    return CueMap("continuity", amap, score)
