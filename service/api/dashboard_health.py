"""Health of what the gateway depends on, as the overview shows it: workers, destinations, the model.

Why cached: the overview is reloaded by several people and polled; a Celery ping waits for replies and a
C-ECHO opens an association, so each answer is kept for a few seconds instead of being redone per view.
The gateway never imports worker code, so Celery workers are pinged through a bare Celery client on the
same broker, and the in-process executor thread is asked about through `core.queue`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from core.contracts import model_path
from core.dicom.destination import parse_destination
from core.settings import Settings

WORKER_CACHE_SECONDS = 10.0
ECHO_CACHE_SECONDS = 30.0
PING_TIMEOUT_SECONDS = 1.0
ECHO_TIMEOUT_SECONDS = 3.0

T = TypeVar("T")
_cache: dict[str, tuple[float, Any]] = {}
_cache_lock = threading.Lock()


def _cached(key: str, ttl: float, compute: Callable[[], T]) -> T:
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
        if hit and now - hit[0] < ttl:
            return hit[1]
    value = compute()
    with _cache_lock:
        _cache[key] = (time.monotonic(), value)
    return value


@dataclass(frozen=True)
class WorkerHealth:
    mode: str  # "celery" or "in-process"
    ok: bool
    detail: str
    workers: tuple[str, ...] = ()


def _ping_celery(broker_url: str) -> WorkerHealth:
    from celery import Celery

    client = Celery("btd-dashboard", broker=broker_url)
    try:
        replies = client.control.inspect(timeout=PING_TIMEOUT_SECONDS).ping() or {}
    except Exception as exc:  # broker down: say so, the page still renders
        return WorkerHealth("celery", False, f"broker unreachable: {type(exc).__name__}")
    finally:
        client.close()
    names = tuple(sorted(replies))
    if not names:
        return WorkerHealth("celery", False, "no Celery worker answered the ping")
    return WorkerHealth("celery", True, f"{len(names)} worker(s) answered", names)


def _in_process_worker() -> WorkerHealth:
    """`btd serve` without a broker runs tasks in its executor thread (core.queue); is it alive?"""
    from core import queue as local_queue

    executor = local_queue.current_executor()
    if executor is None:
        return WorkerHealth("in-process", False, "no task executor runs in this process")
    if not executor.alive:
        return WorkerHealth("in-process", False, "the task executor thread has stopped")
    detail = f"executor thread alive: {executor.completed} task(s) done, {executor.failures} failed"
    return WorkerHealth("in-process", True, detail)


def worker_health(settings: Settings) -> WorkerHealth:
    if settings.broker_url:
        return _cached(f"ping:{settings.broker_url}", WORKER_CACHE_SECONDS, lambda: _ping_celery(settings.broker_url))
    return _in_process_worker()


def model_in_use(settings: Settings, last_name: str | None, last_sha256: str | None) -> dict[str, Any]:
    """The configured model (file and metadata name) and the one that produced the latest result."""
    path = model_path(settings.model)
    info: dict[str, Any] = {"file": path.name, "name": None, "version": None}
    if path.is_file():
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            info["name"] = meta.get("name")
            info["version"] = meta.get("software_version") or meta.get("version")
            calibration = meta.get("calibration") if isinstance(meta.get("calibration"), dict) else {}
            info["threshold"] = calibration.get("slice_threshold", calibration.get("threshold"))
            info["series_threshold"] = calibration.get("series_threshold")
            performance = meta.get("performance") if isinstance(meta.get("performance"), dict) else {}
            info["operating_point"] = performance.get("summary")
        except (OSError, ValueError):
            pass
    info["last_name"] = last_name
    info["last_sha256"] = last_sha256
    return info


def destinations_view(settings: Settings, last_attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every configured destination with its last delivery outcome (and ones seen only in the log)."""
    by_name = {row["destination"]: row for row in last_attempts}
    names = list(settings.destinations) + sorted(set(by_name) - set(settings.destinations))
    view = []
    for name in names:
        last = by_name.get(name)
        view.append(
            {
                "destination": name,
                "configured": name in settings.destinations,
                "outcome": last["outcome"] if last else None,
                "at": last["at"] if last else None,
                "error": last["error"] if last else None,
            }
        )
    return view


@dataclass(frozen=True)
class EchoResult:
    destination: str
    ok: bool
    detail: str


def echo(settings: Settings, destination: str) -> EchoResult:
    """One C-ECHO to a destination, as our own AE title."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    try:
        target = parse_destination(destination)
    except ValueError as exc:
        return EchoResult(destination, False, str(exc))
    ae = AE(ae_title=settings.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ECHO_TIMEOUT_SECONDS
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        return EchoResult(destination, False, "association rejected or no answer")
    try:
        status = assoc.send_c_echo()
        ok = bool(status) and int(getattr(status, "Status", -1)) == 0
        return EchoResult(destination, ok, "C-ECHO success" if ok else "C-ECHO failed")
    finally:
        assoc.release()


def echo_all(settings: Settings) -> list[dict[str, Any]]:
    return [
        asdict(_cached(f"echo:{name}", ECHO_CACHE_SECONDS, lambda name=name: echo(settings, name)))
        for name in settings.destinations
    ]
