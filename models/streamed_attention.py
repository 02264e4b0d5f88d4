"""The U-Net's linear-attention block (norm, attention, output conv, norm, residual) streamed over positions.

At full resolution the block is memory-bound on the CPU: the default model projects its 8 channels into 48
(q, k, v) for every pixel of a 512 x 512 slice (48 MB per image) and the step-by-step form writes and reads
that and its softmaxes several times over: about a quarter of a whole slice's U-Net time went to the two
full-resolution blocks (models/unet.py, docs/bench/scoring.md). Linear attention needs only two small
per-image summaries, so the block is computed in two sweeps over runs of positions that stay in the
last-level cache:

1. each run is normalised and projected to k and v; k's softmax over all positions is kept as a running
   maximum, a running sum of exponentials and a running context sum(exp(k - max) v^T) (rescaled whenever
   the maximum grows, as streaming softmaxes do);
2. each run is normalised again and projected to q; q's softmax over features, the output convolution
   folded into the context (W_out (context^T q) = (W_out context^T) q: the attention's own output, 16
   channels beside the input's 8, is never written, nor scaled copies of q and v), the output norm and the
   residual give the run's output.

Nothing larger than a run is written except the result. The sums are the same in another order: float32
rounding (tests/test_fast_unet.py compares with the library's step-by-step form). Only scoring on the CPU
takes this path (Unet._attend): training keeps the modules' autograd form, CUDA the einsum form, and so does
bf16 autocast, under which the runs' sums would be kept in bf16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from models.unet import LinearAttention

RUN = 16384  # positions per run: a run's k and v (default model, two images) are 4 MB, within a last-level cache


def softmax_over_rows(t: torch.Tensor) -> torch.Tensor:
    """Softmax over dim -2 of (..., d, n) with d small (dim_head) and n the positions, in element-wise passes
    along n: torch's softmax over that strided dimension ran 2.2x slower at full resolution (17 vs 8 ms for
    2 x 2 x 8 x 253,952, 2 threads, torch 2.13). Same formula (max subtracted, exp, divided by the sum)."""
    e = (t - t.amax(dim=-2, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-2, keepdim=True))


def streamed_attention_block(
    attention: LinearAttention, norm_in: nn.Module, x: torch.Tensor, run: int = RUN
) -> torch.Tensor:
    """x + norm_out(W_out attention(norm_in(x)) + b_out) for (B, C, H, W) x, without autograd."""
    b, channels, h, w = x.shape
    n = h * w
    heads = attention.heads
    weight = attention.to_qkv.weight.reshape(3, heads, -1, channels)  # q, k, v projections
    dim_head = weight.shape[2]
    project_q = weight[0].reshape(1, heads * dim_head, channels).expand(b, -1, -1)
    project_kv = weight[1:].reshape(1, 2 * heads * dim_head, channels).expand(b, -1, -1)
    rows = x.reshape(b, channels, 1, n)  # norms read (B, C, H, W): one row of positions

    peak = total = context = None
    for start in range(0, n, run):
        part = norm_in(rows[..., start : start + run]).reshape(b, channels, -1)
        k, v = torch.bmm(project_kv, part).reshape(b, 2, heads, dim_head, -1).unbind(dim=1)
        run_peak = k.amax(dim=-1, keepdim=True)  # (b, heads, d, 1)
        if peak is None:
            peak = run_peak
        else:
            grown = torch.maximum(peak, run_peak)
            kept = (peak - grown).exp_()
            total.mul_(kept)
            context.mul_(kept)
            peak = grown
        e = (k - peak).exp_()
        run_total = e.sum(dim=-1, keepdim=True)
        run_context = torch.stack([torch.bmm(e[i], v[i].transpose(1, 2)) for i in range(b)])  # (b, heads, d, e)
        total = run_total if total is None else total.add_(run_total)
        context = run_context if context is None else context.add_(run_context)

    conv = attention.to_out[0]
    factor = attention.scale if attention.inner_norm else attention.scale / n
    out_weight = conv.weight.reshape(channels, heads, dim_head)
    # folded[b, c, (h, d)] = factor * sum_e W_out[c, (h, e)] * context[b, h, d, e] / total[b, h, d]
    folded = torch.einsum("che,bhde->bchd", out_weight, context.div_(total)).mul_(factor)
    folded = folded.reshape(b, channels, heads * dim_head)
    bias = conv.bias.reshape(1, channels, 1)

    out = torch.empty_like(x).reshape(b, channels, 1, n)
    for start in range(0, n, run):
        stop = min(start + run, n)
        part = norm_in(rows[..., start:stop]).reshape(b, channels, -1)
        q = softmax_over_rows(torch.bmm(project_q, part).reshape(b, heads, dim_head, -1))
        mixed = torch.baddbmm(bias, folded, q.reshape(b, heads * dim_head, -1))
        result = attention.to_out[1](mixed.reshape(b, channels, 1, -1))
        out[..., start:stop] = result.add_(rows[..., start:stop])
    return out.reshape(b, channels, h, w)
