"""Generative attacks with our own diffusion model: the closest thing here to CT-GAN and in-painting GANs.

- inject: a coarse nodule is pasted, then the model re-renders a crop around it from t = start_t
  (SDEdit/RePaint), so the nodule gets the texture the model believes CT has.
- remove: the lesion's region is in-painted from pure noise (RePaint), the surroundings kept.
Crops of 64 x 64 px and a few dozen respaced steps keep this cheap on a CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.forensics.inpaint import repaint
from models.forensics.tamper import Skip, Tamper, inject_nodule, removal_region
from models.windowing import Window

CROP = 64


def _windows(model: Any) -> list[Window]:
    meta = getattr(model, "metadata", None)
    windows = meta.windows if meta is not None else [{"low": -1100.0, "high": 300.0}]
    return [Window.from_dict(w) for w in windows]


def _crop_box(centre: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    cy, cx = centre
    y0 = int(np.clip(cy - CROP // 2, 0, shape[0] - CROP))
    x0 = int(np.clip(cx - CROP // 2, 0, shape[1] - CROP))
    return y0, y0 + CROP, x0, x0 + CROP


def _render(
    model: Any, hu: np.ndarray, coarse: np.ndarray, mask: np.ndarray, rng: np.random.Generator, start_t: int | None
) -> np.ndarray:
    """Re-render `coarse` inside `mask` with the model; HU outside the mask stay exactly those of `hu`."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = _crop_box((int(ys.mean()), int(xs.mean())), hu.shape)
    window = _windows(model)[0]
    crop = window.apply(coarse[y0:y1, x0:x1])[None]
    seed = int(rng.integers(2**31))
    filled = repaint(model.diffusion, crop, mask[y0:y1, x0:x1], steps=40, seed=seed, start_t=start_t)
    out = hu.copy()
    region = mask[y0:y1, x0:x1]
    new_hu = window.low + filled[0] * (window.high - window.low)
    out[y0:y1, x0:x1][region] = new_hu[region]
    return out


def inject_by_diffusion(hu: np.ndarray, rng: np.random.Generator, model: Any, start_t: int = 150) -> Tamper | Skip:
    method = "inject-diffusion"
    if model is None:
        return Skip(method, "no diffusion model")
    coarse = inject_nodule(hu, rng, noise_matched=False)
    if isinstance(coarse, Skip):
        return Skip(method, coarse.reason)
    out = _render(model, hu, coarse.hu, coarse.mask, rng, start_t)
    return Tamper(method, out, coarse.mask, {**coarse.details, "start_t": start_t})


def remove_by_diffusion(hu: np.ndarray, lesion_mask: np.ndarray, rng: np.random.Generator, model: Any) -> Tamper | Skip:
    method = "remove-diffusion"
    if model is None:
        return Skip(method, "no diffusion model")
    region = removal_region(hu, lesion_mask)
    if isinstance(region, str):
        return Skip(method, region)
    ys, xs = np.nonzero(region)
    if ys.max() - ys.min() >= CROP - 8 or xs.max() - xs.min() >= CROP - 8:
        return Skip(method, "lesion larger than the in-painting crop")
    out = _render(model, hu, hu, region, rng, None)
    return Tamper(method, out, region, {"lesion_px": int(lesion_mask.sum())})
