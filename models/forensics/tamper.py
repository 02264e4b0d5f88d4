"""Tampering of real CT slices, with ground truth: what an attacker does, so that we can measure detection.

Every method works on HU arrays and returns a ``Tamper``: the new HU and the exact region it changed (a
mask, its box, the method). Pixels outside the mask are never changed, so the ground truth is exact.
When a slice cannot be tampered honestly (no lung, a lesion at the image edge, an annotation that does
not match the image), a ``Skip`` with the reason is returned instead, never a mislabelled sample.

Methods (names used in ground-truth files and benchmark tables):
- ``inject-noise``: a synthetic nodule carrying this slice's own noise texture (the hard case);
- ``inject-smooth``: the same nodule without noise (a careless attacker);
- ``inject-diffusion``: a nodule drawn by our diffusion model (RePaint), the closest here to CT-GAN;
- ``copy-move``: a real annotated lesion cut from another slice and pasted into this one;
- ``remove``: an annotated lesion erased by smooth in-painting with the slice's noise texture added back;
- ``remove-diffusion``: an annotated lesion erased by diffusion in-painting;
- ``inject-3d``: a sphere-ish nodule over neighbouring slices (see ``inject_sphere``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from models.forensics.inpaint import borrow_noise, harmonic_fill
from models.lungmask import lung_mask

EDGE_MARGIN_PX = 8
NODULE_HU = (-50.0, 60.0)


@dataclass
class Tamper:
    """A tampered slice and its ground truth."""

    method: str
    hu: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def box(self) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(self.mask)
        return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)

    def ground_truth(self) -> dict[str, Any]:
        x0, y0, x1, y1 = self.box
        return {"method": self.method, "box": {"x0": x0, "y0": y0, "x1": x1, "y1": y1}, **self.details}


@dataclass
class Skip:
    """Why a slice was not tampered with this method."""

    method: str
    reason: str


def _soft_disc(shape: tuple[int, int], cy: float, cx: float, radius: float, edge: float = 1.5) -> np.ndarray:
    """Weight in [0, 1]: 1 inside a slightly irregular disc, a smooth falloff of width `edge` at its border."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    distance = np.hypot(yy - cy, xx - cx)
    return np.clip((radius - distance) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def pick_lung_centre(
    hu: np.ndarray, radius: float, rng: np.random.Generator, lungs: np.ndarray | None = None
) -> tuple[int, int] | None:
    """A point deep enough inside the lung that a nodule of this radius stays in it, or None."""
    lungs = lung_mask(hu) if lungs is None else lungs
    inner = ndimage.binary_erosion(lungs, iterations=int(radius) + 3)
    margin = int(radius) + EDGE_MARGIN_PX
    inner[:margin], inner[-margin:], inner[:, :margin], inner[:, -margin:] = False, False, False, False
    # Avoid pasting onto existing dense structures (vessels, nodules): the attacker wants a clean spot.
    inner &= ndimage.uniform_filter(hu, size=int(2 * radius + 1)) < -600
    candidates = np.argwhere(inner)
    if len(candidates) == 0:
        return None
    cy, cx = candidates[int(rng.integers(len(candidates)))]
    return int(cy), int(cx)


def inject_nodule(
    hu: np.ndarray,
    rng: np.random.Generator,
    radius: float | None = None,
    noise_matched: bool = True,
    centre: tuple[int, int] | None = None,
    lungs: np.ndarray | None = None,
    level: float | None = None,
) -> Tamper | Skip:
    """Paste a synthetic solid nodule into the lung; with noise_matched, it carries the slice's real noise."""
    method = "inject-noise" if noise_matched else "inject-smooth"
    radius = float(rng.uniform(4.0, 9.0)) if radius is None else radius
    lungs = lung_mask(hu) if lungs is None else lungs
    if centre is None:
        centre = pick_lung_centre(hu, radius, rng, lungs)
    if centre is None:
        return Skip(method, "no lung region large enough for a nodule")
    cy, cx = centre
    weight = _soft_disc(hu.shape, cy, cx, radius * float(rng.uniform(0.9, 1.1)))
    level = float(rng.uniform(*NODULE_HU)) if level is None else level
    mask = weight > 0
    out = hu.copy()
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    w = weight[y0:y1, x0:x1]
    target = np.full(w.shape, level, dtype=np.float32)
    if noise_matched:
        # The nodule's interior gets real noise from soft tissue of this slice; the blend keeps the
        # parenchyma's own noise at the edge, so the noise level stays continuous.
        body_soft = (hu > -200) & (hu < 200)
        target += borrow_noise(hu, body_soft if body_soft.sum() > 400 else lungs, w.shape, rng)
    out[y0:y1, x0:x1] = (1.0 - w) * hu[y0:y1, x0:x1] + w * target
    return Tamper(method, out, mask, {"centre": [cx, cy], "radius_px": round(radius, 2), "hu": round(level, 1)})


def copy_move(
    hu: np.ndarray,
    source_hu: np.ndarray,
    lesion_mask: np.ndarray,
    rng: np.random.Generator,
    lungs: np.ndarray | None = None,
) -> Tamper | Skip:
    """Cut a real annotated lesion (with a feathered margin) from source_hu and paste it in this slice's lung."""
    method = "copy-move"
    if not lesion_mask.any():
        return Skip(method, "empty lesion mask")
    ys, xs = np.nonzero(lesion_mask)
    if (
        ys.min() < EDGE_MARGIN_PX
        or xs.min() < EDGE_MARGIN_PX
        or ys.max() >= hu.shape[0] - EDGE_MARGIN_PX
        or (xs.max() >= hu.shape[1] - EDGE_MARGIN_PX)
    ):
        return Skip(method, "lesion at the image edge")
    if float(source_hu[lesion_mask].mean()) < -700:
        return Skip(method, "annotation does not match the image (no dense tissue under the outline)")
    weight_full = ndimage.gaussian_filter(ndimage.binary_dilation(lesion_mask, iterations=2).astype(np.float32), 1.0)
    y0, y1, x0, x1 = ys.min() - 5, ys.max() + 6, xs.min() - 5, xs.max() + 6
    y0, x0 = max(y0, 0), max(x0, 0)
    weight = weight_full[y0:y1, x0:x1]
    weight[weight < 0.02] = 0.0
    patch = source_hu[y0:y1, x0:x1]
    radius = max(weight.shape) / 2.0
    lungs = lung_mask(hu) if lungs is None else lungs
    centre = pick_lung_centre(hu, radius, rng, lungs)
    if centre is None:
        return Skip(method, "no lung region large enough for this lesion")
    cy, cx = centre
    ty0, tx0 = cy - weight.shape[0] // 2, cx - weight.shape[1] // 2
    out = hu.copy()
    region = out[ty0 : ty0 + weight.shape[0], tx0 : tx0 + weight.shape[1]]
    out[ty0 : ty0 + weight.shape[0], tx0 : tx0 + weight.shape[1]] = (1 - weight) * region + weight * patch
    mask = np.zeros(hu.shape, dtype=bool)
    mask[ty0 : ty0 + weight.shape[0], tx0 : tx0 + weight.shape[1]] = weight > 0
    return Tamper(method, out, mask, {"centre": [int(cx), int(cy)], "source_box": [int(x0), int(y0), int(x1), int(y1)]})


def removal_region(hu: np.ndarray, lesion_mask: np.ndarray) -> np.ndarray | str:
    """The region to erase for a lesion (its mask, dilated to cover its edge), or why it cannot be erased."""
    if not lesion_mask.any():
        return "empty lesion mask"
    region = ndimage.binary_dilation(lesion_mask, iterations=3)
    ys, xs = np.nonzero(region)
    if (
        ys.min() < EDGE_MARGIN_PX
        or xs.min() < EDGE_MARGIN_PX
        or ys.max() >= hu.shape[0] - EDGE_MARGIN_PX
        or (xs.max() >= hu.shape[1] - EDGE_MARGIN_PX)
    ):
        return "lesion at the image edge"
    if float(hu[lesion_mask].mean()) < -700:
        return "annotation does not match the image (no dense tissue under the outline)"
    ring = ndimage.binary_dilation(region, iterations=3) & ~region
    if float(np.median(hu[ring])) > float(hu[lesion_mask].mean()) - 50:
        return "lesion not distinguishable from its surroundings (embedded in the chest wall or mediastinum)"
    return region


def remove_lesion(
    hu: np.ndarray, lesion_mask: np.ndarray, rng: np.random.Generator, add_noise: bool = True
) -> Tamper | Skip:
    """Erase an annotated lesion: smooth in-painting from its surroundings, the slice's noise added back."""
    method = "remove" if add_noise else "remove-smooth"
    region = removal_region(hu, lesion_mask)
    if isinstance(region, str):
        return Skip(method, region)
    filled = harmonic_fill(hu, region)
    if add_noise:
        ys, xs = np.nonzero(region)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        lungs = lung_mask(hu)
        noise = borrow_noise(hu, lungs & ~region, (y1 - y0, x1 - x0), rng)
        filled[y0:y1, x0:x1] += noise * region[y0:y1, x0:x1]
    out = hu.copy()
    out[region] = filled[region]
    return Tamper(method, out, region, {"lesion_px": int(lesion_mask.sum())})


def inject_sphere(
    volume: list[np.ndarray],
    spacing_z_mm: float,
    pixel_mm: float,
    rng: np.random.Generator,
    radius_mm: float | None = None,
    noise_matched: bool = True,
) -> list[tuple[int, Tamper]] | Skip:
    """A 3-D consistent nodule across neighbouring slices: each slice gets the sphere's cross-section.

    volume: HU slices in order along z. Returns (slice index, Tamper) for every slice the sphere touches.
    """
    method = "inject-3d"
    radius_mm = float(rng.uniform(5.0, 9.0)) if radius_mm is None else radius_mm
    radius_px = radius_mm / pixel_mm
    reach = int(np.floor(radius_mm / max(spacing_z_mm, 1e-3)))
    if len(volume) < 2 * reach + 1:
        return Skip(method, f"series has {len(volume)} slices; the sphere needs {2 * reach + 1}")
    centre_index = int(rng.integers(reach, len(volume) - reach))
    lungs_centre = lung_mask(volume[centre_index])
    # The centre must be inside the lung on every slice the sphere crosses.
    common = lungs_centre.copy()
    for k in range(centre_index - reach, centre_index + reach + 1):
        common &= lung_mask(volume[k])
    centre = pick_lung_centre(volume[centre_index], radius_px, rng, common)
    if centre is None:
        return Skip(method, "no lung region common to the neighbouring slices")
    level = float(rng.uniform(*NODULE_HU))
    results = []
    for k in range(centre_index - reach, centre_index + reach + 1):
        dz = (k - centre_index) * spacing_z_mm
        section = np.sqrt(max(radius_mm**2 - dz**2, 0.0)) / pixel_mm
        if section < 1.5:
            continue
        sub_rng = np.random.default_rng(int(rng.integers(2**31)))
        tamper = inject_nodule(
            volume[k], sub_rng, radius=section, noise_matched=noise_matched, centre=centre, level=level
        )
        if isinstance(tamper, Skip):
            return Skip(method, f"slice {k}: {tamper.reason}")
        tamper.method = method
        tamper.details.update(
            {"hu": level, "sphere_radius_mm": round(radius_mm, 2), "sphere_centre_slice": centre_index}
        )
        results.append((k, tamper))
    return results
