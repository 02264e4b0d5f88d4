"""Building and delivering reports against real DICOM peers (dcmtk storescp, pynetdicom SCPs), on a real
database: states, the delivery log, no second copy after a success, and every bad destination.

Peers: storescp is the dcmtk reference SCP; pynetdicom SCPs in threads play the PACS that refuses the
association, refuses the SR SOP class, answers a failure status, or counts what it received. A socket
that accepts and never answers plays the PACS that hangs.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from helpers_gateway import free_port, postgres_database, wait_for_port, wait_until
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import KeyObjectSelectionDocumentStorage
from sqlalchemy import select

from core.contracts import State, Task
from core.db import migrate
from core.db.base import Base
from core.db.repository import latest_instances
from core.db.schema import DeliveryAttempt, Instance, InstanceResult, Region, Report, SeriesResult, Study
from core.db.session import dispose_engines, get_engine, session_scope
from core.observability.metrics import DELIVERY_ATTEMPTS
from core.settings import Settings
from core.spool import relative_path
from service.api.app import create_app
from worker import report_tasks
from worker.reports.validate import validation_errors

FIXTURES = Path(__file__).parent / "fixtures"
CT_FILES = sorted(p for p in (FIXTURES / "ct_series_20").iterdir() if p.name.startswith("CT."))[:4]
REPORT_TABLES = ("reports", "delivery_attempts")


# --------------------------------------------------------------------------------------------------
# Database and a scored study


def make_settings(tmp_path: Path, **overrides) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", kos_enabled=True, **overrides)
    migrate.upgrade(settings)
    return settings


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    yield make_settings(tmp_path)
    dispose_engines()


def seed_scored_study(settings: Settings, flagged: bool = True, version: int = 1) -> str:
    """A SCORED study of 4 real CT slices in the spool, with results as the scoring task writes them."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in CT_FILES]
    study_uid, series_uid = str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID)
    with session_scope(settings) as session:
        if session.scalar(select(Study).where(Study.study_uid == study_uid)) is None:
            session.add(Study(study_uid=study_uid, state=State.SCORED, version=version, n_instances=4,
                              verdict="suspicious" if flagged else "no_evidence", score=0.9 if flagged else 0.1,
                              modalities="CT"))
            session.flush()  # the study row first: instances refer to it
            for path, ds in zip(CT_FILES, headers, strict=True):
                rel = relative_path(study_uid, series_uid, str(ds.SOPInstanceUID), 1)
                target = settings.spool_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
                session.add(Instance(study_uid=study_uid, series_uid=series_uid, sop_instance_uid=ds.SOPInstanceUID,
                                     sop_class_uid=ds.SOPClassUID, modality="CT",
                                     transfer_syntax="1.2.840.10008.1.2.4.90",
                                     size=target.stat().st_size, sha256="0" * 64, path=rel))
        series = SeriesResult(study_uid=study_uid, study_version=version, series_uid=series_uid, modality="CT",
                              verdict="suspicious" if flagged else "no_evidence", score=0.9 if flagged else 0.1,
                              n_instances=4, n_assessed=4, model_name="btd-ct-test", model_sha256="e" * 64)
        session.add(series)
        session.flush()
        for i, ds in enumerate(headers):
            suspicious = flagged and i == 2
            verdict = "suspicious" if suspicious else "no_evidence"
            inst = InstanceResult(series_result_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
                                  score=0.9 if suspicious else 0.1, verdict=verdict)
            session.add(inst)
            session.flush()
            if suspicious:
                session.add(Region(instance_result_id=inst.id, sop_instance_uid=ds.SOPInstanceUID, x0=100, y0=120,
                                   x1=140, y1=150, score=0.9,
                                   outline=[[100, 120], [140, 120], [140, 150], [100, 150], [100, 120]]))
    return study_uid


def study_row(settings: Settings, study_uid: str) -> Study:
    with session_scope(settings) as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        assert study is not None
        return study


def attempts(settings: Settings) -> list[tuple[str, int, str, int | None]]:
    with session_scope(settings) as session:
        rows = session.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)).all()
        return [(r.destination, r.attempt, r.outcome, r.dicom_status) for r in rows]


def reported_study(settings: Settings, flagged: bool = True) -> str:
    study_uid = seed_scored_study(settings, flagged=flagged)
    assert report_tasks.run_build_report(study_uid, settings, dispatch_next=False).kind == report_tasks.BUILT
    return study_uid


# --------------------------------------------------------------------------------------------------
# DICOM peers


class CountingSCP:
    """A pynetdicom Storage SCP that records what it stores and answers `status`."""

    def __init__(self, ae_title: str = "PACS", status: int = 0x0000, kos_only: bool = False,
                 require_calling_aet: list[str] | None = None, port: int | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.ae_title, self.status = ae_title, status
        self.port = port or free_port()
        self.received: list[tuple[str, str]] = []  # (SOP Class UID, SOP Instance UID)
        self.ae = AE(ae_title=ae_title)
        if kos_only:  # a PACS that stores key-object selections but refuses SR documents
            self.ae.add_supported_context(KeyObjectSelectionDocumentStorage)
        else:
            self.ae.supported_contexts = AllStoragePresentationContexts
        if require_calling_aet:
            self.ae.require_calling_aet = require_calling_aet
        self.server = None
        self.ssl_context = ssl_context

    def _on_store(self, event) -> int:
        if self.status in (0x0000, 0xB000):
            ds = event.dataset
            self.received.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        return self.status

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def __enter__(self) -> CountingSCP:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=self.ssl_context,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.shutdown()


class SilentPeer:
    """Accepts TCP connections and never says a word (a hung PACS)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def __enter__(self) -> SilentPeer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(timeout=2)
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.fixture
def env_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings that the in-process executor (which reads the environment) shares with the test."""
    from core import queue
    from core.settings import get_settings
    from worker.registry import in_process_tasks

    down_port = free_port()
    for key, value in {"DATA_DIR": tmp_path / "data", "DESTINATIONS": f"LATER@127.0.0.1:{down_port}",
                       "KOS_ENABLED": "true", "API_TOKEN": "s3cret", "DELIVERY_RETRIES": "2",
                       "DELIVERY_BACKOFF_SECONDS": "0.05"}.items():
        monkeypatch.setenv(f"BTD_{key}", str(value))
    get_settings.cache_clear()
    settings = get_settings()
    migrate.upgrade(settings)
    queue.start_executor(in_process_tasks(settings).get)  # what `btd serve` starts without a broker
    yield settings
    queue.stop_executor()
    get_settings.cache_clear()
    dispose_engines()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if shutil.which("storescp") is None:
        pytest.skip("dcmtk storescp not installed")
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), "+xa", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        yield f"STORESCP@127.0.0.1:{port}", out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------------
# Schema


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migration_0002_matches_the_orm(tmp_path: Path, backend: str) -> None:
    def compare(settings: Settings) -> list:
        with get_engine(settings).connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": False}), Base.metadata)
        return [d for d in diffs if any(t in repr(d) for t in REPORT_TABLES)]

    if backend == "sqlite":
        assert compare(make_settings(tmp_path)) == []
        dispose_engines()
    else:
        with postgres_database() as url:
            assert compare(make_settings(tmp_path, database_url=url)) == []


# --------------------------------------------------------------------------------------------------
# build_report


def test_build_report_writes_valid_sr_and_kos_and_moves_to_reported(settings: Settings) -> None:
    study_uid = seed_scored_study(settings)
    outcome = report_tasks.run_build_report(study_uid, settings, dispatch_next=False)
    assert outcome.kind == report_tasks.BUILT
    study = study_row(settings, study_uid)
    assert study.state == State.REPORTED and study.verdict == "suspicious"
    with session_scope(settings) as session:
        report = session.scalars(select(Report)).one()
    sr_path, kos_path = settings.data_dir / report.sr_path, settings.data_dir / report.kos_path
    assert report.sr_path.startswith(f"reports/{study_uid}/")
    sr, kos = pydicom.dcmread(sr_path), pydicom.dcmread(kos_path)
    assert sr.SOPInstanceUID == report.sr_sop_instance_uid and sr.StudyInstanceUID == study_uid
    flagged = pydicom.dcmread(CT_FILES[2], stop_before_pixels=True).SOPInstanceUID
    images = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    kos_refs = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images]
    assert kos_refs == [flagged]
    # every scored instance is cited, though only the first and the flagged one were read (worker/reports/evidence.py)
    cited = [ref.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
             for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
    assert sorted(cited) == sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in CT_FILES)
    if shutil.which("dciodvfy") and shutil.which("dsrdump"):
        assert validation_errors(sr_path) == [] and validation_errors(kos_path) == []


def test_the_report_reads_only_the_headers_it_describes(settings: Settings) -> None:
    """Headers are read for the first instance and the first CT/MR image (here the first received is a
    dose report, say), and for flagged images; every other instance is cited through a stand-in."""
    study_uid = seed_scored_study(settings, flagged=False)
    with session_scope(settings) as session:
        rows = latest_instances(session, study_uid)
        session.expunge_all()
    rows[0].modality = "SR"  # detached: the database keeps "CT"
    flagged = rows[3].sop_instance_uid
    sources = report_tasks.read_sources(settings, rows, {flagged})
    assert [str(ds.SOPInstanceUID) for ds in sources] == [r.sop_instance_uid for r in rows]
    read = [i for i, ds in enumerate(sources) if "PatientID" in ds]
    assert read == [0, 1, 3]
    assert len(sources[2]) <= 5  # the stand-in: four UIDs and the modality


def test_sr_names_the_model_version_and_its_measured_operating_point(tmp_path: Path) -> None:
    performance = {"summary": "Measured on held-out patients: flags 1.8 % of genuine slices."}
    (tmp_path / "m.json").write_text(
        json.dumps({"weights_sha256": "e" * 64, "software_version": "btd 9.9.9", "performance": performance})
    )
    settings = make_settings(tmp_path, model=str(tmp_path / "m.pt"))
    reported_study(settings)
    with session_scope(settings) as session:
        report = session.scalars(select(Report)).one()
    sr = pydicom.dcmread(settings.data_dir / report.sr_path)
    versions = {i.TextValue for i in walk_items(sr.ContentSequence) if i.get("ValueType") == "TEXT"
                and i.ConceptNameCodeSequence[0].CodeValue == "111003"}  # Algorithm Version
    assert versions == {"btd 9.9.9"}
    operating = [i.TextValue for i in walk_items(sr.ContentSequence) if i.get("ValueType") == "TEXT"
                 and i.ConceptNameCodeSequence[0].CodeValue == "BTD0006"]
    assert operating == [performance["summary"]]
    dispose_engines()


def test_a_model_without_a_measured_operating_point_is_reported_as_unvalidated(tmp_path: Path) -> None:
    """Metadata of other weights (another SHA-256) must not lend them its operating point."""
    from worker.report_tasks import operating_point, scoring_model_metadata

    (tmp_path / "m.json").write_text(json.dumps({"weights_sha256": "e" * 64, "performance": {"summary": "good"}}))
    settings = make_settings(tmp_path, model=str(tmp_path / "m.pt"))
    assert operating_point(scoring_model_metadata(settings, "e" * 64)) == "good"
    assert "unvalidated" in operating_point(scoring_model_metadata(settings, "f" * 64))
    assert "unvalidated" in operating_point(scoring_model_metadata(settings, None))


def walk_items(items) -> Iterator:
    for item in items:
        yield item
        yield from walk_items(item.get("ContentSequence", []))


def test_clean_study_gets_an_sr_and_no_kos(settings: Settings) -> None:
    study_uid = reported_study(settings, flagged=False)
    with session_scope(settings) as session:
        report = session.scalars(select(Report)).one()
    assert report.kos_path is None and report.kos_sop_instance_uid is None
    assert study_row(settings, study_uid).state == State.REPORTED


def test_a_repeated_build_reuses_the_report(settings: Settings) -> None:
    study_uid = reported_study(settings)
    assert report_tasks.run_build_report(study_uid, settings, dispatch_next=False).kind == report_tasks.SKIPPED
    with session_scope(settings) as session:  # a crash after the report, before the state moved on
        session.execute(Study.__table__.update().values(state=State.SCORED))
    assert report_tasks.run_build_report(study_uid, settings, dispatch_next=False).kind == report_tasks.REUSED
    with session_scope(settings) as session:
        assert len(session.scalars(select(Report)).all()) == 1


def test_two_workers_building_the_same_report_on_postgres_make_one(tmp_path: Path) -> None:
    """A duplicated message: both tasks may build the SR at once; one row, one REPORTED, no FAILED."""
    with postgres_database() as url:
        settings = make_settings(tmp_path, database_url=url)
        study_uid = seed_scored_study(settings)
        outcomes: list[str] = []
        threads = [threading.Thread(target=lambda: outcomes.append(
            report_tasks.run_build_report(study_uid, settings, dispatch_next=False).kind)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(outcomes) == [report_tasks.BUILT, report_tasks.SKIPPED]
        assert study_row(settings, study_uid).state == State.REPORTED
        with session_scope(settings) as session:
            assert len(session.scalars(select(Report)).all()) == 1


def test_rescore_builds_a_new_sr_naming_the_previous_as_predecessor(settings: Settings) -> None:
    study_uid = reported_study(settings)
    with session_scope(settings) as session:
        first = session.scalars(select(Report)).one()
        session.execute(Study.__table__.update().values(state=State.SCORED, version=2, verdict="no_evidence"))
        # the PACS routed btd's first SR back to it: it is in the spool and the instances table now
        sr_rel = relative_path(study_uid, first.sr_series_uid, first.sr_sop_instance_uid, 1)
        (settings.spool_dir / sr_rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(settings.data_dir / first.sr_path, settings.spool_dir / sr_rel)
        session.add(Instance(study_uid=study_uid, series_uid=first.sr_series_uid,
                             sop_instance_uid=first.sr_sop_instance_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                             modality="SR", transfer_syntax="1.2.840.10008.1.2.1", size=1, sha256="1" * 64,
                             path=sr_rel))
    seed_scored_study(settings, flagged=False, version=2)
    assert report_tasks.run_build_report(study_uid, settings, dispatch_next=False).kind == report_tasks.BUILT
    with session_scope(settings) as session:
        second = session.scalar(select(Report).where(Report.study_version == 2))
    assert second.predecessor_sop_instance_uid == first.sr_sop_instance_uid
    sr = pydicom.dcmread(settings.data_dir / second.sr_path)
    ref = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.sr_sop_instance_uid
    assert sr.SOPInstanceUID != first.sr_sop_instance_uid
    evidence = {r.ReferencedSOPInstanceUID for st in sr.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert len(evidence) == 4 and first.sr_sop_instance_uid not in evidence


def test_sources_deleted_from_the_spool_fail_clearly_and_keep_the_verdict(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    study_uid = seed_scored_study(settings)
    shutil.rmtree(settings.spool_dir)
    with caplog.at_level(logging.ERROR, logger="btd.worker.reports"):
        outcome = report_tasks.run_build_report(study_uid, settings, dispatch_next=False)
    assert outcome.kind == report_tasks.FAILED
    study = study_row(settings, study_uid)
    assert study.state == State.FAILED
    assert "4 of 4 source instance(s) missing" in study.error
    assert (study.verdict, study.score) == ("suspicious", 0.9)
    assert any(getattr(r, "event", "") == "report.failed" for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# deliver_report


def test_delivery_to_storescp_stores_sr_and_kos(tmp_path: Path, storescp: tuple[str, Path]) -> None:
    destination, out = storescp
    settings = make_settings(tmp_path, destinations=[destination])
    study_uid = reported_study(settings)
    before = DELIVERY_ATTEMPTS.labels(outcome="success")._value.get()
    assert report_tasks.run_deliver_report(study_uid, settings).kind == report_tasks.DELIVERED
    assert study_row(settings, study_uid).state == State.DELIVERED
    stored = {pydicom.dcmread(p).SOPClassUID for p in out.iterdir()}
    assert stored == {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.59"}
    assert attempts(settings) == [(destination, 1, "success", 0)]
    assert DELIVERY_ATTEMPTS.labels(outcome="success")._value.get() == before + 1
    dispose_engines()


def test_a_destination_down_for_a_while_gets_the_report_and_the_other_no_second_copy(tmp_path: Path) -> None:
    down_port = free_port()
    with CountingSCP("UP") as up:
        settings = make_settings(tmp_path, destinations=[up.destination, f"LATER@127.0.0.1:{down_port}"])
        study_uid = reported_study(settings)
        first = report_tasks.run_deliver_report(study_uid, settings, final_attempt=False, timeout=5)
        assert first.kind == report_tasks.RETRY
        assert study_row(settings, study_uid).state == State.REPORTED
        assert len(up.received) == 2  # SR + KOS
        with CountingSCP("LATER", port=down_port) as later:
            second = report_tasks.run_deliver_report(study_uid, settings, final_attempt=False, timeout=5)
            assert second.kind == report_tasks.DELIVERED
            assert len(later.received) == 2
        assert len(up.received) == 2  # not sent again
    assert study_row(settings, study_uid).state == State.DELIVERED
    log = attempts(settings)
    assert log[0] == (up.destination, 1, "success", 0)
    assert log[1][:3] == (f"LATER@127.0.0.1:{down_port}", 1, "failure")
    assert log[2] == (f"LATER@127.0.0.1:{down_port}", 2, "success", 0)
    dispose_engines()


@pytest.mark.parametrize("fault", ["refuses_association", "refuses_sr_sop_class", "failure_status", "times_out",
                                   "not_a_destination"])
def test_a_bad_destination_ends_in_failed_delivery_with_its_reason(
    tmp_path: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    peers = {
        "refuses_association": lambda: CountingSCP("PACS", require_calling_aet=["SOMEONE_ELSE"]),
        "refuses_sr_sop_class": lambda: CountingSCP("PACS", kos_only=True),
        "failure_status": lambda: CountingSCP("PACS", status=0xA700),
        "times_out": SilentPeer,
    }
    peer = peers[fault]() if fault in peers else None
    with peer if peer is not None else _nothing():
        destination = "no-port-here" if peer is None else f"PACS@127.0.0.1:{peer.port}"
        settings = make_settings(tmp_path, destinations=[destination])
        study_uid = reported_study(settings)
        with caplog.at_level(logging.WARNING, logger="btd.worker.reports"):
            outcome = report_tasks.run_deliver_report(study_uid, settings, final_attempt=True, timeout=2)
    assert outcome.kind == report_tasks.FAILED
    study = study_row(settings, study_uid)
    assert study.state == State.FAILED_DELIVERY
    assert (study.verdict, study.score) == ("suspicious", 0.9)
    expected_error = {
        "refuses_association": "association rejected: calling AE title not recognised (permanent",
        "refuses_sr_sop_class": "presentation context",
        "failure_status": "0xA700",
        "times_out": "peer unreachable: no answer from 127.0.0.1",
        "not_a_destination": "is not AET@host:port",
    }[fault]
    assert expected_error.lower() in (study.error or "").lower()
    log = attempts(settings)
    assert len(log) == 1 and log[0][2] == "failure"
    if fault == "failure_status":
        assert log[0][3] == 0xA700
    assert any(getattr(r, "event", "") == "delivery.failed" for r in caplog.records)
    dispose_engines()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_report_file_gone_before_delivery_ends_in_failed_delivery(tmp_path: Path) -> None:
    with CountingSCP("PACS") as pacs:
        settings = make_settings(tmp_path, destinations=[pacs.destination])
        study_uid = reported_study(settings)
        shutil.rmtree(settings.data_dir / "reports")
        outcome = report_tasks.run_deliver_report(study_uid, settings, final_attempt=True, timeout=5)
    assert outcome.kind == report_tasks.FAILED and pacs.received == []
    study = study_row(settings, study_uid)
    assert study.state == State.FAILED_DELIVERY and "report file(s) missing" in (study.error or "")
    assert study.verdict == "suspicious"
    dispose_engines()


def test_no_destinations_leaves_the_study_reported(settings: Settings) -> None:
    study_uid = reported_study(settings)
    assert report_tasks.run_deliver_report(study_uid, settings).kind == report_tasks.NO_DESTINATIONS
    assert study_row(settings, study_uid).state == State.REPORTED
    assert attempts(settings) == []


def test_in_process_delivery_retries_with_backoff_then_fails(env_settings: Settings) -> None:
    """No broker: the executor runs a round, a timer re-dispatches the next after the backoff (0.05 s,
    then 0.1 s), and after BTD_DELIVERY_RETRIES retries the study is FAILED_DELIVERY."""
    settings = env_settings
    study_uid = reported_study(settings)
    assert report_tasks.deliver_report(study_uid, settings=settings) == report_tasks.RETRY
    wait_until(lambda: study_row(settings, study_uid).state == State.FAILED_DELIVERY, timeout=60,
               what="FAILED_DELIVERY after the retries")
    assert [a[1:3] for a in attempts(settings)] == [(1, "failure"), (2, "failure"), (3, "failure")]
    assert "LATER@127.0.0.1" in (study_row(settings, study_uid).error or "")


# --------------------------------------------------------------------------------------------------
# REST


def test_reports_api_lists_the_delivery_log_and_redeliver_sends_after_a_failure(env_settings: Settings) -> None:
    settings = env_settings
    study_uid = reported_study(settings)
    assert report_tasks.run_deliver_report(study_uid, settings, final_attempt=True, timeout=2).kind == "failed"
    client = TestClient(create_app(settings))
    reader = {"Authorization": "Bearer s3cret"}  # with BTD_API_TOKEN set the reads need it too (issue 14)

    listed = client.get(f"/api/studies/{study_uid}/reports", headers=reader).json()
    assert len(listed) == 1 and [d["outcome"] for d in listed[0]["deliveries"]] == ["failure"]
    assert client.get("/api/studies/1.2.3/reports", headers=reader).status_code == 404

    url = f"/api/studies/{study_uid}/redeliver"
    assert client.post(url).status_code == 401
    assert client.post(url, headers={"Authorization": "Bearer no"}).status_code == 403
    assert study_row(settings, study_uid).state == State.FAILED_DELIVERY
    port = int(settings.destinations[0].rsplit(":", 1)[1])
    with CountingSCP("LATER", port=port) as later:
        response = client.post(url, headers={"Authorization": "Bearer s3cret"})
        assert response.status_code == 202, response.text
        assert response.json()["state"] == State.REPORTED
        wait_until(lambda: study_row(settings, study_uid).state == State.DELIVERED, timeout=60, what="DELIVERED")
        assert len(later.received) == 2  # SR + KOS
    again = client.post(url, headers={"Authorization": "Bearer s3cret"})
    assert again.status_code == 409  # DELIVERED is not redelivered
    listed = client.get(f"/api/studies/{study_uid}/reports", headers=reader).json()
    assert [(d["attempt"], d["outcome"]) for d in listed[0]["deliveries"]] == [(1, "failure"), (2, "success")]


# --------------------------------------------------------------------------------------------------
# Celery: the deliver task's retries with backoff, through Redis and a real `btd worker`


@pytest.mark.slow
@pytest.mark.redis
def test_celery_worker_retries_delivery_until_the_pacs_is_back(tmp_path: Path) -> None:
    import uuid

    import redis
    from helpers_gateway import gateway_env
    from test_e2e_celery import REDIS_URL, Worker, redis_available

    from core.queue import dispatch

    if not redis_available():
        pytest.skip(f"no Redis at {REDIS_URL}")
    port = free_port()
    values = {"broker_url": REDIS_URL, "queue_name": f"btd-delivery-{uuid.uuid4().hex[:10]}",
              "destinations": f"LATER@127.0.0.1:{port}", "delivery_retries": 6, "delivery_backoff_seconds": 1,
              "kos_enabled": "true"}
    settings = make_settings(tmp_path, broker_url=REDIS_URL, queue_name=values["queue_name"],
                             destinations=[values["destinations"]], delivery_retries=6, delivery_backoff_seconds=1)
    study_uid = reported_study(settings)
    worker = Worker(gateway_env(settings.data_dir, **values), tmp_path / "worker.log")
    try:
        dispatch(Task.DELIVER_REPORT, study_uid, settings=settings)
        wait_until(lambda: attempts(settings), timeout=120, what="a first (failed) delivery attempt")
        assert study_row(settings, study_uid).state == State.REPORTED  # waiting for its retry, not failed
        with CountingSCP("LATER", port=port) as later:
            wait_until(lambda: study_row(settings, study_uid).state == State.DELIVERED, timeout=120,
                       what=f"DELIVERED; worker log:\n{worker.log_text()[-3000:]}")
            assert len(later.received) == 2
    finally:
        worker.stop()
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(values["queue_name"])
        client.close()
        dispose_engines()
    log = attempts(settings)
    assert log[0][2] == "failure" and log[-1][2] == "success"
    assert [a[1] for a in log] == list(range(1, len(log) + 1))


# --------------------------------------------------------------------------------------------------
# DICOM TLS


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _issue(folder: Path, name: str, ca: str | None) -> None:
    """A key and certificate `name`, signed by the CA `ca` (or self-signed when None)."""
    key, crt = str(folder / f"{name}.key"), str(folder / f"{name}.crt")
    if ca is None:
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt, "-days", "2",
                 "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
        return
    csr = str(folder / f"{name}.csr")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", str(folder / f"{ca}.crt"), "-CAkey", str(folder / f"{ca}.key"),
             "-CAcreateserial", "-out", crt, "-days", "2")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder = tmp_path_factory.mktemp("pki")
    _issue(folder, "ca", None)
    _issue(folder, "pacs", "ca")
    _issue(folder, "btd", "ca")
    _issue(folder, "rogue", None)  # a PACS certificate our CA never signed
    return folder


def server_context(pki: Path, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki / f"{name}.crt"), str(pki / f"{name}.key"))
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: btd must present a certificate of our CA
    context.load_verify_locations(str(pki / "ca.crt"))
    return context


@pytest.mark.parametrize(("server_cert", "delivered"), [("pacs", True), ("rogue", False)])
def test_delivery_over_mutual_tls_verifies_the_pacs(tmp_path: Path, pki: Path, server_cert: str,
                                                     delivered: bool) -> None:
    with CountingSCP("SECURE", ssl_context=server_context(pki, server_cert)) as pacs:
        settings = make_settings(tmp_path, destinations=[pacs.destination], tls_ca=pki / "ca.crt",
                                 tls_cert=pki / "btd.crt", tls_key=pki / "btd.key")
        study_uid = reported_study(settings)
        outcome = report_tasks.run_deliver_report(study_uid, settings, final_attempt=True, timeout=5)
    if delivered:
        assert outcome.kind == report_tasks.DELIVERED and len(pacs.received) == 2
    else:
        assert outcome.kind == report_tasks.FAILED and pacs.received == []
        assert study_row(settings, study_uid).state == State.FAILED_DELIVERY
    dispose_engines()
