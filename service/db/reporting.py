"""ORM models of migration 0002_reports: the reports built for each study version and every delivery try.

Why a row per report and per attempt: the delivery log is evidence (what was sent where, when, with
which DICOM status), and "a destination that already succeeded for this report is never sent again" is
decided from these rows, not from memory, so it survives worker restarts and duplicated tasks.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base, UTCDateTime, utcnow

UID = String(64)

SUCCESS = "success"
FAILURE = "failure"


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
