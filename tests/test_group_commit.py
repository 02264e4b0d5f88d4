"""Group commit (service/dicom/group_commit.py) on a real database and a real spool: instances that are
ready together share one transaction and one folder fsync, each caller gets its own outcome, and a bad
instance in a batch never fails the others.

The staged bytes are real files written by `Spool.stage`; the tests hold them back through the future the
listener would get from its staging thread, so which instances meet in one batch is decided by the test,
not by timing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from helpers_gateway import postgres_database, wait_until
from sqlalchemy import event, select

import core.spool
from core.db import migrate
from core.db.repository import ReceivedInstance, RecordOutcome
from core.db.schema import Instance, Study
from core.db.session import dispose_engines, get_engine, session_factory, session_scope
from core.settings import Settings
from core.spool import INCOMING_FOLDER, Spool, sha256_hex
from service.dicom.group_commit import GroupCommit

pytestmark = pytest.mark.timeout(60)

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.1"


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if request.param == "postgres" else None
        values = {"database_url": url} if url else {}
        settings = Settings(data_dir=tmp_path, min_free_bytes=0, **values)
        migrate.upgrade(settings)
        yield settings
        dispose_engines()


def received(sop: str, data: bytes) -> ReceivedInstance:
    return ReceivedInstance(
        study_uid=STUDY,
        series_uid=SERIES,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=len(data),
        sha256=sha256_hex(data),
        modality="CT",
    )


class Caller(threading.Thread):
    """An association's handler: records one instance and keeps what `record` returned or raised."""

    def __init__(self, committer: GroupCommit, instance: ReceivedInstance, staging: Future[Path]) -> None:
        super().__init__(daemon=True)
        self.committer, self.instance, self.staging = committer, instance, staging
        self.outcome: RecordOutcome | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.outcome = self.committer.record(self.instance, self.staging)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc


def staged(spool: Spool, data: bytes) -> Future[Path]:
    future: Future[Path] = Future()
    future.set_result(spool.stage(INCOMING_FOLDER, data))
    return future


def rows(settings: Settings) -> list[Instance]:
    with session_scope(settings) as session:
        return list(session.scalars(select(Instance).order_by(Instance.sop_instance_uid)))


def run_in_batches(
    settings: Settings,
    spool: Spool,
    first: tuple[ReceivedInstance, bytes],
    later: list[tuple[ReceivedInstance, Future[Path]]],
) -> tuple[list[int], Caller, list[Caller]]:
    """`first` leads a batch of its own, held inside its transaction until `later` have all queued; those
    then make up the next batch together. Returns the committed batch sizes and the callers."""
    batches: list[int] = []
    committer = GroupCommit(spool, session_factory(settings, pre_ping=False), 3600, on_batch=batches.append)
    held: Future[Path] = Future()
    leader = Caller(committer, first[0], held)
    leader.start()
    wait_until(lambda: committer.handoff.leading, what="the first caller leads")
    callers = [Caller(committer, instance, staging) for instance, staging in later]
    for caller in callers:
        caller.start()
    wait_until(lambda: committer.handoff.queued == len(later), what="the later callers queue behind the leader")
    held.set_result(spool.stage(INCOMING_FOLDER, first[1]))
    for thread in (leader, *callers):
        thread.join(30)
        assert not thread.is_alive()
    return batches, leader, callers


def test_instances_ready_together_share_one_transaction_and_one_folder_fsync(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(settings.spool_dir)
    synced: list[str] = []
    real_fsync_dir = core.spool.fsync_dir

    def counting_fsync_dir(path: Path) -> None:
        synced.append(path.name)
        real_fsync_dir(path)

    monkeypatch.setattr(core.spool, "fsync_dir", counting_fsync_dir)
    later = [(received(f"2.25.{k}", b"slice %d" % k), staged(spool, b"slice %d" % k)) for k in range(1, 4)]
    synced.clear()  # count from here: the study folder exists once the first instance is published
    batches, leader, callers = run_in_batches(settings, spool, (received("2.25.0", b"slice 0"), b"slice 0"), later)

    assert batches == [1, 3]
    assert [c.outcome.kind for c in (leader, *callers) if c.outcome] == ["stored"] * 4
    # the study and series folders are created (and their parents synced) by the first batch; the batch of
    # three published into the existing series folder and synced it once
    assert synced.count(SERIES) == 2
    stored = rows(settings)
    assert [row.sop_instance_uid for row in stored] == [f"2.25.{k}" for k in range(4)]
    for row in stored:
        assert spool.absolute(row.path).read_bytes() == b"slice " + row.sop_instance_uid[-1].encode()
    with session_scope(settings) as session:
        assert session.scalar(select(Study.n_instances)) == 4


def test_one_failing_instance_does_not_fail_its_batch(settings: Settings) -> None:
    spool = Spool(settings.spool_dir)
    broken: Future[Path] = Future()
    broken.set_exception(OSError(5, "Input/output error"))  # its staged write failed
    later = [
        (received("2.25.1", b"one"), staged(spool, b"one")),
        (received("2.25.2", b"two"), broken),
        (received("2.25.3", b"three"), staged(spool, b"three")),
    ]
    batches, leader, callers = run_in_batches(settings, spool, (received("2.25.0", b"zero"), b"zero"), later)

    assert leader.outcome is not None and leader.outcome.kind == "stored"
    assert [c.outcome.kind if c.outcome else None for c in callers] == ["stored", None, "stored"]
    assert isinstance(callers[1].error, OSError) and callers[0].error is None and callers[2].error is None
    assert batches == [1, 1, 1]  # the batch of three failed; its instances were committed one by one
    assert [row.sop_instance_uid for row in rows(settings)] == ["2.25.0", "2.25.1", "2.25.3"]
    published = sorted(p.name for p in settings.spool_dir.rglob("*.dcm"))
    assert published == ["2.25.0.v1.dcm", "2.25.1.v1.dcm", "2.25.3.v1.dcm"]  # nothing left of the failed one


def test_a_resend_in_the_same_batch_is_a_duplicate(settings: Settings) -> None:
    """Two associations delivering the same instance at once: one row, one file, one duplicate counted."""
    spool = Spool(settings.spool_dir)
    same = received("2.25.7", b"same bytes")
    later = [(same, staged(spool, b"same bytes")), (same, staged(spool, b"same bytes"))]
    batches, _, callers = run_in_batches(settings, spool, (received("2.25.0", b"zero"), b"zero"), later)

    assert batches == [1, 2]
    assert sorted(c.outcome.kind for c in callers if c.outcome) == ["duplicate", "stored"]
    [row] = [r for r in rows(settings) if r.sop_instance_uid == "2.25.7"]
    assert (row.version, row.duplicates) == (1, 1)
    assert len(list(settings.spool_dir.rglob("2.25.7*"))) == 1


def test_batches_share_one_connection_replaced_after_a_failure_and_returned_on_close(settings: Settings) -> None:
    """The batches run on one connection of their own (a checkout per batch was CPU under the interpreter
    lock); a failed batch gives it up so the next one starts on a fresh connection, and close() returns it."""
    spool = Spool(settings.spool_dir)
    engine = get_engine(settings, pre_ping=False)
    checkouts: list[object] = []
    event.listen(engine, "checkout", lambda dbapi_connection, _record, _proxy: checkouts.append(dbapi_connection))
    committer = GroupCommit(spool, session_factory(settings, pre_ping=False), 3600)
    try:
        for k in (1, 2):
            assert committer.record(received(f"2.25.{k}", b"%d" % k), staged(spool, b"%d" % k)).kind == "stored"
        assert len(checkouts) == 1 and engine.pool.checkedout() == 1  # kept between batches, not returned

        broken: Future[Path] = Future()
        broken.set_exception(OSError(5, "Input/output error"))
        with pytest.raises(OSError):
            committer.record(received("2.25.3", b"3"), broken)
        assert engine.pool.checkedout() == 0  # given up with the failed batch

        assert committer.record(received("2.25.4", b"4"), staged(spool, b"4")).kind == "stored"
        assert len(checkouts) == 2 and engine.pool.checkedout() == 1
    finally:
        committer.close()
    assert engine.pool.checkedout() == 0
    assert [row.sop_instance_uid for row in rows(settings)] == ["2.25.1", "2.25.2", "2.25.4"]
