"""Gateway tables: studies, study_events, instances, series_results, instance_results, regions.

Revision ID: 0001_gateway
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_gateway"
down_revision = None
branch_labels = None
depends_on = None

UID = sa.String(64)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", UID, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("state_since", TS, nullable=False),
        sa.Column("quiet_deadline", TS, nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(32), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("modalities", sa.String(64), nullable=True),
        sa.Column("n_instances", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("patient_id", sa.String(64), nullable=True),
        sa.Column("patient_name", sa.String(324), nullable=True),
        sa.Column("study_date", sa.String(8), nullable=True),
        sa.Column("study_description", sa.String(64), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_until", TS, nullable=True),
        sa.Column("queued_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
        sa.UniqueConstraint("study_uid", name="uq_studies_study_uid"),
    )
    op.create_index("ix_studies_state", "studies", ["state"])
    op.create_index("ix_studies_quiet_deadline", "studies", ["quiet_deadline"])

    op.create_table(
        "study_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", UID, nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("from_state", sa.String(32), nullable=True),
        sa.Column("to_state", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["study_uid"], ["studies.study_uid"], name="fk_study_events_study_uid_studies"),
        sa.PrimaryKeyConstraint("id", name="pk_study_events"),
    )
    op.create_index("ix_study_events_study_uid", "study_events", ["study_uid"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", UID, nullable=False),
        sa.Column("series_uid", UID, nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("sop_class_uid", UID, nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("transfer_syntax", UID, nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("conflict", sa.Boolean(), nullable=False),
        sa.Column("duplicates", sa.Integer(), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=True),
        sa.Column("peer", sa.String(64), nullable=True),
        sa.Column("received_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["study_uid"], ["studies.study_uid"], name="fk_instances_study_uid_studies"),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("sop_instance_uid", "version", name="uq_instances_sop_instance_uid_version"),
    )
    op.create_index("ix_instances_study_uid_series_uid", "instances", ["study_uid", "series_uid"])

    op.create_table(
        "series_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", UID, nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("series_uid", UID, nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("verdict", sa.String(32), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("n_instances", sa.Integer(), nullable=False),
        sa.Column("n_assessed", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=True),
        sa.Column("model_sha256", sa.String(64), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["study_uid"], ["studies.study_uid"], name="fk_series_results_study_uid_studies"),
        sa.PrimaryKeyConstraint("id", name="pk_series_results"),
    )
    op.create_index("ix_series_results_study_uid", "series_results", ["study_uid"])

    op.create_table(
        "instance_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_result_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("frame", sa.Integer(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("verdict", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("map_path", sa.String(512), nullable=True),
        sa.ForeignKeyConstraint(
            ["series_result_id"],
            ["series_results.id"],
            name="fk_instance_results_series_result_id_series_results",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_instance_results"),
    )
    op.create_index("ix_instance_results_series_result_id", "instance_results", ["series_result_id"])

    op.create_table(
        "regions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_result_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("frame", sa.Integer(), nullable=True),
        sa.Column("x0", sa.Integer(), nullable=False),
        sa.Column("y0", sa.Integer(), nullable=False),
        sa.Column("x1", sa.Integer(), nullable=False),
        sa.Column("y1", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("outline", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_result_id"],
            ["instance_results.id"],
            name="fk_regions_instance_result_id_instance_results",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_regions"),
    )
    op.create_index("ix_regions_instance_result_id", "regions", ["instance_result_id"])


def downgrade() -> None:
    op.drop_table("regions")
    op.drop_table("instance_results")
    op.drop_table("series_results")
    op.drop_table("instances")
    op.drop_table("study_events")
    op.drop_table("studies")
