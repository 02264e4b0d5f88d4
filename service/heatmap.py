"""PNG of one slice with the BTD residual heat map and the suspicious regions drawn over it.

Why this exists: a radiology IT person (or a radiologist glancing at the dashboard) must *see* why a slice
was flagged, without opening a viewer. The picture is the stored spool slice in a familiar window (lung or
soft tissue for CT, a percentile stretch for MR), the residual map the worker saved for that slice as a
translucent heat map, and a box (plus outline when known) around each region the detector reported.

Pillow does the compositing and the colour ramp is a small table of our own (dark -> purple -> red ->
orange -> pale yellow, rising in brightness like matplotlib's inferno), so the gateway needs neither
matplotlib (about 75 MB with its dependencies in the image) nor a figure or GUI backend (safe in a server
thread).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.pixels import apply_modality_lut

# Display windows (centre, width) in HU. Lung shows the parenchyma the threat model tampers with;
# soft tissue shows the mediastinum and lesions above it.
CT_WINDOWS: dict[str, tuple[float, float]] = {"lung": (-600.0, 1500.0), "soft": (40.0, 400.0)}
DEFAULT_CT_WINDOW = "lung"
# The heat ramp: (position in [0, 1], red, green, blue), linearly interpolated between the stops.
HEAT_RAMP: tuple[tuple[float, float, float, float], ...] = (
    (0.00, 0.00, 0.00, 0.02),
    (0.25, 0.30, 0.05, 0.45),
    (0.50, 0.75, 0.15, 0.30),
    (0.75, 0.98, 0.50, 0.05),
    (1.00, 1.00, 0.95, 0.60),
)
# Below this fraction of the map's robust maximum a pixel gets no colour, so anatomy stays readable.
HEAT_FLOOR = 0.35
HEAT_MAX_ALPHA = 0.6
REGION_COLOUR = (0, 255, 128, 255)
MAX_SIDE = 1024


@dataclass(frozen=True)
class RegionBox:
    """A region as stored in the `regions` table: pixel box (x1/y1 exclusive), score, optional outline."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float | None = None
    outline: Sequence[Sequence[float]] | None = field(default=None)


def slice_modality_values(ds: pydicom.Dataset, frame: int | None = None) -> np.ndarray:
    """The slice in modality units (HU for CT): (H, W) float32. `frame` is 1-based for multi-frame images."""
    pixels = ds.pixel_array
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1:
        index = (frame or 1) - 1
        if not 0 <= index < n_frames:
            raise ValueError(f"frame {frame} outside 1..{n_frames}")
        pixels = pixels[index]
    if pixels.ndim != 2:
        raise ValueError(f"not a greyscale slice (shape {pixels.shape})")
    return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)


def window_to_grey(values: np.ndarray, modality: str, window: str = DEFAULT_CT_WINDOW) -> np.ndarray:
    """Modality units -> uint8 grey. CT uses a named HU window; anything else a 1-99 percentile stretch."""
    if modality == "CT":
        centre, width = CT_WINDOWS.get(window, CT_WINDOWS[DEFAULT_CT_WINDOW])
        low, high = centre - width / 2.0, centre + width / 2.0
    else:
        low, high = (float(v) for v in np.percentile(values, [1.0, 99.0]))
    if high <= low:
        high = low + 1.0
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    return (scaled * 255.0 + 0.5).astype(np.uint8)


def heat_colours(norm: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGBA floats in [0, 1] along HEAT_RAMP (alpha 1; the caller sets it)."""
    stops = np.array(HEAT_RAMP, dtype=np.float32)
    rgba = np.ones((*norm.shape, 4), dtype=np.float32)
    for channel in range(3):
        rgba[..., channel] = np.interp(norm, stops[:, 0], stops[:, channel + 1])
    return rgba


def heat_rgba(residual: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Residual map -> RGBA heat layer of `size` (W, H); transparent where the residual is unremarkable.

    The map is taken as magnitude (removals lower the residual, injections raise it; both matter) and
    scaled to its own 99.5th percentile so one hot pixel does not wash out the rest.
    """
    magnitude = np.abs(np.nan_to_num(residual.astype(np.float32)))
    if magnitude.ndim == 3:
        magnitude = magnitude.mean(axis=0)
    top = float(np.percentile(magnitude, 99.5)) if magnitude.size else 0.0
    norm = np.clip(magnitude / top, 0.0, 1.0) if top > 0 else np.zeros_like(magnitude)
    rgba = heat_colours(norm)
    alpha = np.clip((norm - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0) * HEAT_MAX_ALPHA
    rgba[..., 3] = alpha
    layer = Image.fromarray((rgba * 255.0 + 0.5).astype(np.uint8), mode="RGBA")
    if layer.size != size:
        layer = layer.resize(size, Image.Resampling.BILINEAR)
    return layer


def draw_regions(image: Image.Image, regions: Sequence[RegionBox]) -> None:
    """Outline each region (polygon when the detector gave one) and draw its box, in place."""
    draw = ImageDraw.Draw(image)
    for region in regions:
        draw.rectangle([region.x0, region.y0, max(region.x0, region.x1 - 1), max(region.y0, region.y1 - 1)],
                       outline=REGION_COLOUR, width=2)
        if region.outline and len(region.outline) >= 3:
            points = [(float(x), float(y)) for x, y in region.outline]
            draw.line(points + [points[0]], fill=REGION_COLOUR, width=1)
        if region.score is not None:
            draw.text((region.x0 + 2, max(0, region.y0 - 12)), f"{region.score:.1f}", fill=REGION_COLOUR)


def render_overlay(
    dicom_path: Path,
    residual: np.ndarray | None = None,
    regions: Sequence[RegionBox] = (),
    frame: int | None = None,
    window: str = DEFAULT_CT_WINDOW,
) -> Image.Image:
    """The composed RGB picture: windowed slice, heat map over it, regions on top."""
    ds = pydicom.dcmread(dicom_path)
    values = slice_modality_values(ds, frame)
    grey = window_to_grey(values, str(getattr(ds, "Modality", "")), window)
    image = Image.fromarray(grey, mode="L").convert("RGBA")
    if residual is not None:
        image = Image.alpha_composite(image, heat_rgba(residual, image.size))
    draw_regions(image, regions)
    picture = image.convert("RGB")
    if max(picture.size) > MAX_SIDE:
        picture.thumbnail((MAX_SIDE, MAX_SIDE))
    return picture


def render_overlay_png(
    dicom_path: Path,
    residual: np.ndarray | None = None,
    regions: Sequence[RegionBox] = (),
    frame: int | None = None,
    window: str = DEFAULT_CT_WINDOW,
) -> bytes:
    """`render_overlay` encoded as PNG bytes, ready for an HTTP response."""
    buffer = io.BytesIO()
    render_overlay(dicom_path, residual, regions, frame, window).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def load_residual_map(path: Path) -> np.ndarray | None:
    """The worker's float16 .npy map, or None when it is missing or unreadable (the slice still renders)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
