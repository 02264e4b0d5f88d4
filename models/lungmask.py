"""Lung masks from HU alone (no network): where the threat model tampers, and where the detector searches.

Why a threshold method: it must run on CPU for every slice the service scores, need no extra weights, and
be good enough to say "this pixel is in or next to a lung". Air below about -400 HU inside the body, not
connected to the air around the patient, is lung (or airway/bowel gas, which a size filter removes).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from models import morphology
from models.content_cache import ContentCache, image_key

BODY_HU = -500.0
LUNG_HU = -400.0
MIN_LUNG_FRACTION = 0.002  # of the image area: smaller air pockets are bowel gas or airway, not lung


def _scale(hu: np.ndarray) -> int:
    """Masks need no full resolution: large slices are segmented at half size (4x less work per slice)."""
    return 2 if min(hu.shape) >= 256 else 1


def _upsample(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)[: shape[0], : shape[1]]


# Scoring one slice asks for the same masks several times (where to run the model, its search region, the
# tissue features, the cues): each is computed once per slice content. 12 images: the batch being finished, its
# neighbours and the batch whose pass runs ahead (models/pass_ahead.py).
_masks = ContentCache(slots=12)


def _remembered(kind: str, hu: np.ndarray, extra: int, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """compute(), or its earlier result (shared, read-only) for an image of the same bytes, shape and type.

    Always keyed by the full-size image, also for a mask made at half size: a decoded slice is frozen, so its
    key is remembered (models/content_cache.py), where a half-size view is a new array on every call and was
    hashed on every call (~1.5 ms of a B70f slice's ~42 ms of CPU besides the U-Net, 2026-12-05)."""
    return _masks.get(image_key(hu), (kind, extra), compute)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient's body: the largest connected region above -500 HU, holes filled."""
    scale = _scale(hu)
    body = _body_at(hu, scale)
    return _upsample(body, hu.shape) if scale == 2 else body.copy()


def _body_at(hu: np.ndarray, scale: int) -> np.ndarray:
    """The body of the full-size image `hu` at 1/`scale` of its resolution (the lung mask starts from it too)."""
    return _remembered("body", hu, scale, lambda: _segment_body(hu[::scale, ::scale]))


def _segment_body(hu: np.ndarray) -> np.ndarray:
    mask = morphology.opening(hu > BODY_HU, iterations=2)
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    body = labels == (int(np.argmax(_label_sizes(labels, count))) + 1)
    # Fill the lungs too: close first so that thin chest walls do not leave the lungs "outside".
    return morphology.fill_holes(morphology.closing(body, iterations=3))


def _label_sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Pixels per label 1..count: `ndimage.sum(mask, labels, range(1, count + 1))` of the labelled mask, as
    integers, counted in one pass (scipy's per-label statistics took ~0.9 ms of a slice)."""
    return np.bincount(labels.ravel(), minlength=count + 1)[1:]


def lung_mask(hu: np.ndarray, dilate_px: int = 0) -> np.ndarray:
    """Boolean (H, W) mask of lung tissue (vessels and nodules inside it included), optionally dilated."""
    return _remembered("lungs", hu, dilate_px, lambda: _compute_lung_mask(hu, dilate_px)).copy()


def _compute_lung_mask(hu: np.ndarray, dilate_px: int) -> np.ndarray:
    if _scale(hu) == 2:
        return _upsample(_lung_mask(hu, (dilate_px + 1) // 2, scale=2), hu.shape)
    return _lung_mask(hu, dilate_px, scale=1)


def _lung_mask(full: np.ndarray, dilate_px: int, scale: int) -> np.ndarray:
    """The lungs of the full-size image `full`, segmented at 1/`scale` of its resolution."""
    hu = full[::scale, ::scale]
    body = _body_at(full, scale)
    air = (hu < LUNG_HU) & body
    labels, count = ndimage.label(air)
    if count == 0:
        return np.zeros_like(air)
    sizes = _label_sizes(labels, count)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    keep = [i + 1 for i, size in enumerate(sizes) if size >= MIN_LUNG_FRACTION * hu.size and (i + 1) not in border]
    lungs = np.isin(labels, keep)
    # Close per slice so that vessels and nodules (soft tissue inside the lung) belong to the lung.
    lungs = morphology.closing(lungs, iterations=max(6 // scale, 1), square=True)
    lungs = morphology.fill_holes(lungs)
    if dilate_px > 0:
        lungs = morphology.dilate(lungs, iterations=dilate_px) & body
    return lungs


def share(mask: np.ndarray) -> float:
    """`mask.mean()` of a boolean mask, the same float (an exact count over the size, one rounding), without
    summing the mask as float64 (~0.2 ms per 512 x 512 mask, asked several times per slice)."""
    return np.count_nonzero(mask) / mask.size


def has_lungs(hu: np.ndarray, min_fraction: float = 0.02) -> bool:
    """Whether a slice shows enough lung to tamper in or search (a head or pelvis slice does not)."""
    return share(lung_mask(hu)) >= min_fraction
