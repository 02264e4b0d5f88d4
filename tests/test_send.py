"""`btd send` and core.dicom.sender against dcmtk storescp (a real peer), and TCP_NODELAY on both
ends of our own associations."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_gateway import PYTHON, REPO_ROOT, free_port, self_signed_certificate, wait_for_port
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from btd.cli import main as cli_main
from core.db import migrate
from core.db.session import dispose_engines
from core.dicom import sender
from core.settings import Settings
from service.dicom.listener import start_listener

FIXTURES = Path(__file__).parent / "fixtures"
SERIES = FIXTURES / "ct_series_20"


def dataset_part(path: Path) -> bytes:
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    return data[144 + int.from_bytes(data[140:144], "little") :]


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp accepting every transfer syntax (+xa), writing what it receives to a folder."""
    out = tmp_path_factory.mktemp("storescp")
    port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen(
        ["storescp", "+xa", "-aet", "STORESCP", "-od", str(out), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def btd_send(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "btd.cli", "send", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_btd_send_a_folder_to_storescp(storescp: tuple[int, Path]) -> None:
    port, out = storescp
    done = btd_send(str(SERIES), "--host", "127.0.0.1", "--port", str(port), "--aet", "STORESCP")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "20 sent, 0 failed" in done.stderr
    assert done.stdout.count("OK   0x0000") == 20
    sources = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in SERIES.glob("CT.*")}
    received = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    assert set(sources) <= set(received)
    for uid, source in sources.items():  # sent as stored: JPEG 2000 bytes unchanged
        assert dataset_part(received[uid]) == dataset_part(source)


def test_btd_send_fails_loudly(storescp: tuple[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port, _ = storescp
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not an image")
    ct = str(FIXTURES / "pydicom" / "CT_small.dcm")
    assert cli_main(["send", str(not_dicom), ct, "--port", str(port), "--aet", "STORESCP"]) == 1
    out = capsys.readouterr().out
    assert "FAIL ---- " in out and "not a DICOM Part 10 file" in out
    assert "OK   0x0000" in out  # the good file still went
    closed_port = free_port()
    assert cli_main(["send", ct, "--port", str(closed_port), "--timeout", "2"]) == 1
    assert f"peer unreachable: Connection refused (127.0.0.1:{closed_port})" in capsys.readouterr().out
    missing = tmp_path / "gone.dcm"
    assert cli_main(["send", str(missing), ct, "--port", str(port), "--aet", "STORESCP"]) == 1
    captured = capsys.readouterr()
    assert f"FAIL ---- {missing}  no such file" in captured.out and "OK   0x0000" in captured.out
    assert "----        1  no such file\n" in captured.err


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("--associations", "0", "must be a finite number above 0, got 0"),
        ("--associations", "two", "'two' is not a number"),
        ("--timeout", "nan", "must be a finite number above 0, got nan"),
        ("--timeout", "-1", "must be a finite number above 0, got -1"),
        ("--port", "70000", "a port is 1-65535, got 70000"),
    ],
)
def test_btd_send_refuses_settings_that_cannot_send(argument: str, value: str, message: str) -> None:
    """Refused before anything is read or sent: 0 associations used to be taken as 1 without a word."""
    done = btd_send(str(SERIES), f"{argument}={value}")
    assert done.returncode == 2, done.stderr
    assert f"argument {argument}: {message}" in done.stderr and not done.stdout


def test_send_files_datasets_and_mixed_syntaxes(storescp: tuple[int, Path]) -> None:
    port, out = storescp
    ds = dcmread(FIXTURES / "pydicom" / "MR_small.dcm")
    results = sender.send_files(
        [ds, FIXTURES / "ct_transfer_syntaxes"], "127.0.0.1", port, "STORESCP", "BTDTEST", timeout=30
    )
    assert results[0].sop_instance_uid == ds.SOPInstanceUID and results[0].status == 0
    refused = {Path(r.path or "").name for r in results if not r.ok}
    # storescp +xa does not accept the JPEG processes 6/8, 10/12 and 14 (non-SV1): the peer's choice,
    # reported per file; everything else (the deflated file included) is stored.
    assert refused == {
        "CTImage.dcm_JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53.dcm",
        "CTImage.dcm_JPEGProcess10_12TransferSyntax_1.2.840.10008.1.2.4.55.dcm",
        "CTImage.dcm_JPEGProcess14TransferSyntax_1.2.840.10008.1.2.4.57.dcm",
    }
    assert all("No presentation context" in (r.error or "") for r in results if not r.ok)
    assert sum(r.ok for r in results) == len(results) - 3 >= 15


def test_more_than_128_contexts_are_split_over_associations() -> None:
    items = [sender._Item(Path(f"/x/{i}"), f"1.2.3.{i}", f"2.25.{i}", "1.2.840.10008.1.2.1") for i in range(130)]
    batches = list(sender._batches(items))
    assert [len(contexts) for contexts, _ in batches] == [128, 2]
    assert sum(len(batch) for _, batch in batches) == 130


def test_tcp_nodelay_is_set_on_both_ends(tmp_path: Path) -> None:
    """pynetdicom sets no TCP_NODELAY itself: our sender's handler and our listener do, so small PDUs never wait
    for an ACK."""
    settings = Settings(data_dir=tmp_path, dicom_host="127.0.0.1", dicom_port=free_port(), min_free_bytes=0)
    migrate.upgrade(settings)
    server = start_listener(settings)
    try:
        ae = AE(ae_title="NODELAY")
        ae.add_requested_context(Verification)
        assoc = ae.associate(
            "127.0.0.1", settings.dicom_port, ae_title="BTD", evt_handlers=[(evt.EVT_CONN_OPEN, sender._on_conn_open)]
        )
        assert assoc.is_established
        ours = assoc.dul.socket.socket
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        acceptors = server.active_associations
        assert acceptors, "the listener holds the association"
        theirs = acceptors[0].socket
        assert theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assoc.release()
    finally:
        server.shutdown()
        dispose_engines()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it serves as its own CA, for both ends)."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def test_dicom_tls_with_client_certificates(tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = tls_files
    settings = Settings(
        data_dir=tmp_path,
        dicom_host="127.0.0.1",
        dicom_port=free_port(),
        min_free_bytes=0,
        tls_cert=cert,
        tls_key=key,
        tls_ca=cert,
    )
    migrate.upgrade(settings)
    server = start_listener(settings)
    ct = FIXTURES / "pydicom" / "CT_small.dcm"
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        trusted.load_cert_chain(str(cert), str(key))
        ok = sender.send_files([ct], "127.0.0.1", settings.dicom_port, "BTD", "TLSOK", ssl_context=trusted, timeout=10)
        assert ok[0].status == 0
        anonymous = ssl.create_default_context(cafile=str(cert))  # no client certificate
        refused = sender.send_files(
            [ct], "127.0.0.1", settings.dicom_port, "BTD", "NOCERT", ssl_context=anonymous, timeout=10
        )
        assert refused[0].status is None
        plain = sender.send_files([ct], "127.0.0.1", settings.dicom_port, "BTD", "PLAIN", timeout=10)
        assert plain[0].status is None
        assert len([p for p in settings.spool_dir.rglob("*.dcm")]) == 1
    finally:
        server.shutdown()
        dispose_engines()


def test_instances_left_unanswered_by_a_dying_association_are_sent_again() -> None:
    """A peer that aborts the association in the middle of a series (as a crashed or overloaded PACS, or
    pynetdicom's own lost-response race, does): every instance still ends up stored exactly once."""
    from pynetdicom import AllStoragePresentationContexts

    stored: list[str] = []
    aborted: list[bool] = []

    def handle_store(event: evt.Event) -> int:
        if len(stored) == 5 and not aborted:
            aborted.append(True)
            event.assoc.abort()
            return 0xA700
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="FLAKY")
    ae.supported_contexts = AllStoragePresentationContexts
    from pydicom.uid import JPEG2000Lossless

    for context in ae.supported_contexts:
        context.transfer_syntax = [*context.transfer_syntax, JPEG2000Lossless]
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        results = sender.send_files([SERIES], "127.0.0.1", port, "FLAKY", timeout=10)
    finally:
        server.shutdown()
    files = [p for p in sorted(SERIES.iterdir()) if p.name.startswith("CT.")]
    assert aborted, "the peer never aborted: the test did not exercise the resend"
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert sorted(stored) == sorted(dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files)
