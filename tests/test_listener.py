"""The DICOM listener with real peers: dcmtk storescu and pynetdicom send to it over loopback.

What the stored SHA-256 covers: the bytes of the file we store, which is pynetdicom's File Meta (built
from the negotiated context) followed by the dataset bytes exactly as the peer sent them. storescu sends
a file's dataset unchanged (no transcoding with -xv), so the stored dataset part equals the source file's
dataset part byte for byte, while the File Meta differs (implementation UID and version of the receiver).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers_gateway import free_port, postgres_database
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select, text

from core.db import migrate
from core.db.schema import Instance, Study
from core.db.session import get_engine, session_scope
from core.dicom import scu, sender
from core.observability.logs import JsonFormatter
from core.settings import Settings
from core.spool import Spool
from service.dicom.listener import file_meta_bytes, start_listener

pytestmark = pytest.mark.timeout(120)

FIXTURES = Path(__file__).parent / "fixtures"
CT_SMALL = FIXTURES / "pydicom" / "CT_small.dcm"


@contextmanager
def running_listener(data_dir: Path, **overrides: Any) -> Iterator[Settings]:
    values: dict[str, Any] = {"dicom_host": "127.0.0.1", "dicom_port": free_port(), "min_free_bytes": 0}
    values.update(overrides)
    settings = Settings(data_dir=data_dir, **values)
    migrate.upgrade(settings)
    server = start_listener(settings)
    try:
        yield settings
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with running_listener(tmp_path_factory.mktemp("listener")) as settings:
        yield settings


def dataset_part(path: Path) -> bytes:
    """The bytes after the File Meta (explicit VR LE group 0002 with its group length first)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    return data[144 + int.from_bytes(data[140:144], "little") :]


def rows_for(settings: Settings, **where: str) -> list[Instance]:
    with session_scope(settings) as session:
        query = select(Instance).order_by(Instance.sop_instance_uid, Instance.version)
        for key, value in where.items():
            query = query.where(getattr(Instance, key) == value)
        return list(session.scalars(query))


def spool_files(settings: Settings) -> list[Path]:
    return [p for p in settings.spool_dir.rglob("*") if p.is_file()] if settings.spool_dir.exists() else []


def fresh_ct(**changes: str) -> Any:
    """CT_small with new Study/Series/SOP UIDs, so each test owns its study."""
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def storescu(
    settings: Settings, *files: str, options: tuple[str, ...] = (), aet: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TCP_NODELAY="1")  # dcmtk otherwise waits ~40 ms per message on loopback
    cmd = ["storescu", "-aet", aet, "-aec", settings.ae_title, *options, "127.0.0.1", str(settings.dicom_port), *files]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_storescu_series_every_instance_stored_with_its_sha256(gateway: Settings) -> None:
    series = FIXTURES / "ct_series_20"
    sources = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in series.glob("CT.*")}
    done = storescu(gateway, str(series), options=("-xv", "+sd", "+r", "+sp", "CT.*"))
    assert done.returncode == 0, done.stderr
    study_uid = dcmread(next(iter(sources.values())), stop_before_pixels=True).StudyInstanceUID
    rows = rows_for(gateway, study_uid=study_uid)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sources)
    for row in rows:
        stored = gateway.spool_dir / row.path
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
        assert row.size == stored.stat().st_size
        assert dataset_part(stored) == dataset_part(sources[row.sop_instance_uid])
        assert row.transfer_syntax == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless, as sent
        assert (row.version, row.conflict, row.calling_ae, row.modality) == (1, False, "STORESCU", "CT")
    with session_scope(gateway) as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        assert study is not None and study.state == "RECEIVING" and study.n_instances == 20


def test_c_echo(gateway: Settings) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gateway.dicom_port, ae_title=gateway.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_every_transfer_syntax_is_stored_as_sent(gateway: Settings) -> None:
    folder = FIXTURES / "ct_transfer_syntaxes"
    results = sender.send_files([folder], "127.0.0.1", gateway.dicom_port, gateway.ae_title, "TSTEST")
    assert len(results) >= 17 and all(r.status == 0 for r in results), [(r.path, r.status) for r in results]
    for result in results:
        assert result.path is not None
        source = Path(result.path)
        rows = rows_for(gateway, sop_instance_uid=str(result.sop_instance_uid), calling_ae="TSTEST")
        # The sender pads an odd-length deflated dataset with one zero byte (DICOM wants even fragments).
        sent = dataset_part(source) + (b"\0" if len(dataset_part(source)) % 2 else b"")
        stored = [r for r in rows if dataset_part(gateway.spool_dir / r.path) == sent]
        assert len(stored) == 1, source.name
        assert stored[0].transfer_syntax == str(dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_identical_resend_is_a_duplicate_and_new_bytes_a_flagged_version(gateway: Settings) -> None:
    ds = fresh_ct()
    port, aet = gateway.dicom_port, gateway.ae_title
    assert [r.status for r in sender.send_files([ds], "127.0.0.1", port, aet)] == [0]
    assert [r.status for r in sender.send_files([ds], "127.0.0.1", port, aet)] == [0]
    rows = rows_for(gateway, sop_instance_uid=ds.SOPInstanceUID)
    assert [(r.version, r.duplicates, r.conflict) for r in rows] == [(1, 1, False)]
    ds.StudyDescription = "changed after the first send"
    assert [r.status for r in sender.send_files([ds], "127.0.0.1", port, aet)] == [0]
    rows = rows_for(gateway, sop_instance_uid=ds.SOPInstanceUID)
    assert [(r.version, r.conflict) for r in rows] == [(1, False), (2, True)]
    assert rows[0].sha256 != rows[1].sha256
    assert all((gateway.spool_dir / r.path).exists() for r in rows)  # the first bytes are kept
    assert rows[1].path.endswith(".v2.dcm")


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even-length UIDs
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2"),  # odd-length: padded with NUL
        ("1.2.840.10008.5.1.4.1.1.88.34", "2.25.123", "1.2.840.10008.1.2.4.90"),
    ],
)
def test_file_meta_is_byte_for_byte_what_pynetdicom_writes(
    sop_class: str, sop_instance: str, transfer_syntax: str
) -> None:
    """The listener writes the File Meta itself (cheaper); the stored file must not change because of it."""
    meta = create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(transfer_syntax)
    )
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(meta)
    assert file_meta_bytes(sop_class, sop_instance, UID(transfer_syntax)) == expected
    assert dcmread(DicomBytesIO(expected)).file_meta.MediaStorageSOPInstanceUID == sop_instance


def test_patient_name_is_decoded_with_the_datasets_character_set(gateway: Settings) -> None:
    """Only the identifying elements are decoded; Specific Character Set must be among them."""
    ds = fresh_ct(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jürgen", StudyDescription="Thorax ü")
    assert sender.send_files([ds], "127.0.0.1", gateway.dicom_port, gateway.ae_title)[0].status == 0
    with session_scope(gateway) as session:
        study = session.scalar(select(Study).where(Study.study_uid == ds.StudyInstanceUID))
        assert study is not None
        assert (study.patient_name, study.study_description) == ("Müller^Jürgen", "Thorax ü")


def test_an_orphan_left_by_a_crash_does_not_block_the_resend(gateway: Settings) -> None:
    """A crash after the bytes were published but before the row was committed leaves a file without a
    row (the PACS got no answer and resends): the resend is stored under the next free name."""
    ds = fresh_ct()
    folder = gateway.spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
    folder.mkdir(parents=True)
    (folder / f"{ds.SOPInstanceUID}.v1.dcm").write_bytes(b"bytes of an earlier, unanswered attempt")
    assert [r.status for r in sender.send_files([ds], "127.0.0.1", gateway.dicom_port, gateway.ae_title)] == [0]
    [row] = rows_for(gateway, sop_instance_uid=ds.SOPInstanceUID)
    assert (row.version, row.conflict) == (1, False) and row.path.endswith(".v1~2.dcm")
    assert hashlib.sha256((gateway.spool_dir / row.path).read_bytes()).hexdigest() == row.sha256
    assert [r.status for r in sender.send_files([ds], "127.0.0.1", gateway.dicom_port, gateway.ae_title)] == [0]
    assert [(r.version, r.duplicates) for r in rows_for(gateway, sop_instance_uid=ds.SOPInstanceUID)] == [(1, 1)]


def malformed_file(folder: Path) -> Path:
    """Valid File Meta followed by an unterminated sequence: the dataset cannot be decoded."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta)
    junk = b"\x08\x00\x18\x00SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x18\x00UI\xff\x00"
    path = folder / "malformed.dcm"
    path.write_bytes(fp.getvalue() + junk)
    return path


def test_malformed_datasets_fail_and_the_association_goes_on(gateway: Settings, tmp_path: Path) -> None:
    blank_study = fresh_ct(StudyInstanceUID="")
    blank_sop = fresh_ct()
    blank_sop.SOPInstanceUID = ""  # the File Meta (used for the C-STORE request) keeps its UID
    blank_sop.save_as(tmp_path / "blank_sop.dcm", enforce_file_format=False)
    good = fresh_ct()
    results = sender.send_files(
        [malformed_file(tmp_path), blank_study, tmp_path / "blank_sop.dcm", good],
        "127.0.0.1",
        gateway.dicom_port,
        gateway.ae_title,
    )
    assert [r.status for r in results] == [0xC210, 0xC211, 0xC211, 0x0000]  # one association, four C-STOREs
    assert rows_for(gateway, sop_instance_uid=blank_study.SOPInstanceUID) == []
    assert len(rows_for(gateway, sop_instance_uid=good.SOPInstanceUID)) == 1
    # Writing starts before decoding: the bytes of the refused ones are removed once written.
    deadline = time.monotonic() + 10
    while Spool(gateway.spool_dir).incoming_leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Spool(gateway.spool_dir).incoming_leftovers() == []


def rejection(port: int, called: str, calling: str) -> tuple[int, int, int]:
    """(result, source, reason) of the A-ASSOCIATE-RJ the listener answers, read by btd's own requestor.

    Why not pynetdicom's: once (CI, 2026-12-03) its AE.associate came back neither rejected nor established
    although the listener had sent the rejection (its ACSE leaves both flags unset when no A-ASSOCIATE answer
    reaches it in time, or the connection goes first). storescu is the real peer in the tests that need one."""
    with pytest.raises(scu.AssociationRejected) as rejected:
        scu.Association.request("127.0.0.1", port, called, calling, [(Verification, "1.2.840.10008.1.2")])
    return rejected.value.result, rejected.value.source, rejected.value.reason


def test_unknown_calling_ae_is_rejected(tmp_path: Path) -> None:
    with running_listener(tmp_path, allowed_aets=["PACS"]) as settings:
        assert rejection(settings.dicom_port, called=settings.ae_title, calling="INTRUDER") == (0x01, 0x01, 0x03)
        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
        assert assoc.is_established
        assoc.release()


def test_a_called_ae_title_other_than_ours_is_rejected_as_not_recognised(tmp_path: Path) -> None:
    """A PACS node configured for another receiver must be told (PS3.8 reason 7), not silently served."""
    with running_listener(tmp_path / "a") as settings:
        wrong = subprocess.run(
            ["storescu", "-v", "-aet", "PACS", "-aec", "NOTBTD", "127.0.0.1", str(settings.dicom_port), str(CT_SMALL)],
            env=dict(os.environ, TCP_NODELAY="1"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert wrong.returncode != 0
        assert "Called AE Title Not Recognized" in wrong.stderr + wrong.stdout
        assert spool_files(settings) == [] and rows_for(settings) == []
        assert storescu(settings, str(CT_SMALL)).returncode == 0  # called by our own title: served
    with running_listener(tmp_path / "b", called_aets=["BTD", "BTD-ALIAS"]) as settings:
        for title in ("BTD", "BTD-ALIAS"):
            ae = AE(ae_title="PACS")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=title)
            assert assoc.is_established, title
            assoc.release()
        assert rejection(settings.dicom_port, called="OTHER", calling="PACS") == (0x01, 0x01, 0x07)


def test_peer_address_outside_the_allow_list_is_rejected(tmp_path: Path) -> None:
    with running_listener(tmp_path / "a", allowed_ips=["10.255.255.0/24"]) as settings:
        results = sender.send_files([fresh_ct()], "127.0.0.1", settings.dicom_port, settings.ae_title)
        assert results[0].status is None
        assert results[0].error == "association rejected: no reason given (permanent; source 1, reason 1)"
        assert spool_files(settings) == []
    with running_listener(tmp_path / "b", allowed_ips=["10.255.255.0/24", "127.0.0.0/8"]) as settings:
        results = sender.send_files([fresh_ct()], "127.0.0.1", settings.dicom_port, settings.ae_title)
        assert results[0].status == 0


def refused_count() -> float:
    return REGISTRY.get_sample_value("btd_instances_received_total", {"status": "0xA700"}) or 0.0


def test_below_the_free_space_watermark_nothing_is_written(tmp_path: Path) -> None:
    before = refused_count()
    with running_listener(tmp_path, min_free_bytes=2**62) as settings:
        done = storescu(settings, str(CT_SMALL), options=("-v",))
        assert "Refused: OutOfResources" in done.stderr
        results = sender.send_files([fresh_ct()], "127.0.0.1", settings.dicom_port, settings.ae_title)
        assert results[0].status == 0xA700
        assert spool_files(settings) == []
        assert rows_for(settings) == []
    assert refused_count() == before + 2  # counted in the Prometheus metrics


def test_an_instance_over_the_size_cap_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    before = refused_count()
    with running_listener(tmp_path, max_instance_bytes=100_000) as settings:
        done = storescu(
            settings, str(FIXTURES / "ct_series_20"), str(CT_SMALL), options=("-v", "-nh", "-xv", "+sd", "+sp", "CT.*")
        )
        assert "Refused: OutOfResources" in done.stderr
        # every ~157 kB slice of the series refused, the 39 kB CT_small after them stored
        assert [row.sop_instance_uid for row in rows_for(settings)] == [dcmread(CT_SMALL).SOPInstanceUID]
        assert len(spool_files(settings)) == 1
    assert refused_count() == before + 20


def test_logs_carry_uids_never_patient_identity(gateway: Settings, caplog: pytest.LogCaptureFixture) -> None:
    ds = fresh_ct(PatientName="Secret^Patient", PatientID="PID-SECRET-42")
    with caplog.at_level(logging.INFO, logger="btd.listener"):
        assert sender.send_files([ds], "127.0.0.1", gateway.dicom_port, gateway.ae_title)[0].status == 0
    stored = [r for r in caplog.records if getattr(r, "event", "") == "instance.stored"]
    assert stored and stored[-1].fields["study_uid"] == ds.StudyInstanceUID  # type: ignore[attr-defined]
    rendered = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert ds.SOPInstanceUID in rendered
    assert "Secret" not in rendered and "PID-SECRET-42" not in rendered
    with session_scope(gateway) as session:  # kept in the database only, for the SR
        study = session.scalar(select(Study).where(Study.study_uid == ds.StudyInstanceUID))
        assert study is not None and study.patient_id == "PID-SECRET-42"


@pytest.mark.postgres
def test_database_unreachable_answers_out_of_resources(tmp_path: Path) -> None:
    with postgres_database() as url, running_listener(tmp_path, database_url=url) as settings:
        first = fresh_ct()
        assert sender.send_files([first], "127.0.0.1", settings.dicom_port, settings.ae_title)[0].status == 0
        with get_engine(settings).connect() as conn:
            name = conn.execute(text("SELECT current_database()")).scalar_one()
        from helpers_gateway import drop_postgres_database

        drop_postgres_database(name)  # the database disappears under the running listener
        second = fresh_ct()
        assert sender.send_files([second], "127.0.0.1", settings.dicom_port, settings.ae_title)[0].status == 0xA700
        assert [p.name for p in spool_files(settings)] == [f"{first.SOPInstanceUID}.v1.dcm"]


@pytest.mark.postgres
def test_a_connection_the_server_dropped_is_replaced_without_failing_the_instance(tmp_path: Path) -> None:
    """The listener does not ping pooled connections before use (a round trip per instance); when Postgres
    has dropped one (restart, idle timeout), the store is retried once on a new connection."""
    with postgres_database() as url, running_listener(tmp_path, database_url=url) as settings:
        first = fresh_ct()
        assert sender.send_files([first], "127.0.0.1", settings.dicom_port, settings.ae_title)[0].status == 0
        from helpers_gateway import POSTGRES_ADMIN_URL
        from sqlalchemy import create_engine

        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                name = url.rsplit("/", 1)[1]
                killed = conn.execute(
                    text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": name},
                ).scalar_one()
        finally:
            admin.dispose()
        assert killed >= 1, "the listener's pooled connection was open"
        second = fresh_ct()
        assert sender.send_files([second], "127.0.0.1", settings.dicom_port, settings.ae_title)[0].status == 0
        assert {row.sop_instance_uid for row in rows_for(settings)} == {first.SOPInstanceUID, second.SOPInstanceUID}
        assert len(spool_files(settings)) == 2


@pytest.mark.postgres
def test_a_row_that_cannot_be_committed_leaves_no_file_behind(tmp_path: Path) -> None:
    """The bytes are written before the row; if the row then fails, the file is removed again."""
    with postgres_database() as url, running_listener(tmp_path, database_url=url) as settings:
        with get_engine(settings).begin() as conn:
            conn.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ "
                    "LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text("CREATE TRIGGER refuse BEFORE INSERT ON instances FOR EACH ROW EXECUTE FUNCTION refuse()")
            )
        ds = fresh_ct()
        assert sender.send_files([ds], "127.0.0.1", settings.dicom_port, settings.ae_title)[0].status == 0xA700
        assert spool_files(settings) == []
        with get_engine(settings).begin() as conn:
            conn.execute(text("DROP TRIGGER refuse ON instances"))
        assert sender.send_files([ds], "127.0.0.1", settings.dicom_port, settings.ae_title)[0].status == 0
        assert [p.name for p in spool_files(settings)] == [f"{ds.SOPInstanceUID}.v1.dcm"]


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_concurrent_associations_for_one_study(database: str, tmp_path: Path) -> None:
    """Four PACS threads send one study's slices at once: one study row, every instance counted once."""
    files = sorted((FIXTURES / "ct_series_20").glob("CT.*"))
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if database == "postgres" else None
        settings = stack.enter_context(running_listener(tmp_path, database_url=url))
        results: list[list[sender.SendResult]] = [[] for _ in range(4)]

        def send(k: int) -> None:
            results[k] = sender.send_files(files[k::4], "127.0.0.1", settings.dicom_port, "BTD", f"PACS{k}")

        threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(r.status for batch in results for r in batch) == [0] * 20
        with session_scope(settings) as session:
            studies = session.scalars(select(Study)).all()
            assert len(studies) == 1 and studies[0].n_instances == 20
            assert session.scalar(select(func.count()).select_from(Instance)) == 20
        assert len(spool_files(settings)) == 20
