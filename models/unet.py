"""The U-Net that BTD's diffusion model uses, written for btd in both published layouts.

The BTD authors trained with denoising-diffusion-pytorch: their training scripts embed the library's
1.6.4 model code, while their README loads the weights with the 1.8.3 package. We do not depend on that
library (it pulls torchvision, and its 2.x layout cannot read the published weights), so this module is
our own implementation whose parameter names equal the library's state_dict keys, which lets a published
checkpoint load with ``load_state_dict(strict=True)``.

Layouts:
- ``"1.6.4"``: every attention is wrapped as ``Residual(PreNorm(...))`` (keys ``...fn.fn.to_qkv``,
  ``...fn.norm.g``); linear attention at every resolution, full softmax attention in the middle; the
  pre-attention norm is a LayerNorm (mean and variance over channels).
- ``"1.8.3"``: the norm lives inside the attention module (keys ``...norm.g``, ``...to_qkv``), the
  residual is added by the U-Net's forward, norms are RMSNorm, and the deepest stage (``full_attn``
  default ``(False, False, False, True)``) uses full softmax attention.

The two layouts also compute differently (found by reproducing the library's golden vectors):
1.6.4 weight-standardises the 3x3 convolutions of the ResNet blocks and divides the linear attention's
values by the number of positions; 1.8.3 does neither.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.fastconv import PointwiseConv2d, SpatialConv2d, spatial_conv, upsample_conv
from models.streamed_attention import streamed_attention_block

LAYOUTS = ("1.6.4", "1.8.3")


class SinusoidalPosEmb(nn.Module):
    """Fixed sinusoidal embedding of the diffusion timestep (no parameters)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device) * -scale)
        angles = t[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv2d whose kernels are standardised per output channel at every call (works with GroupNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        weight = self.weight
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        var = weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        normalized = (weight - mean) * (var + eps).rsqrt()
        return spatial_conv(x, normalized, self.bias, int(self.padding[0]))  # type: ignore[index]


def _reusing(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a op b` may be written into a's buffer: only when nothing records it for a gradient (scoring)
    and a already has the result's shape and type, so the values are the same as out of place. A whole
    512 x 512 slice's activations are 8 MB each: the allocations saved are most of the element-wise cost."""
    return not torch.is_grad_enabled() and a.dtype == torch.result_type(a, b) and a.dim() >= b.dim()


class LayerNorm(nn.Module):
    """Channel LayerNorm with a gain only (1.6.4 layout)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        # Two passes over the channels, not torch.var_mean: on the CPU var_mean's reduction across channels
        # (a strided dimension) ran 6-10x slower than mean + squared deviations (47 vs 8 ms for 8 x 512 x 512,
        # 1 thread, torch 2.13), about a fifth of a slice's scoring time; results agree within 1e-6.
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        var = centred.square().mean(dim=1, keepdim=True)
        scale = (var + eps).rsqrt()
        if _reusing(centred, scale):
            return centred.mul_(scale).mul_(self.g)
        return centred * scale * self.g


class RMSNorm(nn.Module):
    """Channel RMS norm with a gain (1.8.3 layout); same parameter name and shape as LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.g * (x.shape[1] ** 0.5)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        return out.add_(x) if _reusing(out, x) and out.shape == x.shape else out + x


class Block(nn.Module):
    """Conv -> GroupNorm -> optional time scale/shift -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8, weight_standardized: bool = True) -> None:
        super().__init__()
        conv = WeightStandardizedConv2d if weight_standardized else SpatialConv2d
        self.proj = conv(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x.mul_(scale + 1).add_(shift) if _reusing(x, scale) else x * (scale + 1) + shift
        return F.silu(x, inplace=True) if not torch.is_grad_enabled() else self.act(x)


class ResnetBlock(nn.Module):
    def __init__(
        self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8, weight_standardized: bool = True
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups=groups, weight_standardized=weight_standardized)
        self.block2 = Block(dim_out, dim_out, groups=groups, weight_standardized=weight_standardized)
        self.res_conv: nn.Module = PointwiseConv2d(dim, dim_out) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        emb = self.mlp(time_emb)[:, :, None, None]
        scale, shift = emb.chunk(2, dim=1)
        h = self.block1(x, scale_shift=(scale, shift))
        h = self.block2(h)
        residual = self.res_conv(x)
        return h.add_(residual) if _reusing(h, residual) and h.shape == residual.shape else h + residual


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, heads*c, x, y) -> (b, heads, c, x*y)."""
    b, hc, h, w = t.shape
    return t.reshape(b, heads, hc // heads, h * w)


class LinearAttention(nn.Module):
    """Linear attention (softmax over features for q, over positions for k): cheap at high resolution.

    ``inner_norm`` selects the 1.8.3 behaviour (RMSNorm inside, values not divided by the number of
    positions); without it the module computes as 1.6.4 (LayerNorm after the output conv, v / (h*w)).
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, inner_norm: bool = False) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden = dim_head * heads
        if inner_norm:
            self.norm = RMSNorm(dim)
        self.inner_norm = inner_norm
        self.to_qkv = PointwiseConv2d(dim, hidden * 3, bias=False)
        out_norm: nn.Module = RMSNorm(dim) if inner_norm else LayerNorm(dim)
        self.to_out = nn.Sequential(PointwiseConv2d(hidden, dim), out_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.inner_norm:
            x = self.norm(x)
        q, k, v = (_split_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        if not self.inner_norm:
            v = v / (h * w)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    """Full softmax attention over all positions."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, inner_norm: bool = False) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden = dim_head * heads
        if inner_norm:
            self.norm = RMSNorm(dim)
        self.inner_norm = inner_norm
        self.to_qkv = PointwiseConv2d(dim, hidden * 3, bias=False)
        self.to_out = PointwiseConv2d(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.inner_norm:
            x = self.norm(x)
        # Contiguous (b, heads, n, d): with strided views the CPU fell back to the unfused kernel, which
        # materialises the n x n matrix (4096 positions for a whole 512 x 512 slice in the middle stage);
        # the fused one ran 5x faster with the same maths (float32 rounding, ~1e-6). docs/bench/scoring.md.
        q, k, v = (
            _split_heads(t, self.heads).transpose(-1, -2).contiguous() for t in self.to_qkv(x).chunk(3, dim=1)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (b, heads, n, d)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


class Downsample(nn.Sequential):
    """Space-to-depth (2x2 -> channels) then a 1x1 conv; index 0 has no parameters (keys ``.1.*``)."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__(nn.PixelUnshuffle(2), PointwiseConv2d(dim * 4, dim_out))


class Upsample(nn.Sequential):
    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), SpatialConv2d(dim, dim_out, 3))

    def phase_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same as ``forward`` without the upsampled tensor (models/fastconv.py, upsample_conv)."""
        conv = self[1]
        return upsample_conv(x, conv.weight, conv.bias)


class Unet(nn.Module):
    """Noise-prediction U-Net, ``Unet(dim, dim_mults, channels, layout)``; see the module docstring."""

    def __init__(
        self,
        dim: int,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        channels: int = 1,
        layout: str = "1.6.4",
        resnet_block_groups: int = 8,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
        full_attn: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown U-Net layout {layout!r}; supported: {', '.join(LAYOUTS)}")
        self.layout = layout
        self.dim = dim
        self.dim_mults = tuple(int(m) for m in dim_mults)
        self.channels = channels
        self.out_dim = channels
        self.self_condition = False
        self.attn_heads = attn_heads
        self.attn_dim_head = attn_dim_head
        new = layout == "1.8.3"
        n_stages = len(self.dim_mults)
        if full_attn is None:
            full_attn = tuple([False] * (n_stages - 1) + [True]) if new else (False,) * n_stages
        full_attn = tuple(full_attn)
        if len(full_attn) != n_stages:
            raise ValueError("full_attn needs one flag per stage")
        self.full_attn = full_attn

        self.init_conv = nn.Conv2d(channels, dim, 7, padding=3)
        dims = [dim, *(dim * m for m in self.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:], strict=True))
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )

        def resnet(d_in: int, d_out: int) -> ResnetBlock:
            return ResnetBlock(
                d_in, d_out, time_emb_dim=time_dim, groups=resnet_block_groups, weight_standardized=not new
            )

        def attention(d: int, full: bool) -> nn.Module:
            if not new:
                return Residual(PreNorm(d, LinearAttention(d, attn_heads, attn_dim_head)))
            klass = Attention if full else LinearAttention
            return klass(d, attn_heads, attn_dim_head, inner_norm=True)

        self.downs = nn.ModuleList()
        for index, ((d_in, d_out), full) in enumerate(zip(in_out, full_attn, strict=True)):
            last = index == n_stages - 1
            self.downs.append(
                nn.ModuleList(
                    [
                        resnet(d_in, d_in),
                        resnet(d_in, d_in),
                        attention(d_in, full),
                        SpatialConv2d(d_in, d_out, 3) if last else Downsample(d_in, d_out),
                    ]
                )
            )
        mid = dims[-1]
        self.mid_block1 = resnet(mid, mid)
        if new:
            self.mid_attn: nn.Module = Attention(mid, attn_heads, attn_dim_head, inner_norm=True)
        else:
            self.mid_attn = Residual(PreNorm(mid, Attention(mid, attn_heads, attn_dim_head)))
        self.mid_block2 = resnet(mid, mid)

        self.ups = nn.ModuleList()
        for index, ((d_in, d_out), full) in enumerate(zip(reversed(in_out), reversed(full_attn), strict=True)):
            last = index == n_stages - 1
            self.ups.append(
                nn.ModuleList(
                    [
                        resnet(d_out + d_in, d_out),
                        resnet(d_out + d_in, d_out),
                        attention(d_out, full),
                        SpatialConv2d(d_out, d_in, 3) if last else Upsample(d_out, d_in),
                    ]
                )
            )
        self.final_res_block = resnet(dim * 2, dim)
        self.final_conv = PointwiseConv2d(dim, channels)
        # Scoring on the CPU runs each linear-attention block streamed over positions (models/streamed_attention.py);
        # False keeps the modules' own forward (the differential tests).
        self.stream_attention_on_cpu = True
        # Likewise each Upsample's nearest doubling and 3x3 convolution as one convolution at the lower resolution.
        self.phase_upsample_on_cpu = True

    @property
    def downsample_factor(self) -> int:
        """Height and width must be multiples of this (one halving per stage but the last)."""
        return 2 ** (len(self.dim_mults) - 1)

    def _attend(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # 1.6.4 wraps attention in Residual; 1.8.3 adds the residual here. The streamed block sums its runs in
        # the input's type: under bf16 autocast (an option on the CPU) the modules' forward keeps float32 sums.
        streamed = x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        if self.stream_attention_on_cpu and streamed:
            if self.layout == "1.6.4" and isinstance(attn.fn.fn, LinearAttention):
                return streamed_attention_block(attn.fn.fn, attn.fn.norm, x)
            if self.layout == "1.8.3" and isinstance(attn, LinearAttention):
                return streamed_attention_block(attn, attn.norm, x)
        return attn(x) if self.layout == "1.6.4" else attn(x) + x

    def _upsample(self, up: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Scoring on the CPU in float32 only, as the streamed attention: training and CUDA run the library's form.
        scoring = x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        if self.phase_upsample_on_cpu and scoring and isinstance(up, Upsample):
            return up.phase_forward(x)
        return up(x)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        factor = self.downsample_factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"input height and width must be multiples of {factor}, got {tuple(x.shape[-2:])}")
        x = self.init_conv(x)
        r = x.clone()
        t = self.time_mlp(time)
        skips: list[torch.Tensor] = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, t)
            skips.append(x)
            x = block2(x, t)
            x = self._attend(attn, x)
            skips.append(x)
            x = down(x)
        x = self.mid_block1(x, t)
        x = self._attend(self.mid_attn, x)
        x = self.mid_block2(x, t)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), t)
            x = block2(torch.cat((x, skips.pop()), dim=1), t)
            x = self._attend(attn, x)
            x = self._upsample(up, x)
        x = self.final_res_block(torch.cat((x, r), dim=1), t)
        return self.final_conv(x)
