"""The SR builder on real CT and MR images: content a viewer relies on, and dciodvfy + dsrdump validity."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from worker.reports.evidence import evidence_reference
from worker.reports.findings import RegionFinding, ReplacedInstance, SeriesFinding, StudyFindings
from worker.reports.sr import build_sr, is_btd_document, predecessor_reference
from worker.reports.validate import dciodvfy_errors, dsrdump_errors, validation_errors

FIXTURES = Path(__file__).parent / "fixtures"
SHA = "0123456789abcdef" * 4

needs_validators = pytest.mark.skipif(
    shutil.which("dciodvfy") is None or shutil.which("dsrdump") is None, reason="dicom3tools/dcmtk not installed"
)


def read_headers(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.fixture(scope="module")
def ct() -> list[Dataset]:
    return read_headers(sorted(p for p in (FIXTURES / "ct_series_20").iterdir() if p.name.startswith("CT.")))


@pytest.fixture(scope="module")
def mr() -> list[Dataset]:
    return read_headers([FIXTURES / "pydicom" / "MR_small.dcm"])


@pytest.fixture(scope="module")
def emr() -> list[Dataset]:
    return read_headers([FIXTURES / "pydicom" / "emri_small.dcm"])


def findings_for(images: list[Dataset], modality: str, flagged: bool, version: int = 1) -> StudyFindings:
    first = images[0]
    regions = []
    if flagged:
        target = images[len(images) // 2]
        frame = 3 if int(target.get("NumberOfFrames", 1) or 1) > 1 else None
        regions = [
            RegionFinding(
                sop_instance_uid=str(target.SOPInstanceUID),
                score=0.8125,
                outline=[[10.0, 12.0], [40.0, 12.0], [44.0, 30.0], [25.0, 40.0], [10.0, 30.0]],
                frame=frame,
                x0=10,
                y0=12,
                x1=45,
                y1=41,
            )
        ]
    return StudyFindings(
        study_uid=str(first.StudyInstanceUID),
        study_version=version,
        verdict="suspicious" if flagged else "no_evidence",
        score=0.8125 if flagged else 0.125,
        model_name=f"btd-{modality.lower()}-test",
        model_version="test-1",
        model_sha256=SHA,
        operating_point="Measured on held-out patients: flags 1.8 % of genuine slices. No evidence does not mean "
        "authentic.",
        series=[
            SeriesFinding(str(first.SeriesInstanceUID), modality, "suspicious" if flagged else "no_evidence", 0.8),
            SeriesFinding("1.2.826.0.1.3680043.8.498.1", "CT", "not_assessed", None, "localizer image"),
        ],
        regions=regions,
        flagged_instances=[r.sop_instance_uid for r in regions],
    )


def walk(items) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def children(item: Dataset, code: str) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if concept(c)[0] == code]


def test_flagged_ct_sr_carries_regions_verdict_and_provenance(ct: list[Dataset]) -> None:
    findings = findings_for(ct, "CT", flagged=True)
    sr = build_sr(ct, findings)

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == ct[0].StudyInstanceUID
    assert sr.SeriesInstanceUID != ct[0].SeriesInstanceUID
    assert sr.PatientID == ct[0].PatientID and sr.PatientName == ct[0].PatientName
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert "suspicious" in sr.CompletionFlagDescription
    assert "SUSPICIOUS" in sr.SeriesDescription
    ours = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "btd project"]
    assert ours and ours[0].SoftwareVersions and ours[0].ManufacturerModelName
    assert [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence] == ["99BTD"]
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in ct}

    root = sr  # the document's root content item is the dataset itself
    assert concept(root) == ("126000", "DCM")
    items = list(walk(root.ContentSequence))
    procedure = [i for i in items if concept(i) == ("121058", "DCM")]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "77477000"
    observer_type = [i for i in items if concept(i) == ("121005", "DCM")]
    assert observer_type[0].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    library = children(children(root, "111028")[0], "126200")[0].ContentSequence  # Image Library
    assert [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in library] == [ct[10].SOPInstanceUID]

    groups = children(children(root, "126010")[0], "125007")
    assert len(groups) == 1
    group = groups[0]
    tracking = children(group, "112039")[0].TextValue
    assert tracking == f"BTD: possible tampering, slice {ct[10].InstanceNumber}"
    finding = children(group, "121071")[0].ConceptCodeSequence[0]
    assert (finding.CodeValue, finding.CodingSchemeDesignator) == ("BTD0001", "99BTD")
    score = children(group, "BTD0002")[0].MeasuredValueSequence[0]
    assert float(score.NumericValue) == pytest.approx(0.8125)
    evaluation = children(group, "BTD0001")[0].ConceptCodeSequence[0]
    assert evaluation.CodeValue == "52101004"  # Present
    params = [i.TextValue for i in children(group, "111002")]
    assert f"weights_sha256={SHA}" in params
    assert children(group, "111001")[0].TextValue == "btd-ct-test"
    region = children(group, "111030")[0]
    assert region.GraphicType == "POLYLINE"
    points = list(region.GraphicData)
    assert points[:2] == points[-2:] and len(points) == 12  # closed: 5 vertices + the first again
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ct[10].SOPInstanceUID

    study_eval = children(root, "C0034375")[0]
    assert children(study_eval, "BTD0001")[0].ConceptCodeSequence[0].CodeValue == "52101004"
    assert "SUSPICIOUS" in children(study_eval, "BTD0004")[0].TextValue
    not_assessed = children(study_eval, "BTD0005")
    assert len(not_assessed) == 1 and "localizer image" in not_assessed[0].TextValue
    assert "No evidence does not mean authentic" in children(study_eval, "BTD0006")[0].TextValue


def test_clean_sr_has_no_measurement_group_and_says_absent(ct: list[Dataset]) -> None:
    sr = build_sr(ct, findings_for(ct, "CT", flagged=False))
    assert not children(sr, "126010")  # no Imaging Measurements: nothing for OHIF to choke on
    study_eval = children(sr, "C0034375")[0]
    assert children(study_eval, "BTD0001")[0].ConceptCodeSequence[0].CodeValue == "272519000"  # Absent
    assert "no evidence" in sr.SeriesDescription


def test_clean_sr_image_library_holds_the_first_image(ct: list[Dataset]) -> None:
    """OHIF reads the Image Library without checking it exists: a report without regions still has one."""
    sr = build_sr(ct, findings_for(ct, "CT", flagged=False))
    library = children(children(sr, "111028")[0], "126200")[0].ContentSequence
    assert [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in library] == [ct[0].SOPInstanceUID]


def test_clean_sr_image_library_skips_a_first_instance_without_geometry(ct: list[Dataset]) -> None:
    """The first instance received may be a non-image (a dose report): the library describes the first image."""
    dose = copy.deepcopy(ct[0])  # a header read in full, as the worker reads the first instance received
    for keyword in ("PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient"):
        delattr(dose, keyword)
    dose.SOPClassUID, dose.SOPInstanceUID, dose.Modality = "1.2.840.10008.5.1.4.1.1.88.67", "1.2.3.4.5", "SR"
    dose.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.7"
    sr = build_sr([ct[0], dose, *ct[1:]], findings_for(ct, "CT", flagged=False))
    library = children(children(sr, "111028")[0], "126200")[0].ContentSequence
    assert [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in library] == [ct[0].SOPInstanceUID]
    sr = build_sr([dose, *ct], findings_for(ct, "CT", flagged=False))
    library = children(children(sr, "111028")[0], "126200")[0].ContentSequence
    assert [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in library] == [ct[0].SOPInstanceUID]


def test_stand_ins_for_unread_images_are_cited_like_headers(ct: list[Dataset]) -> None:
    """The worker reads only the first header and the region images' (worker/reports/evidence.py): the SR
    built from stand-ins for the rest cites the same evidence and says the same as one built from headers."""
    findings = findings_for(ct, "CT", flagged=True)
    region_uid = findings.regions[0].sop_instance_uid
    mixed = [
        ds
        if i == 0 or str(ds.SOPInstanceUID) == region_uid
        else evidence_reference(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID), "CT"
        )
        for i, ds in enumerate(ct)
    ]
    from_headers, from_stand_ins = build_sr(ct, findings), build_sr(mixed, findings)
    assert (
        from_stand_ins.CurrentRequestedProcedureEvidenceSequence
        == from_headers.CurrentRequestedProcedureEvidenceSequence
    )
    assert from_stand_ins.ContentSequence == from_headers.ContentSequence
    assert from_stand_ins.PatientID == ct[0].PatientID and from_stand_ins.StudyDate == ct[0].StudyDate


def test_regions_below_the_study_threshold_ask_for_review_not_absent(ct: list[Dataset]) -> None:
    """A study under the study threshold whose slices still hold flagged regions: never "no evidence"."""
    import dataclasses

    findings = dataclasses.replace(findings_for(ct, "CT", flagged=True), verdict="no_evidence")
    sr = build_sr(ct, findings)
    study_eval = children(sr, "C0034375")[0]
    assert children(study_eval, "BTD0001")[0].ConceptCodeSequence[0].CodeValue == "82334004"  # Indeterminate
    assert "REVIEW: slice flags below study threshold" in children(study_eval, "BTD0004")[0].TextValue
    assert sr.SeriesDescription == "BTD forensic report: REVIEW: slice flags below study threshold"
    assert len(children(children(sr, "126010")[0], "125007")) == 1  # the region is still drawn


def test_a_review_verdict_reads_review_and_indeterminate(ct: list[Dataset]) -> None:
    sr = build_sr(ct, dataclasses.replace(findings_for(ct, "CT", flagged=True), verdict="review"))
    study_eval = children(sr, "C0034375")[0]
    assert children(study_eval, "BTD0001")[0].ConceptCodeSequence[0].CodeValue == "82334004"  # Indeterminate
    assert sr.SeriesDescription == "BTD forensic report: REVIEW: slice flags below study threshold"


def test_not_assessed_study_is_indeterminate(ct: list[Dataset]) -> None:
    findings = findings_for(ct, "CT", flagged=False)
    findings.verdict, findings.score = "not_assessed", None
    sr = build_sr(ct, findings)
    study_eval = children(sr, "C0034375")[0]
    assert children(study_eval, "BTD0001")[0].ConceptCodeSequence[0].CodeValue == "82334004"  # Indeterminate
    assert "NOT ASSESSED" in sr.SeriesDescription


def test_rescore_references_previous_sr_as_predecessor(ct: list[Dataset]) -> None:
    first = build_sr(ct, findings_for(ct, "CT", flagged=True, version=1))
    second = build_sr(ct, findings_for(ct, "CT", flagged=False, version=2), previous_sr=first)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    ref = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    # a stand-in built from the reports row works the same when the old file is gone
    stand_in = predecessor_reference(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
    third = build_sr(ct, findings_for(ct, "CT", flagged=False, version=3), previous_sr=stand_in)
    ref3 = third.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref3.ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_same_study_version_gives_same_uids(ct: list[Dataset]) -> None:
    """Rebuilding after a crash must not create a second document for the same verdict."""
    a = build_sr(ct, findings_for(ct, "CT", flagged=True))
    b = build_sr(ct, findings_for(ct, "CT", flagged=True))
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)


def test_btd_documents_are_recognised_and_images_are_not(ct: list[Dataset]) -> None:
    sr = build_sr(ct, findings_for(ct, "CT", flagged=True))
    assert is_btd_document(sr)
    assert not is_btd_document(ct[0])
    sr.Manufacturer = "Another AI vendor"
    assert not is_btd_document(sr)


def test_region_on_an_image_not_in_the_sources_is_refused(ct: list[Dataset]) -> None:
    findings = findings_for(ct, "CT", flagged=True)
    findings.regions = [RegionFinding("1.2.3.4.5", 0.9, [[1, 1], [5, 1], [5, 5]])]
    with pytest.raises(ValueError, match="not among the sources"):
        build_sr(ct, findings)


def test_multiframe_region_names_its_frame(emr: list[Dataset]) -> None:
    sr = build_sr(emr, findings_for(emr, "MR", flagged=True))
    group = children(children(sr, "126010")[0], "125007")[0]
    assert children(group, "112039")[0].TextValue == "BTD: possible tampering, frame 3"
    source = children(group, "111030")[0].ContentSequence[0].ReferencedSOPSequence[0]
    assert int(source.ReferencedFrameNumber) == 3
    procedure = [i for i in walk(sr.ContentSequence) if concept(i) == ("121058", "DCM")]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "113091000"


@needs_validators
@pytest.mark.parametrize(
    ("series", "modality", "flagged"),
    [("ct", "CT", True), ("ct", "CT", False), ("mr", "MR", True), ("mr", "MR", False), ("emr", "MR", True)],
)
def test_sr_passes_dciodvfy_and_dsrdump(request, tmp_path: Path, series: str, modality: str, flagged: bool) -> None:
    images = request.getfixturevalue(series)
    path = tmp_path / "sr.dcm"
    build_sr(images, findings_for(images, modality, flagged)).save_as(path, enforce_file_format=True)
    assert validation_errors(path) == []


@needs_validators
def test_validators_catch_a_broken_sr(ct: list[Dataset], tmp_path: Path) -> None:
    """The validation above means something: a damaged SR is reported by both tools."""
    sr = build_sr(ct, findings_for(ct, "CT", flagged=True))
    sr.ContentSequence[0].ValueType = "BOGUS"
    del sr.CompletionFlag
    path = tmp_path / "broken.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path)
    assert dsrdump_errors(path)


def replaced_findings(images: list[Dataset], modality: str, verdict: str = "review") -> StudyFindings:
    """A clean study whose middle image was received again with different bytes under its UID (version 2)."""
    findings = findings_for(images, modality, flagged=False)
    target = str(images[len(images) // 2].SOPInstanceUID)
    return dataclasses.replace(findings, verdict=verdict, replaced_instances=[ReplacedInstance(target, 2)])


def test_an_instance_replaced_under_its_uid_is_stated_and_never_a_silent_pass(ct: list[Dataset]) -> None:
    findings = replaced_findings(ct, "CT")
    sr = build_sr(ct, findings)
    study_eval = children(sr, "C0034375")[0]
    (stated,) = children(study_eval, "BTD0007")
    target = findings.replaced_instances[0].sop_instance_uid
    assert stated.ValueType == "TEXT" and stated.TextValue == (
        f"Instance {target} was replaced by different bytes under the same UID (version 2): "
        "itself evidence of tampering"
    )
    assert children(study_eval, "BTD0001")[0].ConceptCodeSequence[0].CodeValue == "82334004"  # Indeterminate
    assert "REVIEW: 1 instance(s) replaced" in children(study_eval, "BTD0004")[0].TextValue
    assert sr.SeriesDescription == "BTD forensic report: REVIEW: 1 instance(s) replaced"
    assert sr.CompletionFlagDescription == "BTD verdict: review 0.125"


def test_a_suspicious_study_with_a_replacement_stays_suspicious(ct: list[Dataset]) -> None:
    target = str(ct[0].SOPInstanceUID)
    findings = dataclasses.replace(
        findings_for(ct, "CT", flagged=True), replaced_instances=[ReplacedInstance(target, 3)]
    )
    sr = build_sr(ct, findings)
    study_eval = children(sr, "C0034375")[0]
    assert children(study_eval, "BTD0001")[0].ConceptCodeSequence[0].CodeValue != "82334004"
    assert "SUSPICIOUS" in sr.SeriesDescription and "(version 3)" in children(study_eval, "BTD0007")[0].TextValue


@needs_validators
@pytest.mark.parametrize(("series", "modality"), [("ct", "CT"), ("mr", "MR")])
def test_sr_stating_a_replacement_passes_dciodvfy_and_dsrdump(
    request, tmp_path: Path, series: str, modality: str
) -> None:
    images = request.getfixturevalue(series)
    path = tmp_path / "sr.dcm"
    build_sr(images, replaced_findings(images, modality)).save_as(path, enforce_file_format=True)
    assert validation_errors(path) == []
