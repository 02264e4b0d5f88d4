"""Convolutions of the U-Net computed the way the CPU runs them fastest, with the same arithmetic.

The default model is narrow (8 to 64 channels) and runs on whole 512 x 512 slices, so on the CPU its
convolutions are bound by memory layout, not by arithmetic. oneDNN reorders an NCHW tensor into its
blocked layout and back around every convolution; two cheaper paths give the same sums:

- a 1x1 convolution is a matrix product per image: ``baddbmm`` over (out, in) x (in, pixels) ran 2-3x
  faster than ``conv2d`` for 8 -> 48 channels at 384 x 448 (torch 2.13, 2 threads); the results differ
  only by float32 rounding (~1e-7 relative);
- a 3x3 convolution on a channels-last copy skips oneDNN's reorder (~30 % faster, identical results
  here), and the result is handed back in the usual layout so no other operation sees a new layout.

Only CPU tensors take these paths; CUDA runs ``conv2d`` as before. Measurements: docs/bench/scoring.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution (stride 1, no groups) of (B, C, H, W) as one batched matrix product."""
    if x.device.type != "cpu":
        return F.conv2d(x, weight, bias)
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    matrix = weight.reshape(out_channels, channels).expand(batch, out_channels, channels)
    pixels = x.reshape(batch, channels, height * width)
    out = torch.bmm(matrix, pixels) if bias is None else torch.baddbmm(bias.reshape(1, out_channels, 1), matrix, pixels)
    return out.reshape(batch, out_channels, height, width)


def spatial_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """A stride-1 k x k convolution; on the CPU over a channels-last copy, returned contiguous (NCHW)."""
    if x.device.type != "cpu":
        return F.conv2d(x, weight, bias, padding=padding)
    out = F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, padding=padding)
    return out.contiguous()


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in, out, 1)`` with the same parameters (and state_dict keys), run as a matrix product."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv(x, self.weight, self.bias)


class SpatialConv2d(nn.Conv2d):
    """``nn.Conv2d(in, out, k, padding=k // 2)`` (stride 1), run channels-last on the CPU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int | None = None) -> None:
        same = kernel_size // 2 if padding is None else padding
        super().__init__(in_channels, out_channels, kernel_size, padding=same)
        self.same_padding = same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spatial_conv(x, self.weight, self.bias, self.same_padding)
