"""Access: the audit log of who viewed or acted on which study (audit_log).

Revision ID: 0004_access
Revises: 0003_liveness
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_access"
down_revision = "0003_liveness"
branch_labels = None
depends_on = None

UID = sa.String(64)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("via", sa.String(16), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("study_uid", UID, nullable=True),
        sa.Column("sop_instance_uid", UID, nullable=True),
        sa.Column("peer", sa.String(64), nullable=True),
        sa.Column("detail", sa.String(256), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_study_uid_at", "audit_log", ["study_uid", "at"])


def downgrade() -> None:
    op.drop_table("audit_log")
