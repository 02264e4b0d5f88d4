"""Copy-move: a region of the series that duplicates another place of the series, noise included.

Why: a real lesion copied within a series carries real anatomy and real noise, so neither the BTD residual
nor the noise texture finds it; but CT noise is independent from place to place, so two genuine patches
always differ by at least the noise (mean squared difference about 2 sigma^2), however alike the anatomy.
Two patches whose difference falls far below the noise floor are one patch shown twice. The statistic is
1 - (mean squared difference of the mean-removed patches) / (sigma_a^2 + sigma_b^2), best over +-2 px
shifts: about 0 or below for genuine pairs, about 1 for a copy. The same place on a nearby slice is
excluded (overlapping reconstructions share noise there).

Two stages, so that a series of hundreds of slices stays cheap: keypoints (local maxima of local contrast
inside the lungs: what an attacker copies is a lesion) with a coarse descriptor (smoothed patch,
correlation > COARSE_MIN), then the noise-floor test on the candidate pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from models.cues import CueMap
from models.morphology import erode

KEYPOINTS_PER_SLICE = 96
COARSE_HALF = 6
FINE_HALF = 5
SHIFT = 3
COARSE_MIN = 0.7
TOP_PER_KEYPOINT = 24
ROW_CHUNK = 1024
EXCLUDE_SAME_SLICE_PX = 12
EXCLUDE_ADJACENT_PX = 6


@dataclass
class SliceKeypoints:
    """What the series-level search keeps of one slice: keypoints, coarse descriptors, raw crops, noise."""

    points: np.ndarray  # (N, 2) row, column
    coarse: np.ndarray  # (N, D) unit vectors
    fine: np.ndarray  # (N, 2*(FINE_HALF+SHIFT)+1, same) raw HU crops
    shape: tuple[int, int] = (0, 0)
    extra: dict = field(default_factory=dict)  # "sigma": the slice's noise level (HU)


def keypoints(hu: np.ndarray, search: np.ndarray) -> SliceKeypoints:
    """Keypoints and descriptors of one slice (cheap; kept per slice while a series streams)."""
    image = np.clip(hu.astype(np.float32), -1024, 600)
    smooth = ndimage.gaussian_filter(image, 1.5)
    # Keypoints at local maxima of the lightly smoothed image: they depend on a few pixels around them only,
    # so a copied structure yields its keypoint at the same place in the copy as in the source. Ranked by
    # contrast against the wider neighbourhood (what stands out: a lesion, a vessel), in the lung proper.
    contrast = smooth - ndimage.gaussian_filter(image, 4.0)
    inside = erode(search, iterations=8) if search.sum() > 20000 else search
    peaks = (smooth == ndimage.maximum_filter(smooth, 5)) & inside & (smooth > -700) & (contrast > 10)
    margin = COARSE_HALF + FINE_HALF + SHIFT + 1
    peaks[:margin], peaks[-margin:], peaks[:, :margin], peaks[:, -margin:] = False, False, False, False
    points = np.argwhere(peaks)
    if len(points) > KEYPOINTS_PER_SLICE:
        order = np.argsort(-contrast[points[:, 0], points[:, 1]])[:KEYPOINTS_PER_SLICE]
        points = points[order]
    c, f = COARSE_HALF, FINE_HALF + SHIFT
    coarse = (
        np.stack([smooth[y - c : y + c + 1, x - c : x + c + 1].ravel() for y, x in points])
        if len(points)
        else np.zeros((0, (2 * c + 1) ** 2))
    )
    coarse = coarse - coarse.mean(axis=1, keepdims=True)
    coarse /= np.linalg.norm(coarse, axis=1, keepdims=True) + 1e-6
    crops = (
        np.stack([image[y - f : y + f + 1, x - f : x + f + 1] for y, x in points])
        if len(points)
        else np.zeros((0, 2 * f + 1, 2 * f + 1))
    )
    residual = image - ndimage.median_filter(image, 3)
    values = residual[inside] if inside.any() else residual.ravel()
    sigma = float(np.median(np.abs(values - np.median(values))) * 1.4826 * 1.5 + 1.0)  # median-3 removes ~1/3
    return SliceKeypoints(points.astype(np.int32), coarse.astype(np.float32), crops.astype(np.float32), hu.shape,
                          {"sigma": sigma})


def _fine_correlation(a: np.ndarray, b: np.ndarray, sigma_a: float = 20.0, sigma_b: float = 20.0) -> float:
    """1 - the least mean squared difference of a's centre crop and b's (means removed, +-SHIFT px) over the
    noise floor sigma_a^2 + sigma_b^2: about 1 for a duplicate, about 0 or less for independent noise."""
    h = FINE_HALF
    centre = a[SHIFT : SHIFT + 2 * h + 1, SHIFT : SHIFT + 2 * h + 1]
    centre = centre - centre.mean()
    floor = sigma_a**2 + sigma_b**2
    best = np.inf
    for dy in range(-SHIFT, SHIFT + 1):
        for dx in range(-SHIFT, SHIFT + 1):
            other = b[SHIFT + dy : SHIFT + dy + 2 * h + 1, SHIFT + dx : SHIFT + dx + 2 * h + 1]
            best = min(best, float(np.mean((centre - (other - other.mean())) ** 2)))
    return float(max(1.0 - best / floor, -1.0))


def duplicate_scores(a: np.ndarray, b: np.ndarray, sigma_a: np.ndarray, sigma_b: np.ndarray,
                     chunk: int = 512) -> np.ndarray:
    """`_fine_correlation` for many pairs at once: (P, w, w) crops -> (P,) scores (vectorised over shifts)."""
    h = FINE_HALF
    size = 2 * h + 1
    out = np.empty(len(a), dtype=np.float64)
    for start in range(0, len(a), chunk):
        ca = a[start : start + chunk, SHIFT : SHIFT + size, SHIFT : SHIFT + size]
        ca = ca - ca.mean(axis=(1, 2), keepdims=True)
        windows = np.lib.stride_tricks.sliding_window_view(b[start : start + chunk], (size, size), axis=(1, 2))
        windows = windows - windows.mean(axis=(3, 4), keepdims=True)  # (P, 2S+1, 2S+1, size, size)
        msd = ((windows - ca[:, None, None]) ** 2).mean(axis=(3, 4)).min(axis=(1, 2))
        floor = sigma_a[start : start + chunk] ** 2 + sigma_b[start : start + chunk] ** 2
        out[start : start + chunk] = np.maximum(1.0 - msd / floor, -1.0)
    return out


def copy_move_scores(
    slices: list[SliceKeypoints | None],
    positions: list[float | None] | None = None,
    spacing: float | None = None,
    only: set[int] | None = None,
) -> list[CueMap]:
    """Per slice of a series: the best fine-texture match of its keypoints elsewhere in the series.

    only: score just these slice indices (the others' maps are None); every slice still serves as a partner.
    """
    owner, index, coarse = [], [], []
    for s, kp in enumerate(slices):
        if kp is None or len(kp.points) == 0:
            continue
        owner.extend([s] * len(kp.points))
        index.extend(range(len(kp.points)))
        coarse.append(kp.coarse)
    results: list[CueMap] = []
    best = {s: (-1.0, None) for s in range(len(slices))}
    if coarse:
        owner_a = np.asarray(owner)
        index_a = np.asarray(index)
        descriptors = np.concatenate(coarse)
        points = np.concatenate([slices[s].points[i : i + 1] for s, i in zip(owner_a, index_a, strict=True)])  # type: ignore[union-attr]
        rows = np.arange(len(owner_a)) if only is None else np.nonzero(np.isin(owner_a, list(only)))[0]
        # The best TOP_PER_KEYPOINT coarse matches of each keypoint (rows in chunks: a 100-slice series has
        # ~10^4 keypoints, and a full similarity matrix would be ~400 MB).
        found = []
        for begin in range(0, len(rows), ROW_CHUNK):
            chunk = rows[begin : begin + ROW_CHUNK]
            sims = descriptors[chunk] @ descriptors.T
            sims[np.arange(len(chunk)), chunk] = -1.0
            k = min(TOP_PER_KEYPOINT, sims.shape[1])
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            for r, row in enumerate(top):
                for j in row:
                    if sims[r, j] > COARSE_MIN:
                        found.append((begin + r, int(j)))
        pairs = []
        for r, j in found:
            i = rows[r]
            if i == j:
                continue
            si, sj = int(owner_a[i]), int(owner_a[j])
            distance = float(np.hypot(*(points[i] - points[j])))
            if si == sj and distance < EXCLUDE_SAME_SLICE_PX:
                continue
            if si != sj and distance < EXCLUDE_ADJACENT_PX and _near_in_z(si, sj, positions, spacing):
                continue
            pairs.append((i, j))
        if pairs:
            first = np.array([p[0] for p in pairs])
            second = np.array([p[1] for p in pairs])
            crops_a = np.stack([slices[owner_a[i]].fine[index_a[i]] for i in first])  # type: ignore[union-attr]
            crops_b = np.stack([slices[owner_a[j]].fine[index_a[j]] for j in second])  # type: ignore[union-attr]
            sigma_a = np.array([slices[owner_a[i]].extra.get("sigma", 20.0) for i in first])  # type: ignore[union-attr]
            sigma_b = np.array([slices[owner_a[j]].extra.get("sigma", 20.0) for j in second])  # type: ignore[union-attr]
            values = duplicate_scores(crops_a, crops_b, sigma_a, sigma_b)
            for i, value in zip(first, values, strict=True):
                si = int(owner_a[i])
                if value > best[si][0]:
                    best[si] = (float(value), tuple(points[i]))
    for s, kp in enumerate(slices):
        if kp is None or (only is not None and s not in only):
            results.append(CueMap("copymove", None, None, "no keypoints" if kp is None else None))
            continue
        value, point = best[s]
        amap = np.zeros(kp.shape, dtype=np.float32)
        if point is not None:
            y, x = point
            amap[max(y - FINE_HALF, 0) : y + FINE_HALF + 1, max(x - FINE_HALF, 0) : x + FINE_HALF + 1] = value
        results.append(CueMap("copymove", amap, float(value)))
    return results


def _near_in_z(a: int, b: int, positions: list[float | None] | None, spacing: float | None) -> bool:
    """Adjacent (or next-but-one) slices: their same place shares anatomy and, if overlapping, noise."""
    if positions is None or positions[a] is None or positions[b] is None or not spacing:
        return abs(a - b) <= 2
    return abs(float(positions[a]) - float(positions[b])) <= 2.5 * spacing  # type: ignore[arg-type]
