"""Convolutions of the U-Net computed the way the CPU runs them fastest, with the same arithmetic.

The default model is narrow (8 to 64 channels) and runs on whole 512 x 512 slices, so on the CPU its
convolutions are bound by memory layout, not by arithmetic. oneDNN reorders an NCHW tensor into its
blocked layout and back around every convolution; two cheaper paths give the same sums:

- a 1x1 convolution is a matrix product per image: ``baddbmm`` over (out, in) x (in, pixels) ran 2-3x
  faster than ``conv2d`` for 8 -> 48 channels at 384 x 448 (torch 2.13, 2 threads); the results differ
  only by float32 rounding (~1e-7 relative);
- a 3x3 convolution on a channels-last copy skips oneDNN's reorder (~30 % faster on the AMD EPYC VMs,
  identical results there), and the result is handed back in the usual layout so no other operation sees a
  new layout.

Which layout is faster depends on the CPU, not on the convolution: on the AMD EPYC VMs the channels-last
copy won for the default model's main convolutions, on an Intel Xeon VM with AMX (2026-12-04) the usual layout
won for every shape of both models, its kxk convolutions 160 -> 115 ms per whole-slice pass
(docs/bench/scoring.md). So each process times the two once, on one whole-slice probe convolution, and takes the
usual layout only when it is clearly faster (`conv_layout`); the choice changes sums by float32 rounding at
most (~1e-6 relative; identical for 8-channel outputs), and it is logged.

Only CPU tensors take these paths; CUDA runs ``conv2d`` as before. Measurements: docs/bench/scoring.md.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("btd.models.fastconv")

NCHW, CHANNELS_LAST = "nchw", "channels_last"
# The probe: an 8 -> 8 channel 3x3 convolution over a whole slice, the default model's commonest and costliest
# kind (8 of its 40 kxk convolutions; 4-7 ms each): ~0.1 s once per process. At a quarter of the size the
# layouts' times were closer (1.24 vs 1.64 ms against 4.2 vs 6.8), too close to the margin below.
_PROBE_SHAPE = (1, 8, 496, 512)
_PROBE_ROUNDS = 5
# The usual layout is taken only when it is this much faster (time ratio): a near tie keeps channels-last,
# so a loaded machine's timing noise cannot make two processes of one host choose differently.
_NCHW_MARGIN = 0.8
_layout: str | None = None
_layout_lock = threading.Lock()


def conv_layout() -> str:
    """The layout this process runs kxk convolutions in on the CPU: timed once, on first use (`_probe_layout`)."""
    global _layout
    if _layout is None:
        with _layout_lock:
            if _layout is None:
                _layout = _probe_layout()
    return _layout


def set_conv_layout(layout: str | None) -> None:
    """Run kxk convolutions in `layout` (NCHW or CHANNELS_LAST) from now on; None: time them again on next use.
    For tests and A/B benchmarks: both layouts compute the same sums up to float32 rounding."""
    global _layout
    if layout not in (None, NCHW, CHANNELS_LAST):
        raise ValueError(f"unknown layout {layout!r}")
    with _layout_lock:
        _layout = layout


def _probe_layout() -> str:
    """Time the probe convolution in both layouts (interleaved, medians after a warm-up of each) and choose."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(_PROBE_SHAPE, generator=generator)
    weight = torch.randn(_PROBE_SHAPE[1], _PROBE_SHAPE[1], 3, 3, generator=generator)
    routes: dict[str, Callable[[], torch.Tensor]] = {
        NCHW: lambda: F.conv2d(x, weight, padding=1),
        CHANNELS_LAST: lambda: _channels_last_conv(x, weight, None, 1),
    }
    seconds: dict[str, list[float]] = {name: [] for name in routes}
    with torch.inference_mode():
        for route in routes.values():
            route()  # oneDNN builds and caches its primitive, the allocator its buffers
        for _ in range(_PROBE_ROUNDS):
            for name, route in routes.items():
                started = time.perf_counter()
                route()
                seconds[name].append(time.perf_counter() - started)
    nchw, channels_last = (statistics.median(seconds[name]) for name in (NCHW, CHANNELS_LAST))
    choice = NCHW if nchw < _NCHW_MARGIN * channels_last else CHANNELS_LAST
    log.info(
        "convolutions in %s layout (probe %s: usual layout %.2f ms, channels-last copy %.2f ms)",
        choice, "x".join(map(str, _PROBE_SHAPE)), 1000 * nchw, 1000 * channels_last,
    )
    return choice


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
    """A stride-1 k x k convolution; on the CPU over a channels-last copy where that is the faster layout
    (`conv_layout`), returned contiguous (NCHW) either way."""
    if x.device.type != "cpu" or conv_layout() == NCHW:
        return F.conv2d(x, weight, bias, padding=padding)
    return _channels_last_conv(x, weight, bias, padding)


def _channels_last_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """conv2d over a channels-last copy of `x`, handed back in the usual layout."""
    out = F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, padding=padding)
    return out.contiguous()


# Rows of a 3x3 kernel that fall on each input row when the input was first doubled by nearest-neighbour
# upsampling: output row 2i (phase 0) reads input rows i-1, i, i (kernel rows 0 | 1+2), output row 2i+1
# (phase 1) reads i, i, i+1 (kernel rows 0+1 | 2); the same holds for columns.
_PHASE_ROWS = torch.tensor(
    [[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]
)


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) -> (out * 4, in, 3, 3): per output channel, one kernel per output pixel phase (a, b),
    over the input before upsampling, ordered as ``pixel_shuffle`` reads them (channel out * 4 + a * 2 + b)."""
    rows = _PHASE_ROWS.to(weight.dtype)
    kernels = torch.einsum("aij,ocjl,bkl->oabcik", rows, weight, rows)
    return kernels.reshape(weight.shape[0] * 4, weight.shape[1], 3, 3)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv3x3(nearest_upsample_x2(x))`` (padding 1) without building the upsampled input.

    Each output pixel of the upsampled convolution sees a 2 x 2 neighbourhood of the input, with kernel taps
    summed where two upsampled pixels are copies of one input pixel; the four phases' kernels run as one
    convolution at the input's resolution and ``pixel_shuffle`` interleaves them. The 16-channel upsampled
    tensor at full resolution (32 MB for two slices) and its channels-last copy are never written: the
    full-resolution one ran 23 -> 12 ms (docs/bench/scoring.md). Same sums, with the summed taps added first
    (float32 rounding, ~1e-6 relative).
    """
    kernels = phase_kernels(weight)
    phase_bias = None if bias is None else bias.repeat_interleave(4)
    if x.device.type != "cpu" or conv_layout() == CHANNELS_LAST:  # CUDA as before
        x = x.contiguous(memory_format=torch.channels_last)
    phases = F.conv2d(x, kernels, phase_bias, padding=1)
    return F.pixel_shuffle(phases, 2).contiguous()


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
