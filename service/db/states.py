"""The study life cycle: the state names stored in `studies.state` (a contract, see docs/architecture.md)."""

from __future__ import annotations

RECEIVING = "RECEIVING"
STABLE = "STABLE"
QUEUED = "QUEUED"
SCORING = "SCORING"
SCORED = "SCORED"
REPORTED = "REPORTED"
DELIVERED = "DELIVERED"
FAILED = "FAILED"
FAILED_DELIVERY = "FAILED_DELIVERY"
REJECTED = "REJECTED"

ALL_STATES = (RECEIVING, STABLE, QUEUED, SCORING, SCORED, REPORTED, DELIVERED, FAILED, FAILED_DELIVERY, REJECTED)

# A new instance for a study in one of these states only resumes it (nothing has been scored yet, and at
# STABLE no task was dispatched); in any other state it reopens the study as a new version.
RESUMABLE_STATES = (STABLE,)
