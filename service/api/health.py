"""Liveness and readiness probes.

Why two: `/healthz` says the process answers (a restart is the cure if not); `/readyz` says the gateway
can do its job right now (a load balancer or an operator should look at which dependency failed), so
it checks each dependency and names the ones that failed in a 503 body:

- database, broker: reachable now;
- spool: writable, and its disk above BTD_MIN_FREE_BYTES (below it every C-STORE is refused 0xA700, so a
  gateway that answers "ready" then would be lying);
- workers (Celery mode): at least one worker of each queue (scoring, reports) published its heartbeat
  within BTD_WORKER_ABSENT_SECONDS; in embedded mode, the executor thread is alive;
- studies: none stuck past its deadline (core/liveness.py);
- model: the weights and metadata the workers will load exist.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from core import queue
from core.contracts import QueueRole, model_path
from core.db.session import get_engine
from core.observability.fleet import read_heartbeats
from core.settings import Settings
from service.api.alarms import stuck_report
from service.api.deps import get_settings
from service.api.schemas import Ready, ReadyCheck

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def check_database(settings: Settings) -> ReadyCheck:
    try:
        with get_engine(settings).connect() as conn:
            conn.execute(text("SELECT 1"))
        return ReadyCheck(ok=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with its reason
        return ReadyCheck(ok=False, detail=f"{type(exc).__name__}: {exc}"[:300])


def check_broker(settings: Settings) -> ReadyCheck:
    if not settings.broker_url:
        return ReadyCheck(ok=True, detail="no broker configured: tasks run in-process")
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
        return ReadyCheck(ok=True)
    except redis.RedisError as exc:
        return ReadyCheck(ok=False, detail=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        client.close()


def check_spool(settings: Settings) -> ReadyCheck:
    """The spool must accept a file now, above the free-space watermark; C-STORE answers 0xA700 otherwise."""
    spool = Path(settings.spool_dir)
    try:
        spool.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=spool, prefix=".readyz-")
        os.close(fd)
        os.unlink(name)
        free = shutil.disk_usage(spool).free
    except OSError as exc:
        return ReadyCheck(ok=False, detail=f"spool not writable: {exc}"[:300])
    if free < settings.min_free_bytes:
        detail = f"{free} bytes free, under BTD_MIN_FREE_BYTES={settings.min_free_bytes}: C-STORE is refused (0xA700)"
        return ReadyCheck(ok=False, detail=detail)
    return ReadyCheck(ok=True, detail=f"{free} bytes free")


def check_workers(settings: Settings) -> ReadyCheck:
    """Someone takes the work: a live heartbeat per queue (Celery), or the executor thread (embedded)."""
    if not settings.broker_url:
        executor = queue.current_executor()
        if executor is None:  # an API without `btd serve` around it (a test, a tool): nothing to judge
            return ReadyCheck(ok=True, detail="no in-process executor in this process")
        return ReadyCheck(ok=executor.alive, detail="in-process executor " + ("alive" if executor.alive else "died"))
    beats = read_heartbeats(settings)
    if beats is None:
        # One cause, one failure: an unreachable broker fails the broker check; workers cannot be judged.
        return ReadyCheck(ok=True, detail="unknown: worker heartbeats cannot be read from the broker")
    missing = [role.value for role in QueueRole if not any(role.value in beat.queues for beat in beats)]
    if missing:
        detail = f"no worker for queue(s) {', '.join(missing)} seen in {settings.worker_absent_seconds:g} s"
        return ReadyCheck(ok=False, detail=detail)
    return ReadyCheck(ok=True, detail=f"{len(beats)} worker(s): " + ", ".join(sorted(b.worker for b in beats)))


def check_studies(settings: Settings) -> ReadyCheck:
    """No study stuck past its deadline (the monitor re-dispatched it in vain for BTD_STUCK_SECONDS)."""
    try:
        report = stuck_report(settings)
    except Exception as exc:  # noqa: BLE001 - the database check names the cause
        return ReadyCheck(ok=False, detail=f"cannot read the studies: {type(exc).__name__}"[:300])
    return ReadyCheck(ok=report.total == 0, detail=report.summary())


def check_model(settings: Settings) -> ReadyCheck:
    """The model file the worker will load exists and its metadata is valid (without loading torch here).

    Why not load it: the gateway does not run models (workers do), and a probe must stay cheap.
    """
    from models.metadata import MetadataError, ModelMetadata, metadata_path_for

    weights = model_path(settings.model)
    if not weights.is_file():
        hint = "" if settings.model else " (default model not shipped; set BTD_MODEL)"
        return ReadyCheck(ok=False, detail=f"model file not found: {weights}{hint}")
    sidecar = metadata_path_for(weights)
    if not sidecar.is_file():
        return ReadyCheck(ok=False, detail=f"model metadata missing: {sidecar}")
    try:
        metadata = ModelMetadata.read(sidecar)
    except (OSError, ValueError, TypeError, MetadataError) as exc:
        return ReadyCheck(ok=False, detail=f"model metadata invalid: {sidecar}: {exc}"[:300])
    return ReadyCheck(ok=True, detail=f"{metadata.name} ({weights.name})")


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
def readyz(settings: Settings = Depends(get_settings)) -> JSONResponse:
    checks = {
        "database": check_database(settings),
        "broker": check_broker(settings),
        "spool": check_spool(settings),
        "workers": check_workers(settings),
        "studies": check_studies(settings),
        "model": check_model(settings),
    }
    failed = [name for name, check in checks.items() if not check.ok]
    body = Ready(ready=not failed, checks=checks, failed=failed)
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if failed else 200)
