"""The DICOM Structured Report that carries btd's verdict into the radiologist's viewer.

Encoding (../shared/ARCHITECTURE.md, "Results for radiologists"): a Comprehensive 3D SR holding a
TID 1500 Measurement Report in the source study. Each suspicious region is one TID 1410 planar ROI
group (POLYLINE on the source image, anomaly score as NUM, Present as qualitative evaluation, private
finding code). The study verdict is deliberately NOT a measurement group: OHIF 3.13 throws on any TID
1500 group without an image region. It goes where viewers do not choke: the root-level "Qualitative
Evaluations" container of TID 1500 (row 12; OHIF only reads Imaging Measurements), the Completion Flag
Description and the Series Description (what a PACS series list shows).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from core.contracts import VERSION, Verdict, cue_words
from worker.reports import codes as btd_codes
from worker.reports.findings import RegionFinding, StudyFindings

MANUFACTURER = "btd project"
MODEL_NAME = "btd forensic gateway"
SR_SERIES_NUMBER = 9901
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
SERIES_DESCRIPTION_PREFIX = "BTD forensic report"

# A study under the (stricter) study threshold whose slices still hold regions above the slice threshold
# (verdict "review"): saying "no evidence" beside a region marked "possible tampering" would contradict
# itself, and hiding the region would be a silent pass. It is reported as what it is: slice-level findings
# to review.
REVIEW_WORDS = "REVIEW: slice flags below study threshold"
# A study holding an instance replaced by different bytes under its UID (core/forensics.py): the replacement
# is the finding, whatever the pixels scored; each one is named in its own TEXT item.
REPLACED_WORDS = "REVIEW: {n} instance(s) replaced"
VERDICT_WORDS = {
    Verdict.SUSPICIOUS: "SUSPICIOUS: possible image manipulation",
    Verdict.REVIEW: REVIEW_WORDS,
    Verdict.NO_EVIDENCE: "no evidence of image manipulation",
    Verdict.NOT_ASSESSED: "NOT ASSESSED",
}


def headline(findings: StudyFindings) -> str:
    """The verdict in words, as the series description, the KOS and the verdict text say it. (A result
    stored before the "review" verdict existed says "no_evidence" with flagged slices: read as review.)"""
    if findings.replaced_instances and findings.verdict != Verdict.SUSPICIOUS:
        return REPLACED_WORDS.format(n=len(findings.replaced_instances))
    if findings.verdict == Verdict.NO_EVIDENCE and findings.flagged:
        return REVIEW_WORDS
    return VERDICT_WORDS.get(findings.verdict, findings.verdict)


def study_evaluation(findings: StudyFindings) -> hd.sr.CodedConcept:
    """The study's qualitative evaluation: Indeterminate, not Absent, when slices were flagged below it or an
    instance was replaced under its UID."""
    if findings.verdict != Verdict.SUSPICIOUS and findings.replaced_instances:
        return btd_codes.INDETERMINATE
    if findings.verdict == Verdict.NO_EVIDENCE and findings.flagged:
        return btd_codes.INDETERMINATE
    return btd_codes.VERDICT_EVALUATION.get(findings.verdict, btd_codes.INDETERMINATE)


def report_uid(kind: str, study_uid: str, study_version: int) -> str:
    """A UID derived from the study and its version, so rebuilding after a crash gives the same document."""
    return str(generate_uid(entropy_srcs=["btd", kind, study_uid, str(study_version)]))


def device_uid() -> str:
    return str(generate_uid(entropy_srcs=["btd", "device", MODEL_NAME]))


def verdict_text(findings: StudyFindings) -> str:
    """One line a radiologist can read: the verdict, the score and how many regions were marked."""
    words = headline(findings)
    score = f", score {findings.score:.4g}" if findings.score is not None else ""
    regions = f", {len(findings.regions)} region(s) marked" if findings.regions else ""
    return f"BTD: {words}{score}{regions} (model {findings.model_name}; not verified by a person)"


def replacement_text(sop_instance_uid: str, version: int) -> str:
    """What the SR says of one instance replaced under its UID."""
    return (
        f"Instance {sop_instance_uid} was replaced by different bytes under the same UID (version {version}): "
        "itself evidence of tampering"
    )


def completion_text(findings: StudyFindings) -> str:
    """The short verdict for the Completion Flag Description (LO, at most 64 characters)."""
    score = f" {findings.score:.4g}" if findings.score is not None else ""
    return f"BTD verdict: {findings.verdict}{score}"[:64]


def _procedure(datasets: Sequence[Dataset]) -> list[hd.sr.CodedConcept]:
    modalities = sorted({str(ds.get("Modality", "")) for ds in datasets})
    procedures = [btd_codes.PROCEDURE_BY_MODALITY[m] for m in modalities if m in btd_codes.PROCEDURE_BY_MODALITY]
    if not procedures:
        raise ValueError(f"no CT or MR image among the source datasets (modalities {modalities})")
    return procedures


def _observation_context() -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid(),
                name="BTD",
                manufacturer_name=MANUFACTURER,
                model_name=MODEL_NAME,
            ),
        )
    )


def _algorithm(findings: StudyFindings) -> hd.sr.AlgorithmIdentification:
    parameters = [f"weights_sha256={findings.model_sha256 or 'unknown'}", f"software_version={VERSION}"]
    return hd.sr.AlgorithmIdentification(
        name=findings.model_name,
        version=findings.model_version,
        parameters=parameters,
        family=codes.DCM.ArtificialIntelligence,
    )


def _slice_label(image: Dataset, region: RegionFinding) -> str:
    if region.frame is not None and int(image.get("NumberOfFrames", 1) or 1) > 1:
        return f"frame {region.frame}"
    number = image.get("InstanceNumber")
    return f"slice {number}" if number not in (None, "") else f"image {image.SOPInstanceUID}"


def _closed_polyline(outline: list[list[float]], region: RegionFinding) -> np.ndarray:
    """The outline as a closed POLYLINE (first point repeated last); the bounding box if there is none."""
    points = [[float(x), float(y)] for x, y in outline]
    if len(points) < 3:
        points = [[region.x0, region.y0], [region.x1, region.y0], [region.x1, region.y1], [region.x0, region.y1]]
    if points[0] != points[-1]:
        points.append(points[0])
    return np.asarray(points, dtype=np.float32)


def _region_group(
    index: int, image: Dataset, region: RegionFinding, findings: StudyFindings
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    frames = [int(region.frame)] if region.frame is not None and int(image.get("NumberOfFrames", 1) or 1) > 1 else None
    source = hd.sr.SourceImageForRegion.from_source_image(image, referenced_frame_numbers=frames)
    image_region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_closed_polyline(region.outline, region),
        source_image=source,
    )
    found_by = f" ({cue_words(region.cue)})" if region.cue else ""
    label = f"BTD: possible tampering, {_slice_label(image, region)}{found_by}"
    tracking = hd.sr.TrackingIdentifier(
        uid=report_uid(f"region-{index}", findings.study_uid, findings.study_version), identifier=label
    )
    score = hd.sr.Measurement(name=btd_codes.ANOMALY_SCORE, value=float(region.score), unit=btd_codes.NO_UNITS)
    evaluation = hd.sr.QualitativeEvaluation(name=btd_codes.IMAGE_MANIPULATION, value=btd_codes.PRESENT)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=image_region,
        finding_type=btd_codes.IMAGE_MANIPULATION,
        method=btd_codes.BTD_METHOD,
        algorithm_id=_algorithm(findings),
        measurements=[score],
        qualitative_evaluations=[evaluation],
    )


def _study_evaluations(findings: StudyFindings) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the study verdict as a root-level qualitative evaluation, plus, as TEXT (no image
    region, so no measurement group), each instance replaced under its UID and the reasons of every series
    that was not assessed."""
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=btd_codes.IMAGE_MANIPULATION,
            value=study_evaluation(findings),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        hd.sr.TextContentItem(
            name=btd_codes.STUDY_VERDICT,
            value=verdict_text(findings),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ]
    if findings.operating_point:
        items.append(
            hd.sr.TextContentItem(
                name=btd_codes.OPERATING_POINT,
                value=findings.operating_point,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    for series in findings.series:
        if series.verdict == Verdict.NOT_ASSESSED:
            continue
        summaries = [(btd_codes.FORENSIC_CUES, series.cue_summary())]
        if series.cues:  # a fused model says against what it judged; an unfused one has nothing to say here
            summaries.append((btd_codes.SCANNER_REFERENCE, series.reference_summary()))
        for name, text in summaries:
            if text:
                contains = hd.sr.RelationshipTypeValues.CONTAINS
                items.append(hd.sr.TextContentItem(name=name, value=text, relationship_type=contains))
    for replaced in findings.replaced_instances:
        items.append(
            hd.sr.TextContentItem(
                name=btd_codes.INSTANCE_REPLACED,
                value=replacement_text(replaced.sop_instance_uid, replaced.version),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    for series in findings.not_assessed:
        items.append(
            hd.sr.TextContentItem(
                name=btd_codes.SERIES_NOT_ASSESSED,
                value=f"series {series.series_uid} ({series.modality or 'unknown modality'}): "
                f"{series.reason or 'no reason recorded'}",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    container = hd.sr.ContainerContentItem(
        name=btd_codes.QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _image_library_images(datasets: Sequence[Dataset], findings: StudyFindings) -> list[Dataset]:
    """The Image Library (TID 1600): the images the regions are drawn on, or, for a report without regions,
    the first image with plane geometry, because OHIF reads the library without checking that it exists.

    Why not every source image: each entry costs highdicom about 0.1 MB and 20 ms to build (1.3 GB and 40 s
    for a 2,000-slice study) and describes geometry no content item uses; every instance is still cited in
    the evidence. Only images with plane geometry at top level can be described (enhanced multi-frame
    images keep it in functional groups, which highdicom's Image Library does not read; they stay in the
    evidence and their regions still reference them).
    """
    regions_on = {region.sop_instance_uid for region in findings.regions}
    drawn_on = [ds for ds in datasets if str(ds.SOPInstanceUID) in regions_on]
    with_geometry = [ds for ds in drawn_on or datasets if "PixelSpacing" in ds and "ImagePositionPatient" in ds]
    return with_geometry if drawn_on else with_geometry[:1]


def _measurement_report(
    source_datasets: Sequence[Dataset],
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations],
    findings: StudyFindings,
) -> hd.sr.MeasurementReport:
    """TID 1500 with the region groups (if any) and the root-level study evaluation.

    highdicom insists on at least one measurement group; a clean study has none, and a group without a
    region is exactly what breaks OHIF. So a clean report is built with a placeholder group and its
    Imaging Measurements container is then removed: TID 1500 allows a report whose content is only
    the Qualitative Evaluations container (row 12).
    """
    placeholder = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier="placeholder"),
    )
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=_procedure(source_datasets),
        imaging_measurements=groups or [placeholder],
        referenced_images=_image_library_images(source_datasets, findings) or None,
    )
    root = report[0]
    if not groups:
        kept = [item for item in root.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue != "126010"]
        root.ContentSequence = hd.sr.ContentSequence(kept)
    root.ContentSequence.append(_study_evaluations(findings))
    return report


def _contributing_equipment() -> hd.ContributingEquipment:
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=MODEL_NAME,
        software_versions=VERSION,
    )


def _images_by_uid(datasets: Sequence[Dataset]) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def build_sr(
    source_datasets: Sequence[Dataset],
    findings: StudyFindings,
    previous_sr: Dataset | None = None,
    *,
    series_number: int = SR_SERIES_NUMBER,
) -> Dataset:
    """Build the SR of one study version from the instances that were scored (headers suffice).

    `source_datasets` are the study's images (every instance scored: they become the evidence; the headers
    of the first image and of the images regions point at are read, the others may be stand-ins made by
    worker/reports/evidence.py). `previous_sr` is the SR of the previous version of the study, if any: it becomes
    the Predecessor Documents Sequence, so the PACS shows the new SR as a revision.
    Regions on an image missing from `source_datasets` raise ValueError (a report must not point at
    an image the PACS does not have).
    """
    if not source_datasets:
        raise ValueError("an SR needs at least one source image")
    images = _images_by_uid(source_datasets)
    groups = []
    for index, region in enumerate(findings.regions):
        image = images.get(region.sop_instance_uid)
        if image is None:
            raise ValueError(f"region on instance {region.sop_instance_uid}, which is not among the sources")
        groups.append(_region_group(index, image, region, findings))
    report = _measurement_report(source_datasets, groups, findings)
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(source_datasets),
        content=report,
        series_instance_uid=report_uid("sr-series", findings.study_uid, findings.study_version),
        series_number=series_number,
        sop_instance_uid=report_uid("sr", findings.study_uid, findings.study_version),
        instance_number=findings.study_version,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[previous_sr] if previous_sr is not None else None,
        contributing_equipment=[_contributing_equipment()],
        series_description=f"{SERIES_DESCRIPTION_PREFIX}: {headline(findings)}"[:64],
        manufacturer_model_name=MODEL_NAME,
        software_versions=VERSION,
    )
    sr.CompletionFlagDescription = completion_text(findings)
    sr.CodingSchemeIdentificationSequence = [btd_codes.coding_scheme_identification()]
    return sr


def is_btd_document(ds: Dataset) -> bool:
    """True for an SR or KOS that btd wrote itself (its SOP class and Manufacturer).

    Why: a PACS rule that forwards whole studies sends btd's own reports back to it; the listener can
    use this to store them without reopening the study, or the study would be scored again, its new
    report forwarded again, and so on.
    """
    return str(ds.get("SOPClassUID", "")) in (COMPREHENSIVE_3D_SR, KEY_OBJECT_SELECTION) and (
        str(ds.get("Manufacturer", "")) == MANUFACTURER
    )


def predecessor_reference(study_uid: str, series_uid: str, sop_instance_uid: str) -> Dataset:
    """A stand-in for a previous SR whose file is gone: the four UIDs are all a predecessor reference needs."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.SOPClassUID = COMPREHENSIVE_3D_SR
    return ds
