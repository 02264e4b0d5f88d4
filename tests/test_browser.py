"""The dashboard in a real browser: headless Debian Chromium (Playwright) against a running `btd serve`
that received the real 20-slice CT series over DICOM and scored it (tests/dashboard_flow.py: a tiny random
model with its calibration threshold set below any score, so the study is flagged deterministically).

Screenshots go to artifacts/screenshots/ (gitignored) as test artefacts.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from dashboard_flow import ScoredFlow

pytest_plugins = ["dashboard_flow"]
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(1200)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if shutil.which(CHROMIUM) is None:
        pytest.skip("Debian chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    yield page
    context.close()
    assert not errors, f"the page reported errors: {errors}"  # a broken script fails the test that loaded it


def test_overview_counts_the_scored_study(page: object, scored_flow: ScoredFlow) -> None:
    page.goto(f"{scored_flow.base_url}/")  # type: ignore[attr-defined]
    assert page.inner_text("#count-received") == "1"  # type: ignore[attr-defined]
    assert page.inner_text("#count-scored") == "1"  # type: ignore[attr-defined]
    assert page.inner_text("#count-flagged") == "1"  # type: ignore[attr-defined]
    assert page.inner_text("#count-failed") == "0"  # type: ignore[attr-defined]
    worker = page.locator("#worker-health")  # type: ignore[attr-defined]
    assert "in-process" in worker.inner_text() and "ok" in (worker.get_attribute("class") or "")
    assert "dashboard-tiny-random" in page.inner_text("#model")  # type: ignore[attr-defined]
    body = page.content()  # type: ignore[attr-defined]
    assert scored_flow.patient_id not in body and scored_flow.patient_name not in body
    page.screenshot(path=str(scored_flow.artifacts / "overview.png"), full_page=True)  # type: ignore[attr-defined]


def test_study_list_filters_flagged(page: object, scored_flow: ScoredFlow) -> None:
    page.goto(f"{scored_flow.base_url}/ui/studies")  # type: ignore[attr-defined]
    page.select_option("select[name=verdict]", "suspicious")  # type: ignore[attr-defined]
    page.click("#filters button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_url("**verdict=suspicious**")  # type: ignore[attr-defined]
    assert scored_flow.study_uid in page.inner_text("#study-list")  # type: ignore[attr-defined]
    page.screenshot(path=str(scored_flow.artifacts / "studies-flagged.png"), full_page=True)  # type: ignore[attr-defined]
    page.select_option("select[name=verdict]", "no_evidence")  # type: ignore[attr-defined]
    page.click("#filters button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_url("**verdict=no_evidence**")  # type: ignore[attr-defined]
    assert scored_flow.study_uid not in page.inner_text("#study-list")  # type: ignore[attr-defined]


def test_flagged_study_page_shows_heat_map_slices(page: object, scored_flow: ScoredFlow) -> None:
    page.goto(f"{scored_flow.base_url}/ui/studies/{scored_flow.study_uid}")  # type: ignore[attr-defined]
    assert "suspicious" in page.inner_text("#study-verdict")  # type: ignore[attr-defined]
    assert "dashboard-tiny-random" in page.inner_text("#series")  # type: ignore[attr-defined]
    milestones = page.inner_text("#milestones").lower()  # type: ignore[attr-defined]
    assert "scored" in milestones and page.locator("#milestones li.done").count() >= 5  # type: ignore[attr-defined]
    first = page.locator("img.overlay").first  # type: ignore[attr-defined]
    first.scroll_into_view_if_needed()
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => { const i = document.querySelector('img.overlay'); return i && i.complete && i.naturalWidth > 0; }"
    )
    assert first.evaluate("img => img.naturalWidth") == 512
    # Every suspicious slice shown (up to 12; later ones load lazily) renders once scrolled to.
    page.evaluate("document.querySelectorAll('img.overlay').forEach(i => { i.loading = 'eager'; })")  # type: ignore[attr-defined]
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => [...document.querySelectorAll('img.overlay')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator("img.overlay").count() == 12  # type: ignore[attr-defined]
    assert page.locator("#progress").is_hidden()  # type: ignore[attr-defined]
    body = page.content()  # type: ignore[attr-defined]
    assert scored_flow.patient_id not in body and scored_flow.patient_name not in body
    page.screenshot(path=str(scored_flow.artifacts / "study-flagged.png"), full_page=True)  # type: ignore[attr-defined]


def test_rescore_click_changes_the_state(page: object, scored_flow: ScoredFlow) -> None:
    """Last on purpose: after the click the gateway scores again; the test stops it once the change shows,
    so a second scoring does not eat the CPU of the rest of the suite."""
    page.goto(f"{scored_flow.base_url}/ui/studies/{scored_flow.study_uid}")  # type: ignore[attr-defined]
    before = page.locator("#study").get_attribute("data-state")  # type: ignore[attr-defined]
    assert before in ("SCORED", "REPORTED", "DELIVERED", "FAILED_DELIVERY")
    page.click("#rescore-button")  # type: ignore[attr-defined]
    # The page polls its status every 2 s and reloads itself when the state moves on.
    page.wait_for_function(  # type: ignore[attr-defined]
        "(before) => { const s = document.getElementById('study');"
        " return s && s.dataset.state && s.dataset.state !== before; }",
        arg=before,
        timeout=60_000,
    )
    after = page.locator("#study").get_attribute("data-state")  # type: ignore[attr-defined]
    assert after in ("QUEUED", "SCORING", "SCORED"), after
    assert scored_flow.study()["version"] == 2
    # Live progress: while version 2 is being scored the page shows how many slices are done, polled every 2 s.
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => { const p = document.getElementById('progress'); const s = document.getElementById('study');"
        " return s.dataset.state === 'SCORING' && !p.classList.contains('hidden')"
        " && / \\/ 20 slices scored/.test(p.innerText); }",
        timeout=120_000,
    )
    page.screenshot(path=str(scored_flow.artifacts / "study-rescoring.png"), full_page=True)  # type: ignore[attr-defined]
    page.goto("about:blank")  # stop the page's polling before its server goes away  # type: ignore[attr-defined]
    scored_flow.gateway.stop()
