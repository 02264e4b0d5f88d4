"""The dashboard's pages and the overlay PNG, against a real migrated SQLite database and real spool slices.

The database is filled the way the gateway and the worker leave it (studies, state events, instances in
the spool, series/instance results, a residual map on disk, regions); the dashboard only reads, so
writing those rows directly is the input, not a mock of anything the dashboard does.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from html import escape
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from helpers_gateway import REPO_ROOT, free_port, gateway_env, wait_for_port, wait_until
from PIL import Image
from sqlalchemy import inspect, select, text

from core.contracts import DEFAULT_MODEL_PATH
from core.db.migrate import upgrade
from core.db.schema import AuditEntry, Instance, InstanceResult, Region, SeriesResult, Study, StudyEvent
from core.db.session import session_scope
from core.settings import Settings
from service.api import dashboard_health
from service.api.app import create_app
from service.api.dashboard_queries import milestones
from service.heatmap import REGION_COLOUR, RegionBox, render_overlay

FLAGGED_UID = "1.2.826.0.1.3680043.8.498.1001"
CLEAN_UID = "1.2.826.0.1.3680043.8.498.1002"
FAILED_UID = "1.2.826.0.1.3680043.8.498.1003"
OLD_UID = "1.2.826.0.1.3680043.8.498.1004"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2001"
N_FILLER = 27  # with the four above: 31 studies, two pages of 25
REGION = (200, 220, 260, 280)
PATIENT_NAME = "TOTALSEG^EXAMPLE"
PATIENT_ID = "TOTALSEG-EXAMPLE"
PIPELINE = ("RECEIVING", "STABLE", "QUEUED", "SCORING", "SCORED", "REPORTED", "DELIVERED")


def _events(uid: str, states: tuple[str, ...], start: datetime) -> list[StudyEvent]:
    events, previous = [], None
    for i, state in enumerate(states):
        events.append(StudyEvent(study_uid=uid, at=start + timedelta(seconds=5 * i), from_state=previous,
                                 to_state=state, detail=f"step {i}"))
        previous = state
    return events


def _study(uid: str, state: str, created: datetime, **values: object) -> Study:
    defaults = dict(state_since=created, version=1, n_instances=0, attempts=0, created_at=created, updated_at=created,
                    patient_name=PATIENT_NAME, patient_id=PATIENT_ID, modalities="CT")
    defaults.update(values)
    return Study(study_uid=uid, state=state, **defaults)


def seed(settings: Settings, ct_series_dir: Path) -> dict[str, object]:
    """Four studies worth looking at (flagged, clean, failed, received yesterday) and filler for paging."""
    now = datetime.now(UTC)
    # Today's studies are spread over the last 37 "minutes"; just after midnight UTC a minute shrinks so that
    # they all stay today (the counts of today and the list of yesterday below depend on it).
    minute = min(timedelta(minutes=1), (now - now.replace(hour=0, minute=0, second=0, microsecond=0)) / 40)
    spool = Path(settings.spool_dir)
    slices = sorted(p for p in ct_series_dir.iterdir() if p.name.startswith("CT."))[:3]
    sops = []
    with session_scope(settings) as session:
        session.add(_study(FLAGGED_UID, "DELIVERED", now - 5 * minute, verdict="suspicious", score=7.5,
                           n_instances=3, study_description="CHEST", study_date="20221208"))
        session.add(_study(CLEAN_UID, "SCORED", now - 4 * minute, verdict="no_evidence", score=1.2,
                           modalities="MR"))
        session.add(_study(FAILED_UID, "FAILED", now - 3 * minute, attempts=3,
                           error="RuntimeError: model file missing"))
        session.add(_study(OLD_UID, "DELIVERED", now - timedelta(days=1), verdict="no_evidence"))
        for i in range(N_FILLER):
            session.add(_study(f"1.2.826.0.1.3680043.8.498.9{i:03d}", "RECEIVING", now - (10 + i) * minute))
        session.flush()
        session.add_all(_events(FLAGGED_UID, PIPELINE, now - 5 * minute))
        session.add_all(_events(CLEAN_UID, PIPELINE[:5], now - 4 * minute))
        session.add_all(_events(FAILED_UID, ("RECEIVING", "STABLE", "QUEUED", "SCORING", "FAILED"),
                                now - 3 * minute))
        session.add_all(_events(OLD_UID, PIPELINE, now - timedelta(days=1)))
        for path in slices:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            relative = f"{FLAGGED_UID}/{SERIES_UID}/{ds.SOPInstanceUID}.dcm"
            (spool / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, spool / relative)
            sops.append(ds.SOPInstanceUID)
            session.add(Instance(study_uid=FLAGGED_UID, series_uid=SERIES_UID, sop_instance_uid=ds.SOPInstanceUID,
                                 sop_class_uid=ds.SOPClassUID, modality="CT", transfer_syntax="1.2.840.10008.1.2.4.90",
                                 size=path.stat().st_size, sha256="0" * 64, path=relative, received_at=now))
        series = SeriesResult(study_uid=FLAGGED_UID, study_version=1, series_uid=SERIES_UID, modality="CT",
                              verdict="suspicious", score=7.5, n_instances=3, n_assessed=3, model_name="btd-test-tiny",
                              model_sha256="ab" * 32)
        session.add(series)
        session.flush()
        # The residual map the worker saves: hot inside the region, quiet elsewhere.
        residual = np.full((512, 512), 0.001, dtype=np.float16)
        x0, y0, x1, y1 = REGION
        residual[y0:y1, x0:x1] = 0.2
        map_rel = f"maps/{FLAGGED_UID}/{sops[0]}.npy"
        (Path(settings.data_dir) / map_rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(Path(settings.data_dir) / map_rel, residual)
        flagged = InstanceResult(series_result_id=series.id, sop_instance_uid=sops[0], score=7.5, verdict="suspicious",
                                 map_path=map_rel)
        session.add(flagged)
        session.add(InstanceResult(series_result_id=series.id, sop_instance_uid=sops[1], score=0.5,
                                   verdict="no_evidence"))
        session.flush()
        outline = [[x0, y0], [x1 - 1, y0], [x1 - 1, y1 - 1], [x0, y1 - 1]]
        session.add(Region(instance_result_id=flagged.id, sop_instance_uid=sops[0], x0=x0, y0=y0, x1=x1, y1=y1,
                           score=7.5, outline=outline))
        session.add(SeriesResult(study_uid=CLEAN_UID, study_version=1, series_uid="1.2.3.4", modality="MR",
                                 verdict="no_evidence", score=1.2, n_instances=5, n_assessed=5, model_name="btd-test"))
        tables = set(inspect(session.connection()).get_table_names())
        if {"reports", "delivery_attempts"} <= tables:
            report_id = session.execute(
                text("INSERT INTO reports (study_uid, study_version, sr_sop_instance_uid, sr_series_uid, sr_path, "
                     "created_at) VALUES (:u, 1, '1.2.3.9', '1.2.3.8', 'reports/x.dcm', :t) RETURNING id"),
                {"u": FLAGGED_UID, "t": now},
            ).scalar_one()
            for attempt, outcome, status in ((1, "failure", None), (2, "success", 0)):
                session.execute(
                    text("INSERT INTO delivery_attempts (report_id, destination, attempt, at, outcome, dicom_status, "
                         "error) VALUES (:r, 'PACS@127.0.0.1:4242', :a, :t, :o, :s, :e)"),
                    {"r": report_id, "a": attempt, "t": now + timedelta(seconds=attempt), "o": outcome, "s": status,
                     "e": "connection refused" if outcome == "failure" else None},
                )
    return {"sops": sops, "map_rel": map_rel}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ct_series_dir: Path) -> dict[str, object]:
    data_dir = tmp_path_factory.mktemp("dashboard")
    settings = Settings(data_dir=data_dir, destinations=["PACS@127.0.0.1:4242"])
    upgrade(settings)
    seeded = seed(settings, ct_series_dir)
    return {"settings": settings, **seeded}


@pytest.fixture(scope="module")
def client(env: dict[str, object]) -> TestClient:
    return TestClient(create_app(env["settings"]))  # type: ignore[arg-type]


def _assert_no_patient(html: str) -> None:
    assert PATIENT_NAME not in html and "TOTALSEG" not in html, "patient name or ID leaked into the page"


def test_overview_counts_today(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    html = response.text
    # Received today: everything but the study of yesterday.
    assert f'id="count-received" data-key="received">{3 + N_FILLER}<' in html
    assert 'id="count-scored" data-key="scored">2<' in html  # flagged + clean reached SCORED today
    assert 'id="count-flagged" data-key="flagged">1<' in html
    assert 'id="count-failed" data-key="failed">1<' in html
    assert 'id="count-review" data-key="review">0<' in html  # no study between the slice and study bars
    assert "btd-test" in html  # the model of the latest result
    # The configured (default) model's thresholds and its measured operating point, from its metadata.
    assert "<dt>thresholds</dt><dd>slice " in html and ", series " in html
    summary = json.loads(DEFAULT_MODEL_PATH.with_suffix(".json").read_text())["performance"]["summary"]
    assert f'id="operating-point">{escape(summary[:60])}' in html
    assert "PACS@127.0.0.1:4242" in html
    _assert_no_patient(html)
    numbers = client.get("/ui/overview.json").json()
    assert numbers["received"] == 3 + N_FILLER and numbers["flagged"] == 1 and numbers["review"] == 0
    assert numbers["states"]["RECEIVING"] == N_FILLER and numbers["states"]["DELIVERED"] == 2


def test_overview_reports_in_process_worker_missing(client: TestClient) -> None:
    # No `btd serve` worker thread runs in the test process: the overview must say so, not claim health.
    html = client.get("/").text
    assert 'id="worker-health" class="health bad"' in html


def test_study_list_filters_and_pages(client: TestClient) -> None:
    first = client.get("/ui/studies").text
    assert "31 found" in first and "page 1 of 2" in first and 'rel="next"' in first
    assert client.get("/ui/studies?page=2").text.count('href="/ui/studies/1.2.') == 31 - 25
    failed = client.get("/ui/studies?state=FAILED").text
    assert FAILED_UID in failed and FLAGGED_UID not in failed and "1 found" in failed
    flagged = client.get("/ui/studies?verdict=suspicious").text
    assert FLAGGED_UID in flagged and CLEAN_UID not in flagged
    assert CLEAN_UID in client.get("/ui/studies?modality=MR").text
    assert FLAGGED_UID not in client.get("/ui/studies?modality=MR").text
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    by_day = client.get(f"/ui/studies?date={yesterday}").text
    assert OLD_UID in by_day and "1 found" in by_day
    # Filters survive paging.
    assert "state=RECEIVING&amp;page=2" in client.get("/ui/studies?state=RECEIVING").text
    assert client.get("/ui/studies?date=yesterday").status_code == 422
    _assert_no_patient(first)


def test_study_page_shows_history_series_slices_and_deliveries(client: TestClient, env: dict[str, object]) -> None:
    response = client.get(f"/ui/studies/{FLAGGED_UID}")
    assert response.status_code == 200
    html = response.text
    assert html.count('<li class="done">') == len(PIPELINE)
    assert "btd-test-tiny" in html and "verdict-suspicious" in html
    sops = env["sops"]
    assert f"/ui/studies/{FLAGGED_UID}/instances/{sops[0]}/overlay.png" in html  # type: ignore[index]
    assert f"instances/{sops[1]}/overlay.png" not in html  # type: ignore[index]
    assert 'id="rescore-button"' in html and 'id="redeliver-button"' in html
    if 'id="deliveries"' in html:  # the reports migration is installed
        assert "connection refused" in html and "outcome-success" in html
    _assert_no_patient(html)
    failed = client.get(f"/ui/studies/{FAILED_UID}").text
    assert "model file missing" in failed and 'id="study-error"' in failed
    assert 'id="study-error"' not in html  # a study that never failed shows no error panel
    assert client.get("/ui/studies/1.2.3.404").status_code == 404


def test_patient_ids_only_when_allowed(env: dict[str, object]) -> None:
    settings: Settings = env["settings"]  # type: ignore[assignment]
    exposing = TestClient(
        create_app(settings.model_copy(update={"expose_patient_ids": True, "api_token": "s3cret"})),
        headers={"Authorization": "Bearer s3cret"},  # every page needs the token now (issue 14)
    )
    html = exposing.get(f"/ui/studies/{FLAGGED_UID}").text
    assert PATIENT_NAME in html and PATIENT_ID in html
    assert 'id="api-token"' in html  # a token field appears when the API wants one
    assert PATIENT_ID in exposing.get("/ui/studies").text


def test_status_json_reports_progress(client: TestClient, env: dict[str, object]) -> None:
    settings: Settings = env["settings"]  # type: ignore[assignment]
    progress_dir = Path(settings.data_dir) / "progress"
    progress_dir.mkdir(exist_ok=True)
    (progress_dir / f"{FAILED_UID}.json").write_text(json.dumps({"done": 7, "total": 20}))
    status = client.get(f"/ui/studies/{FAILED_UID}/status.json").json()
    assert status["state"] == "FAILED" and status["progress"]["done"] == 7 and status["progress"]["total"] == 20
    flagged = client.get(f"/ui/studies/{FLAGGED_UID}/status.json").json()
    assert flagged["instances_scored"] == 2 and flagged["n_events"] == len(PIPELINE)
    assert client.get("/ui/studies/1.2.3.404/status.json").status_code == 404


def _png(response_bytes: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response_bytes)).convert("RGB"))


def test_overlay_png_draws_heat_and_region(client: TestClient, env: dict[str, object]) -> None:
    sop = env["sops"][0]  # type: ignore[index]
    response = client.get(f"/ui/studies/{FLAGGED_UID}/instances/{sop}/overlay.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    pixels = _png(response.content)
    assert pixels.shape == (512, 512, 3)
    x0, y0, x1, y1 = REGION
    assert tuple(pixels[y0, (x0 + x1) // 2]) == REGION_COLOUR[:3]  # the box's top edge
    inside = pixels[y0 + 10 : y1 - 10, x0 + 10 : x1 - 10].astype(int)
    assert (inside[..., 0] - inside[..., 2]).mean() > 40  # the heat ramp is red/yellow where hot: not grey
    outside = pixels[20:60, 20:60].astype(int)
    assert np.abs(outside[..., 0] - outside[..., 2]).max() < 3  # no heat where the residual is quiet
    soft = _png(client.get(f"/ui/studies/{FLAGGED_UID}/instances/{sop}/overlay.png?window=soft").content)
    assert not np.array_equal(soft, pixels)  # the window changes the grey levels


def test_overlay_errors(client: TestClient, env: dict[str, object]) -> None:
    assert client.get(f"/ui/studies/{FLAGGED_UID}/instances/1.2.3/overlay.png").status_code == 404
    settings: Settings = env["settings"]  # type: ignore[assignment]
    with session_scope(settings) as session:
        session.add(Instance(study_uid=CLEAN_UID, series_uid="9", sop_instance_uid="9.9", sop_class_uid="1.2",
                             transfer_syntax="1.2", size=1, sha256="0" * 64, path="../../../../etc/passwd"))
    assert client.get(f"/ui/studies/{CLEAN_UID}/instances/9.9/overlay.png").status_code == 404


def test_static_assets_are_local(client: TestClient) -> None:
    css = client.get("/static/dashboard.css")
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]
    assert client.get("/static/dashboard.js").status_code == 200
    assert client.get("/static/..%2Fheatmap.py").status_code == 404
    root = Path(__file__).resolve().parents[1] / "service"
    for path in [*(root / "templates").iterdir(), *(root / "static").iterdir()]:
        body = path.read_text()
        assert "http://" not in body and "https://" not in body and 'src="//' not in body, path


def test_render_overlay_without_map_is_plain_windowed_slice(ct_series_dir: Path) -> None:
    path = sorted(p for p in ct_series_dir.iterdir() if p.name.startswith("CT."))[0]
    plain = np.asarray(render_overlay(path))
    assert plain.shape == (512, 512, 3)
    assert np.array_equal(plain[..., 0], plain[..., 2])  # grey only
    # Lung window [-1350, 150] HU: air (about -1000 HU) is dark grey, bone saturates to white.
    assert plain.min() < 70 and plain.max() == 255 and plain.std() > 30
    boxed = np.asarray(render_overlay(path, regions=[RegionBox(10, 10, 50, 50, 3.0)]))
    assert tuple(boxed[10, 30]) == REGION_COLOUR[:3]


def test_action_buttons_follow_the_state(client: TestClient) -> None:
    delivered = client.get(f"/ui/studies/{FLAGGED_UID}").text
    assert "disabled" not in _button(delivered, "rescore")
    assert "disabled" in _button(delivered, "redeliver")  # only a FAILED_DELIVERY study can be redelivered
    receiving = client.get("/ui/studies/1.2.826.0.1.3680043.8.498.9000").text
    assert "disabled" in _button(receiving, "rescore")


def _button(html: str, name: str) -> str:
    match = re.search(rf'<button[^>]*id="{name}-button"[^>]*>', html)
    assert match, name
    return match.group(0)


def test_destination_echo_against_a_real_storescp(env: dict[str, object]) -> None:
    if shutil.which("storescp") is None:
        pytest.skip("dcmtk storescp is not installed")
    port, dead_port = free_port(), free_port()
    scp = subprocess.Popen(["storescp", "-aet", "ECHOSCP", str(port)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=scp)
        settings: Settings = env["settings"]  # type: ignore[assignment]
        destinations = [f"ECHOSCP@127.0.0.1:{port}", f"NOBODY@127.0.0.1:{dead_port}"]
        app = create_app(settings.model_copy(update={"destinations": destinations}))
        answers = TestClient(app).get("/ui/destinations/echo.json").json()["destinations"]
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    by_name = {a["destination"]: a for a in answers}
    assert by_name[destinations[0]]["ok"] is True
    assert by_name[destinations[1]]["ok"] is False


@pytest.mark.redis
def test_celery_worker_health_from_a_real_worker(env: dict[str, object], tmp_path: Path) -> None:
    """A real `btd worker` on its own Redis database answers the overview's ping (mode celery)."""
    import redis

    broker = "redis://127.0.0.1:6379/14"  # a database of its own: other tests' workers must not answer
    try:
        redis.Redis.from_url(broker, socket_connect_timeout=2).ping()
    except redis.RedisError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    settings: Settings = env["settings"]  # type: ignore[assignment]
    with_broker = settings.model_copy(update={"broker_url": broker, "queue_name": "dashboard-health"})
    dashboard_health._cache.clear()
    assert dashboard_health.worker_health(with_broker).ok is False  # nobody listens yet
    dashboard_health._cache.clear()
    worker_env = gateway_env(tmp_path, broker_url=broker, queue_name="dashboard-health",
                             database_url=settings.resolved_database_url)
    worker = subprocess.Popen([sys.executable, "-m", "btd.cli", "worker"], cwd=REPO_ROOT, env=worker_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        health = wait_until(lambda: _fresh_ping(with_broker), timeout=90, interval=1.0, what="worker ping")
        html = TestClient(create_app(with_broker)).get("/").text
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert health.mode == "celery" and len(health.workers) == 1
    assert 'id="worker-health" class="health ok"' in html and "1 worker(s) answered" in html


def _fresh_ping(settings: Settings) -> dashboard_health.WorkerHealth | None:
    dashboard_health._cache.clear()
    health = dashboard_health.worker_health(settings)
    return health if health.ok else None


def test_milestones_restart_with_a_rescore() -> None:
    start = datetime.now(UTC)
    events = [{"to_state": s, "at": start + timedelta(seconds=i)} for i, s in enumerate(PIPELINE)]
    events += [{"to_state": "QUEUED", "at": start + timedelta(seconds=20)},
               {"to_state": "SCORING", "at": start + timedelta(seconds=21)}]
    shown = {m["state"]: m["at"] for m in milestones(events)}
    assert shown["RECEIVING"] == start and shown["QUEUED"] == start + timedelta(seconds=20)
    assert shown["SCORED"] is None and shown["DELIVERED"] is None  # those times were version 1's


def test_pages_escape_what_came_from_dicom(env: dict[str, object], client: TestClient) -> None:
    settings: Settings = env["settings"]  # type: ignore[assignment]
    now = datetime.now(UTC)
    with session_scope(settings) as session:
        session.add(_study("1.2.826.0.1.3680043.8.498.7777", "RECEIVING", now,
                           study_description="<script>alert(1)</script>", error="<img src=x onerror=alert(2)>"))
    html = client.get("/ui/studies/1.2.826.0.1.3680043.8.498.7777").text
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert "<img src=x" not in html


def test_an_image_fetch_is_audited_with_its_instance_and_credential(env: dict[str, object]) -> None:
    """Issue 14: the slice behind overlay.png is patient data; who fetched which instance is on record."""
    settings: Settings = env["settings"]  # type: ignore[assignment]
    sop = env["sops"][0]  # type: ignore[index]
    guarded = TestClient(create_app(settings.model_copy(update={"view_tokens": ["radiology-it:v1ew"]})))
    url = f"/ui/studies/{FLAGGED_UID}/instances/{sop}/overlay.png"
    assert guarded.get(url).status_code == 401
    assert guarded.get(url, headers={"Authorization": "Bearer v1ew"}).status_code == 200
    with session_scope(settings) as session:
        rows = session.scalars(
            select(AuditEntry).where(
                AuditEntry.action == "view_image", AuditEntry.sop_instance_uid == sop, AuditEntry.via == "bearer"
            )
        ).all()
    assert [(r.actor, r.study_uid, r.via) for r in rows] == [("token:view:radiology-it", FLAGGED_UID, "bearer")]
    page = guarded.get(f"/ui/studies/{FLAGGED_UID}", headers={"Authorization": "Bearer v1ew"}).text
    assert "token:view:radiology-it" in page[page.index('id="audit"'):]
