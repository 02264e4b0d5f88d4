"""Calibration: thresholds at a false-positive rate from genuine scans, written into the model's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from models.calibration import calibrate_detector, calibration_record, threshold_at_fpr, write_calibration
from models.checkpoint import save_model
from models.detector import Detector
from models.diffusion import GaussianDiffusion
from models.metadata import ModelMetadata
from models.results import NO_EVIDENCE, NOT_ASSESSED, SUSPICIOUS
from models.unet import Unet

FIXTURES = Path(__file__).parent / "fixtures"


def test_threshold_flags_at_most_the_allowed_fraction():
    scores = np.arange(1000, dtype=float)  # 0..999
    threshold = threshold_at_fpr(scores, 0.01)
    assert np.sum(scores >= threshold) == 10 and 989 < threshold <= 990
    assert np.sum(scores >= threshold_at_fpr(scores, 0.0)) == 0
    tied = [1.0] * 50 + [2.0] * 50
    assert np.sum(np.asarray(tied) >= threshold_at_fpr(tied, 0.1)) == 0  # a tie cannot be split: flag none
    with pytest.raises(ValueError):
        threshold_at_fpr([], 0.01)
    with pytest.raises(ValueError):
        threshold_at_fpr([1.0], 1.5)


def test_record_counts_and_dates():
    record = calibration_record([0.1, 0.2, 0.3, 0.9], [0.9, 0.5], fpr=0.25)
    assert record["n_slices"] == 4 and record["n_series"] == 2 and record["fpr"] == 0.25
    assert 0.3 < record["slice_threshold"] <= 0.9 and record["series_threshold"] > 0.9
    assert record["date"].endswith("+00:00")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cal") / "tiny.pt"
    meta = ModelMetadata(name="tiny-cal", patch_size=32, anomaly={"energy_mean": -9.0, "energy_std": 1.0})
    save_model(GaussianDiffusion(Unet(8, (1, 2, 4), 1), 32), path, meta)
    return path


def _genuine_series(folder: Path) -> Path:
    """Two real slices decimated to 128x128 (uncompressed), written as files."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted((FIXTURES / "ct_series_20").glob("CT.*"))[:2]:
        ds = pydicom.dcmread(source)
        pixels = ds.pixel_array[::4, ::4].copy()
        ds.decompress()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm")
    return folder


def test_calibrate_writes_thresholds_that_pass_the_genuine_scans(model_path, tmp_path):
    torch.set_num_threads(1)
    data = _genuine_series(tmp_path / "genuine")
    uncalibrated = Detector.load(model_path, device="cpu")
    assert not uncalibrated.info.calibrated
    calibration = calibrate_detector(uncalibrated, [data], fpr=0.0)
    assert calibration["n_slices"] == 2 and calibration["n_series"] == 1
    sha_before = json.loads(model_path.with_suffix(".json").read_text())["weights_sha256"]
    written = write_calibration(model_path, calibration)
    stored = json.loads(written.read_text())
    assert stored["calibration"]["slice_threshold"] == calibration["slice_threshold"]
    assert stored["weights_sha256"] == sha_before  # the thresholds stay tied to these weights

    calibrated = Detector.load(model_path, device="cpu")
    assert calibrated.info.calibrated
    result = next(calibrated.score_paths([data]))
    assert result.verdict == NO_EVIDENCE  # at FPR 0 the genuine scans used for calibration all pass
    assert {i.verdict for i in result.instances} == {NO_EVIDENCE}
    assert NOT_ASSESSED not in {i.verdict for i in result.instances}

    # thresholds hold only for the scoring they were set with: another mode is not judged by them
    assert calibration["scoring"]["mode"] == calibrated.options.mode
    other = "whole" if calibrated.options.mode == "tiles" else "tiles"
    mismatched = next(Detector.load(model_path, device="cpu", mode=other).score_paths([data]))
    assert mismatched.verdict == NOT_ASSESSED and "calibrated for other scoring options" in mismatched.reason

    # a threshold below the scores flags them: verdicts really come from the stored calibration
    write_calibration(model_path, {**calibration, "slice_threshold": -1e9, "series_threshold": -1e9})
    assert next(Detector.load(model_path, device="cpu").score_paths([data])).verdict == SUSPICIOUS


def test_a_published_checkpoint_without_metadata_gets_one_with_its_calibration(tmp_path):
    import shutil

    weights = tmp_path / "CT_model.pt"
    shutil.copy(FIXTURES / "btd-reference" / "ddpm-1.6.4" / "checkpoint.pt", weights)
    assert not weights.with_suffix(".json").exists()
    written = write_calibration(weights, {"slice_threshold": 1.0, "series_threshold": 2.0, "fpr": 0.01})
    stored = json.loads(written.read_text())
    assert stored["calibration"]["series_threshold"] == 2.0
    assert stored["windows"] == [{"low": -700.0, "high": 2000.0}] and stored["patch_size"] == 96
    detector = Detector.load(weights, device="cpu")  # the metadata file now ties thresholds to these weights
    assert detector.info.calibrated and detector.info.weights_sha256 == stored["weights_sha256"]
