"""Gaussian diffusion maths for BTD: schedules, forward noising, one reverse step, and the BTD residual.

Buffer names equal denoising-diffusion-pytorch's GaussianDiffusion (13 schedule buffers), so a full
library state_dict (buffers plus ``model.``-prefixed U-Net weights) loads with ``strict=True``.

Inputs of every method here are already in [-1, 1]; ``normalize``/``unnormalize`` convert from and to
the [0, 1] images BTD feeds. Detection only ever uses t = 0 (Back-in-Time Diffusion: one reverse step
from the image itself), so ``btd_residual`` is the method scoring code should call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.unet import Unet

BETA_SCHEDULES = ("linear", "cosine", "sigmoid")
OBJECTIVES = ("pred_noise",)
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "loss_weight",
)


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], as the library does inside GaussianDiffusion."""
    return x01 * 2 - 1


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1) * 0.5


def linear_beta_schedule(timesteps: int) -> torch.Tensor:
    scale = 1000 / timesteps
    return torch.linspace(scale * 0.0001, scale * 0.02, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, 0.999)


def sigmoid_beta_schedule(timesteps: int, start: float = -3, end: float = 3, tau: float = 1) -> torch.Tensor:
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    v_start = torch.tensor(start / tau).sigmoid()
    v_end = torch.tensor(end / tau).sigmoid()
    alphas_cumprod = (-((t * (end - start) + start) / tau).sigmoid() + v_end) / (v_end - v_start)
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, 0.999)


def make_betas(beta_schedule: str, timesteps: int) -> torch.Tensor:
    """float64 betas of a named schedule."""
    schedules = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule, "sigmoid": sigmoid_beta_schedule}
    if beta_schedule not in schedules:
        raise ValueError(f"unknown beta schedule {beta_schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")
    return schedules[beta_schedule](timesteps)


def _extract(buffer: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """buffer[t] shaped (b, 1, 1, ...) to broadcast over an image batch."""
    return buffer.gather(-1, t).reshape(t.shape[0], *((1,) * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    """DDPM wrapper around a noise-predicting U-Net (objective ``pred_noise`` only, as BTD trains)."""

    def __init__(
        self,
        model: Unet,
        image_size: int | tuple[int, int],
        timesteps: int = 1000,
        beta_schedule: str = "sigmoid",
        objective: str = "pred_noise",
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r} is not supported; supported: {', '.join(OBJECTIVES)}")
        self.model = model
        self.channels = model.channels
        self.image_size = image_size
        self.objective = objective
        self.beta_schedule = beta_schedule
        self.num_timesteps = int(timesteps)

        # Computed in float64 and stored as float32, exactly as the library does, so the buffers match.
        betas = make_betas(beta_schedule, timesteps)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        snr = alphas_cumprod / (1 - alphas_cumprod)
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": torch.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
            "posterior_mean_coef1": betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
            "loss_weight": snr / snr,  # pred_noise without min-SNR clipping: all ones
        }
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, values[name].to(torch.float32))

    # --- forward process ---------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise a clean image to timestep t: sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
        )

    def p_losses(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss: MSE between the true and predicted noise, weighted per timestep (all ones)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        pred = self.model(x_t, t)
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none").flatten(1).mean(dim=1)
        return (loss * self.loss_weight.gather(-1, t)).mean()

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        """Library-compatible training entry: [0, 1] images, random timesteps, the loss."""
        t = torch.randint(0, self.num_timesteps, (img01.shape[0],), device=img01.device).long()
        return self.p_losses(normalize(img01), t)

    # --- reverse process ---------------------------------------------------------------------------
    def _times(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            return t.to(device=x.device, dtype=torch.long).expand(x.shape[0]) if t.ndim == 0 else t.long()
        return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)

    def predict_noise(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The U-Net's noise prediction for x (in [-1, 1]) at timestep t (int or per-sample tensor)."""
        return self.model(x, self._times(x, t))

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * noise
        )

    def q_posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (
            _extract(self.posterior_mean_coef1, t, x_t.ndim) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        )

    def btd_x_prev(self, x: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor = 0) -> torch.Tensor:
        """Posterior mean of one reverse step from x given its noise prediction, computed in float32.

        x_start is clipped to [-1, 1] (the library's ``clip_denoised=True``); no noise is added, which
        is exactly the library's behaviour at t = 0.
        """
        x32, eps32 = x.float(), eps.float()
        times = self._times(x32, t)
        x_start = self.predict_start_from_noise(x32, times, eps32).clamp(-1.0, 1.0)
        return self.q_posterior_mean(x_start, x32, times)

    @torch.no_grad()
    def p_sample_btd(self, x: torch.Tensor) -> torch.Tensor:
        """One reverse step from the image itself at t = 0 (the BTD step): x_prev, float32."""
        return self.btd_x_prev(x, self.predict_noise(x, 0), 0)

    @torch.no_grad()
    def btd_residual(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """BTD detection signal r = x - x_prev at t = 0, in float32.

        Why from the noise prediction: under bf16/fp16 the difference of two low-precision images loses
        the residual entirely (FINDINGS.md); only the U-Net may run in low precision, the arithmetic here
        is float32. Pass ``eps`` when the caller already ran the U-Net (e.g. batched under autocast).
        """
        eps = self.predict_noise(x, 0) if eps is None else eps
        return x.float() - self.btd_x_prev(x, eps, 0)

    @torch.no_grad()
    def denoise_from(self, x: torch.Tensor, t_k: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """AnoDDPM-style reconstruction: noise x to t_k, then a one-shot x0 estimate, clipped to [-1, 1]."""
        times = self._times(x, t_k)
        x_t = self.q_sample(x, times, noise)
        eps = self.model(x_t, times).float()
        return self.predict_start_from_noise(x_t.float(), times, eps).clamp(-1.0, 1.0)
