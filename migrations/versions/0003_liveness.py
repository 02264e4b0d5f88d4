"""Liveness of study steps: when a step's message was last dispatched, and when its retry is due.

Revision ID: 0003_liveness
Revises: 0002_reports
Create Date: 2026-12-02

Why in the studies row: the stability monitor's sweepers decide from the database alone whether a step's
message is overdue (lost with a broker restart, or its worker died), so several gateways sharing a
database re-dispatch it once (a compare-and-set on `dispatched_at`), and a retry waiting on its countdown
(`retry_at`) is not mistaken for a lost message.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_liveness"
down_revision = "0002_reports"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("dispatched_at", TS, nullable=True))
        batch.add_column(sa.Column("retry_at", TS, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("retry_at")
        batch.drop_column("dispatched_at")
