"""Checkpoint loading: the published layouts load and compute the golden numbers; everything else is
refused with a message, from real crafted files (never by mocking torch.load)."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, load_model, save_model
from models.diffusion import GaussianDiffusion, normalize
from models.metadata import ModelMetadata
from models.unet import Unet

REFERENCE = Path(__file__).parent / "fixtures" / "btd-reference"
TOL = 1e-5


class NotAWeight:
    """A custom class: unpickling it would need this code, which a checkpoint loader must never run."""

    def __init__(self) -> None:
        self.value = 1


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_checkpoint(layout: str) -> dict:
    return torch.load(REFERENCE / f"ddpm-{layout}" / "checkpoint.pt", weights_only=True)


def reference_vectors(layout: str) -> dict:
    return torch.load(REFERENCE / f"ddpm-{layout}" / "vectors.pt", weights_only=True)


def unet_only(diffusion_state: dict) -> dict:
    return {k[len("model.") :]: v for k, v in diffusion_state.items() if k.startswith("model.")}


def assert_golden(loaded, layout: str) -> None:
    vectors = reference_vectors(layout)
    residual = loaded.diffusion.btd_residual(normalize(vectors["x01"]))
    assert (residual - vectors["btd_residual_t0"]).abs().max().item() <= TOL


# --- the published layouts ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["1.6.4", "1.8.3"])
def test_reference_trainer_checkpoint_loads_and_computes_golden(layout: str) -> None:
    loaded = load_model(REFERENCE / f"ddpm-{layout}" / "checkpoint.pt")
    assert loaded.layout == layout
    assert loaded.version == layout
    assert loaded.source == "trainer"
    assert loaded.config.dim == 8 and loaded.config.dim_mults == (1, 2, 4, 8) and loaded.config.channels == 1
    assert loaded.config.timesteps == 1000 and loaded.config.beta_schedule == "sigmoid"
    assert loaded.n_params == sum(p.numel() for p in loaded.diffusion.model.parameters())
    assert not loaded.diffusion.training
    digest = hashlib.sha256((REFERENCE / f"ddpm-{layout}" / "checkpoint.pt").read_bytes()).hexdigest()
    assert loaded.weights_sha256 == digest
    assert_golden(loaded, layout)


def test_reference_parameter_counts() -> None:
    assert load_model(REFERENCE / "ddpm-1.6.4" / "checkpoint.pt").n_params == 673_905


@pytest.mark.parametrize("layout", ["1.6.4", "1.8.3"])
def test_bare_diffusion_and_bare_unet_state_dicts(tmp_path: Path, layout: str) -> None:
    state = reference_checkpoint(layout)["model"]
    torch.save(state, tmp_path / "diffusion.pt")
    torch.save(unet_only(state), tmp_path / "unet.pt")
    bare_diffusion = load_model(tmp_path / "diffusion.pt")
    bare_unet = load_model(tmp_path / "unet.pt")
    assert (bare_diffusion.source, bare_unet.source) == ("diffusion", "unet")
    assert bare_diffusion.layout == bare_unet.layout == layout
    assert bare_diffusion.version is None
    assert_golden(bare_diffusion, layout)
    assert_golden(bare_unet, layout)  # schedule computed, not loaded


def test_trainer_ema_weights(tmp_path: Path) -> None:
    checkpoint = reference_checkpoint("1.6.4")
    online = checkpoint["model"]
    ema_state = {k: v * 0.5 if k.startswith("model.") and v.is_floating_point() else v for k, v in online.items()}
    checkpoint["ema"] = {
        "initted": torch.tensor(True),
        "step": torch.tensor(10),
        **{f"online_model.{k}": v for k, v in online.items()},
        **{f"ema_model.{k}": v for k, v in ema_state.items()},
    }
    torch.save(checkpoint, tmp_path / "trainer.pt")
    plain = load_model(tmp_path / "trainer.pt")
    ema = load_model(tmp_path / "trainer.pt", use_ema=True)
    assert (plain.source, ema.source) == ("trainer", "trainer-ema")
    key = "init_conv.weight"
    assert torch.equal(plain.diffusion.model.state_dict()[key], online[f"model.{key}"])
    assert torch.equal(ema.diffusion.model.state_dict()[key], ema_state[f"model.{key}"])


def test_ema_asked_for_but_absent(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no 'ema'"):
        load_model(REFERENCE / "ddpm-1.6.4" / "checkpoint.pt", use_ema=True)
    torch.save(reference_checkpoint("1.6.4")["model"], tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="without EMA"):
        load_model(tmp_path / "bare.pt", use_ema=True)


@pytest.mark.parametrize("version", ["1.5.4", "1.6.0", "1.6.7"])
def test_versions_computed_as_164(tmp_path: Path, version: str) -> None:
    checkpoint = reference_checkpoint("1.6.4")
    checkpoint["version"] = version
    torch.save(checkpoint, tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt")
    assert loaded.layout == "1.6.4" and loaded.version == version


@pytest.mark.parametrize("layout", ["1.6.4", "1.8.3"])
def test_published_configuration_shapes_load(tmp_path: Path, layout: str) -> None:
    """The real published configuration (dim 32), built from the recorded key shapes."""
    published = json.loads((REFERENCE / f"ddpm-{layout}" / "published_config_keys.json").read_text())
    generator = torch.Generator().manual_seed(0)
    state = {e["key"]: torch.randn(e["shape"], generator=generator) * 0.01 for e in published["state_dict"]}
    reference_buffers = reference_checkpoint(layout)["model"]
    for name in [k for k in state if not k.startswith("model.")]:  # the 13 schedule buffers
        state[name] = reference_buffers[name]
    torch.save({"step": 700000, "model": state, "version": layout}, tmp_path / "CT_model.pt")
    loaded = load_model(tmp_path / "CT_model.pt")
    assert loaded.config.dim == 32 and loaded.config.dim_mults == (1, 2, 4, 8)
    assert loaded.n_params == published["n_parameters"]
    assert loaded.metadata is not None and not loaded.metadata_from_file
    assert loaded.metadata.windows == [{"low": -700.0, "high": 2000.0}] and loaded.metadata.patch_size == 96
    mr = load_model(tmp_path / "CT_model.pt", modality="MR")
    assert mr.metadata.modality == "MR" and mr.metadata.patch_size == 128 and mr.config.image_size == 128


# --- refusals ----------------------------------------------------------------------------------------
def save_variant(tmp_path: Path, layout: str, version: str | None, edit=None) -> Path:
    checkpoint = reference_checkpoint(layout)
    if version is None:
        checkpoint.pop("version")
    else:
        checkpoint["version"] = version
    if edit is not None:
        edit(checkpoint["model"])
    path = tmp_path / "variant.pt"
    torch.save(checkpoint, path)
    return path


def test_refuses_17x(tmp_path: Path) -> None:
    path = save_variant(tmp_path, "1.6.4", "1.7.2")
    with pytest.raises(CheckpointError, match=r"1\.7\.x .*computes differently.*refusing"):
        load_model(path)


def test_refuses_mem_kv_19(tmp_path: Path) -> None:
    def add_mem_kv(state: dict) -> None:
        state["model.mid_attn.mem_kv"] = torch.zeros(2, 4, 4, 32)

    with pytest.raises(CheckpointError, match=r"mem_kv.*1\.9 or later.*supported"):
        load_model(save_variant(tmp_path, "1.8.3", None, add_mem_kv))


def test_refuses_2x_rmsnorm_blocks(tmp_path: Path) -> None:
    def to_rmsnorm_blocks(state: dict) -> None:
        for key in [k for k in state if k.endswith(("block1.norm.weight", "block2.norm.weight"))]:
            channels = state[key].shape[0]
            state[key.replace("norm.weight", "norm.g")] = torch.ones(1, channels, 1, 1)
            del state[key]
            del state[key.replace("weight", "bias")]

    with pytest.raises(CheckpointError, match=r"RMSNorm.*2\.x.*supported"):
        load_model(save_variant(tmp_path, "1.8.3", None, to_rmsnorm_blocks))


def test_refuses_2x_even_with_mem_kv_and_says_2x(tmp_path: Path) -> None:
    def to_2x(state: dict) -> None:
        state["model.mid_attn.mem_kv"] = torch.zeros(2, 4, 4, 32)
        state["model.mid_block1.block1.norm.g"] = torch.ones(1, 64, 1, 1)

    with pytest.raises(CheckpointError, match=r"RMSNorm.*2\.x"):
        load_model(save_variant(tmp_path, "1.8.3", None, to_2x))


def test_refuses_norm_gains_of_another_shape(tmp_path: Path) -> None:
    def flat_gain(state: dict) -> None:
        state["model.mid_attn.norm.gamma"] = state.pop("model.mid_attn.norm.g").flatten()

    with pytest.raises(CheckpointError, match=r"mid_attn\.norm\.gamma \(64,\).*2\.x"):
        load_model(save_variant(tmp_path, "1.8.3", None, flat_gain))


def test_refuses_2x_version_even_with_old_keys(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"2\.1\.1, which btd does not read"):
        load_model(save_variant(tmp_path, "1.6.4", "2.1.1"))


def test_refuses_version_that_contradicts_keys(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="inconsistent"):
        load_model(save_variant(tmp_path, "1.6.4", "1.8.3"))


def test_refuses_wrong_shape(tmp_path: Path) -> None:
    def widen(state: dict) -> None:
        state["model.mid_block1.block1.proj.weight"] = torch.zeros(64, 64, 5, 5)

    with pytest.raises(CheckpointError, match=r"wrong shapes.*mid_block1\.block1\.proj\.weight"):
        load_model(save_variant(tmp_path, "1.6.4", "1.6.4", widen))


def test_refuses_missing_weight(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing.*ups\.1\.0\.block2\.proj\.bias"):
        load_model(save_variant(tmp_path, "1.6.4", "1.6.4", lambda s: s.pop("model.ups.1.0.block2.proj.bias")))


def test_refuses_nan_weights(tmp_path: Path) -> None:
    def poison(state: dict) -> None:
        state["model.final_conv.weight"][0, 0, 0, 0] = float("nan")

    with pytest.raises(CheckpointError, match="NaN"):
        load_model(save_variant(tmp_path, "1.6.4", "1.6.4", poison))


def test_refuses_truncated_file(tmp_path: Path) -> None:
    data = (REFERENCE / "ddpm-1.6.4" / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path / "cut.pt")


def test_refuses_non_torch_file(tmp_path: Path) -> None:
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(tmp_path / "notes.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(tmp_path / "empty.pt")


def test_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "absent.pt")


def test_refuses_torch_save_of_custom_class(tmp_path: Path) -> None:
    checkpoint = reference_checkpoint("1.6.4")
    checkpoint["extra"] = NotAWeight()
    torch.save(checkpoint, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match=r"need to run code.*NotAWeight"):
        load_model(tmp_path / "custom.pt")


def test_refuses_plain_pickle_that_runs_code(tmp_path: Path, capsys) -> None:
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"model": RunsCode()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="need to run code"):
        load_model(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out


def test_refuses_a_tensor_that_is_not_a_state_dict(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="expected a dict of weights, found Tensor"):
        load_model(tmp_path / "tensor.pt")


def test_refuses_unknown_dict(tmp_path: Path) -> None:
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no U-Net weights recognised"):
        load_model(tmp_path / "other.pt")


# --- our own models ----------------------------------------------------------------------------------
@pytest.fixture()
def small_diffusion() -> GaussianDiffusion:
    torch.manual_seed(3)
    unet = Unet(dim=8, dim_mults=(1, 2), channels=2, attn_heads=2, attn_dim_head=8)  # as models/training.py
    return GaussianDiffusion(unet, image_size=32)


def our_metadata() -> ModelMetadata:
    return ModelMetadata(
        name="test-ct",
        modality="CT",
        channels=2,
        windows=[{"low": -700.0, "high": 2000.0}, {"low": -1000.0, "high": 200.0}],
        patch_size=64,
        calibration={"slice_threshold": 1.5},
        training={"steps": 5},
    )


def test_save_then_load_round_trip(tmp_path: Path, small_diffusion: GaussianDiffusion) -> None:
    written = save_model(small_diffusion, tmp_path / "ours.pt", our_metadata(), step=5)
    raw = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert set(raw) == {"step", "model", "version"} and raw["version"] == "1.6.4" and raw["step"] == 5
    sidecar = json.loads((tmp_path / "ours.json").read_text())
    digest = hashlib.sha256((tmp_path / "ours.pt").read_bytes()).hexdigest()
    assert sidecar["weights_sha256"] == digest == written.weights_sha256
    assert sidecar["unet"] == {"dim": 8, "dim_mults": [1, 2], "layout": "1.6.4", "attn_heads": 2, "attn_dim_head": 8}
    assert sidecar["format"] == "btd-model/1" and sidecar["software_version"].startswith("btd ")

    loaded = load_model(tmp_path / "ours.pt")
    assert loaded.metadata_from_file and loaded.metadata == written
    assert loaded.config.channels == 2 and loaded.config.dim_mults == (1, 2) and loaded.config.image_size == 64
    assert (loaded.config.attn_heads, loaded.config.attn_dim_head) == (2, 8)
    x = torch.rand(1, 2, 16, 24) * 2 - 1
    assert torch.equal(loaded.diffusion.btd_residual(x), small_diffusion.eval().btd_residual(x))


def test_refuses_metadata_of_other_weights(tmp_path: Path, small_diffusion: GaussianDiffusion) -> None:
    save_model(small_diffusion, tmp_path / "ours.pt", our_metadata(), step=5)
    sidecar = (tmp_path / "ours.json").read_text()
    save_model(small_diffusion, tmp_path / "ours.pt", our_metadata(), step=6)  # other bytes
    (tmp_path / "ours.json").write_text(sidecar)
    with pytest.raises(CheckpointError, match="written for other weights"):
        load_model(tmp_path / "ours.pt")


def test_refuses_unusable_metadata(tmp_path: Path, small_diffusion: GaussianDiffusion) -> None:
    save_model(small_diffusion, tmp_path / "ours.pt", our_metadata())
    (tmp_path / "ours.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="metadata unusable"):
        load_model(tmp_path / "ours.pt")


def test_refuses_metadata_describing_another_architecture(tmp_path: Path, small_diffusion) -> None:
    save_model(small_diffusion, tmp_path / "ours.pt", our_metadata())
    data = json.loads((tmp_path / "ours.json").read_text())
    data["unet"]["dim"] = 16
    data["weights_sha256"] = ""
    (tmp_path / "ours.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="dim=16"):
        load_model(tmp_path / "ours.pt")


def test_save_refuses_183_layout(tmp_path: Path) -> None:
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2), layout="1.8.3"), image_size=32)
    with pytest.raises(ValueError, match="1.6.4 layout only"):
        save_model(diffusion, tmp_path / "x.pt", ModelMetadata(name="x"))
    assert not (tmp_path / "x.pt").exists()


def test_save_accepts_a_plain_dict(tmp_path: Path, small_diffusion: GaussianDiffusion) -> None:
    """models/training.py passes the metadata as a dict of fields."""
    fields = our_metadata().to_dict()
    del fields["format"]
    written = save_model(small_diffusion, tmp_path / "d.pt", fields)
    assert written.format == "btd-model/1" and written.calibration == {"slice_threshold": 1.5}
    assert load_model(tmp_path / "d.pt").metadata == written


def test_without_metadata_heads_default_to_four(tmp_path: Path, small_diffusion: GaussianDiffusion) -> None:
    save_model(small_diffusion, tmp_path / "m.pt", our_metadata())
    (tmp_path / "m.json").unlink()
    loaded = load_model(tmp_path / "m.pt")  # 16-wide attention: 4 heads of 4, the library default split
    assert (loaded.config.attn_heads, loaded.config.attn_dim_head) == (4, 4)
    assert loaded.config.channels == 2 and len(loaded.metadata.windows) == 2


def test_183_stages_with_full_attention_are_read_from_the_keys(tmp_path: Path) -> None:
    """A 1.8.x model trained with another `full_attn` must be rebuilt with the same attention per stage."""
    torch.manual_seed(4)
    unet = Unet(dim=8, dim_mults=(1, 2, 2), layout="1.8.3", full_attn=(False, True, True))
    diffusion = GaussianDiffusion(unet, image_size=32).eval()
    torch.save({"step": 1, "model": diffusion.state_dict(), "version": "1.8.0"}, tmp_path / "full.pt")
    loaded = load_model(tmp_path / "full.pt")
    assert loaded.layout == "1.8.3" and loaded.config.full_attn == (False, True, True)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(loaded.diffusion.btd_residual(x), diffusion.btd_residual(x))
