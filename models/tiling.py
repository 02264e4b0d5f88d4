"""Running the diffusion model over whole slices: as one padded image, or as overlapping tiles.

The U-Net is fully convolutional, but its GroupNorm and attention see the whole input, so a slice run at
once is not numerically the same as patches of the training size. Both are offered: tiles of the
model's patch size (what it saw in training; air-only tiles skipped), stitched by a weighted average whose
weights fall towards tile edges (edge pixels lack context); or the whole slice, padded to a multiple of
the U-Net's downsampling factor and cropped to the body's bounding box.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# (B, C, H, W) model input in [-1, 1] -> (B, C, H, W) float32 residual
ResidualFn = Callable[[torch.Tensor], torch.Tensor]
# Several passes' inputs at once (their shapes may differ) -> their residuals, in order.
ResidualEachFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def tile_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets covering [0, size) with tiles of `patch`, at most `stride` apart; the last is flush."""
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch, stride))
    starts.append(size - patch)
    return starts


def tile_weight(patch: int) -> np.ndarray:
    """(patch, patch) weights, 1 in the centre falling to ~0.1 at the border (never 0: any pixel may be
    covered by one tile only)."""
    ramp = np.minimum(np.arange(patch) + 0.5, patch - np.arange(patch) - 0.5) / (patch / 2)
    line = np.clip(0.1 + 0.9 * ramp * 2, 0.1, 1.0)
    return np.outer(line, line).astype(np.float32)


def pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reflect-pad (B, C, H, W) at the bottom/right to (height, width) (replicate where reflect cannot)."""
    pad_h, pad_w = height - x.shape[-2], width - x.shape[-1]
    if pad_h <= 0 and pad_w <= 0:
        return x
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    return F.pad(x, (0, max(pad_w, 0), 0, max(pad_h, 0)), mode=mode)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class TileJob:
    """One tile of one slice waiting in the batch."""

    slice_index: int
    y: int
    x: int


def residual_tiles(
    images: list[np.ndarray],
    masks: list[np.ndarray | None],
    residual_fn: ResidualFn,
    patch: int,
    overlap: int,
    batch_size: int,
    device: torch.device,
) -> list[np.ndarray]:
    """Residual maps (C, H, W) of slices (C, H, W in [-1, 1]) by overlapping tiles.

    A tile is run only if it touches its slice's mask (None = everywhere); pixels no tile ran keep 0.
    Tiles of all slices share batches, so small slices still fill the accelerator.
    """
    weight = tile_weight(patch)
    stride = max(1, patch - overlap)
    padded, jobs = [], []
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        _, height, width = image.shape
        full_h, full_w = max(height, patch), max(width, patch)
        tensor = pad_to(torch.from_numpy(image)[None], full_h, full_w)[0]
        padded.append(tensor)
        for y in tile_starts(full_h, patch, stride):
            for x in tile_starts(full_w, patch, stride):
                if mask is None or mask[y : y + patch, x : x + patch].any():
                    jobs.append(TileJob(index, y, x))
    sums = [np.zeros(t.shape, dtype=np.float32) for t in padded]
    weights = [np.zeros(t.shape[-2:], dtype=np.float32) for t in padded]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        batch = torch.stack([padded[j.slice_index][:, j.y : j.y + patch, j.x : j.x + patch] for j in chunk])
        residual = residual_fn(batch.to(device)).float().cpu().numpy()
        for job, tile in zip(chunk, residual, strict=True):
            sums[job.slice_index][:, job.y : job.y + patch, job.x : job.x + patch] += tile * weight
            weights[job.slice_index][job.y : job.y + patch, job.x : job.x + patch] += weight
    maps = []
    for image, total, weight_sum in zip(images, sums, weights, strict=True):
        _, height, width = image.shape
        stitched = np.divide(total, weight_sum, out=np.zeros_like(total), where=weight_sum > 0)
        maps.append(stitched[:, :height, :width])
    return maps


def body_box(mask: np.ndarray | None, height: int, width: int, margin: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the mask's bounding box plus a margin, or the whole slice without a mask."""
    if mask is None or not mask.any():
        return 0, height, 0, width
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return (
        max(0, int(rows[0]) - margin),
        min(height, int(rows[-1]) + 1 + margin),
        max(0, int(cols[0]) - margin),
        min(width, int(cols[-1]) + 1 + margin),
    )


def residual_whole(
    images: list[np.ndarray],
    masks: list[np.ndarray | None],
    residual_fn: ResidualFn,
    multiple: int,
    batch_size: int,
    device: torch.device,
    margin: int = 16,
    residual_each: ResidualEachFn | None = None,
) -> list[np.ndarray]:
    """Residual maps (C, H, W) of slices run whole, each cropped to its body box (+margin) and padded to
    a multiple of the U-Net's downsampling factor; outside the box stays 0. Same-size crops share a batch.

    `residual_each`, when given, gets every batch at once instead of `residual_fn` one at a time: adjacent
    slices' body boxes often differ by a few rows, and two lone crops can then run side by side."""
    maps = [np.zeros(image.shape, dtype=np.float32) for image in images]
    crops: dict[tuple[int, int], list[tuple[int, tuple[int, int, int, int]]]] = {}
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        box = body_box(mask, image.shape[-2], image.shape[-1], margin)
        shape = (round_up(box[1] - box[0], multiple), round_up(box[3] - box[2], multiple))
        crops.setdefault(shape, []).append((index, box))
    chunks = [
        (members[start : start + batch_size], height, width)
        for (height, width), members in crops.items()
        for start in range(0, len(members), batch_size)
    ]

    def batch_of(chunk: list[tuple[int, tuple[int, int, int, int]]], height: int, width: int) -> torch.Tensor:
        tensors = [
            pad_to(torch.from_numpy(images[i][:, y0:y1, x0:x1])[None], height, width)[0]
            for i, (y0, y1, x0, x1) in chunk
        ]
        return torch.stack(tensors).to(device)

    if residual_each is not None:
        outputs = residual_each([batch_of(*chunk) for chunk in chunks])
    else:
        outputs = [residual_fn(batch_of(*chunk)) for chunk in chunks]
    for (chunk, _, _), output in zip(chunks, outputs, strict=True):
        residual = output.float().cpu().numpy()
        for (i, (y0, y1, x0, x1)), result in zip(chunk, residual, strict=True):
            maps[i][:, y0:y1, x0:x1] = result[:, : y1 - y0, : x1 - x0]
    return maps
