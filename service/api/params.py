"""The shapes every route accepts for its path and paging parameters, checked before any database sees them.

Why one place: a crafted value (a NUL byte, 100 kB of text, an offset past 2**63) used to reach
PostgreSQL or SQLite and come back as an HTTP 500, or be echoed whole in a 404. A DICOM UID is at most 64
characters of digits and dots (PS3.5 9.1); every route that takes a study, series or SOP Instance UID
declares it with `DicomUID`, so FastAPI answers 422 for anything else. Leading zeros in a component are
accepted: they are invalid DICOM, but the listener stores what a PACS sends, and such a study must stay
reachable. Paging is bounded far beyond any real archive but well inside a 64-bit integer.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
UID_MAX_CHARS = 64

DicomUID = Annotated[
    str,
    Path(
        min_length=1,
        max_length=UID_MAX_CHARS,
        pattern=UID_PATTERN,
        description="a DICOM UID: digits and dots, at most 64 characters",
    ),
]

MAX_OFFSET = 1_000_000_000  # rows skipped by a list (no archive holds a billion studies)
MAX_PAGE = 1_000_000  # dashboard pages of 25
MAX_FRAME = 2_147_483_647  # a frame number fits a 32-bit integer column
ECHO_LIMIT = 64  # error bodies repeat at most this many characters of what a client sent


def clip(value: object, limit: int = ECHO_LIMIT) -> str:
    """`value` as text, cut to `limit` characters (with an ellipsis) for an error message."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"
