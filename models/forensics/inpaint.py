"""Filling a region of a CT slice with plausible tissue: how an attacker erases a lesion.

Two in-painters:
- ``harmonic_fill``: the smooth solution of Laplace's equation from the region's border (what a photo
  editor's "heal" does). Noise-free unless noise is added back, which is the easiest removal to catch.
- ``repaint``: RePaint-style diffusion in-painting with our own BTD model (Lugmayr et al. 2022): at every
  reverse step the known pixels are re-noised from the original, the unknown ones come from the model.
  Respaced to a few dozen steps on a small crop so that it runs on a CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def harmonic_fill(values: np.ndarray, mask: np.ndarray, iterations: int = 400) -> np.ndarray:
    """Replace values inside mask by a smooth interpolation of the surrounding values (Jacobi iterations)."""
    out = values.astype(np.float32).copy()
    if not mask.any():
        return out
    ys, xs = np.nonzero(mask)
    y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, values.shape[0])
    x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, values.shape[1])
    crop = out[y0:y1, x0:x1]
    region = mask[y0:y1, x0:x1]
    # Start from the mean of the border so that the iterations converge quickly.
    border = ndimage.binary_dilation(region) & ~region
    crop[region] = float(crop[border].mean()) if border.any() else float(crop.mean())
    kernel = np.array([[0, 0.25, 0], [0.25, 0, 0.25], [0, 0.25, 0]], dtype=np.float32)
    for _ in range(iterations):
        smoothed = ndimage.convolve(crop, kernel, mode="nearest")
        crop[region] = smoothed[region]
    out[y0:y1, x0:x1] = crop
    return out


def noise_texture(values: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """The slice's own noise: the image minus a Gaussian-smoothed copy (keeps the scanner's noise texture)."""
    return values - ndimage.gaussian_filter(values, sigma)


def borrow_noise(
    values: np.ndarray, donor_mask: np.ndarray, shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """A patch of this slice's real noise texture, cut from a random place inside donor_mask.

    Why real noise rather than Gaussian: CT noise is spatially correlated by the reconstruction kernel; an
    attacker who matches the noise well copies it from the same image.
    """
    noise = noise_texture(values.astype(np.float32))
    h, w = shape
    valid = ndimage.binary_erosion(donor_mask, iterations=max(h, w) // 2 + 1)
    valid[: h // 2 + 1], valid[-(h // 2 + 1) :] = False, False
    valid[:, : w // 2 + 1], valid[:, -(w // 2 + 1) :] = False, False
    centres = np.argwhere(valid)
    if len(centres) == 0:
        fallback = np.array([[values.shape[0] // 2, values.shape[1] // 2]])
        centres = np.argwhere(donor_mask) if donor_mask.any() else fallback
    cy, cx = centres[int(rng.integers(len(centres)))]
    y0 = int(np.clip(cy - h // 2, 0, values.shape[0] - h))
    x0 = int(np.clip(cx - w // 2, 0, values.shape[1] - w))
    return noise[y0 : y0 + h, x0 : x0 + w].copy()


@torch.no_grad()
def repaint(
    diffusion: torch.nn.Module,
    crop01: np.ndarray,
    mask: np.ndarray,
    steps: int = 50,
    seed: int = 0,
    start_t: int | None = None,
) -> np.ndarray:
    """Diffusion in-painting of a (C, H, W) crop in [0, 1]; returns the crop with mask filled by the model.

    Respaced DDPM (DDIM with eta = 1 noise) over `steps` of the model's timesteps; at each step the known
    region is replaced by the original noised to the same level, so the fill stays consistent with it.
    With start_t (SDEdit-style), the reverse process starts from the crop itself noised to start_t, so a
    coarse edit already in the crop (a pasted nodule) is re-rendered by the model rather than replaced.
    """
    generator = torch.Generator().manual_seed(seed)
    x0_known = torch.from_numpy(crop01 * 2.0 - 1.0).float()[None]
    known = torch.from_numpy(~mask).float()[None, None]
    total = int(diffusion.num_timesteps) if start_t is None else int(start_t) + 1
    times = np.unique(np.linspace(total - 1, 0, steps).round().astype(int))[::-1]
    alphas = diffusion.alphas_cumprod
    if start_t is None:
        x = torch.randn(x0_known.shape, generator=generator)
    else:
        a_start = alphas[int(times[0])]
        x = a_start.sqrt() * x0_known + (1 - a_start).sqrt() * torch.randn(x0_known.shape, generator=generator)
    for index, t in enumerate(times):
        a_t = alphas[t]
        noised_known = a_t.sqrt() * x0_known + (1 - a_t).sqrt() * torch.randn(x.shape, generator=generator)
        x = known * noised_known + (1 - known) * x
        eps = diffusion.predict_noise(x, int(t)).float()
        x0_hat = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1.0, 1.0)
        if index == len(times) - 1:
            x = x0_hat
            break
        a_prev = alphas[times[index + 1]]
        sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        x = a_prev.sqrt() * x0_hat + direction + sigma * torch.randn(x.shape, generator=generator)
    out = known * x0_known + (1 - known) * x
    return ((out[0].numpy() + 1.0) / 2.0).astype(np.float32)
