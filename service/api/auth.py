"""Who may see and who may act: credentials, the dashboard's login cookie, and the route guards.

Roles: `view` (every page, image, SR, list, metric and the OpenAPI description) and `act` (rescore,
redeliver; implies view). Credentials, all optional, read once when the app is built:
- `BTD_API_TOKEN`: a Bearer token with every role (what it always was, now for the reads too);
- `BTD_VIEW_TOKENS` / `BTD_ACT_TOKENS`: comma-separated Bearer tokens, each `TOKEN` or `NAME:TOKEN`
  (the name is what the audit log shows; without one it shows the first 8 hex digits of the token's SHA-256);
- `BTD_USERS_FILE`: dashboard users, one `name:role:scrypt-hash` a line (`btd user-line NAME --role act`).

With none configured every route is open, which `btd serve` allows only on a loopback address
(`exposure_problem`). Once any is configured, every route but `/healthz`, `/readyz`, `/static/*` and the
login page needs one: an API client sends `Authorization: Bearer <token>`, a browser logs in at `/login`
(a user, or a token in the password field with the user left empty) and gets a signed session cookie.

Why a cookie of our own rather than a server-side session table: the gateway keeps no state of its own
beyond the database, and the cookie carries only the credential's name, its expiry and the CSRF token,
HMAC-signed; on every request the name is looked up again among the configured credentials, so removing a
token or a user (and restarting) ends its sessions. Why CSRF only for cookie sessions: a browser attaches
cookies by itself but never an Authorization header, so only a cookie-authenticated POST can be forged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core.settings import Settings
from service.api.passwords import dummy_hash, verify_password

SESSION_COOKIE = "btd_session"
CSRF_HEADER = "X-CSRF-Token"
USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MAX_NEXT_CHARS = 256


class Role(StrEnum):
    VIEW = "view"
    ACT = "act"


ALL_ROLES = frozenset(Role)
VIEW_ONLY = frozenset({Role.VIEW})


@dataclass(frozen=True)
class Identity:
    """A configured credential: the name the audit log shows, and its roles."""

    name: str
    roles: frozenset[str]


@dataclass(frozen=True)
class Principal:
    """Who is making this request, how they proved it, and (cookie sessions) the CSRF token they must echo."""

    name: str
    roles: frozenset[str]
    via: str  # "bearer", "session" or "open" (no credential configured)
    csrf: str | None = None

    def can(self, role: Role) -> bool:
        return role in self.roles


OPEN = Principal("anonymous", ALL_ROLES, "open")


class UsersFileError(ValueError):
    """The users file cannot be read or has a malformed line (the gateway refuses to start with it)."""


def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def _token_entries(values: list[str], kind: str, roles: frozenset[str]) -> list[tuple[bytes, Identity]]:
    entries = []
    for value in values:
        name, sep, token = value.partition(":")
        if not sep or not USER_NAME.match(name) or not token:
            name, token = _fingerprint(value), value
        entries.append((hashlib.sha256(token.encode()).digest(), Identity(f"token:{kind}:{name}", roles)))
    return entries


def read_users_file(path: Path) -> dict[str, tuple[str, Identity]]:
    """`name:role:hash` lines (blank lines and `#` comments ignored) -> name -> (hash, identity)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsersFileError(f"cannot read BTD_USERS_FILE {path}: {exc}") from exc
    users: dict[str, tuple[str, Identity]] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        role, _, encoded = rest.partition(":")
        if not USER_NAME.match(name) or role not in (Role.VIEW, Role.ACT) or not encoded.startswith("scrypt$"):
            raise UsersFileError(f"{path}:{number}: expected name:view|act:scrypt$... (see `btd user-line`)")
        roles = ALL_ROLES if role == Role.ACT else VIEW_ONLY
        users[name] = (encoded, Identity(f"user:{name}", roles))
    return users


class Credentials:
    """Every configured credential, looked up in constant time per entry (no early exit on a match)."""

    def __init__(self, settings: Settings) -> None:
        self.tokens: list[tuple[bytes, Identity]] = []
        if settings.api_token:
            self.tokens.append((hashlib.sha256(settings.api_token.encode()).digest(), Identity("token:api", ALL_ROLES)))
        self.tokens += _token_entries(settings.view_tokens, "view", VIEW_ONLY)
        self.tokens += _token_entries(settings.act_tokens, "act", ALL_ROLES)
        self.users = read_users_file(settings.users_file) if settings.users_file else {}
        self.by_name = {identity.name: identity for _, identity in self.tokens}
        self.by_name.update({identity.name: identity for _, identity in self.users.values()})
        self.configured = settings.auth_configured

    def match_token(self, token: str) -> Identity | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for expected, identity in self.tokens:
            if hmac.compare_digest(digest, expected) and found is None:
                found = identity
        return found

    def check_user(self, name: str, password: str) -> Identity | None:
        entry = self.users.get(name)
        ok = verify_password(password, entry[0] if entry else dummy_hash())
        return entry[1] if entry and ok else None


class SessionCodec:
    """The login cookie: base64url(JSON {n: credential name, e: expiry, c: csrf token}) "." HMAC-SHA256."""

    def __init__(self, secret: str | None, hours: float) -> None:
        # No secret configured: a random one per process (a restart logs everyone out; nothing to leak).
        self.key = hashlib.sha256(secret.encode()).digest() if secret else secrets.token_bytes(32)
        self.seconds = max(60, int(hours * 3600))

    def _sign(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self.key, payload, hashlib.sha256).digest()).decode().rstrip("=")

    def issue(self, identity: Identity, now: float | None = None) -> tuple[str, str]:
        """(cookie value, CSRF token) for a new session of `identity`."""
        csrf = secrets.token_urlsafe(24)
        expires = int((now or time.time()) + self.seconds)
        body = json.dumps({"n": identity.name, "e": expires, "c": csrf}, separators=(",", ":")).encode()
        payload = base64.urlsafe_b64encode(body).decode().rstrip("=")
        return f"{payload}.{self._sign(payload.encode())}", csrf

    def read(self, value: str, now: float | None = None) -> tuple[str, str] | None:
        """(credential name, CSRF token) of a valid, unexpired cookie; None for anything else."""
        payload, _, signature = value.partition(".")
        if not payload or len(value) > 1024 or not hmac.compare_digest(signature, self._sign(payload.encode())):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            name, expires, csrf = str(data["n"]), int(data["e"]), str(data["c"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires < (now or time.time()):
            return None
        return name, csrf


class Access:
    """What the guards need, built once per app from its settings."""

    def __init__(self, settings: Settings) -> None:
        self.credentials = Credentials(settings)
        self.sessions = SessionCodec(settings.session_secret, settings.session_hours)


def access(request: Request) -> Access:
    return request.app.state.access


_bearer = HTTPBearer(auto_error=False)


def _resolve(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal | None:
    """The request's principal; None when it brought no credential. A wrong Bearer token is 403 at once."""
    guard = access(request)
    if not guard.credentials.configured:
        return OPEN
    if credentials is not None and credentials.credentials:
        identity = guard.credentials.match_token(credentials.credentials)
        if identity is None:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid token")
        return Principal(identity.name, identity.roles, "bearer")
    cookie = request.cookies.get(SESSION_COOKIE)
    session = guard.sessions.read(cookie) if cookie else None
    if session is not None:
        identity = guard.credentials.by_name.get(session[0])
        if identity is not None:
            return Principal(identity.name, identity.roles, "session", csrf=session[1])
    return None


def _remember(request: Request, principal: Principal) -> Principal:
    request.state.principal = principal
    return principal


def require_view(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Principal:
    """Guard of the JSON routes, images and metrics: 401 without a credential, 403 with a wrong token."""
    principal = _resolve(request, credentials)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "authentication required", headers={"WWW-Authenticate": "Bearer"}
        )
    return _remember(request, principal)


def login_url(request: Request) -> str:
    """/login, with the page asked for as `next` (when it is short enough to carry back)."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return "/login" if len(target) > MAX_NEXT_CHARS else f"/login?next={quote(target, safe='')}"


def require_view_page(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Principal:
    """Guard of the HTML pages: a browser without a session is sent to the login page instead of a 401."""
    principal = _resolve(request, credentials)
    if principal is None:
        raise HTTPException(status.HTTP_303_SEE_OTHER, "login required", headers={"Location": login_url(request)})
    return _remember(request, principal)


def require_act(request: Request, principal: Principal = Depends(require_view)) -> Principal:
    """Guard of the actions: the act role, and for a cookie session the CSRF token in `X-CSRF-Token`."""
    if not principal.can(Role.ACT):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this credential may view but not act")
    if principal.via == "session":
        sent = request.headers.get(CSRF_HEADER, "")
        if not principal.csrf or not hmac.compare_digest(sent.encode(), principal.csrf.encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token")
    return principal


def safe_next(value: str | None) -> str:
    """Where to go after logging in: a local path only (never another site: no open redirect)."""
    if not value or len(value) > MAX_NEXT_CHARS or not value.startswith("/") or value.startswith("//"):
        return "/"
    if "\\" in value or any(ord(ch) < 32 for ch in value):
        return "/"
    return value


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def exposure_problem(settings: Settings) -> str | None:
    """Why `btd serve` must not start with these settings, or None. The API shows patient images: on an
    address other than loopback it needs a credential, unless the site says it protects it otherwise."""
    if is_loopback(settings.http_host) or settings.auth_configured or settings.allow_unauthenticated_network:
        return None
    return (
        f"refusing to serve the HTTP API on {settings.http_host} without authentication: set BTD_API_TOKEN "
        "(or BTD_VIEW_TOKENS / BTD_ACT_TOKENS / BTD_USERS_FILE), bind BTD_HTTP_HOST=127.0.0.1, or, if the "
        "network itself is protected, set BTD_ALLOW_UNAUTHENTICATED_NETWORK=true"
    )
