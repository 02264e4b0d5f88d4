"""Where reports go: a destination written "AET@host:port", and the TLS context to reach it.

One parser for every reader of BTD_DESTINATIONS (the worker's delivery, the dashboard's C-ECHO), so a
destination the dashboard shows as valid is one the worker can send to, and the other way round.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass

from core.settings import Settings

_DESTINATION = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """`"PACS@10.0.0.5:104"` -> Destination; ValueError for anything else (reported, not retried)."""
    match = _DESTINATION.match(text.strip())
    if not match:
        raise ValueError(f"destination {text!r} is not AET@host:port")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"destination {text!r}: port out of range")
    return Destination(match["aet"].strip(), match["host"].strip("[]"), port)


def client_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A TLS client context when BTD_TLS_CA or BTD_TLS_CERT is set, else None (plain DICOM).

    Peers are verified against BTD_TLS_CA; host names are not checked because PACS destinations are
    usually configured by IP address. BTD_TLS_CERT/KEY, if set, are presented for mutual TLS.
    """
    if not settings.tls_ca and not settings.tls_cert:
        return None
    cafile = str(settings.tls_ca) if settings.tls_ca else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.check_hostname = False
    if not settings.tls_ca:
        context.verify_mode = ssl.CERT_NONE
    if settings.tls_cert:
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None)
    return context
