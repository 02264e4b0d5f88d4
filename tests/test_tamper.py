"""Tampering changes pixels only inside its ground-truth region, keeps DICOM metadata, and skips bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest

from models.corpus import dicom_to_hu
from models.forensics.dicom_write import write_tampered
from models.forensics.red_team import tamper_series
from models.forensics.tamper import Skip, Tamper, copy_move, inject_nodule, inject_sphere, remove_lesion
from models.lungmask import lung_mask

CHEST = "ct_transfer_syntaxes/CT1_J2KR"  # a real chest slice with lungs, JPEG 2000 lossless


@pytest.fixture(scope="module")
def chest(fixtures_dir):
    ds = pydicom.dcmread(fixtures_dir / CHEST)
    return ds, dicom_to_hu(ds)


@pytest.fixture(scope="module")
def vessel_mask(chest):
    """A real dense structure inside the lung (a vessel or nodule) to play the annotated lesion."""
    from scipy import ndimage

    _, hu = chest
    lungs = ndimage.binary_erosion(lung_mask(hu), iterations=12)
    labels, count = ndimage.label((hu > -500) & lungs)
    sizes = ndimage.sum(np.ones_like(hu), labels, range(1, count + 1))
    best = int(np.argmax(np.where((sizes > 20) & (sizes < 400), sizes, 0))) + 1
    return labels == best


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) > 1e-3


def test_injections_change_only_their_region(chest) -> None:
    _, hu = chest
    for noise in (True, False):
        result = inject_nodule(hu, np.random.default_rng(1), noise_matched=noise)
        assert isinstance(result, Tamper), result
        changed = _changed(result.hu, hu)
        assert changed.any() and not (changed & ~result.mask).any()
        x0, y0, x1, y1 = result.box
        assert lung_mask(hu)[(y0 + y1) // 2, (x0 + x1) // 2]  # the nodule sits in a lung
        assert result.hu[(y0 + y1) // 2, (x0 + x1) // 2] > -300  # and is solid


def test_noise_matched_nodule_carries_noise_the_smooth_one_lacks(chest) -> None:
    _, hu = chest
    noisy = inject_nodule(hu, np.random.default_rng(2), radius=8.0, noise_matched=True, centre=None)
    smooth = inject_nodule(hu, np.random.default_rng(2), radius=8.0, noise_matched=False, centre=None)
    from scipy import ndimage

    from models.forensics.inpaint import noise_texture

    def core_noise(result: Tamper) -> float:
        core = ndimage.binary_erosion(result.mask, iterations=6)
        return float(np.std(noise_texture(result.hu)[core]))

    assert core_noise(noisy) > 3 * core_noise(smooth) + 1.0


def test_removal_and_copy_move_stay_inside_the_region(chest, vessel_mask) -> None:
    _, hu = chest
    removed = remove_lesion(hu, vessel_mask, np.random.default_rng(3))
    assert isinstance(removed, Tamper), removed
    assert (removed.mask >= vessel_mask).all()
    assert not (_changed(removed.hu, hu) & ~removed.mask).any()
    assert removed.hu[vessel_mask].mean() < hu[vessel_mask].mean() - 100  # the dense structure is gone
    moved = copy_move(hu, hu, vessel_mask, np.random.default_rng(4))
    assert isinstance(moved, Tamper), moved
    assert not (_changed(moved.hu, hu) & ~moved.mask).any()


def test_bad_input_is_skipped_with_a_reason(chest) -> None:
    _, hu = chest
    air = np.zeros_like(hu, dtype=bool)
    air[5:15, 200:210] = True  # outside the patient, at the image edge
    skipped = remove_lesion(hu, air, np.random.default_rng(0))
    assert isinstance(skipped, Skip) and "edge" in skipped.reason
    air_inside = np.zeros_like(hu, dtype=bool)
    air_inside[18:26, 245:255] = True  # air above the patient: the "annotation" does not match the image
    assert hu[air_inside].mean() < -900
    mismatch = remove_lesion(hu, air_inside, np.random.default_rng(0))
    assert isinstance(mismatch, Skip) and "does not match" in mismatch.reason
    no_lung = np.full((128, 128), 40.0, dtype=np.float32)
    assert isinstance(inject_nodule(no_lung, np.random.default_rng(0)), Skip)
    assert isinstance(inject_sphere([hu, hu], 5.0, 0.7, np.random.default_rng(0)), Skip)  # too few slices


def test_dicom_rewrite_keeps_metadata_and_untouched_pixels(chest, tmp_path) -> None:
    ds, hu = chest
    result = inject_nodule(hu, np.random.default_rng(5))
    out = write_tampered(ds, result.hu, result.mask, tmp_path / "t.dcm")
    written = pydicom.dcmread(out)
    assert not written.file_meta.TransferSyntaxUID.is_compressed
    for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "RescaleIntercept"):
        assert getattr(written, keyword) == getattr(ds, keyword)
    assert np.array_equal(written.pixel_array[~result.mask], ds.pixel_array[~result.mask])
    new_hu = dicom_to_hu(written)
    assert np.abs(new_hu[result.mask] - result.hu[result.mask]).max() <= 0.5 + 1e-3


def test_btd_tamper_writes_a_series_with_ground_truth(fixtures_dir, tmp_path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    shutil.copy(fixtures_dir / CHEST, series / "chest.dcm")
    report = tamper_series(series, tmp_path / "out", "inject-noise", count=1, seed=0)
    truth = json.loads((tmp_path / "out" / "ground_truth.json").read_text())
    assert len(report.tampered) == 1 and truth["tampered"][0]["method"] == "inject-noise"
    original = pydicom.dcmread(series / "chest.dcm")
    written = pydicom.dcmread(tmp_path / "out" / truth["tampered"][0]["file"])
    assert written.PatientID == original.PatientID and written.StudyInstanceUID == original.StudyInstanceUID
    assert written.SeriesInstanceUID != original.SeriesInstanceUID  # a copy beside the original by default
    box = truth["tampered"][0]["box"]
    differ = np.argwhere(written.pixel_array != original.pixel_array)
    assert len(differ) > 0
    assert differ[:, 0].min() >= box["y0"] and differ[:, 0].max() < box["y1"]
    assert differ[:, 1].min() >= box["x0"] and differ[:, 1].max() < box["x1"]
