"""The Key Object Selection document: lists exactly the flagged images, validates, and is absent when clean."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from worker.reports.findings import RegionFinding, StudyFindings
from worker.reports.kos import build_kos
from worker.reports.sr import is_btd_document
from worker.reports.validate import validation_errors

FIXTURES = Path(__file__).parent / "fixtures"

needs_validators = pytest.mark.skipif(
    shutil.which("dciodvfy") is None or shutil.which("dsrdump") is None, reason="dicom3tools/dcmtk not installed"
)


@pytest.fixture(scope="module")
def ct() -> list[Dataset]:
    paths = sorted(p for p in (FIXTURES / "ct_series_20").iterdir() if p.name.startswith("CT."))
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def findings(images: list[Dataset], flagged: list[str], regions: list[str] | None = None) -> StudyFindings:
    return StudyFindings(
        study_uid=str(images[0].StudyInstanceUID),
        study_version=1,
        verdict="suspicious" if flagged or regions else "no_evidence",
        score=0.9,
        flagged_instances=flagged,
        regions=[RegionFinding(uid, 0.9, [[1, 1], [9, 1], [9, 9]]) for uid in (regions or [])],
    )


def referenced_uids(kos: Dataset) -> list[str]:
    return [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in kos.ContentSequence
        if item.ValueType == "IMAGE"
    ]


def test_kos_lists_flagged_images_once_each(ct: list[Dataset]) -> None:
    a, b = str(ct[3].SOPInstanceUID), str(ct[12].SOPInstanceUID)
    kos = build_kos(ct, findings(ct, [a, b], regions=[b]))
    assert kos is not None
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert kos.StudyInstanceUID == ct[0].StudyInstanceUID
    assert kos.SeriesInstanceUID != ct[0].SeriesInstanceUID
    assert referenced_uids(kos) == [a, b]
    assert is_btd_document(kos)
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")  # "Of Interest"
    description = [i.TextValue for i in kos.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert description and "SUSPICIOUS" in description[0]


def test_no_kos_when_nothing_is_flagged(ct: list[Dataset]) -> None:
    assert build_kos(ct, findings(ct, [])) is None


def test_no_kos_when_the_flagged_image_is_not_at_hand(ct: list[Dataset]) -> None:
    assert build_kos(ct, findings(ct, ["1.2.3.4.5.6"])) is None


@needs_validators
@pytest.mark.parametrize("source", ["ct", "emri_small.dcm", "MR_small.dcm"])
def test_kos_passes_dciodvfy_and_dsrdump(ct: list[Dataset], tmp_path: Path, source: str) -> None:
    images = ct if source == "ct" else [pydicom.dcmread(FIXTURES / "pydicom" / source, stop_before_pixels=True)]
    kos = build_kos(images, findings(images, [str(images[-1].SOPInstanceUID)]))
    assert kos is not None
    path = tmp_path / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    assert validation_errors(path) == []
