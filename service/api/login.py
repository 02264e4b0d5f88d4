"""The dashboard's login and logout: a form that turns a user's password (or a token) into a session cookie.

Why the cookie is HttpOnly, SameSite=Strict and, over HTTPS, Secure: page scripts never need to read it
(HttpOnly keeps an injected script from stealing it), no other site can make the browser send it
(SameSite=Strict, the first line against CSRF; the dashboard's POSTs also carry the session's CSRF token),
and over HTTPS it never travels in clear. It expires with the session it carries (BTD_SESSION_HOURS).
"""

from __future__ import annotations

import hmac
import logging

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from core.observability.logs import log_event
from core.settings import Settings
from service.api import audit
from service.api.auth import (
    MAX_NEXT_CHARS,
    SESSION_COOKIE,
    USER_NAME,
    Principal,
    access,
    safe_next,
)
from service.api.deps import get_settings
from service.api.pages import templates

log = logging.getLogger("btd.api.login")

router = APIRouter(tags=["login"])

FIELD_MAX = 256  # a user name, password or token longer than this is no credential of ours


def _login_page(request: Request, settings: Settings, next_url: str, error: str | None = None,
                status_code: int = 200) -> HTMLResponse:
    context = {"next_url": next_url, "error": error, "users": bool(access(request).credentials.users),
               "token_required": False, "expose_patient_ids": settings.expose_patient_ids, "principal": None}
    return templates.TemplateResponse(request, "login.html", context, status_code=status_code)


@router.get("/login", response_class=HTMLResponse)
def login_form(
    request: Request,
    next_url: str = Query("/", alias="next", max_length=MAX_NEXT_CHARS),
    settings: Settings = Depends(get_settings),
) -> Response:
    if not access(request).credentials.configured:
        return RedirectResponse("/", status_code=303)  # nothing to log in to
    return _login_page(request, settings, safe_next(next_url))


@router.post("/login", response_class=HTMLResponse, responses={401: {"description": "wrong user or password"}})
def login(
    request: Request,
    user: str = Form("", max_length=FIELD_MAX),
    password: str = Form(..., min_length=1, max_length=FIELD_MAX),
    next_url: str = Form("/", alias="next", max_length=MAX_NEXT_CHARS),
    settings: Settings = Depends(get_settings),
) -> Response:
    """A user and password from BTD_USERS_FILE, or, with the user left empty, a token in the password field."""
    guard = access(request)
    target = safe_next(next_url)
    if not guard.credentials.configured:
        return RedirectResponse(target, status_code=303)
    user = user.strip()
    identity = guard.credentials.check_user(user, password) if user else guard.credentials.match_token(password)
    if identity is None:
        who = f"user:{user}" if user and USER_NAME.match(user) else ("token" if not user else "unknown")
        audit.record(settings, request, audit.Action.LOGIN_FAILED, principal=Principal(who, frozenset(), "login"))
        log_event(log, "login.failed", logging.WARNING, actor=who, peer=audit.peer_of(request))
        return _login_page(request, settings, target, "wrong user name, password or token", status_code=401)
    cookie, _csrf = guard.sessions.issue(identity)
    principal = Principal(identity.name, identity.roles, "session")
    audit.record(settings, request, audit.Action.LOGIN, principal=principal)
    log_event(log, "login", actor=identity.name, peer=audit.peer_of(request))
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=guard.sessions.seconds,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", responses={303: {"description": "back to the login page"}})
def logout(
    request: Request,
    csrf: str = Form("", max_length=FIELD_MAX),
    settings: Settings = Depends(get_settings),
) -> Response:
    """End the browser's session (the form carries the session's CSRF token, so no other site can do it)."""
    guard = access(request)
    cookie = request.cookies.get(SESSION_COOKIE)
    session = guard.sessions.read(cookie) if cookie else None
    response = RedirectResponse("/login", status_code=303)
    if session is not None and hmac.compare_digest(csrf.encode(), session[1].encode()):
        audit.record(settings, request, audit.Action.LOGOUT, principal=Principal(session[0], frozenset(), "session"))
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
    return response
