"""Structured logs: one JSON object per line, a correlation id, never a patient name or ID.

The unit tests drive `core.observability.logs` directly; the flow test reads everything a real
`btd serve` wrote while it received, scored, reported and delivered the 20-slice CT series
(tests/dashboard_flow.py, shared with the browser tests so the series is scored once per session).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from core.observability.logs import (
    JsonFormatter,
    configure_logging,
    correlation,
    log_event,
    study_correlation_id,
)

if TYPE_CHECKING:
    from dashboard_flow import ScoredFlow

pytest_plugins = ["dashboard_flow"]

# Steps of the worker that must say which study they are about and under which correlation id.
STUDY_STEPS = ("score.claimed", "series.scored", "score.done", "report.built", "delivery.attempt", "delivery.done")


@pytest.fixture()
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("btd.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield stream
    logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_event_is_one_json_line_with_fields_and_correlation(captured: io.StringIO) -> None:
    log = logging.getLogger("btd.test.logs")
    with correlation("abc123") as cid:
        log_event(log, "study.stable", study_uid="1.2.3", n_instances=20)
    log_event(log, "outside")
    inside, outside = _lines(captured)
    assert cid == "abc123"
    assert inside["event"] == "study.stable" and inside["study_uid"] == "1.2.3" and inside["n_instances"] == 20
    assert inside["correlation_id"] == "abc123" and inside["level"] == "info" and inside["ts"].endswith("+00:00")
    assert "correlation_id" not in outside  # the binding ends with its block


def test_patient_fields_are_dropped(captured: io.StringIO) -> None:
    log = logging.getLogger("btd.test.logs")
    log_event(log, "instance.stored", study_uid="1.2.3", patient_name="DOE^JANE", PatientID="P-42", patient="x")
    (line,) = _lines(captured)
    assert line["study_uid"] == "1.2.3"
    assert "DOE^JANE" not in captured.getvalue() and "P-42" not in captured.getvalue()


def test_exceptions_and_plain_records_stay_json(captured: io.StringIO) -> None:
    log = logging.getLogger("btd.test.logs")
    try:
        raise ValueError("bad pixel data")
    except ValueError:
        log.exception("task.failed")
    log.warning("plain %s message", "formatted")
    failed, plain = _lines(captured)
    assert failed["event"] == "task.failed" and "ValueError: bad pixel data" in failed["error"]
    assert plain["event"] == "plain formatted message" and plain["level"] == "warning"


def test_configure_logging_is_idempotent() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        configure_logging("DEBUG")
        configure_logging("WARNING")
        json_handlers = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
        assert len(json_handlers) == 1 and root.level == logging.WARNING
        assert logging.getLogger("pynetdicom").level == logging.WARNING  # it logs dataset contents at DEBUG
    finally:
        root.handlers, root.level = saved_handlers, saved_level


def test_whole_flow_logs_are_json_and_never_name_the_patient(scored_flow: ScoredFlow) -> None:
    text = scored_flow.gateway.log_text()
    assert scored_flow.patient_name not in text and scored_flow.patient_id not in text
    assert "TOTALSEG" not in text  # the fixture's PatientName TOTALSEG^EXAMPLE and PatientID TOTALSEG-EXAMPLE
    events = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"log line {number} is not JSON: {line[:200]!r}")
        assert {"ts", "level", "logger", "event"} <= set(record), record
        events.append(record)
    names = [e["event"] for e in events]
    stored = [e for e in events if e["event"] == "instance.stored"]
    assert len(stored) == 20 and all(e["study_uid"] == scored_flow.study_uid for e in stored)
    for step in ("study.stable", "score.claimed", "series.scored", "score.done"):
        assert step in names, step
    for event in events:
        if event["event"] in STUDY_STEPS:
            assert event["study_uid"] == scored_flow.study_uid, event
            assert event.get("correlation_id"), f"{event['event']} has no correlation id"
    # Scoring, reporting and delivery of the first pass are one story in the logs: one id ties them.
    first_pass = study_correlation_id(scored_flow.study_uid, 1)
    for step in ("score.claimed", "score.done", "report.built", "delivery.done"):
        ids = {e.get("correlation_id") for e in events if e["event"] == step}
        assert first_pass in ids, (step, ids)


def test_study_correlation_id_is_stable_per_study_version() -> None:
    first = study_correlation_id("1.2.3", 1)
    assert first == study_correlation_id("1.2.3", 1) and len(first) == 16
    assert first != study_correlation_id("1.2.3", 2) and first != study_correlation_id("1.2.4", 1)
