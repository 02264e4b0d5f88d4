"""The requestor side of an association: connect, negotiate, C-STORE one instance after another, release.

Why not pynetdicom's `AE.associate` / `send_c_store`: its association runs two polling threads (each
sleeping 1 ms between looks at its queues) and decodes every response through primitives and events; on
the ingest benchmark `btd send` reached a third of storescu's rate into the same receiver
(docs/bench/ingest.md), and under CPU starvation pynetdicom 3.0.4 can lose a C-STORE response (the
"unexpected C-STORE service message" race described there). Here one thread writes each request on a
blocking socket and reads its answer: nothing polls, and a response can only be read by the one waiting
for it. The codecs are `core.dicom.wire`, the same the listener uses.

Scope: C-STORE as SCU, one operation outstanding at a time (no asynchronous operations window is
asked for), one transfer syntax proposed per presentation context (the one the bytes are in: nothing is
transcoded). A dataset is streamed from its file in fragments no larger than the acceptor's maximum
PDU (or 4 MiB when it sets none), so a multi-gigabyte instance never sits in memory whole.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from core.dicom.wire import (
    A_ABORT_TYPE,
    A_ASSOCIATE_AC_TYPE,
    A_ASSOCIATE_RJ_TYPE,
    A_RELEASE_RP_TYPE,
    A_RELEASE_RQ_TYPE,
    C_STORE_RSP,
    P_DATA_TF_TYPE,
    RELEASE_RP,
    RELEASE_RQ,
    ProtocolError,
    abort_pdu,
    associate_rq_pdu,
    command_ui,
    command_us,
    p_data_header,
    p_data_pdus,
    parse_associate_ac,
    parse_associate_rj,
    parse_command,
    read_pdu,
    store_request_command,
)

if TYPE_CHECKING:
    import ssl

# btd's implementation class UID (PS3.7 annex D.3.3.2): a UUID-derived UID (PS3.5 B.2), fixed for btd.
IMPLEMENTATION_UID = "2.25.302473919564358210768734003394802935291"
IMPLEMENTATION_VERSION = "BTD"  # not the package version: reading it costs start-up time

_UNLIMITED_FRAGMENT = 4 << 20  # bytes per P-DATA-TF when the acceptor sets no maximum
_MAX_RESPONSE_PDU = 1 << 20  # a C-STORE-RSP is a few hundred bytes; a larger PDU is not an answer


# What an A-ASSOCIATE-RJ's (source, reason) means (PS3.8 section 9.3.4): said in words, so that an operator
# reading `btd send`'s summary or a failed delivery knows what to change (an AE title, the peer's limit).
REJECTION_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given by the peer's ACSE",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class AssociationRejected(Exception):
    """The acceptor answered A-ASSOCIATE-RJ; `result`, `source`, `reason` as in PS3.8 table 9-21."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        meaning = REJECTION_REASONS.get((source, reason), "a reason the standard does not define")
        lasting = {1: "permanent", 2: "transient"}.get(result, f"result {result}")
        super().__init__(f"association rejected: {meaning} ({lasting}; source {source}, reason {reason})")
        self.result, self.source, self.reason = result, source, reason


class AssociationLost(Exception):
    """The association ended without an answer: A-ABORT, a closed or reset connection, a timeout, or a PDU
    that breaks the protocol."""


@dataclass(frozen=True)
class StoreStatus:
    """The acceptor's C-STORE-RSP: its status and error comment."""

    status: int
    comment: str | None


class Association:
    """One established association on a connected socket; use `request` to open one."""

    def __init__(self, sock: socket.socket, contexts: dict[int, str], requested: dict[int, str], max_pdu: int) -> None:
        self.socket = sock
        self.accepted = contexts  # context id -> transfer syntax
        self.abstract_syntaxes = requested  # context id -> abstract syntax, as proposed
        fragment = (max_pdu - 6) if max_pdu else _UNLIMITED_FRAGMENT
        self.fragment = max(2, fragment - fragment % 2)  # fragments of even length (PS3.5 7.1: values are even)
        self.message_id = 0
        self.open = True

    @classmethod
    def request(
        cls,
        host: str,
        port: int,
        called_aet: str,
        calling_aet: str,
        contexts: Sequence[tuple[str, str]],
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
    ) -> Association:
        """Connect and negotiate `contexts` ((SOP class, transfer syntax) pairs, at most 128).

        Raises AssociationRejected, or AssociationLost / OSError when the peer is unreachable or aborts."""
        if len(contexts) > 128:
            raise ValueError("at most 128 presentation contexts per association (PS3.8 9.3.2.2)")
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            with contextlib.suppress(OSError):  # a small PDU must not wait for the peer's delayed ACK
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=host if ssl_context.check_hostname else None)
            requested = {2 * k + 1: sop_class for k, (sop_class, _) in enumerate(contexts)}
            proposed = [(2 * k + 1, sop_class, [ts]) for k, (sop_class, ts) in enumerate(contexts)]
            sock.sendall(
                associate_rq_pdu(
                    calling_aet,
                    called_aet,
                    proposed,
                    max_pdu=0,  # answers are small; no limit saves nothing and costs nothing
                    implementation_uid=IMPLEMENTATION_UID,
                    implementation_version=IMPLEMENTATION_VERSION,
                )
            )
            pdu = _read(sock, _MAX_RESPONSE_PDU)
            pdu_type, body = pdu
            if pdu_type == A_ASSOCIATE_RJ_TYPE:
                raise AssociationRejected(*parse_associate_rj(body))
            if pdu_type != A_ASSOCIATE_AC_TYPE:
                raise AssociationLost(f"PDU type 0x{pdu_type:02X} in answer to A-ASSOCIATE-RQ")
            accept = parse_associate_ac(body)
            accepted = {cid: ts for cid, ts in accept.contexts.items() if cid in requested}
            return cls(sock, accepted, requested, accept.max_pdu)
        except BaseException:
            sock.close()
            raise

    def context_for(self, sop_class_uid: str, transfer_syntax: str) -> int | None:
        """The accepted presentation context for this SOP class and transfer syntax, if any."""
        for context_id, ts in self.accepted.items():
            if ts == transfer_syntax and self.abstract_syntaxes.get(context_id) == sop_class_uid:
                return context_id
        return None

    def store(
        self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: BinaryIO, length: int
    ) -> StoreStatus:
        """C-STORE `length` bytes read from `dataset` (the encoded dataset, nothing else) and wait for the
        answer. Raises AssociationLost if none comes (the association is then over)."""
        if not self.open:
            raise AssociationLost("association already ended")
        self.message_id = self.message_id % 65535 + 1
        message_id = self.message_id
        command = p_data_pdus(
            context_id, store_request_command(message_id, sop_class_uid, sop_instance_uid), self._max_pdu()
        )
        try:
            self._send_dataset(command, context_id, dataset, length)
            return self._await_response(message_id)
        except (OSError, ProtocolError) as exc:
            self._drop(abort=isinstance(exc, ProtocolError | TimeoutError))
            raise AssociationLost(f"{type(exc).__name__}: {exc}") from exc

    def _max_pdu(self) -> int:
        return self.fragment + 6

    def _send_dataset(self, command: bytes, context_id: int, dataset: BinaryIO, length: int) -> None:
        """The command PDUs and the dataset's fragments, the command sharing the first write with the first
        fragment (one system call per instance when the acceptor takes large PDUs)."""
        sent = 0
        prefix = command
        while True:
            size = min(self.fragment, length - sent)
            last = sent + size >= length
            buffer = bytearray(len(prefix) + 12 + size)
            buffer[: len(prefix)] = prefix
            buffer[len(prefix) : len(prefix) + 12] = p_data_header(context_id, 0x02 if last else 0x00, size)
            with memoryview(buffer) as view:
                got = 0
                target = view[len(prefix) + 12 :]
                while got < size:
                    n = dataset.readinto(target[got:])  # type: ignore[attr-defined]
                    if not n:
                        raise OSError(f"file ended {size - got} bytes early")
                    got += n
            self.socket.sendall(buffer)
            sent += size
            prefix = b""
            if last:
                return

    def _await_response(self, message_id: int) -> StoreStatus:
        command = bytearray()
        while True:
            pdu_type, body = _read(self.socket, _MAX_RESPONSE_PDU)
            if pdu_type == A_ABORT_TYPE:
                self.open = False
                raise AssociationLost("A-ABORT from the peer")
            if pdu_type == A_RELEASE_RQ_TYPE:  # the peer wants to end it: we have nothing more to say here
                with contextlib.suppress(OSError):
                    self.socket.sendall(RELEASE_RP)
                self.open = False
                raise AssociationLost("A-RELEASE-RQ from the peer while a C-STORE was outstanding")
            if pdu_type != P_DATA_TF_TYPE:
                raise ProtocolError(0x02, f"PDU type 0x{pdu_type:02X} while waiting for C-STORE-RSP")
            offset = 0
            while offset + 6 <= len(body):
                item_length, _, control = struct.unpack_from(">IBB", body, offset)
                if item_length < 2 or offset + 4 + item_length > len(body):
                    raise ProtocolError(0x06, "PDV item length out of range")
                if not control & 0x01:
                    raise ProtocolError(0x02, "a dataset in answer to C-STORE")
                command += body[offset + 6 : offset + 4 + item_length]
                offset += 4 + item_length
                if control & 0x02:
                    elements = parse_command(command)
                    if command_us(elements, 0x0100) != C_STORE_RSP or command_us(elements, 0x0120) != message_id:
                        raise ProtocolError(0x02, "not the C-STORE-RSP for the request sent")
                    status = command_us(elements, 0x0900)
                    if status is None:
                        raise ProtocolError(0x06, "C-STORE-RSP without a status")
                    comment = command_ui(elements, 0x0902) or None
                    return StoreStatus(status, comment)

    def release(self) -> None:
        """A-RELEASE-RQ, wait for A-RELEASE-RP, close; an association already lost is only closed."""
        try:
            if self.open:
                self.socket.sendall(RELEASE_RQ)
                while True:
                    pdu_type, _ = _read(self.socket, _MAX_RESPONSE_PDU)
                    if pdu_type in (A_RELEASE_RP_TYPE, A_ABORT_TYPE):
                        break
        except (OSError, ProtocolError, AssociationLost):
            pass
        finally:
            self.open = False
            with contextlib.suppress(OSError):
                self.socket.close()

    def abort(self) -> None:
        self._drop(abort=True)

    def _drop(self, abort: bool) -> None:
        if self.open and abort:
            with contextlib.suppress(OSError):
                self.socket.sendall(abort_pdu(0x00, source=0x00))
        self.open = False
        with contextlib.suppress(OSError):
            self.socket.close()


def _read(sock: socket.socket, max_length: int) -> tuple[int, bytearray]:
    pdu = read_pdu(sock, max_length)
    if pdu is None:
        raise AssociationLost("the peer closed the connection")
    return pdu
