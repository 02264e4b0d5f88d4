"""The listener's DICOM upper layer (service/dicom/scp.py) against real peers and raw protocol bytes.

The real C-STORE handler is covered by test_listener.py; here a recording handler stands in for it so that
these tests look only at what the upper layer owns: negotiation, PDU framing and fragmentation, DIMSE
command sets, protocol violations, association limits and shutdown.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from helpers_gateway import free_port, self_signed_certificate
from pydicom import dcmread
from pydicom.filereader import read_dataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.dicom.listener import supported_contexts
from service.dicom.scp import (
    AcceptorSettings,
    DicomServer,
    StoreRequest,
    p_data_pdus,
    parse_command,
    read_pdu,
    recv_exactly,
    response_command,
)

pytestmark = pytest.mark.timeout(60)

CT_SMALL = Path(__file__).parent / "fixtures" / "pydicom" / "CT_small.dcm"
CT_SERIES = Path(__file__).parent / "fixtures" / "ct_series_20"


class Recorder:
    """Records every complete C-STORE the upper layer hands over, and answers success."""

    def __init__(self) -> None:
        self.requests: list[StoreRequest] = []
        self.release = threading.Event()
        self.release.set()
        self.closed_after: int | None = None  # requests answered when the server closed the handler

    def __call__(self, request: StoreRequest) -> tuple[int, str | None]:
        self.release.wait(10)
        self.requests.append(request)
        return 0x0000, None

    def close(self) -> None:
        self.closed_after = len(self.requests)


@contextlib.contextmanager
def running_server(**overrides: object) -> Iterator[tuple[DicomServer, Recorder]]:
    recorder = Recorder()
    acceptor = AcceptorSettings(contexts=list(supported_contexts()))
    for key, value in overrides.items():
        setattr(acceptor, key, value)
    server = DicomServer(("127.0.0.1", free_port()), acceptor, recorder)
    server.start()
    try:
        yield server, recorder
    finally:
        server.shutdown(timeout=5)


def associate_rq(contexts: list[tuple[int, str, list[str]]], max_pdu: int = 16384) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID("1.2.840.10008.3.1.1.1")
    primitive.calling_ae_title = "RAWPEER"
    primitive.called_ae_title = "BTD"
    for context_id, abstract, syntaxes in contexts:
        context = build_context(abstract, syntaxes)
        context.context_id = context_id
        primitive.presentation_context_definition_list.append(context)
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


@contextlib.contextmanager
def raw_association(server: DicomServer, contexts: list[tuple[int, str, list[str]]]) -> Iterator[socket.socket]:
    """A TCP connection that has sent an A-ASSOCIATE-RQ; the caller reads the answer."""
    sock = socket.create_connection(server.server_address[:2], timeout=10)
    with sock:
        sock.sendall(associate_rq(contexts))
        yield sock


def accepted(sock: socket.socket) -> A_ASSOCIATE:
    pdu = read_pdu(sock)
    assert pdu is not None and pdu[0] == 0x02, f"expected A-ASSOCIATE-AC, got {pdu and pdu[0]}"
    answer = A_ASSOCIATE_AC()
    answer.decode(struct.pack(">BBI", 0x02, 0, len(pdu[1])) + bytes(pdu[1]))
    return answer.to_primitive()


def assert_still_serving(server: DicomServer) -> None:
    """After whatever ended an association, a new peer is accepted and answered."""
    ae = AE(ae_title="AFTER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="BTD")
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()


def assert_no_associations_left(server: DicomServer, within: float) -> None:
    deadline = time.monotonic() + within
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.active_associations == []


def request_command(command_field: int, message_id: int, sop_class: str) -> bytes:
    """A request command set without a dataset (Implicit VR Little Endian), built like a peer would."""
    raw = sop_class.encode() + (b"\0" if len(sop_class) % 2 else b"")
    body = struct.pack("<HHI", 0, 0x0002, len(raw)) + raw
    body += struct.pack("<HHIH", 0, 0x0100, 2, command_field)
    body += struct.pack("<HHIH", 0, 0x0110, 2, message_id)
    body += struct.pack("<HHIH", 0, 0x0800, 2, 0x0101)
    return struct.pack("<HHII", 0, 0x0000, 4, len(body)) + body


def read_response(sock: socket.socket) -> dict[int, bytes]:
    command = bytearray()
    while True:
        pdu = read_pdu(sock)
        assert pdu is not None and pdu[0] == 0x04, f"expected P-DATA-TF, got {pdu and pdu[0]}"
        body = pdu[1]
        offset = 0
        while offset < len(body):
            length, _context, control = struct.unpack_from(">IBB", body, offset)
            command += body[offset + 6 : offset + 4 + length]
            offset += 4 + length
            if control == 0x03:
                return parse_command(command)


def us(elements: dict[int, bytes], element: int) -> int:
    return struct.unpack("<H", elements[element])[0]


def test_pdu_reads_return_exactly_what_was_asked_or_what_came_before_close() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        payload = bytes(range(256)) * 2048  # 512 KiB, more than one kernel buffer
        sending = threading.Thread(target=peer.sendall, args=(payload + b"tail",))
        sending.start()
        assert recv_exactly(ours, len(payload)) == payload
        sending.join()
        peer.close()
        assert recv_exactly(ours, 10) == b"tail"
    lying, peer = socket.socketpair()
    with lying, peer:  # a header announcing 4 GiB, then 3 bytes and a close: no 4 GiB buffer
        peer.sendall(b"abc")
        peer.close()
        assert recv_exactly(lying, 0xFFFFFFFF) == b"abc"


def test_response_command_set_decodes_as_dicom() -> None:
    """pydicom reads our hand-packed C-STORE-RSP back, group length included."""
    raw = response_command(0x8001, 7, 0xC210, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "dataset does not decode")
    ds = read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.CommandField == 0x8001 and ds.MessageIDBeingRespondedTo == 7 and ds.CommandDataSetType == 0x0101
    assert ds.Status == 0xC210 and ds.ErrorComment == "dataset does not decode"
    assert ds.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.AffectedSOPInstanceUID == "1.2.3.45"


def test_p_data_fragments_respect_the_peers_maximum_pdu_length() -> None:
    command = response_command(0x8001, 1, 0, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")
    stream = BytesIO(p_data_pdus(5, command, max_pdu=40))
    pieces, controls = [], []
    while header := stream.read(6):
        pdu_type, _, length = struct.unpack(">BBI", header)
        assert pdu_type == 0x04 and length <= 40
        item_length, context_id, control = struct.unpack(">IBB", stream.read(6))
        assert context_id == 5 and item_length == length - 4
        pieces.append(stream.read(item_length - 2))
        controls.append(control)
    assert b"".join(pieces) == command
    assert len(pieces) > 1 and controls == [0x01] * (len(pieces) - 1) + [0x03]


def test_negotiation_accepts_supported_syntaxes_and_refuses_the_rest() -> None:
    with (
        running_server() as (server, _),
        raw_association(
            server,
            [
                (1, CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian]),
                (3, "1.2.3.4.5.6", [ImplicitVRLittleEndian]),  # no such abstract syntax
                (5, Verification, ["1.2.840.10008.1.2.4.50"]),  # Verification over JPEG: no common syntax
            ],
        ) as sock,
    ):
        results = {cx.context_id: cx for cx in accepted(sock).presentation_context_definition_results_list}
        assert results[1].result == 0x00 and results[1].transfer_syntax[0] == ExplicitVRLittleEndian
        assert results[3].result == 0x03  # abstract syntax not supported
        assert results[5].result == 0x04  # transfer syntaxes not supported


def test_a_repeated_association_request_is_decoded_once_and_judged_every_time() -> None:
    """storescu proposes 128 contexts in the same ~9.6 kB request every time: it is decoded and negotiated once;
    the checks that belong to the connection (the peer's address, its AE title) still run for each."""
    path = sorted(CT_SERIES.glob("CT.*"))[0]
    with running_server() as (server, recorder):
        port = str(server.server_address[1])
        store = ["storescu", "-xv", "-aet", "REPEAT", "-aec", "BTD", "127.0.0.1", port, str(path)]

        def send() -> subprocess.CompletedProcess[str]:
            return subprocess.run(store, capture_output=True, text=True, timeout=30)

        for _ in range(3):
            assert send().returncode == 0
        assert len(recorder.requests) == 3 and server.negotiations.decoded == 1
        server.acceptor.peer_allowed = lambda _address: False
        refused = send()
        assert refused.returncode != 0 and "Association Rejected" in refused.stderr + refused.stdout
        server.acceptor.peer_allowed = lambda _address: True
        server.acceptor.allowed_aets = ["SOMEONE"]
        assert send().returncode != 0
        server.acceptor.allowed_aets = []
        assert send().returncode == 0
        assert len(recorder.requests) == 4 and server.negotiations.decoded == 1
        assert_still_serving(server)  # pynetdicom's request: another one, decoded for itself
        assert server.negotiations.decoded == 2


def test_negotiations_keep_the_latest_requests_and_answer_as_a_fresh_negotiation() -> None:
    from service.dicom.negotiation import KEPT_REQUEST_BYTES, Negotiations
    from service.dicom.scp import ProtocolError

    def body(context_id: int, max_pdu: int = 16384) -> bytes:
        return associate_rq([(context_id, CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian])], max_pdu)[6:]

    negotiations = Negotiations(list(supported_contexts()), kept=2)
    first = negotiations.request(body(1))
    assert first.peer_max_pdu == 16384 and first.calling == "RAWPEER" and first.called == "BTD"
    assert dict(first.acceptance.syntaxes) == {1: ExplicitVRLittleEndian}
    assert negotiations.request(body(1)) is first and negotiations.decoded == 1
    fresh = Negotiations(list(supported_contexts())).request(body(1))
    assert fresh.acceptance.accept_pdu == first.acceptance.accept_pdu
    negotiations.request(body(3))
    negotiations.request(body(5, max_pdu=4096))  # a third distinct request: the least recently used goes
    assert negotiations.decoded == 3 and negotiations.request(body(5, max_pdu=4096)).peer_max_pdu == 4096
    assert negotiations.request(body(1)) is not first and negotiations.decoded == 4
    with pytest.raises(ProtocolError):
        negotiations.request(b"\x00\x01 not a request")
    assert negotiations.decoded == 4
    syntaxes = [f"1.2.840.10008.1.2.4.{n}" for n in range(50, 90)]
    many = [(n, CTImageStorage, syntaxes) for n in range(1, 256, 2)]  # 128 contexts of 40 syntaxes: not kept
    huge = associate_rq(many)[6:]
    assert len(huge) > KEPT_REQUEST_BYTES
    assert negotiations.request(huge) is not negotiations.request(huge) and negotiations.decoded == 4
    assert negotiations.request(body(1)).peer_max_pdu == 16384  # what was kept stayed


def test_unsupported_requests_are_answered_and_the_association_goes_on() -> None:
    with (
        running_server() as (server, _),
        raw_association(server, [(1, Verification, [ImplicitVRLittleEndian])]) as sock,
    ):
        accepted(sock)
        sock.sendall(p_data_pdus(1, request_command(0x0020, 11, Verification), 0))  # C-FIND-RQ
        answer = read_response(sock)
        assert us(answer, 0x0100) == 0x8020 and us(answer, 0x0120) == 11 and us(answer, 0x0900) == 0x0211
        sock.sendall(p_data_pdus(1, request_command(0x0030, 12, Verification), 0))  # C-ECHO-RQ
        answer = read_response(sock)
        assert us(answer, 0x0100) == 0x8030 and us(answer, 0x0120) == 12 and us(answer, 0x0900) == 0x0000
        sock.sendall(struct.pack(">BBII", 0x05, 0, 4, 0))  # A-RELEASE-RQ
        assert read_pdu(sock) == (0x06, bytearray(4))
        assert read_pdu(sock) is None


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (struct.pack(">BBI", 0x09, 0, 2) + b"\0\0", 0x01),  # unknown PDU type
        (associate_rq([(1, Verification, [ImplicitVRLittleEndian])]), 0x02),  # a second A-ASSOCIATE-RQ
        (p_data_pdus(7, request_command(0x0030, 1, Verification), 0), 0x06),  # context 7 was never accepted
    ],
)
def test_protocol_violations_abort_and_the_listener_goes_on(payload: bytes, reason: int) -> None:
    with running_server() as (server, _):
        with raw_association(server, [(1, Verification, [ImplicitVRLittleEndian])]) as sock:
            accepted(sock)
            sock.sendall(payload)
            assert read_pdu(sock) == (0x07, bytearray([0, 0, 0x02, reason]))  # A-ABORT from the provider
            assert read_pdu(sock) is None
        assert_still_serving(server)


def test_after_an_abort_the_listener_waits_for_the_peer_to_close() -> None:
    """PS3.8 state Sta13: after A-ABORT the provider leaves closing to the peer (for up to the ARTIM time),
    dropping what is still in flight, so that a TCP reset cannot destroy the abort before the peer reads
    it; once the peer closes, the association ends at once."""
    verification = [(1, Verification, [ImplicitVRLittleEndian])]
    with running_server() as (server, _), raw_association(server, verification) as sock:
        accepted(sock)
        junk = struct.pack(">BBI", 0x09, 0, 2) + b"\0\0" + bytes(1 << 20)  # unknown PDU, then 1 MB more

        def send_all() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(junk)

        sending = threading.Thread(target=send_all)
        sending.start()
        assert read_pdu(sock) == (0x07, bytearray([0, 0, 0x02, 0x01]))
        sending.join(10)
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # not closed under us: the listener waits for our close
            sock.recv(1)
        assert len(server.active_associations) == 1
        sock.close()
        assert_no_associations_left(server, within=1.0)


def test_an_association_silent_past_the_network_timeout_is_aborted() -> None:
    """An established association that sends nothing for the network timeout ends with A-ABORT (a PACS
    that died mid-study must not hold a thread and an association slot forever); the listener goes on."""
    verification = [(1, Verification, [ImplicitVRLittleEndian])]
    with running_server(network_timeout=1.0) as (server, _):
        with raw_association(server, verification) as sock:
            accepted(sock)
            started = time.monotonic()
            assert read_pdu(sock) == (0x07, bytearray([0, 0, 0x02, 0x00]))  # A-ABORT from the provider
            assert 0.8 < time.monotonic() - started < 8
        assert_still_serving(server)


def test_a_connection_silent_before_its_association_request_is_ended_after_the_acse_timeout() -> None:
    with running_server(acse_timeout=1.0) as (server, _):
        sock = socket.create_connection(server.server_address[:2], timeout=10)
        with sock:
            started = time.monotonic()
            assert read_pdu(sock) == (0x07, bytearray([0, 0, 0x02, 0x00]))
            assert 0.8 < time.monotonic() - started < 8
        assert_no_associations_left(server, within=5.0)


def test_associations_beyond_the_limit_are_rejected_transiently() -> None:
    verification = [(1, Verification, [ImplicitVRLittleEndian])]
    with running_server(max_associations=1) as (server, _), raw_association(server, verification) as first:
        accepted(first)
        with raw_association(server, verification) as second:
            # A-ASSOCIATE-RJ: transient (2), service provider presentation (3), local limit exceeded (2)
            assert read_pdu(second) == (0x03, bytearray([0, 2, 3, 2]))


def test_storescu_fragments_are_reassembled_byte_for_byte() -> None:
    """storescu limited to 4 kB PDUs splits a 157 kB CT slice over ~40 P-DATA-TF PDUs: the handler gets the
    dataset exactly as in the file (storescu sends it unchanged with -xv, as test_listener.py relies on)."""
    path = sorted(CT_SERIES.glob("CT.*"))[0]
    raw = path.read_bytes()
    source = dcmread(path)
    dataset_part = raw[144 + int.from_bytes(raw[140:144], "little") :]
    with running_server() as (server, recorder):
        env = dict(os.environ, TCP_NODELAY="1")
        port = str(server.server_address[1])
        cmd = ["storescu", "-xv", "--max-send-pdu", "4096", "-aet", "FRAG", "-aec", "BTD", "127.0.0.1", port]
        done = subprocess.run([*cmd, str(path)], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    [request] = recorder.requests
    assert len(request.dataset) == len(dataset_part) > 30 * 4096
    assert request.dataset == dataset_part
    assert request.sop_instance_uid == source.SOPInstanceUID and request.sop_class_uid == source.SOPClassUID
    assert request.transfer_syntax == source.file_meta.TransferSyntaxUID and request.peer.ae_title == "FRAG"


def test_a_dataset_over_the_cap_is_dropped_as_it_arrives_and_the_association_goes_on() -> None:
    """The cap bounds what one message may hold in memory: a larger C-STORE reaches the handler without its
    dataset, flagged with its size (the listener refuses it, test_listener.py), and a smaller instance after
    it on the same association arrives whole."""
    large = dcmread(sorted(CT_SERIES.glob("CT.*"))[0])  # ~157 kB of dataset
    small = dcmread(CT_SMALL)  # ~39 kB
    with running_server(max_dataset_bytes=100_000) as (server, recorder):
        ae = AE(ae_title="CAPPED")
        for dataset in (large, small):
            ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="BTD", max_pdu=16384)
        assert assoc.is_established
        assert assoc.send_c_store(large).Status == 0x0000  # what the recorder answers
        assert assoc.send_c_store(small).Status == 0x0000
        assoc.release()
    dropped, stored = recorder.requests
    assert dropped.sop_instance_uid == large.SOPInstanceUID and dropped.dataset == b""
    assert dropped.dropped_bytes > 100_000
    assert stored.sop_instance_uid == small.SOPInstanceUID and stored.dropped_bytes == 0
    assert len(stored.dataset) > 30_000


def test_an_endless_command_set_is_aborted() -> None:
    """Command fragments are held until the last one: a peer that never ends its command set is aborted
    once it passes 64 kB, instead of growing the listener's memory without bound."""
    verification = [(1, Verification, [ImplicitVRLittleEndian])]
    fragment = bytes(16_000)
    pdu = struct.pack(">BBII", 0x04, 0, 6 + len(fragment), 2 + len(fragment)) + bytes([1, 0x01]) + fragment
    with running_server() as (server, _), raw_association(server, verification) as sock:
        accepted(sock)
        for _ in range(5):  # 80 kB of command, never marked last
            sock.sendall(pdu)
        assert read_pdu(sock) == (0x07, bytearray([0, 0, 0x02, 0x06]))


def test_a_pdu_longer_than_any_acceptable_message_is_aborted_before_it_is_read() -> None:
    verification = [(1, Verification, [ImplicitVRLittleEndian])]
    with running_server(max_dataset_bytes=100_000) as (server, _), raw_association(server, verification) as sock:
        accepted(sock)
        sock.sendall(struct.pack(">BBI", 0x04, 0, 1 << 30))  # announces a 1 GiB P-DATA-TF, sends none of it
        assert read_pdu(sock) == (0x07, bytearray([0, 0, 0x02, 0x06]))  # A-ABORT: invalid PDU parameter


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts around a self-signed certificate for 127.0.0.1."""
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(cert), str(key))
    return server, ssl.create_default_context(cafile=str(cert))


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_shutdown_lets_the_store_in_flight_answer_then_ends_the_association(
    tls: bool, request: pytest.FixtureRequest
) -> None:
    """Also over TLS: the answer written after shutdown began must still go out inside the TLS session."""
    server_context, client_context = request.getfixturevalue("tls_contexts") if tls else (None, None)
    with running_server(ssl_context=server_context) as (server, recorder):
        recorder.release.clear()  # the handler holds the first instance until released
        ae = AE(ae_title="INFLIGHT")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        tls_args = (client_context, "127.0.0.1") if client_context else None
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="BTD", tls_args=tls_args)
        assert assoc.is_established
        ds = dcmread(CT_SMALL)
        statuses: list[int] = []
        sending = threading.Thread(target=lambda: statuses.append(assoc.send_c_store(ds).Status))
        sending.start()
        deadline = time.monotonic() + 10
        while not any(a.busy for a in server.active_associations) and time.monotonic() < deadline:
            time.sleep(0.01)
        stopping = threading.Thread(target=server.shutdown)
        stopping.start()
        time.sleep(0.2)
        assert stopping.is_alive(), "shutdown waits for the handler in flight"
        recorder.release.set()
        stopping.join(10)
        sending.join(10)
        assert not stopping.is_alive() and statuses == [0x0000]
        assert len(recorder.requests) == 1
        assert recorder.closed_after == 1, "the handler is closed after the store in flight answered"
        deadline = time.monotonic() + 10
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert assoc.is_aborted, "the peer is told the association ended"
