"""The JSON shapes of the REST API (pydantic), which are also what /docs shows.

Why explicit response models: the API is read by radiology IT's own tools, so its fields are a
contract; and declaring them is what keeps patient names and IDs out (they are optional fields filled
only when BTD_EXPOSE_PATIENT_IDS is set).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class Progress(BaseModel):
    """How far the scoring of a study has come (slices done of the study's total)."""

    done: int
    total: int
    fraction: float
    updated_at: datetime | None = None


class StudySummary(BaseModel):
    study_uid: str
    state: str
    state_since: datetime
    version: int
    verdict: str | None = None
    score: float | None = None
    modalities: str | None = None
    n_instances: int
    attempts: int
    error: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    created_at: datetime
    updated_at: datetime
    patient_id: str | None = Field(default=None, description="only when BTD_EXPOSE_PATIENT_IDS is set")
    patient_name: str | None = Field(default=None, description="only when BTD_EXPOSE_PATIENT_IDS is set")
    duplicates: int = Field(default=0, description="identical resends of the study's instances (nothing stored)")
    conflicting_instances: int = Field(
        default=0, description="instances replaced by different bytes under the same SOP Instance UID"
    )
    conflict: bool = Field(default=False, description="true if any instance was replaced under its UID")


class StudyList(BaseModel):
    items: list[StudySummary]
    total: int
    limit: int
    offset: int


class StudyEventOut(BaseModel):
    at: datetime
    from_state: str | None
    to_state: str
    detail: str | None


class RegionOut(BaseModel):
    x0: int
    y0: int
    x1: int
    y1: int
    score: float | None
    outline: list[list[float]] | None = None
    cue: str | None = Field(default=None, description="the forensic cue whose map holds the region")


class InstanceResultOut(BaseModel):
    sop_instance_uid: str
    frame: int | None
    score: float | None
    verdict: str
    reason: str | None
    map_path: str | None
    regions: list[RegionOut]
    cue_scores: dict[str, float] | None = Field(default=None, description="calibrated score of each cue")


class SeriesResultOut(BaseModel):
    series_uid: str
    study_version: int
    modality: str | None
    verdict: str
    score: float | None
    reason: str | None
    n_instances: int
    n_assessed: int
    model_name: str | None
    model_sha256: str | None
    created_at: datetime
    instances: list[InstanceResultOut]
    cues: list[dict[str, Any]] | None = Field(
        default=None, description="each forensic cue: its score, threshold, whether it fired, or why it was not used"
    )
    reference: dict[str, Any] | None = Field(
        default=None, description="the scanner reference the series was judged against (None: against itself)"
    )
    scanner_key: dict[str, str] | None = Field(default=None, description="manufacturer, model, kernel, thickness band")


class InstanceVersionOut(BaseModel):
    """One stored object: the bytes received under a SOP Instance UID at one time."""

    version: int = Field(description="1 = the first bytes seen; 2, 3, ... = different bytes under the same UID")
    sha256: str = Field(description="SHA-256 of the stored file (File Meta + the dataset as received)")
    size: int
    received_at: datetime
    calling_ae: str | None
    peer: str | None
    transfer_syntax: str
    duplicates: int = Field(description="identical resends of this version")


class InstanceOut(BaseModel):
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    modality: str | None
    current_version: int = Field(description="the version that is scored and reported")
    duplicates: int
    conflict: bool = Field(description="replaced by different bytes under the same UID: evidence of tampering")
    versions: list[InstanceVersionOut]


class ForensicSummary(BaseModel):
    instances: int = Field(description="distinct SOP Instance UIDs received")
    versions: int = Field(description="objects stored (an instance replaced once counts two)")
    duplicates: int = Field(description="identical resends")
    conflicting_instances: int = Field(description="instances replaced by different bytes under the same UID")
    conflict: bool


class StudyDetail(StudySummary):
    lease_owner: str | None = None
    lease_until: datetime | None = None
    queued_at: datetime | None = None
    progress: Progress | None = None
    results_version: int | None = Field(default=None, description="the study version the series results are for")
    history: list[StudyEventOut]
    series: list[SeriesResultOut]
    errors: list[str]
    forensics: ForensicSummary
    instances: list[InstanceOut] = Field(description="what arrived: every instance with each of its versions")
    reports: list[dict[str, Any]] | None = Field(
        default=None, description="SR/KOS reports with their delivery attempts, when reporting is installed"
    )


class RescoreAccepted(BaseModel):
    study_uid: str
    state: str
    version: int
    dispatched: str


class Stats(BaseModel):
    conflicting_instances: int = Field(description="instances replaced by different bytes under the same UID")
    studies_with_conflicts: int
    duplicate_resends: int = Field(description="identical resends received (nothing stored for them)")
    by_state: dict[str, int]
    by_verdict: dict[str, int]
    total: int
    queue_depth: int | None
    queue_mode: Literal["celery", "in-process"]


class ReadyCheck(BaseModel):
    ok: bool
    detail: str | None = None


class Ready(BaseModel):
    ready: bool
    checks: dict[str, ReadyCheck]
    failed: list[str]


class ScannerReferenceOut(BaseModel):
    """A genuine reference the site has learnt for one scanner key, with its provenance."""

    manufacturer: str
    model: str
    kernel: str
    band: str
    n_slices: int
    n_series: int
    source: str
    fitted_at: datetime
    updated_at: datetime


class GenuineAccepted(BaseModel):
    study_uid: str
    version: int
    samples_marked: int
