"""The DICOM listener: C-ECHO, and C-STORE of every storage SOP class into the spool and the database.

An instance is acknowledged (0x0000) only after its bytes are fsynced in the spool and its row is
committed, so a PACS never deletes an image we could still lose. The bytes are stored exactly as received
(the File Meta pynetdicom's `event.encoded_dataset()` would build from the negotiated context, written by
`file_meta_bytes` without pydicom, followed by the dataset bytes as the peer sent them; nothing is
transcoded), and the SHA-256 recorded is that of the stored file.

Statuses we answer (C-STORE):
- 0x0000 success, also for an identical resend (recorded as a duplicate) and for different bytes under a
  known SOP Instance UID (kept as a new, flagged version);
- 0xA700 out of resources: free space below BTD_MIN_FREE_BYTES, the database unreachable, a disk error,
  a dataset over BTD_MAX_INSTANCE_BYTES (answered by service.dicom.scp, its bytes dropped as they arrive);
  nothing is left in the spool (a file written before the failure is removed again);
- 0xC210 cannot understand: the dataset does not decode;
- 0xC211 cannot understand: SOP Instance, Study or Series Instance UID missing, blank or over 64 chars;
- 0xC212 cannot understand: the dataset's SOP Instance/Class UID disagrees with the C-STORE request;
- 0x0110 processing failure: anything unexpected (logged with its traceback).
Failures never end the association; the peer may go on sending.

Associations are rejected (A-ASSOCIATE-RJ, permanent) for a calling AE title not in BTD_ALLOWED_AETS
(reason 0x03 "calling AE title not recognised"), a called AE title other than ours (BTD_CALLED_AETS,
default BTD_AE_TITLE: reason 0x07 "called AE title not recognised", so a PACS node configured for another
receiver is told at once instead of being served by the wrong one) or a peer address outside
BTD_ALLOWED_IPS (reason 0x01, no reason given: DICOM has no code for it; the log says why).

The association itself (negotiation, PDUs, DIMSE commands) is served by `service.dicom.scp`, one blocking
thread per association; every accepted socket gets TCP_NODELAY there, so a small C-STORE response never
waits for the peer's delayed ACK (about 40 ms on Linux loopback).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import ssl
import struct
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
)
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.db import repository
from core.db.session import session_factory
from core.dicom.element_scan import dataset_of, scan_elements
from core.dicom.wire import uid_bytes, unpadded_text
from core.observability.logs import log_event
from core.observability.metrics import ASSOCIATIONS, BYTES_RECEIVED, INSTANCES_RECEIVED, STORE_BATCH_SIZE
from core.settings import Settings
from core.spool import INCOMING_FOLDER, Spool, SpoolConflict, SpoolFull, sha256_hex
from service.dicom.group_commit import GroupCommit
from service.dicom.scp import AcceptorSettings, DicomServer, Peer, StoreRequest

log = logging.getLogger("btd.listener")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_DECODE = 0xC210
MISSING_UID = 0xC211
UID_MISMATCH = 0xC212
PROCESSING_FAILURE = 0x0110

# Transfer syntaxes accepted as sent: uncompressed, deflated, every JPEG family a CT/MR archive may hold
# (retired JPEG processes included: storing them is harmless; the detector reports them not assessed).
ACCEPTED_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.1.98",  # Encapsulated Uncompressed Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.53",  # JPEG Extended (Process 6 & 8), retired
    "1.2.840.10008.1.2.4.55",  # JPEG Full Progression (Process 10 & 12), retired
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (Process 14, selection value 1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component Lossless
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 Multi-component
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

_STORE_ATTEMPTS = 3  # a racing receiver of the same SOP Instance UID makes us re-read and retry
_MAX_ASSOCIATIONS = 64
# One staging thread per association at most (created on demand): a handler holds its transaction while it
# waits for its bytes, so a write queued behind other associations' writes would hold the database longer.
_STAGING_THREADS = _MAX_ASSOCIATIONS


Answer = tuple[int, str | None]  # a C-STORE status and its error comment


def _status(code: int, comment: str | None = None) -> Answer:
    return code, comment[:64] if comment else None


# Character sets in which every byte below 0x80 but ESC is the ASCII character (ESC starts an ISO 2022 switch)
_ASCII_COMPATIBLE_CHARSETS = frozenset({b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192"})


def _text(ds: Dataset, keyword: str) -> str | None:
    """A PN or LO value decoded with the dataset's character set, padding removed.

    Plain ASCII in one of the common character sets (a single value: no backslash, no ESC) is read from its
    raw bytes: pydicom's conversion would give the same text (it decodes, splits values, strips padding) at
    ~30 us per element, three per received instance, under the interpreter lock. Anything else goes
    through pydicom as before."""
    element = ds.get_item(_TAGS[keyword])
    if element is None:
        return None
    raw = element.value
    if isinstance(raw, bytes) and raw.isascii() and b"\\" not in raw and b"\x1b" not in raw:
        charset = ds.get_item(_TAGS["SpecificCharacterSet"])
        charset_raw = charset.value if charset is not None else b""
        if isinstance(charset_raw, bytes) and charset_raw.strip(b" \0") in _ASCII_COMPATIBLE_CHARSETS:
            return unpadded_text(raw) or None
    value = ds.get(keyword)
    if value is None:
        return None
    return unpadded_text(str(value)) or None


def _ascii_text(ds: Dataset, keyword: str) -> str | None:
    """`_text` for a UI, CS or DA element, read from its raw bytes: these VRs hold only the default
    character repertoire, so no character set applies. Why not `_text`: pydicom's conversion and value
    validation of the six such elements was about 0.25 ms of CPU per instance, a quarter of what
    `parse_request` costs (measured 2026-12-02; docs/bench/ingest.md)."""
    element = ds.get_item(_TAGS[keyword])
    if element is None:
        return None
    value = element.value
    if value is None:
        return None
    return unpadded_text(bytes(value) if isinstance(value, bytes | bytearray) else str(value)) or None


@functools.lru_cache(maxsize=64)
def _received_counter(code: int) -> Any:
    """The counter of one C-STORE status, looked up once: `labels()` takes a lock and validates every call."""
    return INSTANCES_RECEIVED.labels(status=f"0x{code:04X}")


class InvalidDataset(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ParsedInstance:
    received: repository.ReceivedInstance
    data: bytes


# The only elements parse_request needs. Why not decode the dataset: that decodes every element and copies the
# pixel data (0.5 MB for a 512x512 CT); reading only these tags still walks the whole element structure, so
# a dataset that does not decode is refused as before, but values of the other elements are skipped.
_IDENTIFYING_KEYWORDS = (
    "SpecificCharacterSet",  # how PatientName and StudyDescription are encoded
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "Modality",
    "StudyDescription",
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)
_IDENTIFYING_TAGS: list[BaseTag | int] = [
    int(Tag(keyword))  # plain ints: pydicom tests every element's tag against this set, and int == int is cheap
    for keyword in _IDENTIFYING_KEYWORDS
]
_WANTED_TAGS = frozenset(int(tag) for tag in _IDENTIFYING_TAGS)
_TAGS = {keyword: Tag(keyword) for keyword in _IDENTIFYING_KEYWORDS}  # looked up once, not per instance


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a 2-byte length (every File Meta VR but OB)."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


@functools.lru_cache(maxsize=64)
def _file_meta_tail(transfer_syntax: str) -> bytes:
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("latin-1")
    return (
        _element(0x00020010, b"UI", uid_bytes(transfer_syntax))
        + _element(0x00020012, b"UI", uid_bytes(PYNETDICOM_IMPLEMENTATION_UID))
        + _element(0x00020013, b"SH", version + b" " if len(version) % 2 else version)
    )


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and the File Meta pynetdicom's `event.encoded_dataset()` writes, byte for byte,
    without building a pydicom FileMetaDataset per instance (a quarter of a millisecond each)."""
    body = (
        b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"  # (0002,0001) version 00\01
        + _element(0x00020002, b"UI", uid_bytes(sop_class_uid))
        + _element(0x00020003, b"UI", uid_bytes(sop_instance_uid))
        + _file_meta_tail(transfer_syntax)
    )
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _identifying_dataset(dataset: bytes, transfer_syntax: UID) -> Dataset:
    """Decode the identifying elements of the dataset as sent (deflated ones are inflated first): by the
    plain element walk of core.dicom.element_scan where the structure is regular, else by pydicom."""
    if transfer_syntax.is_deflated:
        dataset = zlib.decompress(dataset, -zlib.MAX_WBITS)
    implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    found = scan_elements(dataset, implicit, little, _WANTED_TAGS)
    if found is not None:
        return dataset_of(found, implicit, little)
    return read_dataset(BytesIO(dataset), implicit, little, specific_tags=_IDENTIFYING_TAGS)


def encoded_instance(request: StoreRequest) -> bytes:
    """The bytes to store: File Meta from the negotiated context, then the dataset exactly as received."""
    meta = file_meta_bytes(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax)
    return b"".join((meta, request.dataset))


def parse_request(request: StoreRequest, data: bytes | None = None) -> ParsedInstance:
    """Decode what identifies the instance; raise InvalidDataset with the status to answer.

    `data`: the instance's stored bytes (`encoded_instance(request)`), if the caller already has them."""
    transfer_syntax = request.transfer_syntax
    if data is None:
        data = encoded_instance(request)
    # The hash first: hashlib lets go of the interpreter lock while it runs, and the staging thread the
    # handler has just started gets it at once to begin its write, instead of after the element walk
    # (measured in-process, one association: the write began ~0.3 ms after it was submitted).
    sha256 = sha256_hex(data)
    try:
        ds = _identifying_dataset(request.dataset, transfer_syntax)
        ts = str(transfer_syntax)
        sop_uid = _ascii_text(ds, "SOPInstanceUID")
        sop_class = _ascii_text(ds, "SOPClassUID")
        study_uid = _ascii_text(ds, "StudyInstanceUID")
        series_uid = _ascii_text(ds, "SeriesInstanceUID")
        modality = _ascii_text(ds, "Modality")
        patient_id = _text(ds, "PatientID")
        patient_name = _text(ds, "PatientName")
        study_date = _ascii_text(ds, "StudyDate")
        study_description = _text(ds, "StudyDescription")
    except Exception as exc:  # pydicom raises many kinds on malformed bytes
        raise InvalidDataset(CANNOT_DECODE, f"dataset does not decode: {type(exc).__name__}") from exc
    for name, value in (
        ("SOPInstanceUID", sop_uid),
        ("StudyInstanceUID", study_uid),
        ("SeriesInstanceUID", series_uid),
    ):
        if not value or len(value) > 64:
            raise InvalidDataset(MISSING_UID, f"{name} missing, blank or too long")
    requested_sop = request.sop_instance_uid
    requested_class = request.sop_class_uid
    if requested_sop and requested_sop != sop_uid:
        raise InvalidDataset(UID_MISMATCH, "SOPInstanceUID differs from the request")
    if sop_class and requested_class and sop_class != requested_class:
        raise InvalidDataset(UID_MISMATCH, "SOPClassUID differs from the request")
    assert sop_uid and study_uid and series_uid
    peer = request.peer
    return ParsedInstance(
        repository.ReceivedInstance(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class or requested_class,
            transfer_syntax=ts,
            size=len(data),
            sha256=sha256,
            modality=modality[:16] if modality else None,
            calling_ae=peer.ae_title[:16] or None,
            peer=f"{peer.address}:{peer.port}"[:64],
            patient_id=patient_id[:64] if patient_id else None,
            patient_name=patient_name[:324] if patient_name else None,
            study_date=study_date[:8] if study_date else None,
            study_description=study_description[:64] if study_description else None,
        ),
        data,
    )


class StoreHandler:
    """EVT_C_STORE: spool, record, answer. One instance per listener; called from association threads.

    Why a staging thread: writing an instance and syncing it to disk (~1-2 ms for a 512x512 CT) is the
    longest step and needs no decoded field, so it starts at once, into the spool's staging folder, while
    this thread hashes the bytes and decodes the identifying tags. The order that makes an answer safe is
    unchanged: bytes on disk, then their final name (folder fsynced), then the row committed, then 0x0000.
    """

    def __init__(self, settings: Settings, spool: Spool, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.spool = spool
        self.sessions = sessions
        self.stager = ThreadPoolExecutor(max_workers=_STAGING_THREADS, thread_name_prefix="btd-stage")
        self.committer = GroupCommit(spool, sessions, settings.stable_seconds, on_batch=STORE_BATCH_SIZE.observe)

    def __call__(self, request: StoreRequest) -> Answer:
        started = time.perf_counter()
        (code, comment), kind, parsed = self._handle(request)
        _received_counter(code).inc()
        fields: dict[str, Any] = {
            "status": f"0x{code:04X}",
            "ms": round(1000 * (time.perf_counter() - started), 2),
        }
        if parsed is not None:
            fields.update(
                study_uid=parsed.received.study_uid,
                sop_instance_uid=parsed.received.sop_instance_uid,
                size=parsed.received.size,
                calling_ae=parsed.received.calling_ae,
            )
        else:  # refused before the dataset was read: the request's own UID still says which one
            fields["sop_instance_uid"] = request.sop_instance_uid
        if code == SUCCESS:
            log_event(log, f"instance.{kind}", **fields)
        else:
            log_event(log, "instance.refused", logging.WARNING, reason=comment, **fields)
        return code, comment

    def _handle(self, request: StoreRequest) -> tuple[Answer, str, ParsedInstance | None]:
        """The status to answer, what happened ("stored", "duplicate", ...) and what was decoded."""
        if request.dropped_bytes:
            limit = self.settings.max_instance_bytes
            return _status(OUT_OF_RESOURCES, f"dataset over BTD_MAX_INSTANCE_BYTES ({limit})"), "", None
        try:
            self.spool.check_space()
        except SpoolFull as exc:
            log_event(log, "spool.full", logging.ERROR, detail=str(exc))
            return _status(OUT_OF_RESOURCES, "spool free space below watermark"), "", None
        data = encoded_instance(request)
        staging = self.stager.submit(self.spool.stage, INCOMING_FOLDER, data)
        try:
            parsed = parse_request(request, data)
        except InvalidDataset as exc:
            staging.add_done_callback(self._discard_later)  # at once if done, else when the write ends
            return _status(exc.status, exc.reason), "", None
        try:
            return self._record(parsed, staging)
        finally:
            # The write is over here (recording waited for it, or failed and waits now); its temporary name
            # goes before the answer, so a peer told 0x0000 (or a failure) never finds it in the spool.
            # Why not on a staging thread after the answer: a fast peer's next instance, or its release,
            # overtook the unlink. On the success path this unlinks a second name of a published file.
            _discard_staged(staging)

    def close(self) -> None:
        """The server stopped (every association has ended): return the group commit's connection."""
        self.committer.close()

    def _discard_later(self, staging: Future[Path]) -> None:
        """Remove the staged name of a refused instance on a staging thread, once its write ends: an
        instance refused while its bytes were still being written is not held up by the write."""
        try:
            self.stager.submit(_discard_staged, staging)
        except RuntimeError:  # the executor is shut down: do it here
            _discard_staged(staging)

    def _record(self, parsed: ParsedInstance, staging: Future[Path]) -> tuple[Answer, str, ParsedInstance]:
        races, reconnected = 0, False
        while True:
            try:
                kind = self._store(parsed, staging)
                if kind != "duplicate":
                    BYTES_RECEIVED.inc(parsed.received.size)
                return _status(SUCCESS), kind, parsed
            except SpoolFull:
                return _status(OUT_OF_RESOURCES, "spool free space below watermark"), "", parsed
            except (IntegrityError, SpoolConflict):
                races += 1
                if races == _STORE_ATTEMPTS:
                    log.exception("store.race")
                    return _status(OUT_OF_RESOURCES, "concurrent store of the same instance"), "", parsed
            except DBAPIError as exc:
                if exc.connection_invalidated and not reconnected:  # the server dropped a pooled connection
                    reconnected = True
                    log_event(log, "store.reconnect", logging.WARNING, error=type(exc.orig).__name__)
                    continue
                log_event(log, "store.unavailable", logging.ERROR, error=f"{type(exc).__name__}: {exc}"[:500])
                return _status(OUT_OF_RESOURCES, f"storage unavailable: {type(exc).__name__}"), "", parsed
            except OSError as exc:
                log_event(log, "store.unavailable", logging.ERROR, error=f"{type(exc).__name__}: {exc}"[:500])
                return _status(OUT_OF_RESOURCES, f"storage unavailable: {type(exc).__name__}"), "", parsed
            except Exception:
                log.exception("store.failed")
                return _status(PROCESSING_FAILURE, "internal error"), "", parsed

    def _store(self, parsed: ParsedInstance, staging: Future[Path]) -> str:
        """Publish the staged bytes under their final name and commit the row, in a transaction shared with
        the instances other associations have ready at the same moment (service.dicom.group_commit).

        The batch's bytes are on disk before its first study row update, and each is published under its
        final name before its study row is updated and its row inserted, so the row never points at bytes
        that are not on disk, and the study's row lock (PostgreSQL: another receiving process recording
        the same study waits on it) is held from the first update to the commit only. On failure the
        names published for this instance are removed again; the caller removes the staged file."""
        outcome = self.committer.record(parsed.received, staging)
        if outcome.reopened:
            log_event(log, "study.reopened", study_uid=parsed.received.study_uid)
        return outcome.kind


def _discard_staged(staging: Future[Path]) -> None:
    """Remove a staged temporary file once it is published (linked) or not needed; a failed write left none."""
    if staging.cancelled() or staging.exception() is not None:
        return
    try:
        Spool.discard(staging.result())
    except OSError:
        log.exception("spool.discard_failed")


def _peer_allowed(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


_REJECTION_REASONS = {
    "rejected_ip": "peer address not allowed",
    "rejected_aet": "calling AE title not allowed",
    "rejected_called_aet": "called AE title not recognised",
    "rejected_protocol": "protocol version not supported",
    "rejected_context_name": "application context name not supported",
    "rejected_busy": "too many associations",
}


def _on_association(outcome: str, peer: Peer) -> None:
    """Count and log each association's outcome (accepted, or why it was rejected)."""
    ASSOCIATIONS.labels(outcome=outcome).inc()
    if outcome == "accepted":
        log_event(log, "association.accepted", calling_ae=peer.ae_title, peer=peer.address)
        return
    reason = _REJECTION_REASONS.get(outcome, outcome)
    log_event(log, "association.rejected", logging.WARNING, reason=reason, calling_ae=peer.ae_title, peer=peer.address)


@functools.lru_cache(maxsize=1)
def supported_contexts() -> tuple[PresentationContext, ...]:
    """Every storage SOP class with every transfer syntax we accept as sent, and Verification.

    Shared by all associations: the negotiation reads them and builds its own result contexts."""
    contexts = [build_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts]
    contexts.append(build_context(Verification, ACCEPTED_TRANSFER_SYNTAXES[:3]))
    return tuple(contexts)


def _server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.tls_cert and settings.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.tls_ca:
        context.load_verify_locations(str(settings.tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED  # only peers with a certificate from our CA
    return context


def start_listener(
    settings: Settings, sessions: sessionmaker[Session] | None = None, *, listen: bool = True
) -> DicomServer:
    """Start listening on DICOM_HOST:DICOM_PORT in background threads; call `.shutdown()` to stop.

    The database must already be migrated (`core.db.migrate.upgrade(settings)`; `btd serve` does it).
    `listen=False`: bind and accept nothing; serve only the connections handed to `server.serve_connection`
    (a receiving process: service.dicom.receivers).
    """
    spool = Spool(settings.spool_dir, settings.min_free_bytes)
    # No pre-ping: StoreHandler retries once on a connection found dead instead of a round trip per instance.
    handler = StoreHandler(settings, spool, sessions or session_factory(settings, pre_ping=False))
    networks = [ipaddress.ip_network(item, strict=False) for item in settings.allowed_ips]
    acceptor = AcceptorSettings(
        contexts=list(supported_contexts()),
        allowed_aets=[aet.strip() for aet in settings.allowed_aets],
        called_aets=[aet.strip() for aet in settings.called_aets] or [settings.ae_title.strip()],
        peer_allowed=(lambda address: _peer_allowed(address, networks)) if networks else (lambda _address: True),
        max_associations=_MAX_ASSOCIATIONS,
        acse_timeout=30,
        network_timeout=120,
        ssl_context=_server_ssl_context(settings),
        on_association=_on_association,
        max_dataset_bytes=settings.max_instance_bytes,
    )
    server = DicomServer((settings.dicom_host, settings.dicom_port), acceptor, handler, listen)
    if not listen:
        return server
    server.start()
    log_event(
        log,
        "listener.started",
        ae_title=settings.ae_title,
        host=settings.dicom_host,
        port=settings.dicom_port,
        tls=settings.tls_cert is not None,
    )
    return server
