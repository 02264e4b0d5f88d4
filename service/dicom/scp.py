"""The listener's DICOM upper layer: one blocking thread per association, C-ECHO and C-STORE as SCP.

Why not pynetdicom's association machinery: it runs two polling threads per association (the DUL reactor
and the association reactor, each sleeping 1 ms between looks at its queues) and turns every PDU into
primitives and events on the way. Measured on the ingest benchmark (docs/bench/ingest.md), that was about
2 ms of latency and CPU per 0.5 MB instance, a third of the time a PACS waited for each answer. Here the
association's own thread reads each PDU as it arrives, hands a complete C-STORE to the handler and writes
the answer at once: nothing polls.

What still comes from pynetdicom is the acceptor's protocol knowledge: A-ASSOCIATE-RQ/AC decoding and
encoding (`pynetdicom.pdu`), presentation-context negotiation (`negotiate_as_acceptor`, SCP/SCU role
selection included) and the implementation UID, worked out once per distinct request
(service/dicom/negotiation.py). The fixed-layout PDUs (A-ASSOCIATE-RJ, A-RELEASE-RP,
A-ABORT), P-DATA-TF and the command sets (Implicit VR Little Endian, PS3.7 section 9.3 and annex E) are
btd's own codecs in `core.dicom.wire`, shared with the sender (`core.dicom.scu`), the requestor side.

Scope, as an acceptor (PS3.8 section 9): one outstanding operation at a time (no asynchronous operations
window is granted, so peers wait for each answer, as they do with Orthanc and storescp), the command set of
every request read, C-ECHO and C-STORE served, any other DIMSE request answered 0x0211 (unrecognised
operation), anything that breaks the protocol answered with A-ABORT.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import UID
from pynetdicom.presentation import PresentationContext

from core.dicom.wire import (
    A_ABORT_TYPE,
    A_ASSOCIATE_RQ_TYPE,
    A_RELEASE_RQ_TYPE,
    ABORT_INVALID_PARAMETER,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNISED_PDU,
    APPLICATION_CONTEXT,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    NO_DATASET,
    P_DATA_TF_TYPE,
    RELEASE_RP,
    UNRECOGNISED_OPERATION,
    ProtocolError,
    abort_pdu,
    command_ui,
    command_us,
    p_data_pdus,
    parse_command,
    read_pdu,
    recv_exactly,  # noqa: F401 - part of this module's interface, as before the codecs moved
    reject_pdu,
    response_command,
    uid_bytes,  # noqa: F401 - part of this module's interface, as before the codecs moved
)
from core.observability.logs import log_event
from service.dicom.negotiation import Negotiations, Request

log = logging.getLogger("btd.listener")

VERIFICATION = "1.2.840.10008.1.1"

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 section 9.3.4
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_CONTEXT_NAME = (0x01, 0x01, 0x02)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user: "called AE title not recognized" (PS3.8 9.3.4)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_TOO_MANY = (0x02, 0x03, 0x02)  # transient: local limit exceeded

_ARTIM_SECONDS = 2.0  # how long a rejected or aborted peer is given to close (PS3.8 9.1.5, state Sta13)
_DRAIN_LIMIT = 16 << 20  # bytes discarded at most meanwhile
_MAX_ASSOCIATE_RQ = 1 << 20  # an A-ASSOCIATE-RQ of 128 contexts is ~10 kB; more is not a real peer
_COMMAND_SLACK_BYTES = 64 * 1024  # the largest command set taken; room for it beside a dataset fragment in a PDU


@dataclass(frozen=True)
class Peer:
    ae_title: str
    address: str
    port: int


@dataclass(frozen=True)
class StoreRequest:
    """A complete C-STORE request: what the handler needs, nothing decoded beyond the command set."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    dataset: bytes  # the dataset exactly as the peer sent it, in `transfer_syntax`
    peer: Peer
    # > 0: the dataset was this long, over AcceptorSettings.max_dataset_bytes, and was dropped as it arrived
    # (`dataset` is empty); the handler must refuse it
    dropped_bytes: int = 0


# The handler answers a status code and an optional error comment (at most 64 characters are sent).
StoreHandlerType = Callable[[StoreRequest], tuple[int, str | None]]


@dataclass
class AcceptorSettings:
    contexts: list[PresentationContext]
    allowed_aets: list[str] = field(default_factory=list)
    called_aets: list[str] = field(default_factory=list)  # the titles we answer to; empty = any
    peer_allowed: Callable[[str], bool] = lambda _address: True
    max_associations: int = 64
    acse_timeout: float = 30.0
    network_timeout: float = 120.0
    ssl_context: ssl.SSLContext | None = None
    on_association: Callable[[str, Peer], None] = lambda _outcome, _peer: None
    # The largest dataset one C-STORE may carry. A message is held in memory until complete, so a peer
    # streaming an endless dataset would otherwise exhaust memory for every association: past the cap the
    # rest is read and dropped, and the handler gets the request with `dropped_bytes` set to refuse it.
    max_dataset_bytes: int = 2 * 1024**3


# ------------------------------------------------------------------------------------------ acceptor


def await_peer_close(sock: socket.socket, seconds: float = _ARTIM_SECONDS) -> None:
    """After A-ASSOCIATE-RJ or A-ABORT, read and discard until the peer closes or the ARTIM time is up.

    Why: closing a socket that still holds unread bytes (a peer in the middle of sending a dataset) makes
    the kernel answer with a TCP reset, which can destroy the reject or abort before the peer reads it."""
    deadline = time.monotonic() + seconds
    drained = 0
    with contextlib.suppress(OSError):  # a timeout or a reset: either way the wait is over
        while drained < _DRAIN_LIMIT:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                return
            drained += len(chunk)


# ------------------------------------------------------------------------------------------ association


@dataclass
class _Message:
    """A DIMSE message being received: its command fragments, then its dataset fragments."""

    context_id: int
    command: bytearray = field(default_factory=bytearray)
    elements: dict[int, bytes] | None = None
    dataset: list[memoryview] = field(default_factory=list)
    dataset_bytes: int = 0
    oversized: bool = False  # past AcceptorSettings.max_dataset_bytes: the rest is dropped as it arrives


class Association:
    """One accepted TCP connection, served on its own thread from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], server: DicomServer) -> None:
        self.socket = sock
        self.address = address
        self.server = server
        self.settings = server.acceptor
        self.peer = Peer("", address[0], address[1])
        self.called = ""  # the AE title the peer called us by
        # each accepted presentation context's transfer syntax, by context ID, built once per distinct request
        # (service/dicom/negotiation.py): a pydicom UID validates its value when made (~20 us, under the
        # interpreter lock, for every C-STORE before this)
        self.syntaxes: Mapping[int, UID] = {}
        self.peer_max_pdu = 0
        self.stopping = False
        self.busy = False
        self.thread = threading.current_thread()

    # -- negotiation

    def associate(self) -> bool:
        """Read the A-ASSOCIATE-RQ and answer AC or RJ; True if the association is established."""
        self.socket.settimeout(self.settings.acse_timeout)
        pdu = read_pdu(self.socket, _MAX_ASSOCIATE_RQ)
        if pdu is None:
            return False
        pdu_type, body = pdu
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            raise ProtocolError(ABORT_UNEXPECTED_PDU, f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ")
        request = self.server.negotiations.request(bytes(body))  # decoded once per distinct request
        self.peer = Peer(request.calling, self.address[0], self.address[1])
        self.called = request.called
        rejection = self._rejection(request)
        if rejection is not None:
            self.socket.sendall(reject_pdu(*rejection))
            return False
        acceptance = request.acceptance
        self.syntaxes = acceptance.syntaxes
        self.peer_max_pdu = request.peer_max_pdu
        self.socket.sendall(acceptance.accept_pdu)
        self.settings.on_association("accepted", self.peer)
        return True

    def _rejection(self, request: Request) -> tuple[int, ...] | None:
        """What this connection is refused for, if anything: judged for every association, never remembered."""
        if not self.settings.peer_allowed(self.peer.address):
            self.settings.on_association("rejected_ip", self.peer)
            return REJECT_NO_REASON
        if self.settings.allowed_aets and request.calling not in self.settings.allowed_aets:
            self.settings.on_association("rejected_aet", self.peer)
            return REJECT_CALLING_AE
        if self.settings.called_aets and self.called not in self.settings.called_aets:
            self.settings.on_association("rejected_called_aet", self.peer)
            return REJECT_CALLED_AE
        if not (request.protocol_version & 0x0001):
            self.settings.on_association("rejected_protocol", self.peer)
            return REJECT_PROTOCOL_VERSION
        if request.application_context != APPLICATION_CONTEXT:
            self.settings.on_association("rejected_context_name", self.peer)
            return REJECT_CONTEXT_NAME
        if self.server.association_count() > self.settings.max_associations:
            self.settings.on_association("rejected_busy", self.peer)
            return REJECT_TOO_MANY
        return None

    # -- data transfer

    def serve(self) -> None:
        """Receive PDUs until release, abort, close or shutdown; answer each complete request in turn."""
        self.socket.settimeout(self.settings.network_timeout)
        message: _Message | None = None
        # A PDU holds at most one dataset fragment plus headers; a larger one could not be a storable message.
        max_pdu = self.settings.max_dataset_bytes + _COMMAND_SLACK_BYTES
        while True:
            pdu = read_pdu(self.socket, max_pdu)
            if pdu is None:
                if not self.stopping:
                    log_event(log, "association.closed_by_peer", peer=self.peer.address)
                else:  # our shutdown ended the read: tell the peer
                    with contextlib.suppress(OSError):
                        self.socket.sendall(abort_pdu(0x00, source=0x00))
                return
            pdu_type, body = pdu
            if pdu_type == P_DATA_TF_TYPE:
                message = self._p_data(body, message)
            elif pdu_type == A_RELEASE_RQ_TYPE:
                self.socket.sendall(RELEASE_RP)
                return
            elif pdu_type == A_ABORT_TYPE:
                log_event(log, "association.aborted_by_peer", logging.WARNING, peer=self.peer.address)
                return
            elif pdu_type in (0x01, 0x02, 0x03, 0x06):
                raise ProtocolError(ABORT_UNEXPECTED_PDU, f"PDU type 0x{pdu_type:02X} during data transfer")
            else:
                raise ProtocolError(ABORT_UNRECOGNISED_PDU, f"unknown PDU type 0x{pdu_type:02X}")

    def _p_data(self, body: bytearray, message: _Message | None) -> _Message | None:
        """Take the PDVs of one P-DATA-TF; a message is handled as soon as its last fragment arrives."""
        offset, end = 0, len(body)
        view = memoryview(body)
        while offset < end:
            if end - offset < 6:
                raise ProtocolError(ABORT_INVALID_PARAMETER, "PDV item header cut short")
            length, context_id, control = struct.unpack_from(">IBB", body, offset)
            if length < 2 or offset + 4 + length > end:
                raise ProtocolError(ABORT_INVALID_PARAMETER, "PDV item length out of range")
            value = view[offset + 6 : offset + 4 + length]
            offset += 4 + length
            if context_id not in self.syntaxes:
                raise ProtocolError(ABORT_INVALID_PARAMETER, f"presentation context {context_id} not accepted")
            if message is None:
                message = _Message(context_id)
            elif message.context_id != context_id:
                raise ProtocolError(ABORT_INVALID_PARAMETER, "fragments of one message on two contexts")
            is_command, is_last = bool(control & 0x01), bool(control & 0x02)
            if is_command:
                if message.elements is not None:
                    raise ProtocolError(ABORT_INVALID_PARAMETER, "command fragment after the command set ended")
                message.command += value
                if len(message.command) > _COMMAND_SLACK_BYTES:  # a real command set is a few hundred bytes
                    raise ProtocolError(ABORT_INVALID_PARAMETER, f"command set over {_COMMAND_SLACK_BYTES} bytes")
                if is_last:
                    message.elements = parse_command(message.command)
                    if command_us(message.elements, 0x0800) == NO_DATASET:
                        self._dispatch(message)
                        message = None
            else:
                if message.elements is None:
                    raise ProtocolError(ABORT_INVALID_PARAMETER, "dataset fragment before the command set")
                message.dataset_bytes += len(value)
                if message.dataset_bytes > self.settings.max_dataset_bytes:
                    message.oversized, message.dataset = True, []
                elif not message.oversized:
                    message.dataset.append(value)  # a view into this PDU's buffer: joined once, when complete
                if is_last:
                    self._dispatch(message)
                    message = None
        return message

    def _dispatch(self, message: _Message) -> None:
        assert message.elements is not None
        elements = message.elements
        command = command_us(elements, 0x0100)
        message_id = command_us(elements, 0x0110) or 0
        sop_class = command_ui(elements, 0x0002)
        self.busy = True
        try:
            if command == C_STORE_RQ:
                sop_instance = command_ui(elements, 0x1000)
                request = StoreRequest(
                    sop_class_uid=sop_class,
                    sop_instance_uid=sop_instance,
                    transfer_syntax=self.syntaxes[message.context_id],
                    dataset=b"".join(message.dataset),
                    peer=self.peer,
                    dropped_bytes=message.dataset_bytes if message.oversized else 0,
                )
                status, comment = self.server.store(request)
                reply = response_command(C_STORE_RSP, message_id, status, sop_class, sop_instance, comment)
            elif command == C_ECHO_RQ:
                reply = response_command(C_ECHO_RSP, message_id, 0x0000, sop_class or VERIFICATION)
            elif command == C_CANCEL_RQ:
                return  # nothing of ours is cancellable: C-CANCEL has no response
            elif command is not None and not command & 0x8000:
                reply = response_command(command | 0x8000, message_id, UNRECOGNISED_OPERATION, sop_class)
            else:
                raise ProtocolError(ABORT_INVALID_PARAMETER, f"not a DIMSE request: command field {command}")
            self.socket.sendall(p_data_pdus(message.context_id, reply, self.peer_max_pdu))
        finally:
            self.busy = False

    def stop(self) -> None:
        """End the association from another thread: a handler in flight finishes and answers first."""
        self.stopping = True
        with contextlib.suppress(OSError):
            # The plain socket's shutdown even for TLS: ssl.SSLSocket.shutdown drops the TLS session, and the
            # answer still to be written would then go out unencrypted.
            socket.socket.shutdown(self.socket, socket.SHUT_RD)


class _AssociationRequestHandler(socketserver.BaseRequestHandler):
    server: DicomServer

    def handle(self) -> None:
        self.server.serve_connection(self.request, self.client_address)


class DicomServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Accepts TCP connections and serves each as an association on its own daemon thread.

    `listen=False`: a server that binds nothing and accepts nothing itself; it serves the connections
    handed to its `serve_connection` (a receiving process, service/dicom/receivers.py). `dispatch`, when set, is
    offered each accepted connection first and returns True when it took it (handed it to another process)."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], acceptor: AcceptorSettings, store: StoreHandlerType, listen: bool = True
    ) -> None:
        self.acceptor = acceptor
        self.store = store
        self.negotiations = Negotiations(acceptor.contexts)  # the acceptor's contexts are fixed from here on
        self._associations: set[Association] = set()
        self._lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _AssociationRequestHandler, bind_and_activate=listen)
        self._thread: threading.Thread | None = None
        self.dispatch: Callable[[socket.socket, Any], bool] | None = None

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.dispatch is not None and self.dispatch(request, client_address):
            return  # another process serves it
        super().process_request(request, client_address)

    @property
    def active_associations(self) -> list[Association]:
        with self._lock:
            return list(self._associations)

    def association_count(self) -> int:
        with self._lock:
            return len(self._associations)

    def serve_connection(self, sock: socket.socket, address: Any) -> None:
        with contextlib.suppress(OSError):  # not a TCP socket: nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.acceptor.ssl_context is not None:
            try:
                sock.settimeout(self.acceptor.acse_timeout)
                sock = self.acceptor.ssl_context.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log_event(log, "association.tls_failed", logging.WARNING, peer=address[0], error=str(exc)[:200])
                return
        association = Association(sock, (str(address[0]), int(address[1])), self)
        with self._lock:
            self._associations.add(association)
        try:
            if association.associate():
                association.serve()
            else:  # rejected (or the peer left before asking)
                await_peer_close(sock)
        except ProtocolError as exc:
            log_event(log, "association.aborted", logging.WARNING, peer=association.peer.address, reason=str(exc))
            with contextlib.suppress(OSError):
                sock.sendall(abort_pdu(exc.reason))
                await_peer_close(sock)
        except TimeoutError:
            log_event(log, "association.timed_out", logging.WARNING, peer=association.peer.address)
            with contextlib.suppress(OSError):
                sock.sendall(abort_pdu(0x00))
        except OSError as exc:
            peer = association.peer.address
            log_event(log, "association.connection_lost", logging.WARNING, peer=peer, error=str(exc)[:200])
        finally:
            with self._lock:
                self._associations.discard(association)
            with contextlib.suppress(OSError):
                sock.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.name = "btd-dicom-accept"
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, then end every association; one storing an instance answers it first (waited
        for up to `timeout` seconds, so the database is not closed under a handler)."""
        if self._thread is not None:  # a server that never accepted has no loop to stop
            super().shutdown()
        self.server_close()
        associations = self.active_associations
        for association in associations:
            association.stop()
        deadline = time.monotonic() + timeout
        for association in associations:
            association.thread.join(max(0.0, deadline - time.monotonic()))
        close = getattr(self.store, "close", None)
        if callable(close):  # a handler holding resources (the listener's database connection) lets them go
            close()
