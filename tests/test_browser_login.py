"""The dashboard's login in a real browser (headless Debian Chromium through Playwright) against a running
`btd serve` with a users file: sent to the login page, logged in, the study page shown with its audit log,
the Rescore button accepted through the session cookie and its CSRF token (service/static/dashboard.js),
then logged out. A failed study is seeded in the database before the gateway starts; rescoring it is all
that is asked of the gateway (its in-process scoring of the stand-in file fails again, which is fine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_gateway import GatewayProcess
from sqlalchemy import select
from test_access import _record, _to_scoring, uid
from test_browser import browser, page  # noqa: F401 - the shared Chromium fixtures

from core.contracts import State
from core.db import migrate
from core.db.schema import AuditEntry
from core.db.session import dispose_engines, session_scope
from core.settings import Settings
from service.api.passwords import hash_password
from worker import tasks

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]

PASSWORD = "operator-password-7"


def test_login_view_rescore_and_logout_in_a_browser(page: object, tmp_path: Path) -> None:  # noqa: F811
    data_dir = tmp_path / "data"
    users = tmp_path / "users"
    users.write_text(f"olga:act:{hash_password(PASSWORD)}\n")
    settings = Settings(data_dir=data_dir)
    migrate.upgrade(settings)
    study = uid()
    with session_scope(settings) as session:
        _record(session, settings, study, study + ".1")
    assert tasks._release(settings, _to_scoring(settings, study), State.FAILED, "failed: seeded", "seeded")
    dispose_engines()

    with GatewayProcess(data_dir, users_file=users, session_secret="browser-test", stable_seconds=3600) as gateway:
        base = f"http://127.0.0.1:{gateway.http_port}"
        page.goto(f"{base}/ui/studies/{study}")  # type: ignore[attr-defined]
        assert "/login?next=" in page.url  # type: ignore[attr-defined]
        page.fill("input[name=user]", "olga")  # type: ignore[attr-defined]
        page.fill("input[name=password]", PASSWORD)  # type: ignore[attr-defined]
        page.click("#login-button")  # type: ignore[attr-defined]
        page.wait_for_selector("#study")  # type: ignore[attr-defined]
        assert page.url == f"{base}/ui/studies/{study}"  # type: ignore[attr-defined]
        assert page.inner_text("#signed-in") == "user:olga"  # type: ignore[attr-defined]
        assert "view_study" in page.inner_text("#audit")  # type: ignore[attr-defined]
        cookie = next(c for c in page.context.cookies() if c["name"] == "btd_session")  # type: ignore[attr-defined]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.click("#rescore-button")  # type: ignore[attr-defined]
        page.wait_for_function(  # type: ignore[attr-defined]
            "() => document.getElementById('action-result').textContent.startsWith('accepted')", timeout=30_000
        )
        page.goto("about:blank")  # type: ignore[attr-defined]  # stop the page's polling
        page.goto(f"{base}/")  # type: ignore[attr-defined]
        page.click("#logout-button")  # type: ignore[attr-defined]
        page.wait_for_url(f"{base}/login")  # type: ignore[attr-defined]
        page.goto(f"{base}/ui/studies")  # type: ignore[attr-defined]
        assert "/login" in page.url  # type: ignore[attr-defined]
    with session_scope(settings) as session:
        actions = session.scalars(select(AuditEntry.action).where(AuditEntry.actor == "user:olga")).all()
    dispose_engines()
    assert {"login", "view_study", "rescore", "logout"} <= set(actions)
