"""Our U-Net and diffusion maths reproduce the library's golden vectors, for both published layouts.

The vectors were produced by running denoising-diffusion-pytorch 1.6.4 and 1.8.3 themselves
(tests/fixtures/btd-reference/README.md); matching them to 1e-5 is what lets btd read the authors' weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.diffusion import SCHEDULE_BUFFERS, GaussianDiffusion, normalize, unnormalize
from models.unet import Unet

REFERENCE = Path(__file__).parent / "fixtures" / "btd-reference"
LAYOUTS = ("1.6.4", "1.8.3")
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=LAYOUTS)
def reference(request) -> tuple[str, GaussianDiffusion, dict]:
    layout = request.param
    folder = REFERENCE / f"ddpm-{layout}"
    checkpoint = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    vectors = torch.load(folder / "vectors.pt", map_location="cpu", weights_only=True)
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2, 4, 8), channels=1, layout=layout), image_size=32)
    diffusion.load_state_dict(checkpoint["model"], strict=True)
    return layout, diffusion.eval(), vectors


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_noise_prediction(reference, t: int) -> None:
    _, diffusion, vectors = reference
    with torch.no_grad():
        eps = diffusion.predict_noise(normalize(vectors["x01"]), t)
    assert max_diff(eps, vectors[f"eps_t{t}"]) <= TOL


def test_noise_prediction_non_square(reference) -> None:
    _, diffusion, vectors = reference
    with torch.no_grad():
        eps = diffusion.predict_noise(normalize(vectors["x01_rect"]), 0)
    assert eps.shape == (2, 1, 48, 40)
    assert max_diff(eps, vectors["eps_rect_t0"]) <= TOL


def test_btd_step_and_residual(reference) -> None:
    _, diffusion, vectors = reference
    x = normalize(vectors["x01"])
    assert max_diff(diffusion.p_sample_btd(x), vectors["btd_x_prev_t0"]) <= TOL
    residual = diffusion.btd_residual(x)
    assert residual.dtype == torch.float32
    assert max_diff(residual, vectors["btd_residual_t0"]) <= TOL
    assert residual.abs().max().item() > 1e-3  # a real signal, not zeros


def test_training_loss(reference) -> None:
    _, diffusion, vectors = reference
    with torch.no_grad():
        loss = diffusion.p_losses(normalize(vectors["x01"]), vectors["train_t"], noise=vectors["train_noise"])
    assert abs(loss.item() - vectors["train_loss"].item()) <= TOL


def test_schedule(reference) -> None:
    _, _, vectors = reference
    fresh = GaussianDiffusion(Unet(dim=8, channels=1), image_size=32)  # buffers computed, not loaded
    assert max_diff(fresh.betas, vectors["betas"]) <= TOL
    assert max_diff(fresh.alphas_cumprod, vectors["alphas_cumprod"]) <= TOL


def test_all_schedule_buffers_match_checkpoint(reference) -> None:
    layout, _, _ = reference
    saved = torch.load(REFERENCE / f"ddpm-{layout}" / "checkpoint.pt", weights_only=True)["model"]
    fresh = GaussianDiffusion(Unet(dim=8, channels=1, layout=layout), image_size=32).state_dict()
    for name in SCHEDULE_BUFFERS:
        assert torch.allclose(fresh[name], saved[name], rtol=1e-5, atol=1e-6), name


def test_residual_is_float32_under_bf16_autocast(reference) -> None:
    """The U-Net may run in bf16; the residual must still be computed in float32 and stay close."""
    _, diffusion, vectors = reference
    x = normalize(vectors["x01_rect"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eps = diffusion.predict_noise(x, 0)
    assert eps.dtype == torch.bfloat16
    residual = diffusion.btd_residual(x, eps=eps)
    assert residual.dtype == torch.float32
    exact = diffusion.btd_residual(x)
    assert torch.isfinite(residual).all()
    # bf16 noise error is scaled by sqrt(1/a0 - 1) (~0.01): far below the residual's own size
    assert max_diff(residual, exact) < 0.1 * exact.abs().max().item()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_published_configuration_keys_and_shapes(layout: str) -> None:
    published = json.loads((REFERENCE / f"ddpm-{layout}" / "published_config_keys.json").read_text())
    diffusion = GaussianDiffusion(Unet(dim=32, dim_mults=(1, 2, 4, 8), channels=1, layout=layout), image_size=96)
    ours = {key: list(value.shape) for key, value in diffusion.state_dict().items()}
    theirs = {entry["key"]: list(entry["shape"]) for entry in published["state_dict"]}
    assert ours == theirs
    n_params = sum(p.numel() for p in diffusion.model.parameters())
    assert n_params == published["n_parameters"]
    if layout == "1.6.4":
        assert n_params == 9_191_361


def test_normalize_round_trip() -> None:
    x01 = torch.linspace(0, 1, 11)
    assert torch.equal(normalize(x01)[[0, -1]], torch.tensor([-1.0, 1.0]))
    assert max_diff(unnormalize(normalize(x01)), x01) <= 1e-7


def test_odd_size_is_refused_clearly() -> None:
    model = Unet(dim=8, channels=1)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 1, 30, 32), torch.zeros(1, dtype=torch.long))


def test_denoise_from_recovers_shape_and_range(reference) -> None:
    _, diffusion, vectors = reference
    x = normalize(vectors["x01"])
    noise = torch.zeros_like(x)
    out = diffusion.denoise_from(x, 10, noise=noise)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    # with zero noise, the estimate equals the clipped x0 prediction from q_sample(x, 10, 0)
    t = torch.full((3,), 10, dtype=torch.long)
    x_t = diffusion.q_sample(x, t, noise)
    with torch.no_grad():
        expected = diffusion.predict_start_from_noise(x_t, t, diffusion.model(x_t, t)).clamp(-1, 1)
    assert max_diff(out, expected) <= TOL
