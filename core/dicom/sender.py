"""C-STORE SCU: send DICOM files or datasets to a peer (used by `btd send` and by report delivery).

Files are sent exactly as they are on disk: the File Meta is read for the SOP class, instance and
transfer syntax, and the dataset bytes stream unchanged from the file, so what the peer stores is what we
hold. Each association proposes one presentation context per (SOP class, transfer syntax) pair found in
the input; more than 128 pairs (the DICOM limit per association) are split over several associations. A
deflated file whose dataset has odd length is sent with one zero pad byte (the only change ever made).

The association is btd's own requestor (`core.dicom.scu`, on the codecs the listener uses), which sets
TCP_NODELAY so a small request PDU never waits for a delayed ACK. `associations=N` sends over N
associations at once (every N-th instance each), as a PACS forwarding a large study does. Neither pydicom
nor pynetdicom is imported to send files: `btd send` starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from core.dicom.scu import Association, AssociationLost, AssociationRejected
from core.dicom.wire import ProtocolError, unpadded_text

if TYPE_CHECKING:
    import ssl

    from pydicom.dataset import Dataset

MAX_CONTEXTS = 128
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"


@dataclass(frozen=True)
class SendResult:
    """Outcome of one C-STORE: `status` is the peer's DIMSE status (None when no answer came)."""

    sop_instance_uid: str | None
    status: int | None
    error: str | None = None
    path: str | None = None

    @property
    def ok(self) -> bool:
        # 0x0000 success; 0xB000, 0xB007, 0xB006 are warnings (stored, with coercion or elements dropped).
        return self.status is not None and (self.status == 0 or self.status & 0xF000 == 0xB000)


@dataclass
class _Item:
    source: Path | Dataset
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    pad: bool = False  # a deflated file whose dataset has odd length: one zero byte is added
    offset: int = 0  # where the dataset starts in the file
    length: int = 0  # the dataset's bytes in the file


def _is_dataset(source: object) -> bool:
    """A pydicom Dataset, tested without importing pydicom (a caller holding one has imported it)."""
    module = sys.modules.get("pydicom.dataset")
    return module is not None and isinstance(source, module.Dataset)


def _is_dicom_file(path: Path) -> bool:
    try:
        return _has_dicm_prefix(path)
    except OSError:
        return False


def _has_dicm_prefix(path: Path) -> bool:
    """Whether the file has the Part 10 preamble's "DICM"; OSError if it cannot be opened or read."""
    with path.open("rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be sent as a Part 10 file, in words an operator can act on; None if it can be."""
    try:
        if _has_dicm_prefix(path):
            return None
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "a folder where a file was expected"
    except OSError as exc:
        return f"cannot read: {exc.strerror or type(exc).__name__}"
    return "not a DICOM Part 10 file"


def _unreachable(exc: BaseException, host: str, port: int) -> str:
    """Why no association could be made with the peer: its address and the system's reason, for the summary
    (one line for all the instances that shared the association) and a failed delivery's error."""
    if isinstance(exc, AssociationLost | ProtocolError):
        return f"association aborted by {host}:{port} while negotiating: {exc}"[:300]
    if isinstance(exc, TimeoutError):
        return f"peer unreachable: no answer from {host}:{port} in time"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    return f"peer unreachable: {reason} ({host}:{port})"[:300]


def expand_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, and every file below a folder (sorted, hidden files skipped)."""
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            yield path


# File Meta VRs with a 4-byte length after two reserved bytes (PS3.5 7.1.2); the others have 2 bytes.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_META_LIMIT = 1 << 20  # a File Meta beyond this is not one
_REQUIRED_META = (
    (0x00020002, "MediaStorageSOPClassUID"),
    (0x00020003, "MediaStorageSOPInstanceUID"),
    (0x00020010, "TransferSyntaxUID"),
)


def read_file_meta(path: Path) -> tuple[dict[int, str], int]:
    """The text values of a Part 10 file's File Meta (group 0002, Explicit VR Little Endian) by tag, and
    the offset where the dataset begins. ValueError if the File Meta does not parse."""
    with path.open("rb") as handle:
        data = handle.read(132 + 16384)
        if len(data) < 132 or data[128:132] != b"DICM":
            raise ValueError("no DICM prefix")
        position = 132

        def have(n: int) -> bool:
            """Whether `n` bytes from `position` are (or can be read) in `data`."""
            nonlocal data
            while len(data) < position + n:
                if len(data) > _META_LIMIT:
                    raise ValueError("File Meta too long")
                more = handle.read(65536)
                if not more:
                    return False
                data += more
            return True

        values: dict[int, str] = {}
        while have(8):
            group, element = struct.unpack_from("<HH", data, position)
            if group != 0x0002:
                break
            vr = data[position + 4 : position + 6]
            if vr in _LONG_VRS:
                if not have(12):
                    raise ValueError("File Meta ends inside an element header")
                length, header = struct.unpack_from("<I", data, position + 8)[0], 12
            else:
                length, header = struct.unpack_from("<H", data, position + 6)[0], 8
            if not have(header + length):
                raise ValueError("File Meta ends inside an element")
            if vr in (b"UI", b"AE", b"SH", b"LO", b"CS"):
                value = data[position + header : position + header + length]
                values[(group << 16) | element] = unpadded_text(value)
            position += header + length
    return values, position


def _describe(source: str | Path | Dataset) -> _Item | SendResult:
    if _is_dataset(source):
        ds: Any = source
        try:
            ts = str(ds.file_meta.TransferSyntaxUID)
        except AttributeError:
            ts = EXPLICIT_VR_LITTLE_ENDIAN
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            return SendResult(ds.get("SOPInstanceUID"), None, "dataset lacks SOPClassUID or SOPInstanceUID")
        return _Item(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts)
    path = Path(source)  # type: ignore[arg-type]
    problem = _unreadable(path)
    if problem is not None:
        return SendResult(None, None, problem, str(path))
    try:
        meta, offset = read_file_meta(path)
        for tag, keyword in _REQUIRED_META:
            if not meta.get(tag):
                raise ValueError(f"no {keyword}")
        ts = meta[0x00020010]
        length = path.stat().st_size - offset
        pad = ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN and length % 2 == 1
        return _Item(path, meta[0x00020002], meta[0x00020003], ts, pad, offset, length)
    except Exception as exc:
        return SendResult(None, None, f"unreadable File Meta: {type(exc).__name__}: {exc}"[:300], str(path))


@contextlib.contextmanager
def _dataset_stream(item: _Item) -> Iterator[tuple[BinaryIO, int]]:
    """The encoded dataset to send and its length: read from the file as it goes out, or a Dataset encoded
    in its transfer syntax (as pynetdicom encodes it)."""
    if isinstance(item.source, Path):
        with item.source.open("rb", buffering=0) as handle:
            handle.seek(item.offset)
            if item.pad:  # deflated and odd: every PDV fragment must have even length (dcmtk aborts otherwise)
                yield io.BytesIO(handle.read(item.length) + b"\x00"), item.length + 1
            else:
                yield handle, item.length
        return
    from pydicom.uid import UID
    from pynetdicom.dsutils import encode

    ts = UID(item.transfer_syntax)
    encoded = encode(item.source, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if encoded is None:
        raise ValueError("the dataset does not encode in its transfer syntax")
    if len(encoded) % 2:
        encoded += b"\x00"
    yield io.BytesIO(encoded), len(encoded)


def _batches(items: list[_Item]) -> Iterator[tuple[list[tuple[str, list[str]]], list[_Item]]]:
    """Group items so that each association needs at most MAX_CONTEXTS presentation contexts."""
    contexts: dict[tuple[str, str], None] = {}
    batch: list[_Item] = []
    for item in items:
        key = (item.sop_class_uid, item.transfer_syntax)
        if key not in contexts and len(contexts) == MAX_CONTEXTS:
            yield _context_list(contexts), batch
            contexts, batch = {}, []
        contexts[key] = None
        batch.append(item)
    if batch:
        yield _context_list(contexts), batch


def _context_list(contexts: dict[tuple[str, str], None]) -> list[tuple[str, list[str]]]:
    return [(sop_class, [ts]) for sop_class, ts in contexts]


def _on_conn_open(event: Any) -> None:
    """pynetdicom EVT_CONN_OPEN handler setting TCP_NODELAY, for code that still opens associations with
    pynetdicom's AE (pynetdicom sets none itself); btd's own requestor sets it on its socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _result(item: _Item, status: int | None, error: str | None) -> SendResult:
    path = str(item.source) if isinstance(item.source, Path) else None
    return SendResult(item.sop_instance_uid, status, error, path)


def send_files(
    paths_or_datasets: Iterable[str | Path | Dataset],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "BTD",
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30,
    *,
    associations: int = 1,
    on_result: Callable[[SendResult], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> list[SendResult]:
    """C-STORE every file (folders are walked) or dataset; one SendResult per input item, in order.

    `associations`: how many associations send at once (each takes every N-th instance). `on_result` is
    called once per input item with its final result (from the sending threads), `on_total` once with the
    number of items when the input is read: together, a progress bar."""
    report = on_result or (lambda _result: None)
    described: list[_Item | SendResult] = []
    for source in paths_or_datasets:
        if not _is_dataset(source) and Path(source).is_dir():  # type: ignore[arg-type]
            # A folder holds licences and notes beside the images: send what is DICOM, skip the rest.
            described.extend(_describe(path) for path in expand_paths([source]) if _is_dicom_file(path))  # type: ignore[list-item]
        else:
            described.append(_describe(source))
    if on_total is not None:
        on_total(len(described))
    for entry in described:
        if isinstance(entry, SendResult):
            report(entry)
    outcome: dict[int, SendResult] = {}
    items = [d for d in described if isinstance(d, _Item)]
    for attempt in range(2):
        last_attempt = attempt == 1

        def settle(item: _Item, result: SendResult, final: bool = last_attempt) -> None:
            outcome[id(item)] = result
            if final or not _worth_resending(result):
                report(result)

        _send_parallel(items, host, port, called_aet, calling_aet, ssl_context, timeout, associations, settle)
        # An association that dies (a peer's abort, a reset) fails every later instance on it. Those never
        # got an answer, so sending them once more on a fresh association cannot store anything twice that
        # the peer acknowledged.
        items = [item for item in items if _worth_resending(outcome[id(item)])]
        if not items:
            break
    return [outcome[id(d)] if isinstance(d, _Item) else d for d in described]


_NO_ANSWER = "no response (timeout, abort or invalid response)"
_ASSOCIATION_ENDED = "association ended before this instance"


def _worth_resending(result: SendResult) -> bool:
    """The association died under this instance: no answer came, and nothing says the peer refuses it."""
    return result.status is None and result.error in (_NO_ANSWER, _ASSOCIATION_ENDED)


def _send_parallel(
    items: list[_Item],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
    associations: int,
    settle: Callable[[_Item, SendResult], None],
) -> None:
    """Send `items` over up to `associations` concurrent associations (every N-th item each); a thread per
    association beyond the first, which runs on the calling thread."""
    lanes = [items[k :: max(1, associations)] for k in range(max(1, associations))]
    lanes = [lane for lane in lanes if lane]

    errors: list[BaseException] = []

    def run(lane: list[_Item]) -> None:
        for contexts, batch in _batches(lane):
            _send_batch(contexts, batch, host, port, called_aet, calling_aet, ssl_context, timeout, settle)

    def run_in_thread(lane: list[_Item]) -> None:
        try:
            run(lane)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below, as with one lane
            errors.append(exc)

    threads = [
        threading.Thread(target=run_in_thread, args=(lane,), name=f"btd-send-{k}") for k, lane in enumerate(lanes[1:])
    ]
    for thread in threads:
        thread.start()
    try:
        if lanes:
            run(lanes[0])
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]


def _send_batch(
    contexts: list[tuple[str, list[str]]],
    batch: list[_Item],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
    settle: Callable[[_Item, SendResult], None],
) -> None:
    """One association for `batch`; every item is settled exactly once."""
    pairs = [(sop_class, syntaxes[0]) for sop_class, syntaxes in contexts]
    try:
        assoc = Association.request(
            host, port, called_aet, calling_aet, pairs, ssl_context=ssl_context, timeout=timeout
        )
    except AssociationRejected as exc:
        for item in batch:
            settle(item, _result(item, None, str(exc)))
        return
    except (AssociationLost, ProtocolError, OSError) as exc:
        why = _unreachable(exc, host, port)
        for item in batch:
            settle(item, _result(item, None, why))
        return
    try:
        for item in batch:
            if not assoc.open:
                settle(item, _result(item, None, _ASSOCIATION_ENDED))
                continue
            context_id = assoc.context_for(item.sop_class_uid, item.transfer_syntax)
            if context_id is None:
                why = (
                    f"No presentation context for {item.sop_class_uid} with transfer syntax "
                    f"{item.transfer_syntax} was accepted by the peer"
                )
                settle(item, _result(item, None, why))
                continue
            try:
                with _dataset_stream(item) as (stream, length):
                    answer = assoc.store(context_id, item.sop_class_uid, item.sop_instance_uid, stream, length)
            except AssociationLost:
                settle(item, _result(item, None, _NO_ANSWER))
                continue
            except (ValueError, AttributeError, OSError) as exc:  # the item itself could not be read or encoded
                settle(item, _result(item, None, f"{type(exc).__name__}: {exc}"[:300]))
                continue
            settle(item, _result(item, answer.status, answer.comment))
    finally:
        assoc.release()
