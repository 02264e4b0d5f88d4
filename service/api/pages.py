"""The dashboard's Jinja2 environment: templates, their filters, and the context every page gets.

Why apart from the routes: the study pages (dashboard.py) and the login page (login.py) render with the
same environment and the same base context (who is logged in, the CSRF token the page's script sends
with its actions), and neither should import the other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from core.contracts import cue_words
from core.settings import Settings
from service.api.audit import principal_of
from service.api.auth import Role

PACKAGE_DIR = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"

templates = Jinja2Templates(directory=str(TEMPLATES_DIR))


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return "—"
    if value.tzinfo is None:  # reflected tables (reports area) on SQLite come back naive; they hold UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt_score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _fmt_bytes(value: int | None) -> str:
    size = float(value or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


templates.env.filters["time"] = _fmt_time
templates.env.filters["score"] = _fmt_score
templates.env.filters["bytes"] = _fmt_bytes
templates.env.filters["cue_words"] = cue_words


def render(request: Request, name: str, settings: Settings, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page with the base context: the token field appears when an action needs a token this browser's
    session cannot supply (no session, or a session without the act role)."""
    principal = principal_of(request)
    session_can_act = principal.via == "session" and principal.can(Role.ACT)
    base = {
        "token_required": settings.auth_configured and not session_can_act,
        "expose_patient_ids": settings.expose_patient_ids,
        "principal": principal,
        "csrf_token": principal.csrf or "",
    }
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)
