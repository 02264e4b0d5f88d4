"""A short training run on a tiny model saves checkpoints, logs its loss and resumes where it stopped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.corpus import DEFAULT_DATA_ROOT, discover, split_by_patient
from models.training import TrainConfig, Trainer, read_losses, sample_timesteps

pytestmark = pytest.mark.skipif(not DEFAULT_DATA_ROOT.is_dir(), reason="shared chest-CT corpus not present")


def tiny_config(steps: int) -> TrainConfig:
    return TrainConfig(dim=8, patch_size=32, batch_size=2, steps=steps, checkpoint_every=2, threads=1)


@pytest.fixture(scope="module")
def few_training_slices():
    train, _ = split_by_patient(discover())
    return [s for s in train if s.patient == "LIDC-IDRI-0001"][:2]


def test_training_saves_and_resumes(tmp_path, few_training_slices) -> None:
    run = tmp_path / "run"
    first = Trainer(run, few_training_slices, tiny_config(steps=3))
    summary = first.train()
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert (run / "checkpoint.pt").is_file()
    weights_after_first = {k: v.clone() for k, v in first.ema.state_dict().items()}

    resumed = Trainer(run, few_training_slices, tiny_config(steps=5))
    assert resumed.step == 3
    for key, value in resumed.ema.state_dict().items():
        assert torch.equal(value, weights_after_first[key]), key
    resumed.train()
    assert resumed.step == 5
    assert [entry["step"] for entry in read_losses(run / "loss.jsonl")] == [1, 2, 3, 4, 5]


def test_low_timestep_emphasis() -> None:
    config = TrainConfig(low_t_fraction=0.8, low_t_max=50)
    t = sample_timesteps(config, 4000, torch.Generator().manual_seed(0))
    share_low = float((t <= 50).float().mean())
    assert 0.75 < share_low < 0.87 and int(t.max()) > 500


def test_btd_train_exports_a_loadable_model(tmp_path, ct_series_dir) -> None:
    """`btd train FOLDER --out M` on a plain DICOM folder: no held-out patients, weights + metadata written."""
    import argparse

    from models.checkpoint import load_model
    from models.train_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "tiny.pt"
    args = parser.parse_args(
        ["train", str(ct_series_dir), "--out", str(out), "--run-dir", str(tmp_path / "run"), "--steps", "1"]
        + ["--batch-size", "2", "--patch-size", "32"]
    )
    assert args.func(args) == 0
    loaded = load_model(out)
    assert loaded.metadata.windows == [{"low": -1100.0, "high": 300.0}]
    assert loaded.metadata.training["steps"] == 1
    assert loaded.config.attn_heads == 2 and loaded.config.attn_dim_head == 8
