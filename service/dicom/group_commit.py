"""Group commit: the rows of concurrent C-STOREs committed together, each answered after its own commit.

Why: every instance needs its row committed (a WAL or PostgreSQL log flush) and its final name made
durable (a folder fsync) before the peer may be told 0x0000. With one transaction per instance, four
associations sending at once queue up behind each other's flushes (one SQLite writer at a time; measured
in docs/bench/ingest.md: 4 associations were slower than 1). Here the handlers that are ready together
share one transaction, one folder fsync per folder and one commit; each is answered once the commit that
holds its row has returned, so an answer still means "bytes, name and row are on disk".

How (models/handoff.py): a handler queues its instance and, if no commit is running, becomes the leader:
it takes every queued instance (its own first, up to MAX_BATCH), records them in one transaction and
commits; handlers that queued meanwhile sleep, each on its own event. The leader wakes the handlers of its
batch once their outcome is known, and hands the lead to the first handler still queued, which commits the
next batch. With one association there is nothing to wait for: the handler commits its own instance on its
own thread, as before, with no hand-over to another thread.

A batch that fails (a row refused, a racing receiver, a disk error, a dropped connection) is rolled back,
the names it published are removed, and each of its instances is tried again alone, so one bad instance
never fails the answers of the others; an instance that fails alone raises to its own handler.

One session on one database connection serves every batch (only the leader uses it, one batch at a time):
a Session and a pool checkout per batch cost ~0.13 ms of the ~0.45 ms of CPU a batch of one takes
(SQLite, 2026-12-03, docs/bench/ingest.md), under the interpreter lock the associations share. After any
failure both are closed and the next batch opens new ones, so a connection the server dropped is never
used twice; `close()` returns the connection when the listener stops.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from core.db import repository
from core.observability.logs import log_event
from core.spool import Spool, relative_path
from models.handoff import Handoff, Waiter

log = logging.getLogger("btd.listener")

MAX_BATCH = 64  # instances per transaction at most (the listener allows 64 associations, one C-STORE each)


@dataclass(eq=False)
class Pending(Waiter):
    """One instance waiting for its commit: what to record, its staged bytes, and the outcome once known."""

    received: repository.ReceivedInstance
    staging: Future[Path]
    outcome: repository.RecordOutcome | None = None
    created: list[str] = field(default_factory=list)  # spool names published for it in the running batch


class GroupCommit:
    """Records received instances in shared transactions; `record` blocks until the caller's row is committed."""

    def __init__(
        self,
        spool: Spool,
        sessions: sessionmaker[Session],
        stable_seconds: float,
        on_batch: Callable[[int], None] = lambda _size: None,
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        self.stable_seconds = stable_seconds
        self.on_batch = on_batch  # told each committed batch's size (metrics, tests)
        self.handoff: Handoff[Pending] = Handoff(lambda queue: (queue[:MAX_BATCH], queue[MAX_BATCH:]), self._commit)
        self._session: Session | None = None  # the batches' session, bound to one connection; leader only
        self._session_lock = threading.Lock()  # the leader against close()

    def record(self, received: repository.ReceivedInstance, staging: Future[Path]) -> repository.RecordOutcome:
        """Publish the staged bytes, record the row and commit (with whichever instances are ready too).

        Raises what recording this instance alone raised (IntegrityError, DBAPIError, OSError, SpoolFull,
        SpoolConflict, ...): the caller decides the answer and whether to try again."""
        mine = Pending(received, staging)
        self.handoff.wait_turn(mine)
        assert mine.outcome is not None
        return mine.outcome

    def _commit(self, batch: list[Pending]) -> None:
        """Commit `batch` in one transaction; if that fails, each instance alone (errors go to the items)."""
        try:
            self._transaction(batch)
            self.on_batch(len(batch))
            return
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            log_event(log, "store.batch_failed", logging.WARNING, size=len(batch), error=type(exc).__name__)
        for item in batch:
            try:
                self._transaction([item])
                self.on_batch(1)
            except BaseException as exc:  # noqa: BLE001 - handed to the item's own handler
                item.error = exc

    def _transaction(self, batch: list[Pending]) -> None:
        """Inside one transaction publish each staged file under its final name and insert its row; fsync
        each folder that got a name once, then commit. On failure remove the names this call published."""
        with self._session_lock:
            session = self._open_session()
            folders: dict[str, str] = {}  # folder -> one name in it
            try:
                for item in batch[1:]:
                    # Every write on disk before the first study row is updated: on PostgreSQL that update
                    # locks the row until the commit, and a receiving process beside this one (the same
                    # study over another association) waits for it (service/dicom/receivers.py). The first
                    # instance's write is awaited inside record_instance, after its read and before its
                    # update, so with one association the read still overlaps the write (measured: 4 %).
                    item.staging.result()
                for item in batch:
                    item.created = []
                    item.outcome = repository.record_instance(
                        session, item.received, stable_seconds=self.stable_seconds, store=self._publisher(item, folders)
                    )
                for name in folders.values():
                    self.spool.sync_folder(name)
                session.commit()
            except BaseException:
                self._close_session(rollback=True)
                for item in batch:
                    item.outcome = None
                    for rel in item.created:
                        try:
                            self.spool.remove(rel)
                        except OSError:
                            log.exception("spool.cleanup_failed")
                raise
            finally:
                if self._session is not None:
                    self._session.expunge_all()  # nothing of a batch is kept for the next one

    def _open_session(self) -> Session:
        """The session of the batches, opened on a connection of its own on first use or after a failure."""
        if self._session is None:
            engine = self.sessions.kw["bind"]  # the engine the listener's sessions are made for
            self._session = self.sessions(bind=engine.connect())
        return self._session

    def _close_session(self, *, rollback: bool) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        connection = session.get_bind()
        try:
            if rollback:
                session.rollback()
        except Exception:  # noqa: BLE001 - the connection may be gone; it is closed below either way
            log.debug("store.rollback_failed", exc_info=True)
        finally:
            session.close()
            with contextlib.suppress(Exception):
                connection.close()  # type: ignore[union-attr]

    def close(self) -> None:
        """Return the batches' connection (the listener is stopping); a later batch would open a new one."""
        with self._session_lock:
            self._close_session(rollback=True)

    def _publisher(self, item: Pending, folders: dict[str, str]) -> Callable[[int], str]:
        """The `store` callback of record_instance: link the staged bytes once they are on disk (the
        caller waited for the batch's writes; a failed one raises here), the folder synced later."""
        received = item.received

        def store(version: int) -> str:
            staged = item.staging.result()  # the bytes are on disk (or the write's error is raised here)
            name = relative_path(received.study_uid, received.series_uid, received.sop_instance_uid, version)
            rel = self.spool.publish_new(staged, name, sync=False)  # another name if an orphan holds this one
            item.created.append(rel)
            folders.setdefault(rel.rsplit("/", 1)[0], rel)
            return rel

        return store
