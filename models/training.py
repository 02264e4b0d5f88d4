"""Unsupervised training of a BTD diffusion model on genuine CT slices: resumable, EMA, loss logged.

Why these choices (see docs/model-card.md):
- random patches from inside the body (half of them centred in the lungs, where tampering happens), so
  that the model spends its few CPU steps on tissue rather than on air;
- low-timestep emphasis: detection uses only t = 0, so most timesteps are drawn from [0, low_t_max];
- AdamW at 1e-4 (the paper's 8e-6 is for 700 k GPU steps) with an EMA copy, which is what gets shipped;
- a checkpoint every N steps and on SIGTERM/SIGINT, resumed from automatically, because a CPU run is
  long and gets interrupted.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.corpus import CorpusSlice
from models.lungmask import body_mask, lung_mask
from models.windowing import Window, to_unit_channels

log = logging.getLogger(__name__)

# Our default CT window: keeps lung parenchyma (about -850 HU) and its noise texture visible, which the
# published [-700, 2000] window clips to a constant (../shared/FINDINGS.md, point 1).
LUNG_WINDOW = Window(-1100.0, 300.0)


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved in the checkpoint and the model metadata."""

    dim: int = 8
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    # Two heads of 8 channels instead of the library's 4 x 32: the full-resolution linear attention
    # dominates CPU time on a whole 512 x 512 slice (3.9 s -> 0.7 s per slice at dim 8, measured here).
    attn_heads: int = 2
    attn_dim_head: int = 8
    windows: list[dict[str, float]] = field(default_factory=lambda: [LUNG_WINDOW.to_dict()])
    patch_size: int = 64
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-4
    ema_decay: float = 0.995
    timesteps: int = 1000
    beta_schedule: str = "sigmoid"
    low_t_fraction: float = 0.8
    low_t_max: int = 50
    lung_centre_fraction: float = 0.5
    steps: int = 1000
    checkpoint_every: int = 100
    seed: int = 0
    # One thread: on a shared, oversubscribed 2-core machine two threads spin-wait on each other (measured:
    # 20 s per step with 2 threads under load against 1-3 s with 1).
    threads: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "dim_mults" in known:
            known["dim_mults"] = tuple(known["dim_mults"])
        return cls(**known)


def build_diffusion(config: TrainConfig) -> torch.nn.Module:
    """The U-Net inside a Gaussian diffusion, with the project's own model code (models.unet/diffusion)."""
    from models.diffusion import GaussianDiffusion
    from models.unet import Unet

    channels = len(config.windows)
    unet = Unet(
        dim=config.dim,
        dim_mults=tuple(config.dim_mults),
        channels=channels,
        attn_heads=config.attn_heads,
        attn_dim_head=config.attn_dim_head,
    )
    return GaussianDiffusion(
        unet, image_size=config.patch_size, timesteps=config.timesteps, beta_schedule=config.beta_schedule
    )


class PatchSampler:
    """Random training patches in [0, 1] from genuine slices, centred inside the body (half in the lungs)."""

    def __init__(self, slices: Sequence[CorpusSlice], config: TrainConfig, rng: np.random.Generator) -> None:
        self.config = config
        self.rng = rng
        windows = [Window.from_dict(w) for w in config.windows]
        half = config.patch_size // 2
        self.images: list[np.ndarray] = []
        self.body_centres: list[np.ndarray] = []
        self.lung_centres: list[np.ndarray] = []
        for item in slices:
            hu = item.hu()
            body = body_mask(hu)
            if body.mean() < 0.05:
                continue
            inner = np.zeros_like(body)
            inner[half:-half, half:-half] = True
            self.images.append(to_unit_channels(hu, windows))
            self.body_centres.append(np.argwhere(body & inner))
            self.lung_centres.append(np.argwhere(lung_mask(hu, dilate_px=4) & inner))
        if not self.images:
            raise ValueError("no usable training slice (no body found in any)")

    def __len__(self) -> int:
        return len(self.images)

    def batch(self) -> torch.Tensor:
        size = self.config.patch_size
        half = size // 2
        out = np.empty((self.config.batch_size, self.images[0].shape[0], size, size), dtype=np.float32)
        for i in range(self.config.batch_size):
            k = int(self.rng.integers(len(self.images)))
            centres = self.lung_centres[k]
            if len(centres) == 0 or self.rng.random() >= self.config.lung_centre_fraction:
                centres = self.body_centres[k]
            cy, cx = centres[int(self.rng.integers(len(centres)))]
            patch = self.images[k][:, cy - half : cy - half + size, cx - half : cx - half + size]
            if self.rng.random() < 0.5:
                patch = patch[:, :, ::-1]
            out[i] = patch
        return torch.from_numpy(out)


def sample_timesteps(config: TrainConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Mostly low timesteps (detection is at t = 0), the rest uniform so that the model stays a diffusion model."""
    low = torch.randint(0, config.low_t_max + 1, (n,), generator=generator)
    full = torch.randint(0, config.timesteps, (n,), generator=generator)
    pick_low = torch.rand(n, generator=generator) < config.low_t_fraction
    return torch.where(pick_low, low, full)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(b)


class Trainer:
    """One training run living in a folder: checkpoint.pt (resumable) and loss.jsonl."""

    def __init__(self, run_dir: Path, slices: Sequence[CorpusSlice], config: TrainConfig) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        self.loss_path = self.run_dir / "loss.jsonl"
        saved = self._read_checkpoint()
        if saved is not None:
            # A resumed run keeps the configuration it started with (only the budget and threads may change).
            config = TrainConfig.from_dict({**saved["config"], "steps": config.steps, "threads": config.threads})
        self.config = config
        torch.manual_seed(config.seed)
        self.model = build_diffusion(config)
        self.ema = copy.deepcopy(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.wall_seconds = 0.0
        self.generator = torch.Generator().manual_seed(config.seed)
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            self.ema.load_state_dict(saved["ema"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.step = int(saved["step"])
            self.wall_seconds = float(saved.get("wall_seconds", 0.0))
            self.generator.manual_seed(config.seed + self.step)
        self.ema.eval()
        self.patients = sorted({s.patient for s in slices})
        self.sampler = PatchSampler(slices, config, np.random.default_rng(config.seed + self.step))
        self._stop = False

    def _read_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.is_file():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)

    def save_checkpoint(self) -> None:
        """Write atomically: a kill during the write must not destroy the last good checkpoint."""
        state = {
            "config": json.loads(json.dumps(asdict(self.config))),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "wall_seconds": self.wall_seconds,
            "patients": self.patients,
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)

    def request_stop(self, *_: object) -> None:
        self._stop = True

    def train(self, install_signal_handlers: bool = False) -> dict[str, Any]:
        """Train until config.steps (or a stop request); returns the training summary."""
        torch.set_num_threads(self.config.threads)
        if install_signal_handlers:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        self.model.train()
        started = time.monotonic()
        last_loss = float("nan")
        with self.loss_path.open("a") as loss_log:
            while self.step < self.config.steps and not self._stop:
                t0 = time.monotonic()
                x = self.sampler.batch()
                t = sample_timesteps(self.config, x.shape[0], self.generator)
                noise = torch.randn(x.shape, generator=self.generator)
                loss = self.model.p_losses(x * 2.0 - 1.0, t, noise=noise)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                _ema_update(self.ema, self.model, self.config.ema_decay)
                self.step += 1
                self.wall_seconds += time.monotonic() - t0
                last_loss = float(loss.detach())
                entry = {"step": self.step, "loss": last_loss, "wall_s": round(self.wall_seconds, 2)}
                loss_log.write(json.dumps(entry) + "\n")
                loss_log.flush()
                if self.step % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
        self.save_checkpoint()
        log.info("training stopped at step %d after %.0f s", self.step, time.monotonic() - started)
        return self.summary(last_loss)

    def summary(self, final_loss: float | None = None) -> dict[str, Any]:
        losses = read_losses(self.loss_path)
        tail = [entry["loss"] for entry in losses[-100:]]
        return {
            "steps": self.step,
            "wall_seconds": round(self.wall_seconds, 1),
            "final_loss": final_loss if final_loss is not None and np.isfinite(final_loss) else None,
            "final_loss_mean_last_100": float(np.mean(tail)) if tail else None,
            "batch_size": self.config.batch_size,
            "patch_size": self.config.patch_size,
            "lr": self.config.lr,
            "ema_decay": self.config.ema_decay,
            "low_t_fraction": self.config.low_t_fraction,
            "low_t_max": self.config.low_t_max,
            "patients": self.patients,
            "n_slices": len(self.sampler),
        }


def read_losses(path: Path) -> list[dict[str, float]]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def export_model(trainer: Trainer, out: Path, summary: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write the EMA weights in the library's 1.6.4 layout with the metadata file beside them."""
    return export_weights(trainer.ema, trainer.config, out, summary, extra, step=trainer.step)


def export_weights(
    ema: torch.nn.Module,
    config: TrainConfig,
    out: Path,
    summary: dict[str, Any],
    extra: dict[str, Any] | None = None,
    step: int = 0,
) -> Path:
    from models.checkpoint import save_model

    metadata = {
        "name": Path(out).stem,
        "modality": "CT",
        "channels": len(config.windows),
        "windows": config.windows,
        "patch_size": config.patch_size,
        "unet": {
            "dim": config.dim,
            "dim_mults": list(config.dim_mults),
            "layout": "1.6.4",
            "attn_heads": config.attn_heads,
            "attn_dim_head": config.attn_dim_head,
        },
        "timesteps": config.timesteps,
        "beta_schedule": config.beta_schedule,
        "training": summary,
        **(extra or {}),
    }
    save_model(ema, Path(out), metadata, step=step)
    return Path(out)


def export_from_checkpoint(run_dir: Path, out: Path, extra: dict[str, Any] | None = None) -> Path:
    """Export the EMA weights of a (possibly still running) training run without loading its data."""
    saved = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)
    config = TrainConfig.from_dict(saved["config"])
    ema = build_diffusion(config)
    ema.load_state_dict(saved["ema"])
    losses = read_losses(Path(run_dir) / "loss.jsonl")
    tail = [entry["loss"] for entry in losses[-100:]]
    summary = {
        "steps": int(saved["step"]),
        "wall_seconds": round(float(saved.get("wall_seconds", 0.0)), 1),
        "final_loss_mean_last_100": float(np.mean(tail)) if tail else None,
        "batch_size": config.batch_size,
        "patch_size": config.patch_size,
        "lr": config.lr,
        "ema_decay": config.ema_decay,
        "low_t_fraction": config.low_t_fraction,
        "low_t_max": config.low_t_max,
        "patients": saved.get("patients", []),
    }
    return export_weights(ema, config, out, summary, extra, step=int(saved["step"]))
