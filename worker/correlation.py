"""One correlation id for every log line of one study version, whichever task or process writes it."""

from __future__ import annotations

from contextlib import AbstractContextManager

from sqlalchemy import select

from core.db.schema import Study
from core.db.session import session_scope
from core.observability.logs import correlation, study_correlation_id
from core.settings import Settings


def study_correlation(settings: Settings, study_uid: str) -> AbstractContextManager[str]:
    """Bind the id derived from the study's current version, so that scoring, reporting and delivery of
    the same pass share it (a reopened or rescored study gets a new one)."""
    with session_scope(settings) as session:
        version = session.scalar(select(Study.version).where(Study.study_uid == study_uid))
    return correlation(study_correlation_id(study_uid, version or 1))
