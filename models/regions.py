"""Anomaly map -> regions: connected areas above the model's threshold, with box, outline and score.

The outline is the convex hull of the component's pixel corners (at most MAX_OUTLINE_POINTS vertices),
because DICOM SR POLYLINE needs a small closed polygon that a viewer can draw, and a hull always encloses
every flagged pixel, which a smoothed contour may not.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.morphology import erode
from models.results import Region

MAX_OUTLINE_POINTS = 32
DEFAULT_MAX_REGIONS = 5
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise hull of (N, 2) points (Andrew's monotone chain), without repeating the first point."""
    pts = np.unique(points, axis=0)
    if len(pts) <= 2:
        return pts

    def half(sequence: np.ndarray) -> list[np.ndarray]:
        chain: list[np.ndarray] = []
        for p in sequence:
            while len(chain) >= 2:
                a, b = chain[-2], chain[-1]
                if (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    lower = half(pts)
    upper = half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def row_extremes(points: np.ndarray) -> np.ndarray:
    """The leftmost and rightmost of the (x, y) points on each row y: the only ones that can be hull vertices.

    Why: the hull is walked in Python, and a large region has thousands of boundary corners (about 0.05 s a
    slice); the hull of the row extremes is the same polygon, vertex for vertex, from the same first point.
    """
    if len(points) == 0:
        return points
    ordered = points[np.lexsort((points[:, 0], points[:, 1]))]
    new_row = np.r_[True, ordered[1:, 1] != ordered[:-1, 1]]
    last_of_row = np.r_[new_row[1:], True]
    return ordered[new_row | last_of_row]


def outline_of(component: np.ndarray, offset_x: int, offset_y: int) -> list[list[float]]:
    """Closed hull polygon of a boolean component (cropped to its box), in image pixel-edge coordinates."""
    boundary = component & ~erode(component)
    rows, cols = np.nonzero(boundary)
    corners = np.concatenate(
        [np.stack([cols + dx, rows + dy], axis=1) for dx in (0, 1) for dy in (0, 1)], axis=0
    ).astype(np.float64)
    hull = convex_hull(row_extremes(corners))
    if len(hull) > MAX_OUTLINE_POINTS:
        keep = np.linspace(0, len(hull), MAX_OUTLINE_POINTS, endpoint=False).astype(int)
        hull = hull[keep]
    hull = hull + np.array([offset_x, offset_y], dtype=np.float64)
    points = [[float(x), float(y)] for x, y in hull]
    return points + points[:1]


def label_maxima(amap: np.ndarray, labels: np.ndarray, above: np.ndarray, count: int) -> np.ndarray:
    """The maximum of `amap` over each label 1..count of `labels` (every label present, as ndimage.label makes
    them; `above` = labels > 0), in the map's type: what `ndimage.maximum(amap, labels, 1..count)` returns.

    Why not that call: it sorts every pixel of the map by value (8-9 % of a whole B70f series' scoring time,
    2026-12-04), where only the labelled pixels, usually a small part of the slice, can matter. Here they are
    grouped by label (a stable sort of small integers) and each group reduced; a maximum is exact either way.
    """
    values = amap[above]
    owners = labels[above]
    order = np.argsort(owners, kind="stable")
    sizes = np.bincount(owners, minlength=count + 1)[1:]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return np.maximum.reduceat(values[order], starts)


def find_regions(amap: np.ndarray, threshold: float, max_regions: int = DEFAULT_MAX_REGIONS) -> list[Region]:
    """The `max_regions` highest-scoring connected areas of `amap > threshold` (8-connected), best first."""
    above = amap > threshold
    if not above.any():
        return []
    labels, count = ndimage.label(above, structure=EIGHT_CONNECTED)
    index = np.arange(1, count + 1)
    maxima = label_maxima(amap, labels, above, count)
    best = np.argsort(-np.asarray(maxima), kind="stable")[:max_regions]
    boxes = ndimage.find_objects(labels)
    regions = []
    for order in best:
        label = int(index[order])
        rows, cols = boxes[label - 1]
        component = labels[rows, cols] == label
        regions.append(
            Region(
                x0=int(cols.start),
                y0=int(rows.start),
                x1=int(cols.stop),
                y1=int(rows.stop),
                score=float(maxima[order]),
                area_px=int(component.sum()),
                outline=outline_of(component, cols.start, rows.start),
            )
        )
    return regions
