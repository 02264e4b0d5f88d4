"""Local noise-texture consistency: does every region of the slice carry the slice's own noise texture?

Why: the reconstruction kernel gives every genuine region of a slice the same noise power spectrum SHAPE,
varying in level with attenuation and local structure. Pasted, synthesised or in-painted texture rarely
matches both. The spectrum is measured in sliding windows as the energy of three difference-of-Gaussian
bands (a coarse NPS: fine / middle / coarse); each window's log band energies are compared with the SAME
slice's windows of the same tissue (local HU bin x structure bin), so the reference is the slice itself and
needs no per-kernel fit. The map is the root-mean-square of the three bands' robust z and of the two
shape ratios (fine - middle, middle - coarse), averaged over a small region. Two-sided: in-painting makes
texture too smooth, pasting too rough or of the wrong grain.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.cues import CueMap, masked_max
from models.morphology import erode

BAND_SIGMAS = (0.0, 1.0, 2.0, 4.0)  # band b = G(sigma_b) - G(sigma_{b+1}); G(0) = the image
WINDOW_PX = 11
REGION_PX = 7
HU_EDGES = (-950.0, -900.0, -850.0, -800.0, -700.0, -550.0, -350.0, -150.0, 0.0, 100.0)
STRUCTURE_EDGES = (5.0, 15.0, 40.0)
MIN_BIN_PX = 150


def band_log_energies(hu: np.ndarray) -> np.ndarray:
    """(3, H, W) log of the local energy of each band in a WINDOW_PX window."""
    image = hu.astype(np.float32)
    blurred = [image] + [ndimage.gaussian_filter(image, s) for s in BAND_SIGMAS[1:]]
    bands = [blurred[i] - blurred[i + 1] for i in range(len(blurred) - 1)]
    return np.stack([np.log(ndimage.uniform_filter(b * b, WINDOW_PX) + 1.0) for b in bands]).astype(np.float32)


def tissue_bins(hu: np.ndarray) -> np.ndarray:
    local = ndimage.uniform_filter(hu.astype(np.float32), WINDOW_PX)
    smooth = ndimage.gaussian_filter(hu.astype(np.float32), 3.0)
    gradient = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)) / 8.0
    return np.digitize(local, HU_EDGES) * (len(STRUCTURE_EDGES) + 1) + np.digitize(gradient, STRUCTURE_EDGES)


def _robust_z(values: np.ndarray, bins: np.ndarray, where: np.ndarray) -> np.ndarray:
    """z of each pixel against the pixels of the same bin within `where` (median / MAD; sparse bins pooled)."""
    n_bins = int(bins.max()) + 1
    z = np.zeros_like(values, dtype=np.float32)
    inside = values[where]
    global_median = float(np.median(inside))
    global_mad = float(np.median(np.abs(inside - global_median)) * 1.4826 + 1e-3)
    medians = np.full(n_bins, global_median, dtype=np.float32)
    mads = np.full(n_bins, global_mad, dtype=np.float32)
    bin_inside = bins[where]
    counts = np.bincount(bin_inside, minlength=n_bins)
    order = np.argsort(bin_inside, kind="stable")
    sorted_values = inside[order]
    starts = np.concatenate([[0], np.cumsum(counts)])
    for b in np.nonzero(counts >= MIN_BIN_PX)[0]:
        chunk = sorted_values[starts[b] : starts[b + 1]]
        med = float(np.median(chunk))
        medians[b] = med
        mads[b] = max(float(np.median(np.abs(chunk - med))) * 1.4826, 0.05)
    z = (values - medians[bins]) / mads[bins]
    return z.astype(np.float32)


def noise_map(hu: np.ndarray, search: np.ndarray) -> CueMap:
    """The cue's map over `search` (the dilated lungs) and its raw score; the slice is its own reference."""
    if search.sum() < 500:
        return CueMap("noise", None, None, "too little lung to compare windows with each other")
    energies = band_log_energies(hu)
    bins = tissue_bins(hu)
    reference = erode(search, iterations=3) if search.sum() > 5000 else search
    features = [energies[0], energies[1], energies[2], energies[0] - energies[1], energies[1] - energies[2]]
    z = np.stack([_robust_z(f, bins, reference) for f in features])
    chi = np.sqrt(np.mean(np.clip(z, -20, 20) ** 2, axis=0))
    chi = ndimage.uniform_filter(chi, REGION_PX)
    amap, score = masked_max(chi, search)
    return CueMap("noise", amap, score)
