"""Access control of the REST API and dashboard (issue 14): every route but the probes needs a credential once
one is configured; view and act roles; the dashboard's login cookie, its CSRF token and logout; the audit
log; the refusal to serve beyond loopback without authentication; HTTPS from the gateway itself.

Real parts: a migrated SQLite database filled through the repository, the app over HTTP (TestClient), and
for the process-level checks a real `btd serve` with a self-signed certificate made by openssl.
"""

from __future__ import annotations

import http.client
import http.cookies
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from helpers_gateway import REPO_ROOT, GatewayProcess, free_port, gateway_env, self_signed_certificate
from sqlalchemy import select
from test_api import PATIENT_ID, PATIENT_NAME, _record, _to_scoring, uid

from core import queue
from core.contracts import State
from core.db import migrate
from core.db.schema import AuditEntry
from core.db.session import dispose_engines, session_scope
from core.settings import Settings
from service.api.app import all_routes, create_app
from service.api.auth import SESSION_COOKIE, Identity, SessionCodec, exposure_problem, read_users_file
from service.api.passwords import hash_password, verify_password
from worker import tasks

TOKEN, VIEWER, OPERATOR = "api-token-0123456789", "view-token-abcdef", "act-token-fedcba"
ALICE_PASSWORD, BOB_PASSWORD = "alice-password-1", "bob-password-22"
# Routes that answer without a credential; none of them shows patient data.
OPEN_ROUTES = {"/healthz", "/readyz", "/login", "/logout", "/static/{name}"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A database with a failed study (rescorable) and a receiving one, and a site with every kind of credential."""
    data_dir = tmp_path_factory.mktemp("access")
    users = data_dir / "users"
    users.write_text(
        "# dashboard users\n"
        f"alice:act:{hash_password(ALICE_PASSWORD)}\n"
        f"bob:view:{hash_password(BOB_PASSWORD)}\n"
    )
    settings = Settings(
        data_dir=data_dir,
        api_token=TOKEN,
        view_tokens=[f"prometheus:{VIEWER}"],
        act_tokens=[OPERATOR],
        users_file=users,
        session_secret="a secret of the site",
    )
    migrate.upgrade(settings)
    ns = SimpleNamespace(settings=settings, failed=uid(), receiving=uid())
    with session_scope(settings) as session:
        ns.failed_sop = _record(session, settings, ns.failed, ns.failed + ".1")
        _record(session, settings, ns.receiving, ns.receiving + ".1")
    claim = _to_scoring(settings, ns.failed)
    assert tasks._release(settings, claim, State.FAILED, "failed: test", "test")
    queue.start_executor(lambda _name: (lambda *_args: None))  # takes the rescore's task and does nothing
    yield ns
    queue.stop_executor()
    dispose_engines()


@pytest.fixture
def client(site: SimpleNamespace) -> TestClient:
    return TestClient(create_app(site.settings), follow_redirects=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def concrete(path: str, site: SimpleNamespace) -> str:
    return (
        path.replace("{study_uid}", site.failed)
        .replace("{sop_instance_uid}", site.failed_sop)
        .replace("{name}", "dashboard.css")
    )


def routes(client: TestClient) -> list[tuple[str, str]]:
    return [(method, route.path) for route in all_routes(client.app) for method in route.methods]


def test_every_route_but_the_probes_needs_a_credential(client: TestClient, site: SimpleNamespace) -> None:
    checked = set()
    for method, path in routes(client):
        response = client.request(method, concrete(path, site))
        if path in OPEN_ROUTES:
            assert response.status_code not in (401, 403), (method, path, response.status_code)
            continue
        checked.add(path)
        if response.status_code == 303:  # a page: the browser is sent to log in, and comes back after
            assert response.headers["location"].startswith("/login?next=%2F"), path
        else:
            assert response.status_code == 401, (method, path, response.status_code)
            assert response.headers["www-authenticate"] == "Bearer"
        assert PATIENT_ID not in response.text and site.failed_sop not in response.text
    protected = {"/", "/docs", "/openapi.json", "/metrics", "/api/studies", "/api/stats", "/ui/studies",
                 "/ui/studies/{study_uid}/instances/{sop_instance_uid}/overlay.png", "/api/studies/{study_uid}/rescore"}
    assert protected <= checked


def test_the_api_token_keeps_every_role(client: TestClient, site: SimpleNamespace) -> None:
    assert client.get(f"/api/studies/{site.failed}", headers=bearer(TOKEN)).status_code == 200
    assert client.get("/metrics", headers=bearer(TOKEN)).status_code == 200
    assert client.post(f"/api/studies/{site.receiving}/rescore", headers=bearer(TOKEN)).status_code == 409
    assert client.get("/api/studies", headers=bearer("wrong")).status_code == 403


def test_a_view_token_reads_everything_but_may_not_act(client: TestClient, site: SimpleNamespace) -> None:
    for path in ("/api/studies", f"/api/studies/{site.failed}", "/api/stats", "/openapi.json", "/metrics",
                 f"/api/studies/{site.failed}/reports", f"/ui/studies/{site.failed}"):
        assert client.get(path, headers=bearer(VIEWER)).status_code == 200, path
    for action in ("rescore", "redeliver"):
        refused = client.post(f"/api/studies/{site.failed}/{action}", headers=bearer(VIEWER))
        assert refused.status_code == 403 and "may view but not act" in refused.text
    with session_scope(site.settings) as session:
        assert session.scalar(select(AuditEntry.actor).where(AuditEntry.action == "view_study").limit(1)) in (
            "token:view:prometheus",
            "token:api",
        )


def test_prometheus_scrapes_metrics_with_a_bearer_token(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 401
    scraped = client.get("/metrics", headers=bearer(VIEWER))
    assert scraped.status_code == 200 and "btd_studies" in scraped.text and "btd_conflicting_instances" in scraped.text


def test_an_act_token_rescores(client: TestClient, site: SimpleNamespace) -> None:
    accepted = client.post(f"/api/studies/{site.failed}/rescore", headers=bearer(OPERATOR))
    assert accepted.status_code == 202, accepted.text
    with session_scope(site.settings) as session:
        row = session.scalars(
            select(AuditEntry).where(AuditEntry.study_uid == site.failed, AuditEntry.action == "rescore")
        ).one()
        assert row.actor.startswith("token:act:") and OPERATOR not in row.actor and row.via == "bearer"
        assert row.peer == "testclient"


def login(client: TestClient, user: str, password: str, next_url: str = "/") -> tuple[int, str | None, str]:
    """POST the login form; (status, the raw Set-Cookie header, Location)."""
    response = client.post("/login", data={"user": user, "password": password, "next": next_url})
    return response.status_code, response.headers.get("set-cookie"), response.headers.get("location", "")


def test_login_sets_a_strict_httponly_expiring_cookie(client: TestClient, site: SimpleNamespace) -> None:
    page = client.get(f"/ui/studies/{site.failed}")
    assert page.status_code == 303
    form = client.get(page.headers["location"])
    assert form.status_code == 200 and 'name="password"' in form.text and f"%2Fui%2Fstudies%2F{site.failed}" in (
        page.headers["location"]
    )
    status, cookie, location = login(client, "alice", ALICE_PASSWORD, f"/ui/studies/{site.failed}")
    assert status == 303 and location == f"/ui/studies/{site.failed}"
    assert cookie is not None
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "max-age", "path"} <= attributes
    assert "samesite=strict" in cookie.lower()
    assert "secure" not in attributes  # plain HTTP here; over HTTPS it is Secure (test_https_...)
    morsel = http.cookies.SimpleCookie(cookie)[SESSION_COOKIE]
    assert int(morsel["max-age"]) == int(site.settings.session_hours * 3600)
    html = client.get(f"/ui/studies/{site.failed}").text  # the client keeps the cookie
    assert 'id="signed-in">user:alice<' in html and 'name="csrf-token"' in html
    assert 'id="api-token"' not in html  # the session can act: no token to type


def csrf_of(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert match
    return match.group(1)


def test_actions_from_a_session_need_its_csrf_token(client: TestClient, site: SimpleNamespace) -> None:
    assert login(client, "alice", ALICE_PASSWORD)[0] == 303
    csrf = csrf_of(client.get("/").text)
    url = f"/api/studies/{site.receiving}/rescore"
    assert client.post(url).status_code == 403  # what a forged cross-site POST would carry: the cookie only
    assert client.post(url, headers={"X-CSRF-Token": "guessed"}).status_code == 403
    assert client.post(url, headers={"X-CSRF-Token": csrf}).status_code == 409  # allowed; RECEIVING -> 409


def test_a_view_user_may_look_but_not_act(client: TestClient, site: SimpleNamespace) -> None:
    assert login(client, "bob", BOB_PASSWORD)[0] == 303
    html = client.get(f"/ui/studies/{site.failed}").text
    assert 'id="signed-in">user:bob<' in html and 'id="api-token"' in html  # a token may still be typed
    refused = client.post(f"/api/studies/{site.receiving}/rescore", headers={"X-CSRF-Token": csrf_of(html)})
    assert refused.status_code == 403


def test_wrong_passwords_and_tokens_are_refused_and_audited(client: TestClient, site: SimpleNamespace) -> None:
    assert login(client, "alice", "not her password")[0] == 401
    assert login(client, "nobody", ALICE_PASSWORD)[0] == 401
    assert login(client, "", "not a token")[0] == 401
    status, cookie, _ = login(client, "", VIEWER)  # a token in the password field, user left empty
    assert status == 303 and cookie
    with session_scope(site.settings) as session:
        failed = session.scalars(select(AuditEntry.actor).where(AuditEntry.action == "login_failed")).all()
    assert {"user:alice", "user:nobody", "token"} <= set(failed)


def test_a_forged_or_expired_cookie_is_no_session(client: TestClient, site: SimpleNamespace) -> None:
    codec = SessionCodec("a secret of the site", hours=1)
    good, _ = codec.issue(Identity("user:alice", frozenset({"view", "act"})))
    assert codec.read(good) is not None
    payload, signature = good.split(".")
    assert codec.read(payload[:-2] + "xx." + signature) is None
    assert SessionCodec("another secret", hours=1).read(good) is None
    assert codec.read(good, now=10**10) is None  # past its expiry
    client.cookies.set(SESSION_COOKIE, payload[:-2] + "xx." + signature)
    assert client.get("/").status_code == 303
    client.cookies.set(SESSION_COOKIE, good)
    assert client.get("/").status_code == 200  # same secret in the site's settings: a valid session
    revoked = codec.issue(Identity("user:mallory", frozenset({"view", "act"})))[0]
    client.cookies.set(SESSION_COOKIE, revoked)
    assert client.get("/").status_code == 303  # signed, but no such credential is configured


def test_logout_needs_the_csrf_token_then_ends_the_session(client: TestClient, site: SimpleNamespace) -> None:
    assert login(client, "alice", ALICE_PASSWORD)[0] == 303
    csrf = csrf_of(client.get("/").text)
    client.post("/logout", data={"csrf": "wrong"})
    assert client.get("/").status_code == 200  # still logged in
    out = client.post("/logout", data={"csrf": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert client.get("/").status_code == 303


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil", "javascript:alert(1)"])
def test_login_never_redirects_off_site(client: TestClient, target: str) -> None:
    assert login(client, "alice", ALICE_PASSWORD, target)[2] == "/"


def test_the_audit_log_names_credentials_and_shows_on_the_study_page(client: TestClient, site: SimpleNamespace) -> None:
    client.get(f"/api/studies/{site.failed}", headers=bearer(VIEWER))
    client.get(f"/api/studies/{site.failed}/reports", headers=bearer(TOKEN))
    html = client.get(f"/ui/studies/{site.failed}", headers=bearer(TOKEN)).text
    table = html[html.index('id="audit"') :]
    assert "token:view:prometheus" in table and "view_reports" in table and "view_study" in table
    with session_scope(site.settings) as session:
        rows = session.scalars(select(AuditEntry).where(AuditEntry.study_uid == site.failed)).all()
        text = " ".join(f"{r.actor} {r.via} {r.action} {r.detail} {r.peer}" for r in rows)
    assert {"view_study", "view_reports"} <= {r.action for r in rows}
    assert PATIENT_ID not in text and "Doe" not in text and PATIENT_NAME not in html


def test_docs_and_openapi_need_a_credential(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/docs").status_code == 303
    assert client.get("/docs", headers=bearer(VIEWER)).status_code == 200
    assert "/api/studies/{study_uid}/rescore" in client.get("/openapi.json", headers=bearer(VIEWER)).json()["paths"]


def test_probes_stay_open_and_show_no_patient_data(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code in (200, 503) and PATIENT_ID not in ready.text


def test_nothing_configured_means_open_on_loopback(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    migrate.upgrade(settings)
    open_client = TestClient(create_app(settings), follow_redirects=False)
    assert open_client.get("/api/studies").status_code == 200 and open_client.get("/").status_code == 200
    assert open_client.get("/login").status_code == 303  # nothing to log in to
    assert exposure_problem(settings) is None
    dispose_engines()


@pytest.mark.parametrize(
    ("host", "configured", "override", "refused"),
    [
        ("127.0.0.1", {}, False, False),
        ("::1", {}, False, False),
        ("localhost", {}, False, False),
        ("0.0.0.0", {}, False, True),
        ("::", {}, False, True),
        ("gateway.example", {}, False, True),
        ("0.0.0.0", {"api_token": "t"}, False, False),
        ("0.0.0.0", {"view_tokens": ["t"]}, False, False),
        ("0.0.0.0", {}, True, False),
    ],
)
def test_binding_beyond_loopback_needs_authentication(
    tmp_path: Path, host: str, configured: dict, override: bool, refused: bool
) -> None:
    settings = Settings(data_dir=tmp_path, http_host=host, allow_unauthenticated_network=override, **configured)
    problem = exposure_problem(settings)
    assert (problem is not None) == refused
    if refused:
        assert "BTD_API_TOKEN" in problem and "BTD_ALLOW_UNAUTHENTICATED_NETWORK" in problem


def test_btd_serve_refuses_to_start_on_all_interfaces_without_authentication(tmp_path: Path) -> None:
    """Nothing is bound: the check comes before the listener and the API."""
    http_port, dicom_port = free_port(), free_port()
    env = gateway_env(tmp_path, http_host="0.0.0.0", http_port=http_port, dicom_host="127.0.0.1",
                      dicom_port=dicom_port)
    done = subprocess.run([sys.executable, "-m", "btd.cli", "serve"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "refusing to serve the HTTP API on 0.0.0.0 without authentication" in done.stderr
    assert not (tmp_path / "btd.sqlite3").exists()  # stopped before it even migrated a database


def test_users_file_lines_are_checked_and_btd_user_line_makes_them(tmp_path: Path) -> None:
    made = subprocess.run([sys.executable, "-m", "btd.cli", "user-line", "carol", "--role", "act"], cwd=REPO_ROOT,
                          input="carol-password\n", capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    line = made.stdout.strip()
    name, role, encoded = line.split(":", 2)
    assert (name, role) == ("carol", "act") and verify_password("carol-password", encoded)
    assert not verify_password("carol-passworD", encoded)
    good = tmp_path / "users"
    good.write_text(line + "\n")
    assert read_users_file(good)["carol"][1].roles == {"view", "act"}
    bad = tmp_path / "bad"
    bad.write_text("carol:admin:scrypt$1$2$3$x$y\n")
    with pytest.raises(ValueError, match="bad:1"):
        read_users_file(bad)


def _https(url: str, cafile: Path, headers: dict[str, str] | None = None, data: bytes | None = None):
    context = ssl.create_default_context(cafile=str(cafile))
    request = urllib.request.Request(url, headers=headers or {}, data=data)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # keep the 303 and its Set-Cookie for the test
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), NoRedirect)
    try:
        return opener.open(request, timeout=30)
    except urllib.error.HTTPError as exc:
        return exc


@pytest.mark.slow
def test_the_gateway_serves_https_itself_with_a_secure_cookie(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    gateway = GatewayProcess(tmp_path / "data", api_token=TOKEN, http_tls_cert=cert, http_tls_key=key)
    with gateway:
        base = f"https://127.0.0.1:{gateway.http_port}"
        assert _https(f"{base}/healthz", cert).status == 200
        assert _https(f"{base}/api/studies", cert).status == 401
        assert _https(f"{base}/api/studies", cert, bearer(TOKEN)).status == 200
        form = f"user=&password={TOKEN}&next=/".encode()
        answer = _https(f"{base}/login", cert, {"Content-Type": "application/x-www-form-urlencoded"}, form)
        assert answer.status == 303
        cookie = answer.headers["set-cookie"].lower()
        assert "secure" in [part.strip() for part in cookie.split(";")] and "httponly" in cookie
        # plain HTTP on the same port gets no HTTP answer (uvicorn's TLS layer drops it)
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{gateway.http_port}/healthz", timeout=10).read()
    assert '"https": true' in gateway.log_text() or '"https":true' in gateway.log_text()
