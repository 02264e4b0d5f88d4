"""C-STORE SCU: send DICOM files or datasets to a peer (used by `btd send` and by report delivery).

Files are sent exactly as they are on disk (pynetdicom's chunked mode: the File Meta is read for the SOP
class, instance and transfer syntax, and the dataset bytes stream unchanged), so what the peer stores is
what we hold. Each association proposes one presentation context per (SOP class, transfer syntax) pair
found in the input; more than 128 pairs (the DICOM limit per association) are split over several
associations. A deflated file whose dataset has odd length is sent with one zero pad byte (the only
change ever made). The socket gets TCP_NODELAY so a small request PDU never waits for a delayed ACK.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt

MAX_CONTEXTS = 128


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
    pad: bool = False  # a deflated file whose dataset has odd length (see _padded_copy)


def _is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def expand_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, and every file below a folder (sorted, hidden files skipped)."""
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            yield path


def _describe(source: str | Path | Dataset) -> _Item | SendResult:
    if isinstance(source, Dataset):
        try:
            ts = str(source.file_meta.TransferSyntaxUID)
        except AttributeError:
            ts = ExplicitVRLittleEndian
        if "SOPClassUID" not in source or "SOPInstanceUID" not in source:
            return SendResult(source.get("SOPInstanceUID"), None, "dataset lacks SOPClassUID or SOPInstanceUID")
        return _Item(source, str(source.SOPClassUID), str(source.SOPInstanceUID), ts)
    path = Path(source)
    if not _is_dicom_file(path):
        return SendResult(None, None, "not a DICOM Part 10 file", str(path))
    try:
        meta = read_file_meta_info(path)
        ts = str(meta.TransferSyntaxUID)
        pad = ts == DeflatedExplicitVRLittleEndian and _dataset_length(path) % 2 == 1
        return _Item(path, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), ts, pad)
    except Exception as exc:
        return SendResult(None, None, f"unreadable File Meta: {type(exc).__name__}: {exc}"[:300], str(path))


def _dataset_length(path: Path) -> int:
    """Bytes after the File Meta (its group length element comes first in a Part 10 file)."""
    with path.open("rb") as handle:
        head = handle.read(144)
    meta_end = 144 + int.from_bytes(head[140:144], "little")
    return path.stat().st_size - meta_end


@contextlib.contextmanager
def _padded_copy(path: Path) -> Iterator[Path]:
    """A deflated dataset stored with odd length, padded with one zero byte as DICOM requires of every
    PDV fragment (dcmtk aborts the association on an odd fragment; zlib ignores the trailing byte)."""
    with tempfile.TemporaryDirectory(prefix="btd-send-") as folder:
        copy = Path(folder) / path.name
        copy.write_bytes(path.read_bytes() + b"\x00")
        yield copy


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
) -> list[SendResult]:
    """C-STORE every file (folders are walked) or dataset; one SendResult per input item, in order."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # send files' bytes as they are, without decoding them
    described: list[_Item | SendResult] = []
    for source in paths_or_datasets:
        if isinstance(source, Dataset):
            described.append(_describe(source))
        elif Path(source).is_dir():
            # A folder holds licences and notes beside the images: send what is DICOM, skip the rest.
            described.extend(_describe(path) for path in expand_paths([source]) if _is_dicom_file(path))
        else:
            described.append(_describe(source))
    outcome: dict[int, SendResult] = {}
    items = [d for d in described if isinstance(d, _Item)]
    for attempt in range(2):
        for contexts, batch in _batches(items):
            sent = _send_batch(contexts, batch, host, port, called_aet, calling_aet, ssl_context, timeout)
            for item, result in zip(batch, sent, strict=True):
                outcome[id(item)] = result
        # pynetdicom 3.0 can swallow a C-STORE response when its threads are starved of CPU, which ends
        # the association and fails every later instance. Those never got an answer, so sending them once
        # more on a fresh association cannot store anything twice that the peer acknowledged.
        items = [item for item in items if _worth_resending(outcome[id(item)])]
        if not items or attempt == 1:
            break
    return [outcome[id(d)] if isinstance(d, _Item) else d for d in described]


_NO_ANSWER = "no response (timeout, abort or invalid response)"
_ASSOCIATION_ENDED = "association ended before this instance"


def _worth_resending(result: SendResult) -> bool:
    """The association died under this instance: no answer came, and nothing says the peer refuses it."""
    return result.status is None and result.error in (_NO_ANSWER, _ASSOCIATION_ENDED)


def _send_batch(
    contexts: list[tuple[str, list[str]]],
    batch: list[_Item],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
) -> list[SendResult]:
    ae = AE(ae_title=calling_aet)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    tls_args = (ssl_context, host) if ssl_context is not None else None
    assoc = ae.associate(
        host, port, ae_title=called_aet, tls_args=tls_args, evt_handlers=[(evt.EVT_CONN_OPEN, _on_conn_open)]
    )
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "association aborted or peer unreachable"
        return [_result(item, None, why) for item in batch]
    results: list[SendResult] = []
    try:
        for message_id, item in enumerate(batch, start=1):
            if not assoc.is_established:
                results.append(_result(item, None, _ASSOCIATION_ENDED))
                continue
            try:
                if item.pad and isinstance(item.source, Path):
                    with _padded_copy(item.source) as padded:
                        status = assoc.send_c_store(padded, msg_id=message_id % 65536)
                else:
                    status = assoc.send_c_store(item.source, msg_id=message_id % 65536)
            except (ValueError, AttributeError, OSError) as exc:
                results.append(_result(item, None, f"{type(exc).__name__}: {exc}"[:300]))
                continue
            if "Status" in status:
                comment = status.get("ErrorComment")
                results.append(_result(item, int(status.Status), str(comment) if comment else None))
            else:
                results.append(_result(item, None, _NO_ANSWER))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
