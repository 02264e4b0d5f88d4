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

# SOP classes whose instances the detector can score (CT and MR images, single- and multi-frame).
# Only these can change a verdict. Anything else arriving for a study past STABLE (btd's own SR and KOS
# routed back by a PACS rule that forwards whole studies, a radiologist's annotations) is stored but does
# not reopen it: reopening on our own report would score, report and forward the study forever.
SCOREABLE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
)
