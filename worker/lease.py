"""A worker's claim on a study step (scoring, delivery): who holds it, until when, and its heartbeat.

Why a lease in the studies row: the database is the truth about who works on what. A claim lasts
BTD_LEASE_SECONDS and is renewed every third of it by a heartbeat thread while the worker lives; a worker
that dies (SIGKILL, out of memory, a lost machine) renews nothing, its lease runs out, and the gateway's
stability monitor dispatches the step again (core/liveness.py), whichever broker message is left. The
claim's compare-and-set writes are guarded by owner, state and study version, so a worker whose lease was
taken over (or whose study was reopened) cannot write over its successor.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import update

from core.contracts import State
from core.db.base import utcnow
from core.db.schema import Study
from core.db.session import session_scope
from core.observability.logs import log_event
from core.settings import Settings

log = logging.getLogger("btd.worker.lease")


def worker_id(per_thread: bool = False) -> str:
    """Who holds a lease: host and process (computed per call: a pool child is a fork with its own pid).

    `per_thread`: also the thread, for a worker that runs several studies on threads of one process
    (BTD_STUDIES_IN_PARALLEL > 1); a lease's holder may take its own lease again, so two threads of one
    process must not share a name, or a duplicate message could score a study its sibling is scoring."""
    base = f"{socket.gethostname()}:{os.getpid()}"
    return f"{base}/{threading.get_native_id()}" if per_thread else base


def lease_holder(settings: Settings) -> str:
    """The name a task's lease is held under: the process, or its thread where studies share a process."""
    return worker_id(per_thread=settings.studies_in_parallel > 1)


def lease_seconds(settings: Settings) -> float:
    """BTD_LEASE_SECONDS, but never more than half the broker's visibility timeout.

    Why the cap: when Redis re-delivers the message of a dead worker (after the visibility timeout) the dead
    worker's lease must already have run out, or the re-delivered message would find the study still leased
    and do nothing.
    """
    return max(1.0, min(settings.lease_seconds, settings.visibility_timeout / 2))


@dataclass
class Claim:
    study_uid: str
    owner: str
    version: int
    attempts: int
    state: str = State.SCORING  # the state the claimed step keeps while the worker holds it


def renew_lease(settings: Settings, claim: Claim) -> bool:
    """Extend our lease while we work; False if it is no longer ours (taken over, reopened, moved on)."""
    until = utcnow() + timedelta(seconds=lease_seconds(settings))
    with session_scope(settings) as session:
        result = session.execute(
            update(Study)
            .where(
                Study.study_uid == claim.study_uid,
                Study.state == claim.state,
                Study.lease_owner == claim.owner,
                Study.version == claim.version,
            )
            .values(lease_until=until)
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1  # type: ignore[attr-defined]


class LeaseLostError(Exception):
    """Our claim on the study is gone; whatever we were computing will not be stored."""


class LeaseKeeper:
    """Renews a claim's lease from a background thread for as long as this process works on the step.

    Why a thread, not the progress callback: one batch of slices (or one slow association) can take longer
    than a lease, and a live worker must never look dead. A killed process renews nothing, so its lease runs
    out and the step is taken over. `lost` turns True when a renewal finds the claim no longer ours.
    """

    def __init__(self, settings: Settings, claim: Claim) -> None:
        self.settings = settings
        self.claim = claim
        self.interval = lease_seconds(settings) / 3
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.study_uid[-12:]}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not renew_lease(self.settings, self.claim):
                    self.lost = True
                    return
            except Exception as exc:  # noqa: BLE001 - a database hiccup: try again next interval
                log_event(log, "lease.renew_failed", logging.WARNING, study_uid=self.claim.study_uid, error=str(exc))
