"""The CPU routes of the U-Net's convolutions (models/fastconv.py), its linear-attention blocks while scoring
(models/streamed_attention.py) and the allocator setting (models/allocator.py) change speed only.

Each route is compared with the plain ``conv2d`` it replaces: on random tensors (forward and gradients,
since training runs the same modules) and through the default model on a real CT slice, where the noise
prediction must stay within the golden-vector tolerance (tests/test_unet_golden.py) of the plain route.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import fastconv
from models.corpus import dicom_to_hu
from models.fastconv import PointwiseConv2d, SpatialConv2d, pointwise_conv, spatial_conv, upsample_conv
from models.streamed_attention import softmax_over_rows, streamed_attention_block
from models.unet import LayerNorm, LinearAttention, WeightStandardizedConv2d

REPO = Path(__file__).resolve().parents[1]
CT = sorted((Path(__file__).parent / "fixtures" / "ct_series_20").glob("CT.*"))[10]
TOL = 1e-5  # the golden vectors' tolerance
LAYOUTS = [fastconv.NCHW, fastconv.CHANNELS_LAST]


@pytest.fixture
def conv_layout(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the kxk convolutions in the layout given (both are tested whichever this machine would choose),
    then put back this process's own choice."""
    chosen = fastconv.conv_layout()
    fastconv.set_conv_layout(request.param)
    yield request.param
    fastconv.set_conv_layout(chosen)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("cin", "cout", "bias"), [(8, 48, False), (16, 8, True), (64, 32, True)])
def test_pointwise_conv_equals_conv2d_forward_and_backward(batch: int, cin: int, cout: int, bias: bool) -> None:
    generator = torch.Generator().manual_seed(cin * cout + batch)
    x = torch.randn(batch, cin, 37, 53, generator=generator, requires_grad=True)
    weight = torch.randn(cout, cin, 1, 1, generator=generator, requires_grad=True)
    b = torch.randn(cout, generator=generator, requires_grad=True) if bias else None
    fast, plain = pointwise_conv(x, weight, b), F.conv2d(x, weight, b)
    assert fast.shape == plain.shape
    assert (fast - plain).abs().max().item() <= TOL * plain.abs().max().item()
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, weight])
    grads_plain = torch.autograd.grad(plain.square().sum(), [x, weight])
    for g_fast, g_plain in zip(grads_fast, grads_plain, strict=True):
        assert (g_fast - g_plain).abs().max().item() <= TOL * g_plain.abs().max().item()


@pytest.mark.parametrize("conv_layout", LAYOUTS, indirect=True)
@pytest.mark.parametrize(("cin", "cout", "kernel"), [(8, 8, 3), (24, 16, 3), (1, 8, 7)])
def test_spatial_conv_equals_conv2d_and_keeps_the_layout(cin: int, cout: int, kernel: int, conv_layout: str) -> None:
    generator = torch.Generator().manual_seed(cin + kernel)
    x = torch.randn(2, cin, 41, 30, generator=generator, requires_grad=True)
    weight = torch.randn(cout, cin, kernel, kernel, generator=generator)
    bias = torch.randn(cout, generator=generator)
    fast = spatial_conv(x, weight, bias, kernel // 2)
    plain = F.conv2d(x, weight, bias, padding=kernel // 2)
    assert fast.is_contiguous()  # the next operation sees the usual layout
    assert (fast - plain).abs().max().item() <= TOL * plain.abs().max().item()
    (grad_fast,) = torch.autograd.grad(fast.sum(), [x])
    (grad_plain,) = torch.autograd.grad(plain.sum(), [x])
    assert (grad_fast - grad_plain).abs().max().item() <= TOL * grad_plain.abs().max().item()


def test_modules_keep_the_state_dict_of_conv2d() -> None:
    """A published checkpoint loads by key and shape: the routes must not rename or reshape anything."""
    for fast, plain in (
        (PointwiseConv2d(8, 48, bias=False), nn.Conv2d(8, 48, 1, bias=False)),
        (SpatialConv2d(16, 8, 3), nn.Conv2d(16, 8, 3, padding=1)),
    ):
        assert {k: v.shape for k, v in fast.state_dict().items()} == {
            k: v.shape for k, v in plain.state_dict().items()
        }


@pytest.mark.parametrize(("dim", "heads", "dim_head", "inner_norm"), [(8, 2, 8, False), (16, 4, 32, True)])
@pytest.mark.parametrize("run", [7, 512, 4096])
def test_streamed_block_equals_the_plain_block(dim: int, heads: int, dim_head: int, inner_norm: bool, run: int) -> None:
    """x + attention(norm(x)) streamed over runs of positions (the last one partial; 7 positions: hundreds of
    runs, the running maximum of k rescaled many times) against the modules' own step-by-step forward (the
    library's formulation, which training and CUDA run)."""
    torch.manual_seed(dim * run)
    attention = LinearAttention(dim, heads, dim_head, inner_norm=inner_norm)
    norm_in = attention.norm if inner_norm else LayerNorm(dim)
    with torch.no_grad():
        for parameter in attention.parameters():  # trained-looking weights, gains away from 1
            parameter.add_(torch.randn(parameter.shape) * 0.3)
        norm_in.g.mul_(3.0)
    x = torch.randn(2, dim, 37, 52) * 4
    with torch.inference_mode():
        plain = x + attention(x if inner_norm else norm_in(x))
        streamed = streamed_attention_block(attention, norm_in, x, run)
    assert streamed.shape == plain.shape
    assert (streamed - plain).abs().max().item() <= TOL * plain.abs().max().item()


def test_bf16_autocast_keeps_the_modules_attention() -> None:
    """Streamed runs would be summed in bf16 under autocast; there the U-Net keeps the modules' forward."""
    from models.unet import Unet

    model = Unet(8, (1, 2, 4), 1).eval()
    x = torch.randn(2, 1, 32, 48, generator=torch.Generator().manual_seed(9))
    results = []
    for streamed in (True, False):
        model.stream_attention_on_cpu = streamed
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(model(x, torch.zeros(2)))
    assert torch.equal(results[0], results[1])
    with torch.inference_mode():  # without autocast the switch does change the route (rounding only)
        model.stream_attention_on_cpu = True
        fp32_streamed = model(x, torch.zeros(2))
        model.stream_attention_on_cpu = False
        fp32_modules = model(x, torch.zeros(2))
    assert not torch.equal(fp32_streamed, fp32_modules)
    assert (fp32_streamed - fp32_modules).abs().max().item() <= TOL * fp32_modules.abs().max().item()


@pytest.mark.parametrize("conv_layout", LAYOUTS, indirect=True)
@pytest.mark.parametrize(("cin", "cout", "height", "width"), [(16, 8, 6, 10), (64, 32, 31, 32), (3, 5, 1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_equals_upsample_then_conv(
    cin: int, cout: int, height: int, width: int, bias: bool, conv_layout: str
) -> None:
    """Every phase and the borders (zero padding after the doubling) against nn.Upsample + conv2d."""
    gen = torch.Generator().manual_seed(cin + height)
    x = torch.randn(2, cin, height, width, generator=gen)
    weight = torch.randn(cout, cin, 3, 3, generator=gen)
    b = torch.randn(cout, generator=gen) if bias else None
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, b, padding=1)
    ours = upsample_conv(x, weight, b)
    assert ours.shape == expected.shape == (2, cout, 2 * height, 2 * width)
    assert ours.is_contiguous()
    assert (ours - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_phase_upsampling_is_used_only_while_scoring_in_float32() -> None:
    """The U-Net's switch changes its CPU route without autograd (rounding only), and nothing under autocast."""
    from models.unet import Unet

    model = Unet(8, (1, 2, 4), 1).eval()
    x = torch.randn(2, 1, 32, 48, generator=torch.Generator().manual_seed(4))
    outputs = {}
    for phase in (True, False):
        model.phase_upsample_on_cpu = phase
        with torch.inference_mode():
            outputs["fp32", phase] = model(x, torch.zeros(2))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs["bf16", phase] = model(x, torch.zeros(2))
    assert not torch.equal(outputs["fp32", True], outputs["fp32", False])
    fp32_plain = outputs["fp32", False]
    assert (outputs["fp32", True] - fp32_plain).abs().max().item() <= TOL * fp32_plain.abs().max().item()
    assert torch.equal(outputs["bf16", True], outputs["bf16", False])


def test_softmax_over_rows_equals_torch_softmax() -> None:
    t = torch.randn(2, 2, 8, 5000, generator=torch.Generator().manual_seed(5)) * 30  # wide range: the max matters
    with torch.inference_mode():
        ours = softmax_over_rows(t)
    assert (ours - t.softmax(dim=-2)).abs().max().item() <= 1e-6
    assert torch.allclose(ours.sum(dim=-2), torch.ones(2, 2, 5000), atol=1e-6)


def test_the_layout_is_timed_once_per_process_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The first convolution times both layouts and logs the choice; later ones reuse it; a forced layout
    is kept until cleared; an unknown one is refused."""
    chosen = fastconv.conv_layout()
    try:
        fastconv.set_conv_layout(None)
        with caplog.at_level("INFO", logger="btd.models.fastconv"):
            first = fastconv.conv_layout()
            assert fastconv.conv_layout() == first in LAYOUTS
        [record] = [r for r in caplog.records if r.name == "btd.models.fastconv"]
        assert record.getMessage().startswith(f"convolutions in {first} layout (probe 1x8x496x512: usual layout ")
        for layout in LAYOUTS:
            fastconv.set_conv_layout(layout)
            assert fastconv.conv_layout() == layout
        with pytest.raises(ValueError, match="unknown layout"):
            fastconv.set_conv_layout("nhwc")
    finally:
        fastconv.set_conv_layout(chosen)


@pytest.mark.parametrize("conv_layout", LAYOUTS, indirect=True)
def test_default_model_predicts_the_same_noise_on_a_real_slice(
    monkeypatch: pytest.MonkeyPatch, conv_layout: str
) -> None:
    from models.detector import Detector

    detector = Detector.load(None, device="cpu")
    hu = np.clip(dicom_to_hu(pydicom.dcmread(CT)), -1024, 3071).astype(np.float32)
    x = torch.from_numpy(detector.model_input(hu))[None]
    with torch.inference_mode():
        fast = detector.diffusion.predict_noise(x, 0)
        monkeypatch.setattr(detector.diffusion.model, "stream_attention_on_cpu", False)
        monkeypatch.setattr(detector.diffusion.model, "phase_upsample_on_cpu", False)
        for klass in (PointwiseConv2d, SpatialConv2d):
            monkeypatch.setattr(klass, "forward", nn.Conv2d.forward)
        monkeypatch.setattr(
            WeightStandardizedConv2d,
            "forward",
            lambda self, x: F.conv2d(x, _standardized(self.weight), self.bias, padding=self.padding),
        )
        plain = detector.diffusion.predict_noise(x, 0)
    assert fast.shape == plain.shape == (1, 1, 512, 512)
    assert (fast - plain).abs().max().item() <= TOL
    assert plain.abs().max().item() > 0.1  # a real prediction, not zeros


def _standardized(weight: torch.Tensor) -> torch.Tensor:
    mean = weight.mean(dim=(1, 2, 3), keepdim=True)
    var = weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (weight - mean) * (var + 1e-5).rsqrt()


ALLOCATION_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from models.allocator import keep_freed_memory
    from models.checkpoint import load_model
    from models.metadata import DEFAULT_MODEL_PATH

    applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
    torch.set_num_threads(1)
    diffusion = load_model(DEFAULT_MODEL_PATH).diffusion.eval()
    x = torch.zeros(2, 1, 512, 512)
    with torch.inference_mode():
        diffusion.predict_noise(x, 0)  # the first pass grows the heap
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            diffusion.predict_noise(x, 0)
    print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
    """
)


def _probe(mode: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    done = subprocess.run(
        [sys.executable, "-c", ALLOCATION_PROBE, mode],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


def test_allocator_keeps_freed_buffers_for_the_next_pass() -> None:
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["applied"] is True
    # Three passes after the first. glibc's defaults: every large buffer of every pass comes fresh (and zeroed)
    # from the kernel: 77,000-159,000 pages per pass here since the attention blocks are streamed (their big
    # temporaries gone; 180,000-213,000 before), down to 49,000 once in CI and 77,697 in a CI-like run of
    # 2026-12-04 (tuned there: ~13,900 in local runs). The bound only says the defaults fault a lot; the check
    # that matters is the ratio below.
    assert default["faults"] > 60_000
    # Tuned: 0 in most passes; now and then one or two 16 MB blocks are faulted in again (4,096-8,192 pages,
    # with one malloc arena too), so the bound is a fifth of the defaults.
    assert tuned["faults"] < default["faults"] / 5


def test_allocator_leaves_an_operators_setting_alone() -> None:
    assert _probe("tuned", MALLOC_TRIM_THRESHOLD_="131072")["applied"] is False


def test_scoring_in_place_gives_the_values_of_the_autograd_path() -> None:
    """Without autograd the U-Net writes element-wise results into buffers it owns (models/unet.py
    `_reusing`); with autograd it computes out of place. Same operations in the same order: equal bits.
    (The streamed attention and phase upsampling exist only without autograd: tests above compare them within
    rounding.)"""
    from models.checkpoint import load_model
    from models.metadata import DEFAULT_MODEL_PATH

    diffusion = load_model(DEFAULT_MODEL_PATH).diffusion.eval()
    diffusion.model.stream_attention_on_cpu = False
    diffusion.model.phase_upsample_on_cpu = False
    x = torch.randn(2, 1, 96, 128, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    with torch.inference_mode():
        scoring = diffusion.predict_noise(x, 0)
    training = diffusion.predict_noise(x.clone().requires_grad_(True), 0)
    assert training.requires_grad
    assert torch.equal(scoring, training.detach())


def test_the_layout_benchmark_sees_every_convolution_of_a_pass() -> None:
    """benchmarks/conv_layout.py times what a pass runs: the default model's 40 kxk convolutions of a whole slice,
    8 of them 8 -> 8 channels at full size (the probe's kind), and leaves the route it recorded through restored."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from conv_layout import pass_convolutions
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    seen = pass_convolutions("default")
    assert sum(seen.values()) == 40
    assert seen[((1, 8, 496, 512), (8, 8, 3, 3), 1)] == 8
    assert fastconv.spatial_conv.__name__ == "spatial_conv"
