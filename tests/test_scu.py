"""btd's own requestor (core/dicom/scu.py, core/dicom/sender.py) and `btd send` against real peers: dcmtk
storescp, pynetdicom's codecs, and btd's listener.

What is checked here beyond tests/test_send.py: the A-ASSOCIATE-RQ we write decodes with pynetdicom's
decoder as what we meant; datasets are streamed in fragments no larger than the peer's maximum PDU and
arrive byte for byte; several associations at once store everything; `btd send` reports counts per status
and lists failures; and sending files imports neither pydicom nor pynetdicom (start-up time).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_gateway import PYTHON, REPO_ROOT, free_port, wait_for_port
from prometheus_client import REGISTRY
from pydicom import dcmread
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import ImplementationClassUIDNotification, MaximumLengthNotification
from sqlalchemy import func, select

from core.db import migrate
from core.db.schema import Instance
from core.db.session import dispose_engines, session_scope
from core.dicom import scu, sender
from core.dicom.wire import associate_rq_pdu
from core.settings import Settings
from service.dicom.listener import start_listener

pytestmark = pytest.mark.timeout(120)

FIXTURES = Path(__file__).parent / "fixtures"
SERIES = FIXTURES / "ct_series_20"
CT_SMALL = FIXTURES / "pydicom" / "CT_small.dcm"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def dataset_part(path: Path) -> bytes:
    data = path.read_bytes()
    return data[144 + int.from_bytes(data[140:144], "little") :]


def series_files() -> list[Path]:
    return sorted(p for p in SERIES.iterdir() if p.name.startswith("CT."))


@pytest.fixture()
def small_pdu_storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """storescp accepting at most 4096-byte PDUs (its smallest), so every dataset goes in many fragments."""
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "+xa", "+B", "--max-pdu", "4096", "-aet", "SMALLPDU", "-od", str(out), str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(data_dir=tmp_path / "btd", dicom_host="127.0.0.1", dicom_port=free_port(), min_free_bytes=0)
    migrate.upgrade(settings)
    server = start_listener(settings)
    try:
        yield settings
    finally:
        server.shutdown()
        dispose_engines()


def test_our_associate_request_decodes_with_pynetdicom() -> None:
    pdu = associate_rq_pdu(
        "CALLING",
        "CALLED",
        [(1, CT_IMAGE, ["1.2.840.10008.1.2.1"]), (3, "1.2.840.10008.5.1.4.1.1.88.22", ["1.2.840.10008.1.2"])],
        max_pdu=0,
        implementation_uid=scu.IMPLEMENTATION_UID,
        implementation_version=scu.IMPLEMENTATION_VERSION,
    )
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(pdu)
    primitive = decoded.to_primitive()
    assert (primitive.calling_ae_title, primitive.called_ae_title) == ("CALLING", "CALLED")
    assert str(primitive.application_context_name) == "1.2.840.10008.3.1.1.1"
    contexts = {
        cx.context_id: (str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
        for cx in primitive.presentation_context_definition_list
    }
    assert contexts == {
        1: (CT_IMAGE, ["1.2.840.10008.1.2.1"]),
        3: ("1.2.840.10008.5.1.4.1.1.88.22", ["1.2.840.10008.1.2"]),
    }
    user = {type(item): item for item in primitive.user_information}
    assert user[MaximumLengthNotification].maximum_length_received == 0
    assert user[ImplementationClassUIDNotification].implementation_class_uid == scu.IMPLEMENTATION_UID


def test_datasets_go_in_fragments_within_the_peers_maximum_pdu(small_pdu_storescp: tuple[int, Path]) -> None:
    port, out = small_pdu_storescp
    files = series_files()[:3] + [CT_SMALL]
    association = scu.Association.request("127.0.0.1", port, "SMALLPDU", "BTDTEST", [(CT_IMAGE, "1.2.840.10008.1.2.1")])
    try:
        assert association.fragment == 4096 - 6  # the peer's maximum PDU minus the PDV item header
        assert association.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        association.release()
    results = sender.send_files(files, "127.0.0.1", port, "SMALLPDU", "BTDTEST")
    assert [r.status for r in results] == [0, 0, 0, 0]
    received = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    for source in files:  # each sent in dozens of fragments, reassembled byte for byte
        assert dataset_part(received[dcmread(source, stop_before_pixels=True).SOPInstanceUID]) == dataset_part(source)


def test_several_associations_store_every_instance_once(listener: Settings) -> None:
    accepted_before = REGISTRY.get_sample_value("btd_associations_total", {"outcome": "accepted"}) or 0.0
    seen: list[sender.SendResult] = []
    totals: list[int] = []
    results = sender.send_files(
        [SERIES],
        "127.0.0.1",
        listener.dicom_port,
        "BTD",
        "MULTI",
        associations=4,
        on_result=seen.append,
        on_total=totals.append,
    )
    assert [r.status for r in results] == [0] * 20
    assert [r.path for r in results] == [str(p) for p in series_files()]  # in input order
    assert totals == [20] and sorted(r.sop_instance_uid or "" for r in seen) == sorted(
        r.sop_instance_uid or "" for r in results
    )
    accepted = REGISTRY.get_sample_value("btd_associations_total", {"outcome": "accepted"}) or 0.0
    assert accepted - accepted_before == 4
    with session_scope(listener) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 20


def test_btd_send_summarises_statuses_and_lists_failures(listener: Settings, tmp_path: Path) -> None:
    notes = tmp_path / "notes.dcm"
    notes.write_bytes(b"\0" * 128 + b"DICM" + b"broken")  # a DICM prefix, but no File Meta after it
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "btd.cli",
            "send",
            str(SERIES),
            str(notes),
            "--port",
            str(listener.dicom_port),
            "--quiet",
            "--associations",
            "3",
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        f"FAIL ---- {notes}  unreadable File Meta: ValueError: no MediaStorageSOPClassUID"
    ]
    assert "0x0000     20  success" in done.stderr
    assert "----        1  unreadable File Meta: ValueError: no MediaStorageSOPClassUID\n" in done.stderr
    assert f"failed (1):\n  FAIL ---- {notes}" in done.stderr
    assert "over 3 association(s)" in done.stderr and done.stderr.rstrip().endswith("20 sent, 1 failed")


def test_sending_files_imports_neither_pydicom_nor_pynetdicom(listener: Settings) -> None:
    """`btd send` is an operator's tool and the ingest benchmark times it from its start: importing pydicom
    and pynetdicom took about a second on the benchmark machine, longer than sending 128 instances."""
    code = (
        "import sys; from btd.cli import main; "
        f"code = main(['send', {str(CT_SMALL)!r}, '--port', '{listener.dicom_port}', '--quiet']); "
        "print(code, sorted(m for m in ('pydicom', 'pynetdicom', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr
