"""The database schema as ORM classes: every table of btd, the one way the code reads and writes them.

Migration 0001_gateway made studies, their events, instances and scoring results; 0002_reports the reports
built for each study version and every delivery try; 0003_liveness the studies' dispatch bookkeeping;
0004_access the audit log of who viewed or acted on what; 0005_forensics the cues and scanner references.
The column names and meanings are a contract shared by the gateway, the worker and the API
(docs/architecture.md). Patient name and ID are kept only so the SR can carry them; nothing logs or serves
them by default.

Why a row per report and per delivery attempt: the delivery log is evidence (what was sent where, when,
with which DICOM status), and "a destination that already succeeded for this report is never sent again"
is decided from these rows, not from memory, so it survives worker restarts and duplicated tasks.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.db.base import Base, UTCDateTime, utcnow

UID = String(64)  # a DICOM UID is at most 64 characters


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True, nullable=False)
    state: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    state_since: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    quiet_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    verdict: Mapped[str | None] = mapped_column(String(32))
    score: Mapped[float | None] = mapped_column(Float)
    modalities: Mapped[str | None] = mapped_column(String(64))
    n_instances: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # 0003_liveness: when the stability monitor last re-dispatched the current step (its compare-and-set),
    # and when a step's own retry (a countdown) is due; see core/liveness.py.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow)


class StudyEvent(Base):
    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), nullable=False, index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32), nullable=False)
    detail: Mapped[str | None] = mapped_column(Text)


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "version"),
        Index("ix_instances_study_uid_series_uid", "study_uid", "series_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), nullable=False)
    series_uid: Mapped[str] = mapped_column(UID, nullable=False)
    sop_instance_uid: Mapped[str] = mapped_column(UID, nullable=False)
    sop_class_uid: Mapped[str] = mapped_column(UID, nullable=False)
    modality: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax: Mapped[str] = mapped_column(UID, nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    path: Mapped[str] = mapped_column(String(512), nullable=False)  # relative to <DATA_DIR>/spool
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    conflict: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    duplicates: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class SeriesResult(Base):
    __tablename__ = "series_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), nullable=False, index=True)
    study_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    series_uid: Mapped[str] = mapped_column(UID, nullable=False)
    modality: Mapped[str | None] = mapped_column(String(16))
    verdict: Mapped[str] = mapped_column(String(32), nullable=False)
    score: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)
    n_instances: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    n_assessed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    # Migration 0005_forensics: each cue's part in the verdict (models.results.CueResult dicts), the reference
    # the series was judged against (None: against itself), and the scanner key read from its headers.
    cues: Mapped[Any] = mapped_column(JSON, nullable=True)
    reference: Mapped[Any] = mapped_column(JSON, nullable=True)
    scanner_key: Mapped[Any] = mapped_column(JSON, nullable=True)


class InstanceResult(Base):
    __tablename__ = "instance_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_result_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("series_results.id", ondelete="CASCADE"), nullable=False, index=True
    )
    sop_instance_uid: Mapped[str] = mapped_column(UID, nullable=False)
    frame: Mapped[int | None] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)
    verdict: Mapped[str] = mapped_column(String(32), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    map_path: Mapped[str | None] = mapped_column(String(512))  # relative to BTD_DATA_DIR
    cue_scores: Mapped[Any] = mapped_column(JSON, nullable=True)  # {cue: calibrated slice score}


class Region(Base):
    __tablename__ = "regions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_result_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("instance_results.id", ondelete="CASCADE"), nullable=False, index=True
    )
    sop_instance_uid: Mapped[str] = mapped_column(UID, nullable=False)
    frame: Mapped[int | None] = mapped_column(Integer)
    x0: Mapped[int] = mapped_column(Integer, nullable=False)
    y0: Mapped[int] = mapped_column(Integer, nullable=False)
    x1: Mapped[int] = mapped_column(Integer, nullable=False)
    y1: Mapped[int] = mapped_column(Integer, nullable=False)
    score: Mapped[float | None] = mapped_column(Float)
    outline: Mapped[Any] = mapped_column(JSON, nullable=True)  # [[x, y], ...] closed polygon in pixel coordinates
    cue: Mapped[str | None] = mapped_column(String(32))  # the cue whose map holds the region


class Report(Base):
    __tablename__ = "reports"
    __table_args__ = (UniqueConstraint("study_uid", "study_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), nullable=False, index=True)
    study_version: Mapped[int] = mapped_column(Integer, nullable=False)
    sr_sop_instance_uid: Mapped[str] = mapped_column(UID, nullable=False)
    sr_series_uid: Mapped[str] = mapped_column(UID, nullable=False)
    sr_path: Mapped[str] = mapped_column(String(512), nullable=False)  # relative to BTD_DATA_DIR
    kos_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    kos_path: Mapped[str | None] = mapped_column(String(512))
    predecessor_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("reports.id", ondelete="CASCADE"), nullable=False, index=True
    )
    destination: Mapped[str] = mapped_column(String(256), nullable=False)  # "AET@host:port"
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)  # "success" | "failure"
    dicom_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class ScannerReference(Base):
    """The site's genuine reference for one scanner key (manufacturer, model, kernel, thickness band).

    `reference` is models.reference.Reference.to_dict(); the columns beside it repeat its provenance so the
    dashboard lists references without parsing them. Learnt from the site's own quiet traffic (see
    worker/references.py), never from a study that is flagged."""

    __tablename__ = "scanner_references"
    __table_args__ = (UniqueConstraint("manufacturer", "model", "kernel", "band"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    manufacturer: Mapped[str] = mapped_column(String(64), nullable=False)
    model: Mapped[str] = mapped_column(String(64), nullable=False)
    kernel: Mapped[str] = mapped_column(String(64), nullable=False)
    band: Mapped[str] = mapped_column(String(16), nullable=False)
    reference: Mapped[Any] = mapped_column(JSON, nullable=False)
    n_slices: Mapped[int] = mapped_column(Integer, nullable=False)
    n_series: Mapped[int] = mapped_column(Integer, nullable=False)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    fitted_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class ReferenceSample(Base):
    """The features of one scored series, waiting to teach its scanner's reference.

    Folded into the reference (`folded_at` set) once its study has stayed quiet (verdict no_evidence) for the
    hold time, or at once when a person marked the study genuine (`marked_genuine_by`); a sample of a study
    that is flagged is never folded unless a person says it is genuine."""

    __tablename__ = "reference_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), nullable=False, index=True)
    study_version: Mapped[int] = mapped_column(Integer, nullable=False)
    series_uid: Mapped[str] = mapped_column(UID, nullable=False)
    manufacturer: Mapped[str] = mapped_column(String(64), nullable=False)
    model: Mapped[str] = mapped_column(String(64), nullable=False)
    kernel: Mapped[str] = mapped_column(String(64), nullable=False)
    band: Mapped[str] = mapped_column(String(16), nullable=False)
    verdict: Mapped[str] = mapped_column(String(32), nullable=False)
    features: Mapped[Any] = mapped_column(JSON, nullable=False)
    n_slices: Mapped[int] = mapped_column(Integer, nullable=False)
    marked_genuine_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    folded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
class AuditEntry(Base):
    """One access to patient data or one action, by whom: a study page or detail, an image, the reports, a
    rescore, a redelivery, a login. Why in the database: it is evidence beside the delivery log, kept where
    the studies are and shown on the study page. It names credentials, never a patient (no name, no ID)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_study_uid_at", "study_uid", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128), nullable=False)  # "token:api", "user:alice", "anonymous"
    via: Mapped[str] = mapped_column(String(16), nullable=False)  # "bearer", "session", "open", "login"
    action: Mapped[str] = mapped_column(String(32), nullable=False)  # service.api.audit.Action
    study_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    peer: Mapped[str | None] = mapped_column(String(64))  # the client's address as the gateway saw it
    detail: Mapped[str | None] = mapped_column(String(256))
