"""The audit log: one row for each look at a study's data and each action on it, naming the credential.

Why written in its own transaction before the data is returned: a view of patient images that left no
audit row would defeat the log, so a failed write fails the request (fail closed), and the reading
session of the route never holds a write lock on SQLite while it renders. Rows name credentials
(`token:api`, `user:alice`), the client's address and UIDs, never a patient's name or ID.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.schema import AuditEntry
from core.db.session import session_scope
from core.settings import Settings
from service.api.auth import OPEN, Principal


class Action(StrEnum):
    VIEW_STUDY = "view_study"  # the study's detail (API) or its page (dashboard)
    VIEW_IMAGE = "view_image"  # a slice with its heat map (overlay.png)
    VIEW_REPORTS = "view_reports"  # the study's SR/KOS list and delivery log
    RESCORE = "rescore"
    REDELIVER = "redeliver"
    MARK_GENUINE = "mark_genuine"  # a person said the study is genuine: it may teach its scanner's reference
    LOGIN = "login"
    LOGIN_FAILED = "login_failed"
    LOGOUT = "logout"


SHOWN_ON_STUDY_PAGE = 50


def principal_of(request: Request) -> Principal:
    """The principal the route's guard resolved (OPEN for a route without one)."""
    return getattr(request.state, "principal", OPEN)


def peer_of(request: Request) -> str | None:
    return request.client.host[:64] if request.client else None


def record(
    settings: Settings,
    request: Request,
    action: Action,
    study_uid: str | None = None,
    sop_instance_uid: str | None = None,
    detail: str | None = None,
    principal: Principal | None = None,
) -> None:
    """Append one audit row and commit it."""
    who = principal or principal_of(request)
    with session_scope(settings) as session:
        session.add(
            AuditEntry(
                actor=who.name[:128],
                via=who.via,
                action=action.value,
                study_uid=study_uid,
                sop_instance_uid=sop_instance_uid,
                peer=peer_of(request),
                detail=detail[:256] if detail else None,
            )
        )


def for_study(session: Session, study_uid: str, limit: int = SHOWN_ON_STUDY_PAGE) -> list[dict[str, Any]]:
    """The newest audit rows of one study, newest first."""
    rows = session.scalars(
        select(AuditEntry).where(AuditEntry.study_uid == study_uid).order_by(AuditEntry.id.desc()).limit(limit)
    ).all()
    return [
        {"at": r.at, "actor": r.actor, "via": r.via, "action": r.action, "sop_instance_uid": r.sop_instance_uid,
         "peer": r.peer, "detail": r.detail}
        for r in rows
    ]
