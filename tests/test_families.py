"""The independent attack families: pixels change only inside the mask, texture comes from where it says."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from models.corpus import dicom_to_hu
from models.forensics import families as fam
from models.forensics.tamper import Skip
from models.lungmask import lung_mask


@pytest.fixture(scope="module")
def chest(fixtures_dir) -> np.ndarray:
    return dicom_to_hu(pydicom.dcmread(fixtures_dir / "ct_transfer_syntaxes/CT1_J2KR"))


def _only_inside(hu: np.ndarray, tamper) -> None:
    assert not isinstance(tamper, Skip), getattr(tamper, "reason", "")
    changed = np.abs(tamper.hu - hu) > 1e-3
    assert changed.any() and not (changed & ~tamper.mask).any()


def test_nps_nodule_noise_is_synthesised_at_the_measured_level(chest) -> None:
    nps, std = fam.measure_nps(chest)
    noise = fam.synthesise_noise(nps, std, (64, 64), np.random.default_rng(0))
    assert noise.std() == pytest.approx(std, rel=0.05)
    # the synthesised noise is correlated like the slice's (not white): neighbours correlate positively
    assert np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1] > 0.1
    _only_inside(chest, fam.nps_nodule_2d(chest, np.random.default_rng(1)))


def test_exemplar_families_and_transplant_change_only_their_masks(chest) -> None:
    rng = np.random.default_rng(2)
    _only_inside(chest, fam.inject_exemplar_2d(chest, rng))
    lungs = ndimage.binary_erosion(lung_mask(chest), iterations=14)
    labels, count = ndimage.label((chest > -500) & lungs)
    sizes = ndimage.sum(np.ones_like(chest), labels, range(1, count + 1))
    lesion = labels == (int(np.argmax(sizes)) + 1)
    removal = fam.remove_exemplar_2d(chest, lesion, rng)
    _only_inside(chest, removal)
    assert removal.hu[lesion].mean() < chest[lesion].mean() - 100  # the dense structure is gone
    donor = fam.Donor("another-patient", [chest], [lesion], pixel_mm=0.7)
    transplant = fam.transplant_2d(chest, donor, 0, rng, pixel_mm=0.5)
    _only_inside(chest, transplant)
    assert transplant.details["donor"] == "another-patient"


def test_3d_forms_cover_consecutive_slices(chest) -> None:
    volume = fam.Volume([chest.copy() for _ in range(15)], spacing_mm=1.25, pixel_mm=0.7)
    edits = fam.nps_nodule_3d(volume, np.random.default_rng(3))
    assert not isinstance(edits, Skip)
    indices = [k for k, _ in edits]
    assert indices == list(range(indices[0], indices[0] + len(indices))) and len(indices) >= 3
    for _, tamper in edits:
        _only_inside(chest, tamper)


def test_btd_tamper_writes_the_new_families_as_dicom(fixtures_dir, tmp_path) -> None:
    """`btd tamper --method nps-nodule | inject-exemplar` on a real chest slice: written, masked, labelled."""
    import json
    import shutil

    from models.forensics.red_team import tamper_series

    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(fixtures_dir / "ct_transfer_syntaxes/CT1_J2KR", folder / "CT1.dcm")
    for method in ("nps-nodule", "inject-exemplar"):
        report = tamper_series(folder, tmp_path / method, method, count=1, seed=0)
        assert len(report.tampered) == 1, report.skipped
        truth = json.loads((tmp_path / method / "ground_truth.json").read_text())
        assert truth["tampered"][0]["method"] == method
        written = pydicom.dcmread(tmp_path / method / truth["tampered"][0]["file"])
        mask = np.load(tmp_path / method / truth["tampered"][0]["mask_file"])
        changed = np.abs(dicom_to_hu(written) - dicom_to_hu(pydicom.dcmread(folder / "CT1.dcm"))) > 0.5
        assert changed.any() and not (changed & ~mask).any()
