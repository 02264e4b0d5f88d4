"""Sending a report to one destination: parse "AET@host:port", build the TLS context, one association.

Why one association per report and destination: the SR and its KOS arrive together or not at all from
the PACS's point of view, and the delivery log records one attempt per destination with one outcome.
The C-STORE itself is the gateway's sender (`service.dicom.sender.send_files`); this module turns its
per-instance results into one outcome and never raises for a destination's faults (refused
association, refused SOP class, timeout, failure status): those are outcomes, logged and retried.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings

_DESTINATION = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d{1,5})$")

# C-STORE statuses that mean the PACS has the document (0xB000/0xB007/0xB006 are warnings: stored).
SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """`"PACS@10.0.0.5:104"` -> Destination; ValueError for anything else (reported, not retried)."""
    match = _DESTINATION.match(text.strip())
    if not match:
        raise ValueError(f"destination {text!r} is not AET@host:port")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"destination {text!r}: port out of range")
    return Destination(match["aet"].strip(), match["host"].strip("[]"), port)


def client_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A TLS client context when BTD_TLS_CA or BTD_TLS_CERT is set, else None (plain DICOM).

    Peers are verified against BTD_TLS_CA; host names are not checked because PACS destinations are
    usually configured by IP address. BTD_TLS_CERT/KEY, if set, are presented for mutual TLS.
    """
    if not settings.tls_ca and not settings.tls_cert:
        return None
    cafile = str(settings.tls_ca) if settings.tls_ca else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.check_hostname = False
    if not settings.tls_ca:
        context.verify_mode = ssl.CERT_NONE
    if settings.tls_cert:
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None)
    return context


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
    from service.dicom.sender import send_files  # the gateway's SCU (ingest area)

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
