"""What the API routes depend on: settings, a database session, the bearer-token guard, and small readers
of state kept outside the database (scoring progress, queue depth).

Why dependencies instead of globals: tests build an app per settings object (a throw-away database, a
token or none), and FastAPI's dependency injection hands each request the app's own settings.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core import queue as core_queue
from core.contracts import progress_path
from core.db.session import session_factory
from core.settings import Settings

_bearer = HTTPBearer(auto_error=False)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(settings: Settings = Depends(get_settings)) -> Iterator[Session]:
    """One session per request; reads only, except the rescore route, which commits itself."""
    session = session_factory(settings)()
    try:
        yield session
    finally:
        session.close()


def require_token(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    settings: Settings = Depends(get_settings),
) -> None:
    """Guard the routes that change state: 401 without a bearer token, 403 with a wrong one.

    No token configured (BTD_API_TOKEN unset) means the site protects the API by network instead.
    """
    expected = settings.api_token
    if not expected:
        return
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "bearer token required", headers={"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid token")


def read_progress(data_dir: Path, study_uid: str) -> dict[str, Any] | None:
    """The worker's progress record for a study being scored, or None (not scoring, or not started)."""
    try:
        raw = json.loads(progress_path(data_dir, study_uid).read_text())
    except (OSError, ValueError):
        return None
    done, total = int(raw.get("done", 0)), int(raw.get("total", 0))
    updated = raw.get("updated_at")
    return {
        "done": done,
        "total": total,
        "fraction": round(done / total, 4) if total else 0.0,
        "updated_at": datetime.fromisoformat(updated) if updated else None,
    }


def queue_depth(settings: Settings) -> int | None:
    """Messages waiting: Redis LLEN of the Celery queue, or the in-process executor's; None if unknown."""
    return core_queue.queue_depth(settings)
