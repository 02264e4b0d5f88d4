"""Coded concepts used in btd's reports, including the private coding scheme for the finding itself.

Why a private scheme: neither SNOMED CT nor DICOM (DCM) has a concept for "image manipulation", so the
finding and its score are coded in "99BTD" (the "99" prefix is DICOM's reserved form for local
schemes, PS3.16 section 8) and every document that uses them declares the scheme in its Coding Scheme
Identification Sequence, so a receiving system can tell where the codes come from.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from core.contracts import Verdict

PRIVATE_SCHEME = "99BTD"
PRIVATE_SCHEME_NAME = "btd forensic findings"
PRIVATE_SCHEME_ORGANIZATION = "btd project"
PRIVATE_SCHEME_VERSION = "1"

# The finding: what a region group reports ("finding type") and what the qualitative evaluation judges.
IMAGE_MANIPULATION = CodedConcept("BTD0001", PRIVATE_SCHEME, "Possible image manipulation")
# The NUM of each region and of the study: the anomaly score of the diffusion model (higher = more suspicious).
ANOMALY_SCORE = CodedConcept("BTD0002", PRIVATE_SCHEME, "BTD anomaly score")
# Method of the region measurements: Back-in-Time Diffusion residual analysis.
BTD_METHOD = CodedConcept("BTD0003", PRIVATE_SCHEME, "Back-in-Time Diffusion residual analysis")
# TEXT items of the study verdict container: the verdict in words, and each series not assessed.
STUDY_VERDICT = CodedConcept("BTD0004", PRIVATE_SCHEME, "BTD study verdict")
SERIES_NOT_ASSESSED = CodedConcept("BTD0005", PRIVATE_SCHEME, "Series not assessed")
# TEXT item beside the verdict: the model's operating point measured on held-out patients.
OPERATING_POINT = CodedConcept("BTD0006", PRIVATE_SCHEME, "Measured operating point")
# TEXT items per assessed series: what each forensic cue said, and the scanner reference it was judged against.
FORENSIC_CUES = CodedConcept("BTD0008", PRIVATE_SCHEME, "Forensic cues")
SCANNER_REFERENCE = CodedConcept("BTD0009", PRIVATE_SCHEME, "Scanner reference")
# TEXT item per instance received again with different bytes under the same SOP Instance UID.
INSTANCE_REPLACED = CodedConcept("BTD0007", PRIVATE_SCHEME, "Instance replaced under the same UID")

# TID 1500 row 12: the root-level "Qualitative Evaluations" container (UMLS C0034375).
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")

PRESENT = CodedConcept(codes.SCT.Present.value, "SCT", codes.SCT.Present.meaning)
ABSENT = CodedConcept(codes.SCT.Absent.value, "SCT", codes.SCT.Absent.meaning)
INDETERMINATE = CodedConcept(codes.SCT.Indeterminate.value, "SCT", codes.SCT.Indeterminate.meaning)

# Verdicts of models.SeriesResult -> the qualitative evaluation a viewer shows.
VERDICT_EVALUATION = {
    Verdict.SUSPICIOUS: PRESENT,
    Verdict.REVIEW: INDETERMINATE,
    Verdict.NO_EVIDENCE: ABSENT,
    Verdict.NOT_ASSESSED: INDETERMINATE,
}

CT_PROCEDURE = CodedConcept("77477000", "SCT", "Computed tomography")
MR_PROCEDURE = CodedConcept("113091000", "SCT", "Magnetic resonance imaging")
PROCEDURE_BY_MODALITY = {"CT": CT_PROCEDURE, "MR": MR_PROCEDURE}

NO_UNITS = CodedConcept("1", "UCUM", "no units")


def coding_scheme_identification() -> Dataset:
    """One item of the Coding Scheme Identification Sequence (0008,0110) declaring the private scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    return item
