"""What the API routes depend on: settings, a database session, and small readers of state kept outside
the database (scoring progress, queue depth). Who may call a route is service/api/auth.py's.

Why dependencies instead of globals: tests build an app per settings object (a throw-away database, a
token or none), and FastAPI's dependency injection hands each request the app's own settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from core import queue as core_queue
from core.contracts import progress_path
from core.db.session import session_factory
from core.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(settings: Settings = Depends(get_settings)) -> Iterator[Session]:
    """One session per request; reads only, except the rescore route, which commits itself."""
    session = session_factory(settings)()
    try:
        yield session
    finally:
        session.close()


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
