"""The detectors compared on the benchmark, each as "HU slice -> residual-like map (H, W)".

- ``btd``: our model, one reverse step at t = 0, through the service's own Detector (same tiling);
- ``untrained``: the same architecture with random weights: tells whether training learned anything;
- ``anoddpm``: AnoDDPM-style (Wyatt et al. 2022): noise the slice to t = k, denoise in one shot, and take
  the difference (with our model, a fixed noise seed so that genuine and tampered see the same noise);
- ``highpass``: the image (in the model's window) minus its 3 x 3 median: a plain noise-residual detector;
- ``published``: BTD with the published configuration and window, when the user supplies the weights.
Every detector's map then goes through the same AnomalyModel, with reference statistics fitted on that
detector's own maps of genuine training slices, so that the comparison is about the signal, not the
post-processing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from models.windowing import Window

ResidualFn = Callable[[np.ndarray], np.ndarray]


def _detector_residual(detector) -> ResidualFn:
    def run(hu: np.ndarray) -> np.ndarray:
        residual = detector.residual_maps([hu])[0]
        return residual.mean(axis=0) if residual.ndim == 3 else residual

    return run


def btd_detector(model_path: Path, mode: str | None = None):
    from models.detector import Detector

    options = {"mode": mode} if mode else {}
    return Detector.load(model_path, device="cpu", **options)


def untrained_detector(model_path: Path, mode: str | None = None, seed: int = 0):
    """Same architecture and metadata as the trained model, weights re-initialised at random."""
    detector = btd_detector(model_path, mode)
    torch.manual_seed(seed)
    for module in detector.diffusion.model.modules():
        if hasattr(module, "reset_parameters") and module is not detector.diffusion.model:
            module.reset_parameters()
    return detector


def anoddpm_residual(detector, t_k: int = 50, seed: int = 0) -> ResidualFn:
    """x - denoise_from(x, t_k), whole slice cropped to the body; the noise is fixed by the seed."""
    diffusion = detector.diffusion

    def run(hu: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(detector.model_input(hu))[None]
        height, width = x.shape[-2:]
        multiple = int(diffusion.model.downsample_factor)
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        x_pad = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        noise = torch.randn(x_pad.shape, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            recon = diffusion.denoise_from(x_pad, t_k, noise=noise)
        residual = (x_pad - recon)[0, :, :height, :width].mean(dim=0).numpy()
        return residual.astype(np.float32)

    return run


def highpass_residual(window: Window) -> ResidualFn:
    def run(hu: np.ndarray) -> np.ndarray:
        unit = window.apply(hu) * 2.0 - 1.0
        return (unit - ndimage.median_filter(unit, size=3)).astype(np.float32)

    return run


def build_detectors(
    model_path: Path, names: list[str], published: Path | None = None, mode: str | None = None
) -> dict[str, ResidualFn]:
    """name -> residual function, for the requested names (``published`` only when a path is given)."""
    out: dict[str, ResidualFn] = {}
    trained = None
    for name in names:
        if name == "btd":
            trained = trained or btd_detector(model_path, mode)
            out[name] = _detector_residual(trained)
        elif name == "untrained":
            out[name] = _detector_residual(untrained_detector(model_path, mode))
        elif name == "anoddpm":
            trained = trained or btd_detector(model_path, mode)
            out[name] = anoddpm_residual(trained)
        elif name == "highpass":
            trained = trained or btd_detector(model_path, mode)
            out[name] = highpass_residual(trained.windows[0])
        elif name == "published":
            if published is None:
                continue
            out[name] = _detector_residual(btd_detector(published, mode))
        else:
            raise ValueError(f"unknown detector {name!r}")
    return out
