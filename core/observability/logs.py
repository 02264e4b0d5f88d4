"""Structured JSON logs, one event per meaningful step, carrying a correlation id.

Why a formatter of our own: every line must be machine-readable for the site's log collector, and
nothing in it may identify a patient. Callers log UIDs (study, series, SOP instance), never names or
patient IDs; `log_event` drops any field whose name says it holds patient data, as a second guard.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("btd_correlation_id", default=None)

# Field names that could carry patient identity; they are never written to a log line.
_FORBIDDEN_FIELDS = frozenset(
    {"patient_name", "patient_id", "patientname", "patientid", "PatientName", "PatientID", "patient"}
)


def new_correlation_id() -> str:
    return uuid.uuid4().hex[:16]


def study_correlation_id(study_uid: str, version: int = 1) -> str:
    """The same id for every step of one study version, computable by any process without passing it.

    Why derived, not random: the listener, the stability monitor, a Celery worker and the report sender
    run in different threads or processes; hashing the study UID and version lets each of them bind the
    id that ties one study's whole flow together in the logs (`with correlation(study_correlation_id(uid))`).
    """
    return hashlib.sha256(f"{study_uid}|{version}".encode()).hexdigest()[:16]


def current_correlation_id() -> str | None:
    return _correlation_id.get()


@contextmanager
def correlation(correlation_id: str | None = None) -> Iterator[str]:
    """Bind a correlation id to every event logged inside the block (threads and tasks each get their own)."""
    value = correlation_id or new_correlation_id()
    token = _correlation_id.set(value)
    try:
        yield value
    finally:
        _correlation_id.reset(token)


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or record.getMessage(),
        }
        cid = getattr(record, "correlation_id", None) or current_correlation_id()
        if cid:
            payload["correlation_id"] = cid
        fields = getattr(record, "fields", None)
        if fields:
            payload.update({k: v for k, v in fields.items() if k not in _FORBIDDEN_FIELDS})
        if record.exc_info:
            payload["error"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines (idempotent)."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers = [handler]
    root.setLevel(level)
    # pynetdicom is chatty at INFO and logs dataset contents at DEBUG; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event: `log_event(log, "instance.stored", study_uid=..., size=...)`."""
    safe = {k: v for k, v in fields.items() if k not in _FORBIDDEN_FIELDS}
    logger.log(level, event, extra={"event": event, "fields": safe})
