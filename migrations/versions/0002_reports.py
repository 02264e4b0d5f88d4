"""Report tables: reports (the SR and KOS of each study version) and delivery_attempts (the delivery log).

Revision ID: 0002_reports
Revises: 0001_gateway
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_reports"
down_revision = "0001_gateway"
branch_labels = None
depends_on = None

UID = sa.String(64)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", UID, nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("sr_sop_instance_uid", UID, nullable=False),
        sa.Column("sr_series_uid", UID, nullable=False),
        sa.Column("sr_path", sa.String(512), nullable=False),
        sa.Column("kos_sop_instance_uid", UID, nullable=True),
        sa.Column("kos_path", sa.String(512), nullable=True),
        sa.Column("predecessor_sop_instance_uid", UID, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["study_uid"], ["studies.study_uid"], name="fk_reports_study_uid_studies"),
        sa.PrimaryKeyConstraint("id", name="pk_reports"),
        sa.UniqueConstraint("study_uid", "study_version", name="uq_reports_study_uid_study_version"),
    )
    op.create_index("ix_reports_study_uid", "reports", ["study_uid"])

    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(256), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("dicom_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["report_id"], ["reports.id"], name="fk_delivery_attempts_report_id_reports", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_delivery_attempts"),
    )
    op.create_index("ix_delivery_attempts_report_id", "delivery_attempts", ["report_id"])


def downgrade() -> None:
    op.drop_table("delivery_attempts")
    op.drop_table("reports")
