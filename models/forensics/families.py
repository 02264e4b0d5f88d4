"""Attack families written independently of the detector and of each other (issue 12, item 1).

Why: the 2026-11 benchmark's attacks all borrowed the slice's high-pass texture, and the detector's scoring
was chosen on them; an independent evaluation with other generators put it at chance. Each family here
makes its texture its own way, so that a cue chosen on three of them can be measured on the fourth:

- ``nps-nodule`` (a): a lobulated solid nodule whose interior noise is SYNTHESISED (white noise shaped by
  the slice's own measured noise power spectrum, scaled to the measured level), not cut from the slice;
- ``transplant`` (b): a real annotated lesion of ANOTHER patient, resampled to this pixel size, its
  background level shifted to this lung and its noise rescaled to this slice's noise level;
- ``inject-exemplar`` (c): a nodule region in-painted by exemplar-based texture synthesis (image quilting
  of 7 px blocks of this slice's own soft tissue), a classical in-painter that is not the detector's model;
- ``remove-exemplar`` (d): a lesion erased by exemplar (patch-based, onion-peel) in-painting from the
  surrounding lung;
- ``copy-move-series``: a real lesion copied from another slice of the SAME series to another place,
  unchanged (what the independent evaluation called copy-move within a series).

Every family has a single-slice form (one slice edited: ``*_2d`` functions) and a 3-D form (every slice
the object crosses: ``*_3d``). All work on HU arrays and return `Tamper` objects (exact masks; pixels
outside the mask unchanged) or a `Skip` with the reason. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.forensics.tamper import EDGE_MARGIN_PX, Skip, Tamper, pick_lung_centre, removal_region
from models.lungmask import lung_mask

FAMILIES = ("nps-nodule", "transplant", "inject-exemplar", "remove-exemplar", "copy-move-series")
REMOVAL_FAMILIES = ("remove-exemplar",)


@dataclass
class Volume:
    """One series as the attacker sees it: HU slices in order along z, slice spacing and pixel size (mm)."""

    slices: list[np.ndarray]
    spacing_mm: float
    pixel_mm: float
    lesions: dict[int, list[np.ndarray]] | None = None  # slice index -> annotated lesion masks


# ------------------------------------------------------------------ shapes


def lobulated_weight(
    shape: tuple[int, int], cy: float, cx: float, radius: float, harmonics: np.ndarray, edge_px: float
) -> np.ndarray:
    """Weight in [0, 1]: a lobulated disc r(theta) = R (1 + sum a_k cos(k theta + phi_k)), blurred edge."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    theta = np.arctan2(yy - cy, xx - cx)
    boundary = np.full(shape, radius, dtype=np.float64)
    for k, (amplitude, phase) in enumerate(harmonics, start=2):
        boundary += radius * amplitude * np.cos(k * theta + phase)
    distance = np.hypot(yy - cy, xx - cx)
    return np.clip((boundary - distance) / max(edge_px, 0.5) + 0.5, 0.0, 1.0).astype(np.float32)


def _harmonics(rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.uniform(0.03, 0.14, 4), rng.uniform(0, 2 * np.pi, 4)], axis=1)


def _section_radii(volume: Volume, radius_mm: float, centre: int) -> dict[int, float]:
    """Slice index -> cross-section radius (px) of a sphere of radius_mm centred on slice `centre`."""
    reach = int(np.floor(radius_mm / max(volume.spacing_mm, 1e-3)))
    out = {}
    for k in range(centre - reach, centre + reach + 1):
        if 0 <= k < len(volume.slices):
            section = np.sqrt(max(radius_mm**2 - ((k - centre) * volume.spacing_mm) ** 2, 0.0)) / volume.pixel_mm
            if section >= 1.5:
                out[k] = section
    return out


def _common_lung(volume: Volume, indices: Sequence[int]) -> np.ndarray:
    common = lung_mask(volume.slices[indices[0]])
    for k in indices[1:]:
        common &= lung_mask(volume.slices[k])
    return common


def _sphere_plan(
    volume: Volume, rng: np.random.Generator, method: str
) -> tuple[dict[int, float], tuple[int, int]] | Skip:
    radius_mm = float(rng.uniform(4.0, 9.0))
    reach = int(np.floor(radius_mm / max(volume.spacing_mm, 1e-3)))
    if len(volume.slices) < 2 * reach + 3:
        return Skip(
            method, f"series has {len(volume.slices)} slices; a {radius_mm:.1f} mm object needs {2 * reach + 3}"
        )
    lungs_per = [lung_mask(s).mean() for s in volume.slices]
    candidates = [k for k in range(reach + 1, len(volume.slices) - reach - 1) if lungs_per[k] > 0.03]
    if not candidates:
        return Skip(method, "no slice with enough lung for a 3-D object")
    centre = int(candidates[int(rng.integers(len(candidates)))])
    radii = _section_radii(volume, radius_mm, centre)
    common = _common_lung(volume, sorted(radii))
    point = pick_lung_centre(volume.slices[centre], max(radii.values()), rng, common)
    if point is None:
        return Skip(method, "no lung region common to the slices the object crosses")
    return radii, point


# ------------------------------------------------------------------ (a) NPS-synthesised noise


def measure_nps(hu: np.ndarray, roi: int = 32, max_rois: int = 40) -> tuple[np.ndarray, float] | None:
    """The slice's noise power spectrum (roi x roi, unshifted) and noise std, from homogeneous soft tissue.

    ROIs: squares whose mean is -150..150 HU and whose smoothed image is flat (so anatomy does not enter the
    spectrum), each detrended by a plane fit. None when the slice has no such region."""
    smooth = ndimage.gaussian_filter(hu, 3.0)
    gradient = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)) / 8.0
    local = ndimage.uniform_filter(hu, roi)
    flat = ndimage.uniform_filter(gradient, roi)
    ok = (np.abs(local) < 150) & (flat < 6.0)
    half = roi // 2
    ok[:half], ok[-half:], ok[:, :half], ok[:, -half:] = False, False, False, False
    centres = np.argwhere(ok[::8, ::8]) * 8
    if len(centres) < 3:
        return None
    order = np.argsort(flat[centres[:, 0], centres[:, 1]])[:max_rois]
    yy, xx = np.mgrid[:roi, :roi]
    design = np.stack([np.ones(roi * roi), yy.ravel(), xx.ravel()], 1)
    spectra, stds = [], []
    for cy, cx in centres[order]:
        patch = hu[cy - half : cy + half, cx - half : cx + half].astype(np.float64)
        coef, *_ = np.linalg.lstsq(design, patch.ravel(), rcond=None)
        detrended = patch - (design @ coef).reshape(roi, roi)
        spectra.append(np.abs(np.fft.fft2(detrended)) ** 2)
        stds.append(detrended.std())
    return np.mean(spectra, axis=0), float(np.median(stds))


def synthesise_noise(nps: np.ndarray, std: float, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Correlated noise of `shape` with the radial profile of `nps`, scaled to `std`."""
    n = nps.shape[0]
    freq = np.fft.fftfreq(n)
    radial = np.hypot(*np.meshgrid(freq, freq, indexing="ij"))
    bins = np.linspace(0, radial.max() + 1e-9, n // 2 + 1)
    which = np.digitize(radial.ravel(), bins)
    profile = np.bincount(which, nps.ravel(), minlength=len(bins) + 1) / np.maximum(
        np.bincount(which, minlength=len(bins) + 1), 1
    )
    size = max(shape) * 2
    f = np.fft.fftfreq(size)
    r = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    amplitude = np.sqrt(np.interp(r, bins, profile[1 : len(bins) + 1]))
    white = rng.standard_normal((size, size))
    noise = np.real(np.fft.ifft2(np.fft.fft2(white) * amplitude))[: shape[0], : shape[1]]
    return (noise / (noise.std() + 1e-9) * std).astype(np.float32)


def _paint(hu: np.ndarray, weight: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = weight > 0.01
    out = hu.copy()
    out[mask] = (1.0 - weight[mask]) * hu[mask] + weight[mask] * target[mask]
    return out, mask


def nps_nodule_2d(
    hu: np.ndarray,
    rng: np.random.Generator,
    radius_px: float | None = None,
    centre: tuple[int, int] | None = None,
    harmonics: np.ndarray | None = None,
    level: float | None = None,
    lungs: np.ndarray | None = None,
    method: str = "nps-nodule",
) -> Tamper | Skip:
    """(a) A lobulated solid nodule with noise synthesised from this slice's NPS at its measured level."""
    measured = measure_nps(hu)
    if measured is None:
        return Skip(method, "no homogeneous soft tissue to measure the noise power spectrum")
    nps, std = measured
    radius_px = float(rng.uniform(4.0, 9.0)) if radius_px is None else radius_px
    lungs = lung_mask(hu) if lungs is None else lungs
    centre = centre or pick_lung_centre(hu, radius_px * 1.2, rng, lungs)
    if centre is None:
        return Skip(method, "no lung region large enough for a nodule")
    harmonics = _harmonics(rng) if harmonics is None else harmonics
    level = float(rng.uniform(-40.0, 60.0)) if level is None else level
    weight = lobulated_weight(
        hu.shape, centre[0], centre[1], radius_px, harmonics, edge_px=float(rng.uniform(0.8, 1.6))
    )
    # A mild density gradient inside (real solid nodules are not flat), then the synthesised noise.
    yy, xx = np.mgrid[: hu.shape[0], : hu.shape[1]]
    ramp = (yy - centre[0]) * rng.normal(0, 1.5) + (xx - centre[1]) * rng.normal(0, 1.5)
    target = level + ramp + synthesise_noise(nps, std, hu.shape, rng)
    out, mask = _paint(hu, weight, target.astype(np.float32))
    return Tamper(
        method,
        out,
        mask,
        {
            "centre": [int(centre[1]), int(centre[0])],
            "radius_px": round(radius_px, 2),
            "hu": round(level, 1),
            "noise_std": round(std, 1),
        },
    )


def nps_nodule_3d(volume: Volume, rng: np.random.Generator) -> list[tuple[int, Tamper]] | Skip:
    """(a) in 3-D: an ellipsoid-like lobulated nodule over every slice it crosses, fresh noise per slice."""
    method = "nps-nodule-3d"
    plan = _sphere_plan(volume, rng, method)
    if isinstance(plan, Skip):
        return plan
    radii, centre = plan
    harmonics, level = _harmonics(rng), float(rng.uniform(-40.0, 60.0))
    out = []
    for k, radius in sorted(radii.items()):
        result = nps_nodule_2d(volume.slices[k], rng, radius, centre, harmonics, level, method=method)
        if isinstance(result, Skip):
            return Skip(method, f"slice {k}: {result.reason}")
        out.append((k, result))
    return out


# ------------------------------------------------------------------ (b) transplant from another patient


@dataclass
class Donor:
    """A real lesion of another patient/series: its slices (HU) and masks, in order along z, pixel size."""

    patient: str
    slices: list[np.ndarray]
    masks: list[np.ndarray]
    pixel_mm: float


def noise_std(hu: np.ndarray, region: np.ndarray | None = None) -> float:
    """Robust noise level: MAD of the image minus its 3x3 median, in the lung (or the body)."""
    residual = hu - ndimage.median_filter(hu, 3)
    region = lung_mask(hu) if region is None else region
    values = residual[region] if region.any() else residual.ravel()
    return float(np.median(np.abs(values - np.median(values))) * 1.4826 + 1e-3)


def _harmonised_patch(
    donor_hu: np.ndarray, donor_mask: np.ndarray, scale: float, target_noise: float, target_background: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """The donor lesion with a margin, resampled by `scale`, its noise and background set to the target's."""
    ys, xs = np.nonzero(donor_mask)
    if len(ys) == 0:
        return None
    margin = 6
    y0, y1 = max(ys.min() - margin, 0), min(ys.max() + margin + 1, donor_hu.shape[0])
    x0, x1 = max(xs.min() - margin, 0), min(xs.max() + margin + 1, donor_hu.shape[1])
    patch = donor_hu[y0:y1, x0:x1].astype(np.float32)
    mask = donor_mask[y0:y1, x0:x1].astype(np.float32)
    donor_noise = noise_std(patch, np.ones_like(mask, dtype=bool) & (mask < 0.5))
    ring = ndimage.binary_dilation(mask > 0.5, iterations=4) & ~(ndimage.binary_dilation(mask > 0.5, iterations=1))
    donor_background = float(np.median(patch[ring])) if ring.any() else -850.0
    if abs(scale - 1.0) > 0.05:
        patch = ndimage.zoom(patch, scale, order=1)
        mask = ndimage.zoom(mask, scale, order=1)
    low = ndimage.gaussian_filter(patch, 1.0)
    patch = low + (patch - low) * min(target_noise / max(donor_noise, 1e-3), 3.0)
    # Background: where the donor shows lung, shift to this lung's level (the lesion's own HU is kept).
    lesion_weight = np.clip(ndimage.gaussian_filter(mask, 1.0) * 1.5, 0, 1)
    patch = patch + (1 - lesion_weight) * (target_background - donor_background)
    weight = ndimage.gaussian_filter(ndimage.binary_dilation(mask > 0.5, iterations=2).astype(np.float32), 1.2)
    weight[weight < 0.02] = 0.0
    return patch, weight


def transplant_2d(
    hu: np.ndarray,
    donor: Donor,
    index: int,
    rng: np.random.Generator,
    pixel_mm: float,
    centre: tuple[int, int] | None = None,
    method: str = "transplant",
) -> Tamper | Skip:
    """(b) One slice of a donor lesion pasted into this slice's lung, harmonised in size, level and noise."""
    lungs = lung_mask(hu)
    if not lungs.any():
        return Skip(method, "no lungs in this slice")
    target_noise = noise_std(hu, lungs)
    target_background = float(np.median(hu[lungs & (hu < -500)])) if (lungs & (hu < -500)).any() else -850.0
    made = _harmonised_patch(
        donor.slices[index], donor.masks[index], donor.pixel_mm / pixel_mm, target_noise, target_background
    )
    if made is None:
        return Skip(method, "empty donor mask")
    patch, weight = made
    h, w = weight.shape
    if centre is None:
        centre = pick_lung_centre(hu, max(h, w) / 2.0, rng, lungs)
    if centre is None:
        return Skip(method, "no lung region large enough for this lesion")
    cy, cx = centre
    ty0, tx0 = cy - h // 2, cx - w // 2
    if (
        ty0 < EDGE_MARGIN_PX
        or tx0 < EDGE_MARGIN_PX
        or ty0 + h > hu.shape[0] - EDGE_MARGIN_PX
        or tx0 + w > hu.shape[1] - EDGE_MARGIN_PX
    ):
        return Skip(method, "lesion does not fit at this place")
    out = hu.copy()
    region = out[ty0 : ty0 + h, tx0 : tx0 + w]
    out[ty0 : ty0 + h, tx0 : tx0 + w] = (1 - weight) * region + weight * patch
    mask = np.zeros(hu.shape, dtype=bool)
    mask[ty0 : ty0 + h, tx0 : tx0 + w] = weight > 0
    return Tamper(
        method,
        out,
        mask,
        {"centre": [int(cx), int(cy)], "donor": donor.patient, "noise_target": round(target_noise, 1)},
    )


def transplant_3d(volume: Volume, donor: Donor, rng: np.random.Generator) -> list[tuple[int, Tamper]] | Skip:
    """(b) in 3-D: consecutive donor slices of the lesion into consecutive target slices, one centre."""
    method = "transplant-3d"
    n = len(donor.slices)
    if n < 2 or len(volume.slices) < n + 2:
        return Skip(method, f"donor spans {n} slices, series has {len(volume.slices)}")
    lungs_per = [lung_mask(s).mean() for s in volume.slices]
    starts = [k for k in range(1, len(volume.slices) - n) if min(lungs_per[k : k + n]) > 0.03]
    if not starts:
        return Skip(method, "no run of lung slices long enough")
    start = int(starts[int(rng.integers(len(starts)))])
    biggest = int(np.argmax([m.sum() for m in donor.masks]))
    extent = int(np.sqrt(donor.masks[biggest].sum()) * donor.pixel_mm / volume.pixel_mm) + 12
    common = _common_lung(volume, list(range(start, start + n)))
    centre = pick_lung_centre(volume.slices[start], extent / 2.0, rng, common)
    if centre is None:
        return Skip(method, "no lung region common to the slices")
    out = []
    for i in range(n):
        result = transplant_2d(volume.slices[start + i], donor, i, rng, volume.pixel_mm, centre, method)
        if isinstance(result, Skip):
            return Skip(method, f"slice {start + i}: {result.reason}")
        out.append((start + i, result))
    return out


# ------------------------------------------------------------------ (c) exemplar in-painting of a nodule


def quilt(
    exemplar_pool: np.ndarray,
    shape: tuple[int, int],
    rng: np.random.Generator,
    block: int = 7,
    overlap: int = 2,
    candidates: int = 60,
) -> np.ndarray:
    """Image quilting (Efros & Freeman 2001, simplified): blocks drawn from `exemplar_pool` (N, block, block),
    each chosen among random candidates for the least squared difference on its overlap with what is laid."""
    step = block - overlap
    rows = (shape[0] - overlap + step - 1) // step
    cols = (shape[1] - overlap + step - 1) // step
    canvas = np.zeros((rows * step + overlap, cols * step + overlap), dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            y, x = r * step, c * step
            picks = exemplar_pool[rng.integers(len(exemplar_pool), size=candidates)]
            cost = np.zeros(candidates)
            if r > 0:
                cost += ((picks[:, :overlap, :] - canvas[y : y + overlap, x : x + block]) ** 2).sum(axis=(1, 2))
            if c > 0:
                cost += ((picks[:, :, :overlap] - canvas[y : y + block, x : x + overlap]) ** 2).sum(axis=(1, 2))
            best = picks[int(np.argmin(cost))]
            patch = best.copy()
            if r > 0:  # average the overlap (a feathered seam)
                patch[:overlap] = 0.5 * (patch[:overlap] + canvas[y : y + overlap, x : x + block])
            if c > 0:
                patch[:, :overlap] = 0.5 * (patch[:, :overlap] + canvas[y : y + block, x : x + overlap])
            canvas[y : y + block, x : x + block] = patch
    return canvas[: shape[0], : shape[1]]


def soft_tissue_exemplars(hu: np.ndarray, rng: np.random.Generator, block: int = 7, n: int = 3000) -> np.ndarray | None:
    """Blocks of this slice's soft tissue (-100..150 HU, no strong edge): the texture the in-painter copies."""
    smooth = ndimage.gaussian_filter(hu, 2.0)
    gradient = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)) / 8.0
    ok = (smooth > -100) & (smooth < 150) & (ndimage.maximum_filter(gradient, block) < 15)
    half = block // 2
    ok[: half + 1], ok[-half - 1 :], ok[:, : half + 1], ok[:, -half - 1 :] = False, False, False, False
    centres = np.argwhere(ok)
    if len(centres) < 50:
        return None
    chosen = centres[rng.integers(len(centres), size=min(n, len(centres)))]
    return np.stack([hu[y - half : y + half + 1, x - half : x + half + 1] for y, x in chosen]).astype(np.float32)


def inject_exemplar_2d(
    hu: np.ndarray,
    rng: np.random.Generator,
    radius_px: float | None = None,
    centre: tuple[int, int] | None = None,
    harmonics: np.ndarray | None = None,
    lungs: np.ndarray | None = None,
    method: str = "inject-exemplar",
) -> Tamper | Skip:
    """(c) A nodule-shaped region in-painted by quilting this slice's own soft-tissue texture."""
    pool = soft_tissue_exemplars(hu, rng)
    if pool is None:
        return Skip(method, "no soft tissue to take exemplars from")
    radius_px = float(rng.uniform(4.0, 9.0)) if radius_px is None else radius_px
    lungs = lung_mask(hu) if lungs is None else lungs
    centre = centre or pick_lung_centre(hu, radius_px * 1.2, rng, lungs)
    if centre is None:
        return Skip(method, "no lung region large enough for a nodule")
    harmonics = _harmonics(rng) if harmonics is None else harmonics
    weight = lobulated_weight(
        hu.shape, centre[0], centre[1], radius_px, harmonics, edge_px=float(rng.uniform(0.8, 1.5))
    )
    ys, xs = np.nonzero(weight > 0.01)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    texture = np.zeros_like(hu, dtype=np.float32)
    texture[y0:y1, x0:x1] = quilt(pool, (y1 - y0, x1 - x0), rng)
    out, mask = _paint(hu, weight, texture)
    return Tamper(method, out, mask, {"centre": [int(centre[1]), int(centre[0])], "radius_px": round(radius_px, 2)})


def inject_exemplar_3d(volume: Volume, rng: np.random.Generator) -> list[tuple[int, Tamper]] | Skip:
    method = "inject-exemplar-3d"
    plan = _sphere_plan(volume, rng, method)
    if isinstance(plan, Skip):
        return plan
    radii, centre = plan
    harmonics = _harmonics(rng)
    out = []
    for k, radius in sorted(radii.items()):
        result = inject_exemplar_2d(volume.slices[k], rng, radius, centre, harmonics, method=method)
        if isinstance(result, Skip):
            return Skip(method, f"slice {k}: {result.reason}")
        out.append((k, result))
    return out


# ------------------------------------------------------------------ (d) exemplar removal


def exemplar_fill(
    hu: np.ndarray,
    region: np.ndarray,
    rng: np.random.Generator,
    patch: int = 9,
    candidates: int = 400,
    ring: tuple[int, int] = (4, 40),
) -> np.ndarray:
    """Onion-peel exemplar in-painting (Criminisi-like, without the priority term): the region is filled
    from its border inwards; each target patch takes the unknown pixels of the source patch (from the
    surrounding lung ring) that best matches its known pixels."""
    out = hu.astype(np.float32).copy()
    known = ~region
    half = patch // 2
    near = ndimage.binary_dilation(region, iterations=ring[1]) & ~ndimage.binary_dilation(region, iterations=ring[0])
    near &= hu < -300  # lung, not chest wall or vessels' walls only
    near[: half + 1], near[-half - 1 :], near[:, : half + 1], near[:, -half - 1 :] = False, False, False, False
    sources = np.argwhere(near)
    if len(sources) < 20:
        sources = np.argwhere(ndimage.binary_dilation(region, iterations=ring[1]) & ~region)
    offsets = np.mgrid[-half : half + 1, -half : half + 1].reshape(2, -1).T
    for _ in range(200):
        front = region & ~known & ndimage.binary_dilation(known)
        if not front.any():
            break
        for y, x in np.argwhere(front)[rng.permutation(int(front.sum()))][:: max(1, half)]:
            if known[y, x]:
                continue
            ty = np.clip(offsets[:, 0] + y, 0, hu.shape[0] - 1)
            tx = np.clip(offsets[:, 1] + x, 0, hu.shape[1] - 1)
            have = known[ty, tx]
            pick = sources[rng.integers(len(sources), size=min(candidates, len(sources)))]
            sy = np.clip(pick[:, 0:1] + offsets[None, :, 0], 0, hu.shape[0] - 1)
            sx = np.clip(pick[:, 1:2] + offsets[None, :, 1], 0, hu.shape[1] - 1)
            source_values = hu[sy, sx]
            cost = (((source_values - out[ty, tx][None]) ** 2) * have[None]).sum(axis=1)
            best = source_values[int(np.argmin(cost))]
            fill = ~have
            out[ty[fill], tx[fill]] = best[fill]
            known[ty[fill], tx[fill]] = True
    return out


def remove_exemplar_2d(
    hu: np.ndarray, lesion_mask: np.ndarray, rng: np.random.Generator, method: str = "remove-exemplar"
) -> Tamper | Skip:
    """(d) An annotated lesion erased by exemplar in-painting from the surrounding lung."""
    region = removal_region(hu, lesion_mask)
    if isinstance(region, str):
        return Skip(method, region)
    filled = exemplar_fill(hu, region, rng)
    out = hu.copy()
    out[region] = filled[region]
    return Tamper(method, out, region, {"lesion_px": int(lesion_mask.sum())})


def remove_exemplar_3d(volume: Volume, run: Sequence[int], rng: np.random.Generator) -> list[tuple[int, Tamper]] | Skip:
    """(d) in 3-D: the lesion erased on every consecutive slice of `run` where it is annotated."""
    method = "remove-exemplar-3d"
    if not volume.lesions:
        return Skip(method, "no annotated lesion in this series")
    out = []
    for k in run:
        masks = volume.lesions.get(k, [])
        if not masks:
            continue
        result = remove_exemplar_2d(volume.slices[k], np.logical_or.reduce(masks), rng, method)
        if isinstance(result, Skip):
            continue  # a slice where the lesion touches the wall stays as it is (the attacker's choice too)
        out.append((k, result))
    return out if len(out) >= 2 else Skip(method, "lesion erasable on fewer than 2 slices")


# ------------------------------------------------------------------ copy-move within a series


def copy_move_series_2d(
    volume: Volume,
    source: int,
    target: int,
    rng: np.random.Generator,
    method: str = "copy-move-series",
    centre: tuple[int, int] | None = None,
    lesion: np.ndarray | None = None,
) -> Tamper | Skip:
    """A real lesion of slice `source` copied, unchanged, to another place of slice `target` (same series)."""
    masks = (volume.lesions or {}).get(source, [])
    if lesion is None:
        if not masks:
            return Skip(method, "no annotated lesion on the source slice")
        lesion = masks[int(np.argmax([m.sum() for m in masks]))]
    src = volume.slices[source]
    if float(src[lesion].mean()) < -700:
        return Skip(method, "annotation does not match the image")
    ys, xs = np.nonzero(lesion)
    y0, y1, x0, x1 = ys.min() - 3, ys.max() + 4, xs.min() - 3, xs.max() + 4
    if y0 < 0 or x0 < 0 or y1 > src.shape[0] or x1 > src.shape[1]:
        return Skip(method, "lesion at the image edge")
    weight = ndimage.gaussian_filter(ndimage.binary_dilation(lesion, iterations=2).astype(np.float32), 0.8)[
        y0:y1, x0:x1
    ]
    weight[weight < 0.05] = 0.0
    patch = src[y0:y1, x0:x1]
    dst = volume.slices[target]
    h, w = patch.shape
    if centre is None:
        lungs = lung_mask(dst)
        centre = pick_lung_centre(dst, max(h, w) / 2.0, rng, lungs)
    if centre is None:
        return Skip(method, "no lung region large enough for this lesion")
    ty0, tx0 = centre[0] - h // 2, centre[1] - w // 2
    if ty0 < 0 or tx0 < 0 or ty0 + h > dst.shape[0] or tx0 + w > dst.shape[1]:
        return Skip(method, "does not fit")
    if source == target and abs(ty0 - y0) < h and abs(tx0 - x0) < w:
        return Skip(method, "target overlaps the source")
    out = dst.copy()
    out[ty0 : ty0 + h, tx0 : tx0 + w] = (1 - weight) * out[ty0 : ty0 + h, tx0 : tx0 + w] + weight * patch
    mask = np.zeros(dst.shape, dtype=bool)
    mask[ty0 : ty0 + h, tx0 : tx0 + w] = weight > 0
    return Tamper(
        method,
        out,
        mask,
        {
            "centre": [int(centre[1]), int(centre[0])],
            "source_slice": int(source),
            "source_box": [int(x0), int(y0), int(x1), int(y1)],
        },
    )


def copy_move_series_3d(
    volume: Volume, run: Sequence[int], rng: np.random.Generator
) -> list[tuple[int, Tamper]] | Skip:
    """The lesion's slices `run` copied to another place of the same slices (a 3-D duplicate)."""
    method = "copy-move-series-3d"
    run = [k for k in run if (volume.lesions or {}).get(k)]
    if len(run) < 2:
        return Skip(method, "lesion annotated on fewer than 2 slices")
    biggest = max(run, key=lambda k: max(m.sum() for m in volume.lesions[k]))  # type: ignore[index]
    size = int(np.sqrt(max(m.sum() for m in volume.lesions[biggest]))) + 10  # type: ignore[index]
    common = _common_lung(volume, run)
    centre = pick_lung_centre(volume.slices[biggest], size / 2.0, rng, common)
    if centre is None:
        return Skip(method, "no lung region common to the slices")
    out = []
    for k in run:
        result = copy_move_series_2d(volume, k, k, rng, method, centre)
        if isinstance(result, Skip):
            continue
        out.append((k, result))
    return out if len(out) >= 2 else Skip(method, "copy possible on fewer than 2 slices")
