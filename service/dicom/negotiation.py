"""Association negotiation as the acceptor, each distinct A-ASSOCIATE-RQ worked out once.

Why: a PACS or a modality opens an association per study (several at once for a large one) and proposes the
same presentation contexts every time; dcmtk's storescu proposes 128. Decoding that request with pynetdicom's
PDU items, validating every UID in it, negotiating and encoding the A-ASSOCIATE-AC took ~11 ms of CPU under
the interpreter lock the listener's associations share (a ~9.6 kB request, 2026-12-04, docs/bench/ingest.md):
with eight associations sending one study, about a tenth of the listener's lock time. The answer is a pure
function of the request's bytes and the acceptor's contexts, which are fixed for a server's life, so each
server remembers the answers to the last few distinct requests (`KEPT`) and a repeated request costs a
dictionary lookup. What must be judged per connection (the peer's address, its AE titles against the allowed
lists, the number of associations) is not remembered: the association checks it every time (service/dicom/scp.py).

The protocol knowledge is still pynetdicom's: `A_ASSOCIATE_RQ` decoding, `negotiate_as_acceptor` (SCP/SCU
role selection included), `A_ASSOCIATE_AC` encoding and the implementation UID.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from core.dicom.wire import A_ASSOCIATE_RQ_TYPE, ABORT_INVALID_PARAMETER, APPLICATION_CONTEXT, ProtocolError

KEPT = 64  # distinct requests remembered per server: a site's PACS, modalities and workstations
# A request longer than this is decoded every time and not remembered: a real one is ~10 kB for 128 contexts, and
# peers that are refused still reach the cache, so what it can hold stays small (KEPT x this at most).
KEPT_REQUEST_BYTES = 64 * 1024


@dataclass(frozen=True)
class Acceptance:
    """btd's answer to an acceptable request: the contexts it accepted and the A-ASSOCIATE-AC to send."""

    syntaxes: Mapping[int, UID]  # each accepted presentation context's transfer syntax, by context ID
    accept_pdu: bytes


class Request:
    """One A-ASSOCIATE-RQ as decoded, and (worked out when first asked for) btd's answer to it."""

    def __init__(self, request: A_ASSOCIATE_RQ, primitive: A_ASSOCIATE, contexts: Sequence[PresentationContext]):
        self.calling = str(primitive.calling_ae_title or "").strip()
        self.called = str(primitive.called_ae_title or "").strip()
        self.protocol_version = int(request.protocol_version)
        self.application_context = str(primitive.application_context_name)
        self.peer_max_pdu = 0  # the largest PDU the peer takes; 0: no limit
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)
        self._primitive = primitive
        self._contexts = contexts

    @cached_property
    def acceptance(self) -> Acceptance:
        """Worked out on the first association that passes the per-connection checks, then shared."""
        primitive = self._primitive
        roles = {}
        for item in primitive.user_information:
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        proposed = primitive.presentation_context_definition_list
        results, reply_roles = negotiate_as_acceptor(proposed, list(self._contexts), roles)
        accepted = [cx for cx in results if cx.result == 0x00 and cx.context_id is not None]
        syntaxes = {int(cx.context_id): UID(str(cx.transfer_syntax[0])) for cx in accepted}  # type: ignore[arg-type]
        answer = A_ASSOCIATE()
        answer.application_context_name = UID(APPLICATION_CONTEXT)
        answer.calling_ae_title = primitive.calling_ae_title
        answer.called_ae_title = primitive.called_ae_title
        answer.result = 0x00
        answer.result_source = 0x01
        answer.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = 0  # no limit: peers send large PDUs, fewer reads per instance
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        answer.user_information = [maximum, implementation, version, *reply_roles]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(answer)
        return Acceptance(MappingProxyType(syntaxes), pdu.encode())


class Negotiations:
    """The requests a server has seen lately, by their exact bytes (the most recently used `kept`)."""

    def __init__(self, contexts: Sequence[PresentationContext], kept: int = KEPT) -> None:
        self.contexts = tuple(contexts)
        self.kept = kept
        self.decoded = 0  # requests decoded and then kept (not found among those kept before): tests read it
        self._requests: OrderedDict[bytes, Request] = OrderedDict()
        self._lock = threading.Lock()

    def request(self, body: bytes) -> Request:
        """The A-ASSOCIATE-RQ whose PDU body (after the 6-byte header) is `body`; ProtocolError if it does not
        decode. Two associations may decode the same new request at once: either result is the same."""
        with self._lock:
            found = self._requests.get(body)
            if found is not None:
                self._requests.move_to_end(body)
                return found
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(struct.pack(">BBI", A_ASSOCIATE_RQ_TYPE, 0, len(body)) + body)
            primitive = pdu.to_primitive()
        except Exception as exc:  # pynetdicom raises several kinds on malformed items
            raise ProtocolError(ABORT_INVALID_PARAMETER, f"A-ASSOCIATE-RQ does not decode: {exc}") from exc
        request = Request(pdu, primitive, self.contexts)
        if len(body) > KEPT_REQUEST_BYTES:
            return request
        with self._lock:
            self.decoded += 1
            self._requests[body] = request
            while len(self._requests) > self.kept:
                self._requests.popitem(last=False)
        return request
