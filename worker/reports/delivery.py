"""Sending a report to one destination: one association, one outcome.

Why one association per report and destination: the SR and its KOS arrive together or not at all from
the PACS's point of view, and the delivery log records one attempt per destination with one outcome.
The C-STORE itself is the shared sender (`core.dicom.sender.send_files`); this module turns its
per-instance results into one outcome and never raises for a destination's faults (refused
association, refused SOP class, timeout, failure status): those are outcomes, logged and retried.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.dicom.destination import Destination, client_ssl_context
from core.dicom.sender import send_files
from core.settings import Settings

# C-STORE statuses that mean the PACS has the document (0xB000/0xB007/0xB006 are warnings: stored).
SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class SendOutcome:
    """One association's result: success only if every document was stored."""

    success: bool
    dicom_status: int | None
    error: str | None


def summarise(results: Sequence[object], expected: int) -> SendOutcome:
    """Fold the sender's per-instance results (sop_instance_uid, status, error) into one outcome."""
    if len(results) < expected:
        errors = [str(getattr(r, "error", "") or "") for r in results if getattr(r, "error", None)]
        return SendOutcome(False, None, "; ".join(errors) or f"only {len(results)} of {expected} documents sent")
    failed = [r for r in results if getattr(r, "status", None) not in SUCCESS_STATUSES]
    if not failed:
        statuses = [int(getattr(r, "status", 0) or 0) for r in results]
        return SendOutcome(True, max(statuses) if statuses else 0x0000, None)
    first = failed[0]
    status = getattr(first, "status", None)
    error = getattr(first, "error", None) or (f"C-STORE status 0x{status:04X}" if status is not None else "no response")
    return SendOutcome(False, int(status) if status is not None else None, str(error))


def send_report(
    paths: Sequence[Path], destination: Destination, settings: Settings, timeout: float = 30.0
) -> SendOutcome:
    """C-STORE the documents in one association; every fault of the destination becomes an outcome."""
    try:
        results = send_files(
            [str(p) for p in paths],
            destination.host,
            destination.port,
            destination.ae_title,
            settings.ae_title,
            ssl_context=client_ssl_context(settings),
            timeout=timeout,
        )
    except Exception as exc:  # noqa: BLE001 - a refused/failed association is an outcome, not a crash
        return SendOutcome(False, None, f"{type(exc).__name__}: {exc}"[:2000])
    return summarise(list(results), len(paths))
