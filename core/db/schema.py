"""The database schema as ORM classes: every table of btd, the one way the code reads and writes them.

Migration 0001_gateway made studies, their events, instances and scoring results; 0002_reports the reports
built for each study version and every delivery try; 0003_liveness the studies' dispatch bookkeeping. The
column names and meanings are a contract shared by
the gateway, the worker and the API (docs/architecture.md). Patient name and ID are kept only so the SR can
carry them; nothing logs or serves them by default.

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
