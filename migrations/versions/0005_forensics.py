"""Forensic cues and per-scanner references (issue 12).

- series_results.cues / reference / scanner_key, instance_results.cue_scores, regions.cue: what the fused
  detector found, against which reference, and which cue found each region;
- scanner_references: the genuine reference of each (manufacturer, model, kernel, thickness band) learnt
  from the site's own traffic, with its provenance;
- reference_samples: per scored series, the features a reference is fitted from, held until the study has
  proven quiet (or a person marked it genuine) before they are folded into the reference.

Revision ID: 0005_forensics
Revises: 0004_access
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_forensics"
down_revision = "0004_access"
branch_labels = None
depends_on = None

UID = sa.String(64)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("series_results") as batch:
        batch.add_column(sa.Column("cues", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("reference", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("scanner_key", sa.JSON(), nullable=True))
    with op.batch_alter_table("instance_results") as batch:
        batch.add_column(sa.Column("cue_scores", sa.JSON(), nullable=True))
    with op.batch_alter_table("regions") as batch:
        batch.add_column(sa.Column("cue", sa.String(32), nullable=True))

    op.create_table(
        "scanner_references",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("manufacturer", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("kernel", sa.String(64), nullable=False),
        sa.Column("band", sa.String(16), nullable=False),
        sa.Column("reference", sa.JSON(), nullable=False),
        sa.Column("n_slices", sa.Integer(), nullable=False),
        sa.Column("n_series", sa.Integer(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("fitted_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_scanner_references"),
        sa.UniqueConstraint(
            "manufacturer", "model", "kernel", "band", name="uq_scanner_references_manufacturer_model_kernel_band"
        ),
    )

    op.create_table(
        "reference_samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", UID, nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("series_uid", UID, nullable=False),
        sa.Column("manufacturer", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("kernel", sa.String(64), nullable=False),
        sa.Column("band", sa.String(16), nullable=False),
        sa.Column("verdict", sa.String(32), nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("n_slices", sa.Integer(), nullable=False),
        sa.Column("marked_genuine_by", sa.String(128), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("folded_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["study_uid"], ["studies.study_uid"], name="fk_reference_samples_study_uid_studies"),
        sa.PrimaryKeyConstraint("id", name="pk_reference_samples"),
    )
    op.create_index("ix_reference_samples_study_uid", "reference_samples", ["study_uid"])
    op.create_index("ix_reference_samples_folded_at", "reference_samples", ["folded_at"])


def downgrade() -> None:
    op.drop_table("reference_samples")
    op.drop_table("scanner_references")
    with op.batch_alter_table("regions") as batch:
        batch.drop_column("cue")
    with op.batch_alter_table("instance_results") as batch:
        batch.drop_column("cue_scores")
    with op.batch_alter_table("series_results") as batch:
        batch.drop_column("scanner_key")
        batch.drop_column("reference")
        batch.drop_column("cues")
