"""The DICOM upper layer's wire format (PS3.8 section 9.3, PS3.7 section 9.3 and annex E): PDUs, P-DATA-TF
fragments and DIMSE command sets, shared by the listener (service/dicom/scp.py, the acceptor) and the
sender (core/dicom/scu.py, the requestor).

Why our own codecs: pynetdicom's association machinery costs two polling threads and a chain of
primitive and event conversions per message (measured in docs/bench/ingest.md); both ends of btd read and
write PDUs on one blocking socket instead. Only the standard library is used here, so `btd send` starts
without importing pydicom or pynetdicom (about a second of start-up on the benchmark machine).

Command sets are Implicit VR Little Endian, elements in tag order, with the group length first.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

# PDU types (PS3.8 section 9.3.1)
A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE, P_DATA_TF_TYPE = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ_TYPE, A_RELEASE_RP_TYPE, A_ABORT_TYPE = 0x05, 0x06, 0x07
# DIMSE command fields (PS3.7 annex E)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP, C_CANCEL_RQ = 0x0001, 0x8001, 0x0030, 0x8030, 0x0FFF
NO_DATASET = 0x0101
DATASET_PRESENT = 0x0000  # any value but 0x0101 says a dataset follows; 0x0000 is what peers send
UNRECOGNISED_OPERATION = 0x0211
# A-ABORT (source 2: service provider) reasons, PS3.8 section 9.3.8
ABORT_UNRECOGNISED_PDU, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 0x01, 0x02, 0x06
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

_RECV_START_BYTES = 256 * 1024  # first buffer of a PDU read; grown only as bytes arrive


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol: the association ends with A-ABORT (reason given)."""

    def __init__(self, reason: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def recv_exactly(sock: socket.socket, nr_bytes: int) -> bytearray:
    """Block until `nr_bytes` are read; fewer only if the peer closed. Reads as much as the kernel holds
    per call into one buffer, which grows only as bytes arrive: a PDU header announcing 4 GiB cannot make
    us allocate it."""
    buffer = bytearray(min(nr_bytes, _RECV_START_BYTES))
    got = 0
    while got < nr_bytes:
        if got == len(buffer):
            buffer.extend(bytes(min(len(buffer), nr_bytes - got)))
        with memoryview(buffer) as view:
            n = sock.recv_into(view[got:])
        if not n:
            break
        got += n
    if got < len(buffer):
        del buffer[got:]
    return buffer


def read_pdu(sock: socket.socket, max_length: int | None = None) -> tuple[int, bytearray] | None:
    """(PDU type, body) or None if the peer closed between PDUs; a PDU cut short raises ProtocolError, as
    does one longer than `max_length` (it would have to be held in memory whole)."""
    header = recv_exactly(sock, 6)
    if not header:
        return None
    if len(header) < 6:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "connection closed inside a PDU header")
    pdu_type, _, length = struct.unpack(">BBI", header)
    if max_length is not None and length > max_length:
        raise ProtocolError(ABORT_INVALID_PARAMETER, f"PDU of {length} bytes, over the {max_length} accepted")
    body = recv_exactly(sock, length)
    if len(body) < length:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "connection closed inside a PDU")
    return pdu_type, body


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", A_ASSOCIATE_RJ_TYPE, 0, 4, 0, result, source, reason)


def abort_pdu(reason: int, source: int = 0x02) -> bytes:
    return struct.pack(">BBIBBBB", A_ABORT_TYPE, 0, 4, 0, 0, source, reason)


RELEASE_RQ = struct.pack(">BBII", A_RELEASE_RQ_TYPE, 0, 4, 0)
RELEASE_RP = struct.pack(">BBII", A_RELEASE_RP_TYPE, 0, 4, 0)


def command_element(tag: int, value: bytes) -> bytes:
    """One element of group 0000, Implicit VR Little Endian."""
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def uid_bytes(uid: str) -> bytes:
    """A UID as a DICOM value: its characters, padded with one NUL to an even length (PS3.5 9.1)."""
    raw = str(uid).encode("latin-1")
    return raw + b"\0" if len(raw) % 2 else raw


def response_command(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: str | None,
    sop_instance_uid: str | None = None,
    comment: str | None = None,
) -> bytes:
    """A DIMSE response command set, Implicit VR Little Endian, elements in tag order (PS3.7 9.3)."""
    body = b""
    if sop_class_uid:
        body += command_element(0x0002, uid_bytes(sop_class_uid))
    body += command_element(0x0100, struct.pack("<H", command_field))
    body += command_element(0x0120, struct.pack("<H", message_id))
    body += command_element(0x0800, struct.pack("<H", NO_DATASET))
    body += command_element(0x0900, struct.pack("<H", status))
    if comment:
        text = comment[:64].encode("ascii", "replace")
        body += command_element(0x0902, text + b" " if len(text) % 2 else text)
    if sop_instance_uid:
        body += command_element(0x1000, uid_bytes(sop_instance_uid))
    return command_element(0x0000, struct.pack("<I", len(body))) + body


def parse_command(data: bytes | bytearray) -> dict[int, bytes]:
    """The command set's elements by element number (group 0000, Implicit VR Little Endian)."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 8:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "command set ends inside an element header")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "command set element outside group 0000 or too long")
        elements[element] = bytes(data[offset : offset + length])
        offset += length
    return elements


def command_us(elements: dict[int, bytes], element: int) -> int | None:
    """A US value of a parsed command set (None if absent or short)."""
    value = elements.get(element)
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else None


def unpadded_text(raw: bytes | str) -> str:
    """The text of a UI, AE, CS, SH or LO value (raw bytes, or text already decoded): the NUL or space that
    pads it to even length and surrounding whitespace removed. One reading for the command set, the File Meta
    and the listener's identifying elements (raw bytes of these VRs hold only the default repertoire, so no
    character set applies)."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    return text.strip("\0 \t\r\n")


def command_ui(elements: dict[int, bytes], element: int) -> str:
    """A UI value of a parsed command set, padding removed ("" if absent)."""
    return unpadded_text(elements.get(element, b""))


def p_data_pdus(context_id: int, command: bytes, max_pdu: int) -> bytes:
    """A command set as P-DATA-TF PDUs, fragmented to the peer's maximum PDU length (0: no limit)."""
    step = max(max_pdu - 6, 1) if max_pdu else len(command) or 1
    out = []
    for start in range(0, max(len(command), 1), step):
        chunk = command[start : start + step]
        last = start + step >= len(command)
        pdv = struct.pack(">IBB", len(chunk) + 2, context_id, 0x03 if last else 0x01) + chunk
        out.append(struct.pack(">BBI", P_DATA_TF_TYPE, 0, len(pdv)) + pdv)
    return b"".join(out)


def p_data_header(context_id: int, control: int, data_length: int) -> bytes:
    """The 12 bytes in front of one fragment sent as its own P-DATA-TF PDU with one PDV item: PDU type,
    PDU length, item length, presentation context, message control header (bit 0 command, bit 1 last)."""
    return struct.pack(">BBIIBB", P_DATA_TF_TYPE, 0, data_length + 6, data_length + 2, context_id, control)


def store_request_command(message_id: int, sop_class_uid: str, sop_instance_uid: str, priority: int = 0) -> bytes:
    """A C-STORE-RQ command set (PS3.7 section 9.3.1.1), announcing a dataset."""
    body = b"".join(
        (
            command_element(0x0002, uid_bytes(sop_class_uid)),
            command_element(0x0100, struct.pack("<H", C_STORE_RQ)),
            command_element(0x0110, struct.pack("<H", message_id)),
            command_element(0x0700, struct.pack("<H", priority)),
            command_element(0x0800, struct.pack("<H", DATASET_PRESENT)),
            command_element(0x1000, uid_bytes(sop_instance_uid)),
        )
    )
    return command_element(0x0000, struct.pack("<I", len(body))) + body


# ------------------------------------------------------------------------------------------ association (requestor)


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _ae_field(title: str) -> bytes:
    """An AE title as the 16-byte field of A-ASSOCIATE-RQ: ASCII, space padded."""
    raw = title.strip().encode("ascii", "replace")[:16]
    return raw.ljust(16, b" ")


def associate_rq_pdu(
    calling_aet: str,
    called_aet: str,
    contexts: Sequence[tuple[int, str, Sequence[str]]],
    *,
    max_pdu: int,
    implementation_uid: str,
    implementation_version: str,
) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 section 9.3.2): `contexts` as (odd context id, abstract syntax, transfer
    syntaxes); `max_pdu` the largest P-DATA-TF we accept (0: no limit)."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode("ascii"))]
    for context_id, abstract_syntax, transfer_syntaxes in contexts:
        sub_items = _item(0x30, abstract_syntax.encode("ascii")) + b"".join(
            _item(0x40, ts.encode("ascii")) for ts in transfer_syntaxes
        )
        items.append(_item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub_items))
    user = (
        _item(0x51, struct.pack(">I", max_pdu))
        + _item(0x52, implementation_uid.encode("ascii"))
        + _item(0x55, implementation_version.encode("ascii")[:16])
    )
    items.append(_item(0x50, user))
    body = struct.pack(">HH", 0x0001, 0) + _ae_field(called_aet) + _ae_field(calling_aet) + bytes(32) + b"".join(items)
    return struct.pack(">BBI", A_ASSOCIATE_RQ_TYPE, 0, len(body)) + body


def _items(data: bytes | bytearray | memoryview, offset: int = 0) -> Iterator[tuple[int, memoryview]]:
    """(item type, value) of each item of a variable field, from `offset` to its end."""
    view = memoryview(data)
    end = len(view)
    while offset < end:
        if end - offset < 4:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "item header cut short")
        item_type, _, length = struct.unpack_from(">BBH", view, offset)
        offset += 4
        if offset + length > end:
            raise ProtocolError(ABORT_INVALID_PARAMETER, f"item 0x{item_type:02X} longer than its PDU")
        yield item_type, view[offset : offset + length]
        offset += length


@dataclass(frozen=True)
class AssociateAccept:
    """What an A-ASSOCIATE-AC grants: the accepted presentation contexts (id -> transfer syntax) and the
    largest P-DATA-TF PDU the acceptor takes (0: no limit)."""

    contexts: dict[int, str]
    max_pdu: int


def parse_associate_ac(body: bytes | bytearray) -> AssociateAccept:
    """Decode the body (after the 6-byte PDU header) of an A-ASSOCIATE-AC (PS3.8 section 9.3.3)."""
    if len(body) < 68:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "A-ASSOCIATE-AC shorter than its fixed fields")
    contexts: dict[int, str] = {}
    max_pdu = 0
    for item_type, value in _items(body, 68):
        if item_type == 0x21 and len(value) >= 4:
            context_id, _, result, _ = struct.unpack_from(">BBBB", value)
            syntaxes = [unpadded_text(bytes(v)) for t, v in _items(value, 4) if t == 0x40]
            if result == 0 and syntaxes:
                contexts[context_id] = syntaxes[0]
        elif item_type == 0x50:
            for sub_type, sub_value in _items(value):
                if sub_type == 0x51 and len(sub_value) == 4:
                    max_pdu = struct.unpack(">I", sub_value)[0]
    return AssociateAccept(contexts, max_pdu)


def parse_associate_rj(body: bytes | bytearray) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ body (PS3.8 section 9.3.4)."""
    if len(body) < 4:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "A-ASSOCIATE-RJ cut short")
    return body[1], body[2], body[3]
