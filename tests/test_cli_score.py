"""`btd score`, `btd calibrate` and `btd evaluate` end to end on real (decimated) slices and a tiny model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from btd.cli import main
from models.checkpoint import save_model
from models.diffusion import GaussianDiffusion
from models.metadata import ModelMetadata
from models.unet import Unet

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("clim") / "tiny.pt"
    meta = ModelMetadata(name="tiny-cli", patch_size=32, anomaly={"energy_mean": -9.0, "energy_std": 1.0})
    save_model(GaussianDiffusion(Unet(8, (1, 2, 4), 1), 32), path, meta)
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A folder: two real slices decimated to 128x128, one truncated file, one non-image (SR-like)."""
    folder = tmp_path_factory.mktemp("study")
    sources = sorted((FIXTURES / "ct_series_20").glob("CT.*"))[:2]
    for source in sources:
        ds = pydicom.dcmread(source)
        pixels = ds.pixel_array[::4, ::4].copy()
        ds.decompress()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm")
    (folder / "truncated.dcm").write_bytes((folder / f"{ds.SOPInstanceUID}.dcm").read_bytes()[:-5000])
    report = pydicom.dcmread(sources[0], stop_before_pixels=True)
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    report.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    report.Modality = "SR"
    report.save_as(folder / "report.dcm")
    return folder


def slices_of(study: Path) -> list[str]:
    return sorted(str(p) for p in study.glob("*.dcm") if p.name not in ("truncated.dcm", "report.dcm"))


def test_score_jsonl_maps_and_failures(model_path, study, tmp_path, capsys):
    maps = tmp_path / "maps"
    code = main(
        ["score", str(study), "--model", str(model_path), "--format", "jsonl", "--maps", str(maps), "--device", "cpu"]
    )
    out, err = capsys.readouterr()
    assert code == 1  # something could not be assessed, the rest was scored
    records = [json.loads(line) for line in out.splitlines()]
    instances = [r for r in records if r["type"] == "instance"]
    series = [r for r in records if r["type"] == "series"]
    scored = [r for r in instances if r["score"] is not None]
    assert len(scored) == 2
    for record in scored:
        assert {"path", "sop_instance_uid", "series_instance_uid", "score", "verdict", "regions"} <= set(record)
        assert record["verdict"] == "not_assessed" and record["reason"] == "model not calibrated"
        assert all({"x0", "y0", "x1", "y1", "score"} <= set(region) for region in record["regions"])
        residual = np.load(maps / f"{record['sop_instance_uid']}.npy")
        assert residual.shape == (128, 128) and residual.dtype == np.float32 and np.abs(residual).max() > 0
    assert len(list(maps.iterdir())) == 2  # no maps for what was not assessed
    assert len(series) == 2  # the CT series (with the truncated copy of one of its slices) and the SR
    ct = next(s for s in series if s["modality"] == "CT")
    assert ct["n_assessed"] == 2 and ct["n_instances"] == 3 and ct["score"] == max(r["score"] for r in scored)
    assert records.index(ct) > max(records.index(r) for r in scored)  # the series object follows its instances
    assert "truncated.dcm: corrupt or truncated" in err
    assert "report.dcm: not an image (no pixel data" in err or "report.dcm: unsupported modality 'SR'" in err


def test_score_table_and_exit_zero_when_everything_is_scored(model_path, study, capsys):
    files = slices_of(study)
    assert main(["score", *files, "--model", str(model_path), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("series ") and out.count("not_assessed") == 3 and "error" not in err


def test_missing_model_is_exit_two(tmp_path, study, capsys):
    assert main(["score", str(study), "--model", str(tmp_path / "none.pt")]) == 2
    assert "cannot load the model" in capsys.readouterr().err


def test_calibrate_then_score_gives_verdicts(model_path, study, tmp_path, capsys):
    import shutil

    local = tmp_path / "model.pt"
    shutil.copy(model_path, local)
    shutil.copy(model_path.with_suffix(".json"), local.with_suffix(".json"))
    genuine = slices_of(study)
    assert main(["calibrate", *genuine, "--model", str(local), "--fpr", "0.0", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_slices"] == 2
    assert (
        json.loads(local.with_suffix(".json").read_text())["calibration"]["slice_threshold"]
        == printed["slice_threshold"]
    )
    assert main(["score", *genuine, "--model", str(local), "--format", "json", "--device", "cpu"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["model"]["calibrated"] is True
    assert [s["verdict"] for s in document["series"]] == ["no_evidence"]


def test_evaluate_prints_auc_and_writes_roc(tmp_path, capsys):
    from models.preprocess import read_hu

    torch.manual_seed(0)
    model = tmp_path / "eval.pt"
    save_model(GaussianDiffusion(Unet(8, (1, 2, 4), 1), 96), model, ModelMetadata(name="tiny-eval", patch_size=96))
    rows = []
    for index, source in enumerate(sorted((FIXTURES / "ct_series_20").glob("CT.*"))[:2]):
        hu = read_hu(source)[0]
        np.save(tmp_path / f"g{index}.npy", hu)
        hu[250:270, 250:270] = 1500.0  # a pasted bright square
        np.save(tmp_path / f"t{index}.npy", hu)
        rows += [(f"g{index}.npy", 260, 260, "0"), (f"t{index}.npy", 260, 260, "1")]
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "x", "y", "type"), *rows])
    roc = tmp_path / "roc.png"
    code = main(
        [
            "evaluate",
            str(labels),
            "--model",
            str(model),
            "--roc",
            str(roc),
            "--bootstrap",
            "20",
            "--json",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and result["n_tampered"] == 2 and 0.0 <= result["auc"] <= 1.0
    assert roc.read_bytes()[:4] == b"\x89PNG"


def test_btd_entry_point_runs_score(model_path, study):
    """The installed command line, in a fresh process: exit code and JSON lines on stdout."""
    file = slices_of(study)[0]
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "btd.cli",
            "score",
            str(file),
            "--model",
            str(model_path),
            "--format",
            "jsonl",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    first = json.loads(completed.stdout.splitlines()[0])
    assert first["type"] == "instance" and first["path"] == file
