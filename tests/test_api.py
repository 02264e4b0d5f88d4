"""The REST API on a real SQLite database filled through the repository (the same writers the listener and
the worker use): listing with paging and filters, one study in detail, rescore with its token, stats,
readiness, and no patient identity in any response unless the site allows it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from helpers_gateway import postgres_database

from core.contracts import State
from core.db import migrate, repository
from core.db.session import dispose_engines, session_scope
from core.settings import Settings
from models.metadata import ModelMetadata
from service.api.app import create_app
from worker import pipeline, tasks

PATIENT_ID = "PID-SECRET-4711"
PATIENT_NAME = "Doe^Jane"


def uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def _record(session, settings: Settings, study_uid: str, series_uid: str, modality: str = "CT") -> str:
    sop = uid()
    received = repository.ReceivedInstance(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=4,
        sha256="0" * 64,
        modality=modality,
        calling_ae="STORESCU",
        peer="127.0.0.1",
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
    )

    def store(version: int) -> str:
        rel = f"{study_uid}/{sop}.v{version}.dcm"
        (settings.spool_dir / study_uid).mkdir(parents=True, exist_ok=True)
        (settings.spool_dir / rel).write_bytes(b"DICM")
        return rel

    repository.record_instance(session, received, stable_seconds=30, store=store)
    return sop


def _to_scoring(settings: Settings, study_uid: str) -> tasks.Claim:
    with session_scope(settings) as session:
        assert repository.transition(session, study_uid, State.RECEIVING, State.STABLE, "quiet")
        assert repository.transition(
            session, study_uid, State.STABLE, State.QUEUED, "queued", queued_at=datetime.now(UTC)
        )
        claim = tasks.claim_study(session, study_uid, "test-worker", settings)
    assert isinstance(claim, tasks.Claim)
    return claim


def _fake_result(series_uid: str, sops: list[str], suspicious: bool) -> pipeline.ScoredSeries:
    """Results shaped like models.SeriesResult (the scoring itself is tested in test_worker_pipeline)."""
    instances = []
    for i, sop in enumerate(sops):
        flagged = suspicious and i == 0
        regions = (
            [SimpleNamespace(x0=10, y0=20, x1=30, y1=40, score=7.5, outline=[[10, 20], [30, 20], [30, 40], [10, 40]])]
            if flagged
            else []
        )
        instances.append(
            SimpleNamespace(
                sop_instance_uid=sop,
                frame=None,
                score=7.5 if flagged else 1.0,
                verdict="suspicious" if flagged else "no_evidence",
                reason=None,
                regions=regions,
            )
        )
    result = SimpleNamespace(
        modality="CT",
        verdict="suspicious" if suspicious else "no_evidence",
        score=7.5 if suspicious else 1.0,
        reason=None,
        instances=instances,
        n_assessed=len(sops),
        model="tiny-test",
    )
    maps = {(sops[0], None): f"maps/x/{sops[0]}.npy"} if suspicious else {}
    return pipeline.ScoredSeries(series_uid, "CT", result, maps)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Four studies: scored suspicious (CT), scored clean (MR), still receiving (CT), failed (CT)."""
    data_dir = tmp_path_factory.mktemp("api")
    settings = Settings(data_dir=data_dir, model=str(data_dir / "model.pt"))
    (data_dir / "model.pt").write_bytes(b"weights are not loaded by the probe")
    ModelMetadata(name="probe-model").write(data_dir / "model.json")
    migrate.upgrade(settings)
    ns = SimpleNamespace(settings=settings)

    ns.flagged, ns.clean, ns.receiving, ns.failed = uid(), uid(), uid(), uid()
    ns.flagged_series = uid()
    with session_scope(settings) as session:
        ns.flagged_sops = [_record(session, settings, ns.flagged, ns.flagged_series) for _ in range(2)]
        clean_sops = [_record(session, settings, ns.clean, ns.clean + ".1", modality="MR")]
        _record(session, settings, ns.receiving, ns.receiving + ".1")
        _record(session, settings, ns.failed, ns.failed + ".1")

    for study_uid, sops, series_uid, suspicious in (
        (ns.flagged, ns.flagged_sops, ns.flagged_series, True),
        (ns.clean, clean_sops, ns.clean + ".1", False),
    ):
        claim = _to_scoring(settings, study_uid)
        scored = _fake_result(series_uid, sops, suspicious)
        verdict, score = pipeline.study_verdict([scored.result])
        with session_scope(settings) as session:
            tasks.store_results(session, claim, pipeline.StudyScore(verdict, score, [scored], "tiny-test", "ab" * 32))
            assert repository.transition(
                session, study_uid, State.SCORING, State.SCORED, "done", verdict=verdict, score=score
            )
    claim = _to_scoring(settings, ns.failed)
    assert tasks._release(settings, claim, State.FAILED, "failed: spool files missing", "spool files missing")
    yield ns
    dispose_engines()


@pytest.fixture(scope="module")
def client(db: SimpleNamespace) -> TestClient:
    return TestClient(create_app(db.settings))


def test_healthz_answers(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_ok_then_names_what_failed(client: TestClient, db: SimpleNamespace, tmp_path: Path) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["failed"] == []
    assert ready.json()["checks"]["model"]["detail"] == "probe-model (model.pt)"

    broken = db.settings.model_copy(
        update={"model": str(tmp_path / "missing.pt"), "broker_url": "redis://127.0.0.1:1/0"}
    )
    resp = TestClient(create_app(broken)).get("/readyz")
    assert resp.status_code == 503
    body = resp.json()
    assert set(body["failed"]) == {"model", "broker"}
    assert "missing.pt" in body["checks"]["model"]["detail"]
    assert body["checks"]["database"]["ok"] is True

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"x")
    (tmp_path / "bad.json").write_text('{"name": "x", "modality": "XR"}')
    resp = TestClient(create_app(db.settings.model_copy(update={"model": str(bad)}))).get("/readyz")
    assert resp.status_code == 503 and resp.json()["failed"] == ["model"]
    assert "metadata invalid" in resp.json()["checks"]["model"]["detail"]


def test_list_pages_and_totals(client: TestClient, db: SimpleNamespace) -> None:
    everything = client.get("/api/studies").json()
    assert everything["total"] == 4
    uids = [s["study_uid"] for s in everything["items"]]
    assert set(uids) == {db.flagged, db.clean, db.receiving, db.failed}

    page = client.get("/api/studies", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == 4 and len(page["items"]) == 1
    assert page["items"][0]["study_uid"] == uids[1]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"state": "SCORED"}, "flagged+clean"),
        ({"state": "RECEIVING"}, "receiving"),
        ({"verdict": "suspicious"}, "flagged"),
        ({"modality": "MR"}, "clean"),
        ({"modality": "mr"}, "clean"),
        ({"state": "FAILED", "modality": "CT"}, "failed"),
    ],
)
def test_list_filters(client: TestClient, db: SimpleNamespace, params: dict, expected: str) -> None:
    want = {getattr(db, name) for name in expected.split("+")}
    body = client.get("/api/studies", params=params).json()
    assert {s["study_uid"] for s in body["items"]} == want
    assert body["total"] == len(want)


def test_since_filter(client: TestClient) -> None:
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert client.get("/api/studies", params={"since": past}).json()["total"] == 4
    assert client.get("/api/studies", params={"since": future}).json()["total"] == 0


@pytest.mark.parametrize(
    "params",
    [
        {"state": "BOGUS"},
        {"verdict": "maybe"},
        {"since": "yesterday"},
        {"limit": 0},
        {"offset": -1},
        {"modality": "ct;drop"},
    ],
)
def test_bad_filters_are_422(client: TestClient, params: dict) -> None:
    assert client.get("/api/studies", params=params).status_code == 422


def test_unknown_study_is_404(client: TestClient) -> None:
    assert client.get(f"/api/studies/{uid()}").status_code == 404
    assert client.post(f"/api/studies/{uid()}/rescore").status_code == 404


def test_study_detail_has_history_series_instances_and_regions(client: TestClient, db: SimpleNamespace) -> None:
    body = client.get(f"/api/studies/{db.flagged}").json()
    assert body["state"] == "SCORED" and body["verdict"] == "suspicious" and body["score"] == 7.5
    assert [e["to_state"] for e in body["history"]] == ["RECEIVING", "STABLE", "QUEUED", "SCORING", "SCORED"]
    assert body["results_version"] == 1
    (series,) = body["series"]
    assert series["series_uid"] == db.flagged_series
    assert series["verdict"] == "suspicious" and series["n_instances"] == 2 and series["model_name"] == "tiny-test"
    by_sop = {i["sop_instance_uid"]: i for i in series["instances"]}
    assert set(by_sop) == set(db.flagged_sops)
    flagged = by_sop[db.flagged_sops[0]]
    assert flagged["regions"] == [
        {"x0": 10, "y0": 20, "x1": 30, "y1": 40, "score": 7.5, "outline": [[10, 20], [30, 20], [30, 40], [10, 40]],
         "cue": None}
    ]
    assert flagged["map_path"].endswith(".npy")
    assert by_sop[db.flagged_sops[1]]["regions"] == []
    assert body["reports"] == []  # the reporting tables exist (0002_reports); nothing reported yet


def test_failed_study_shows_its_error(client: TestClient, db: SimpleNamespace) -> None:
    body = client.get(f"/api/studies/{db.failed}").json()
    assert body["state"] == "FAILED" and body["attempts"] == 1
    assert any("spool files missing" in e for e in body["errors"])


def test_no_patient_identity_unless_allowed(client: TestClient, db: SimpleNamespace) -> None:
    for path in ("/api/studies", f"/api/studies/{db.flagged}", "/api/stats"):
        text = client.get(path).text
        assert PATIENT_ID not in text and "Doe" not in text, path
    exposed = TestClient(create_app(db.settings.model_copy(update={"expose_patient_ids": True})))
    body = exposed.get(f"/api/studies/{db.flagged}").json()
    assert body["patient_id"] == PATIENT_ID and body["patient_name"] == PATIENT_NAME


def test_progress_is_shown_while_scoring(db: SimpleNamespace, client: TestClient) -> None:
    study_uid = uid()
    with session_scope(db.settings) as session:
        _record(session, db.settings, study_uid, study_uid + ".1")
    _to_scoring(db.settings, study_uid)
    pipeline.write_progress(db.settings.data_dir, study_uid, 3, 12)
    body = client.get(f"/api/studies/{study_uid}").json()
    assert body["state"] == "SCORING" and body["lease_owner"] == "test-worker"
    assert body["progress"]["done"] == 3 and body["progress"]["total"] == 12 and body["progress"]["fraction"] == 0.25
    json.dumps(body)


def test_rescore_needs_the_token(db: SimpleNamespace) -> None:
    guarded = TestClient(create_app(db.settings.model_copy(update={"api_token": "s3cret"})))
    url = f"/api/studies/{db.clean}/rescore"
    missing = guarded.post(url)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert guarded.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 403
    with session_scope(db.settings) as session:
        assert repository.get_study(session, db.clean).state == State.SCORED  # untouched


def test_rescore_refuses_a_study_being_received(client: TestClient, db: SimpleNamespace) -> None:
    assert client.post(f"/api/studies/{db.receiving}/rescore").status_code == 409


def test_rescore_requeues_a_failed_study_as_a_new_version(db: SimpleNamespace) -> None:
    """With a broker configured the rescore is a real Celery message in Redis (no worker consumes it here)."""
    redis = pytest.importorskip("redis")
    queue_name = f"btd-test-api-{uuid.uuid4().hex[:8]}"
    settings = db.settings.model_copy(
        update={"api_token": "s3cret", "broker_url": "redis://127.0.0.1:6379/0", "queue_name": queue_name}
    )
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        broker.ping()
    except redis.RedisError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    study_uid = uid()
    with session_scope(settings) as session:
        _record(session, settings, study_uid, study_uid + ".1")
    claim = _to_scoring(settings, study_uid)
    assert tasks._release(settings, claim, State.FAILED, "failed: boom", "boom")

    auth = {"Authorization": "Bearer s3cret"}
    client = TestClient(create_app(settings), headers=auth)  # the reads need the token too (issue 14)
    try:
        resp = client.post(f"/api/studies/{study_uid}/rescore", headers=auth)
        assert resp.status_code == 202, resp.text
        assert resp.json() == {"study_uid": study_uid, "state": "QUEUED", "version": 2, "dispatched": "btd.score_study"}
        assert broker.llen(queue_name) == 1
        message = json.loads(broker.lindex(queue_name, 0))
        assert message["headers"]["task"] == "btd.score_study" and study_uid in message["headers"]["argsrepr"]

        detail = client.get(f"/api/studies/{study_uid}").json()
        assert detail["history"][-1]["to_state"] == "QUEUED" and detail["attempts"] == 0 and detail["error"] is None
        stats = client.get("/api/stats").json()
        assert stats["queue_mode"] == "celery" and stats["queue_depth"] == 1
        # Queued again: a second rescore must not queue it twice.
        assert client.post(f"/api/studies/{study_uid}/rescore", headers=auth).status_code == 409
        assert broker.llen(queue_name) == 1
    finally:
        broker.delete(queue_name)
        broker.close()


def test_stats_counts_states_and_verdicts(client: TestClient, db: SimpleNamespace) -> None:
    body = client.get("/api/stats").json()
    assert body["by_state"]["SCORED"] == 2 and body["by_state"]["RECEIVING"] == 1 and body["by_state"]["FAILED"] == 1
    assert body["by_verdict"]["suspicious"] == 1 and body["by_verdict"]["no_evidence"] >= 1
    assert body["total"] == sum(body["by_state"].values())
    assert body["queue_mode"] == "in-process"


def test_openapi_docs_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    assert "/api/studies/{study_uid}/rescore" in client.get("/openapi.json").json()["paths"]


def test_a_review_verdict_is_listed_filtered_and_counted(tmp_path: Path) -> None:
    """A study with a flagged slice under the study threshold is "review" over REST, never "no_evidence"."""
    settings = Settings(data_dir=tmp_path, model=str(tmp_path / "model.pt"))
    migrate.upgrade(settings)
    study_uid, series_uid = uid(), uid()
    with session_scope(settings) as session:
        sops = [_record(session, settings, study_uid, series_uid) for _ in range(2)]
    claim = _to_scoring(settings, study_uid)
    scored = _fake_result(series_uid, sops, suspicious=True)  # slice 0 over the slice threshold
    scored.result.verdict = "review"  # ... the series under the series threshold
    verdict, score = pipeline.study_verdict([scored.result])
    assert verdict == "review"
    with session_scope(settings) as session:
        tasks.store_results(session, claim, pipeline.StudyScore(verdict, score, [scored], "tiny-test", "ab" * 32))
        assert repository.transition(
            session, study_uid, State.SCORING, State.SCORED, "done", verdict=verdict, score=score
        )
    client = TestClient(create_app(settings))
    try:
        listed = client.get("/api/studies", params={"verdict": "review"}).json()
        assert [s["study_uid"] for s in listed["items"]] == [study_uid]
        detail = client.get(f"/api/studies/{study_uid}").json()
        assert detail["verdict"] == "review" and detail["series"][0]["verdict"] == "review"
        assert client.get("/api/stats").json()["by_verdict"]["review"] == 1
        assert client.get("/api/studies", params={"verdict": "no_evidence"}).json()["items"] == []
    finally:
        dispose_engines()


def _receive(settings: Settings, study_uid: str, sop: str, sha: str, calling_ae: str) -> str:
    """Record one received instance as the listener does (its bytes stand in as a few bytes in the spool)."""
    received = repository.ReceivedInstance(
        study_uid=study_uid, series_uid=study_uid + ".1", sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1", size=len(sha),
        sha256=sha, modality="CT", calling_ae=calling_ae, peer="127.0.0.1", patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
    )

    def store(version: int) -> str:
        rel = f"{study_uid}/{sop}.v{version}.dcm"
        (settings.spool_dir / study_uid).mkdir(parents=True, exist_ok=True)
        (settings.spool_dir / rel).write_bytes(sha.encode())
        return rel

    with session_scope(settings) as session:
        return repository.record_instance(session, received, stable_seconds=30, store=store).kind


def test_versions_duplicates_and_replacements_are_on_the_api(tmp_path: Path) -> None:
    """Issue 14: an instance replaced by different bytes under its UID, and identical resends, are visible per
    instance and per study, filterable, counted in /api/stats and exported as metrics."""
    settings = Settings(data_dir=tmp_path, model=str(tmp_path / "model.pt"))
    migrate.upgrade(settings)
    tampered, clean = uid(), uid()
    replaced_sop, resent_sop, clean_sop = uid(), uid(), uid()
    assert _receive(settings, tampered, replaced_sop, "a" * 64, "MODALITY") == "stored"
    assert _receive(settings, tampered, resent_sop, "b" * 64, "MODALITY") == "stored"
    assert _receive(settings, tampered, resent_sop, "b" * 64, "ROUTER") == "duplicate"
    assert _receive(settings, tampered, resent_sop, "b" * 64, "ROUTER") == "duplicate"
    assert _receive(settings, tampered, replaced_sop, "c" * 64, "INTRUDER") == "conflict"
    assert _receive(settings, clean, clean_sop, "d" * 64, "MODALITY") == "stored"
    client = TestClient(create_app(settings))
    try:
        body = client.get(f"/api/studies/{tampered}").json()
        assert body["forensics"] == {"instances": 2, "versions": 3, "duplicates": 2, "conflicting_instances": 1,
                                     "conflict": True}
        assert body["conflict"] is True and body["conflicting_instances"] == 1 and body["duplicates"] == 2
        by_sop = {i["sop_instance_uid"]: i for i in body["instances"]}
        replaced = by_sop[replaced_sop]
        assert replaced["conflict"] is True and replaced["current_version"] == 2 and replaced["duplicates"] == 0
        assert [(v["version"], v["sha256"], v["calling_ae"]) for v in replaced["versions"]] == [
            (1, "a" * 64, "MODALITY"), (2, "c" * 64, "INTRUDER")
        ]
        assert all(v["size"] == 64 and v["received_at"] and v["peer"] == "127.0.0.1" for v in replaced["versions"])
        resent = by_sop[resent_sop]
        assert resent["conflict"] is False and resent["duplicates"] == 2 and len(resent["versions"]) == 1
        assert PATIENT_ID not in json.dumps(body) and "Doe" not in json.dumps(body)

        assert client.get(f"/api/studies/{clean}").json()["forensics"]["conflict"] is False
        flagged = client.get("/api/studies", params={"conflict": "true"}).json()
        assert [s["study_uid"] for s in flagged["items"]] == [tampered] and flagged["total"] == 1
        assert flagged["items"][0]["conflicting_instances"] == 1 and flagged["items"][0]["duplicates"] == 2
        assert [s["study_uid"] for s in client.get("/api/studies", params={"conflict": "false"}).json()["items"]] == [
            clean
        ]
        stats = client.get("/api/stats").json()
        counted = (stats["conflicting_instances"], stats["studies_with_conflicts"], stats["duplicate_resends"])
        assert counted == (1, 1, 2)
        metrics = client.get("/metrics").text
        assert "btd_conflicting_instances 1.0" in metrics and "btd_studies_with_conflicts 1.0" in metrics
        assert "btd_duplicate_resends 2.0" in metrics
    finally:
        dispose_engines()



@pytest.mark.postgres
def test_a_study_read_while_its_scoring_commits_shows_one_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state and verdict shown belong to the same read as the history: the worker's commit of SCORED lands
    while the request is still reading (here: between the history and the instances), and the page must not
    then show the new state with the old history (a rollback expires the study row; reading it afterwards
    loaded the newer one: CI saw state SCORED with a history that ended at SCORING). PostgreSQL: there each
    statement of a read sees what is committed when it starts; SQLite's read transaction holds the write lock."""
    import service.api.studies as studies_module

    with postgres_database() as url:
        settings = Settings(data_dir=tmp_path, database_url=url)
        migrate.upgrade(settings)
        client = TestClient(create_app(settings))
        study_uid = uid()
        with session_scope(settings) as session:
            _record(session, settings, study_uid, study_uid + ".1")
        _to_scoring(settings, study_uid)
        real_instance_history = studies_module.instance_history

        def scoring_commits_meanwhile(session, uid_):  # noqa: ANN001, ANN202 - same signature as the real one
            with session_scope(settings) as other:
                assert repository.transition(other, study_uid, State.SCORING, State.SCORED, "done", verdict="clean")
            return real_instance_history(session, uid_)

        monkeypatch.setattr(studies_module, "instance_history", scoring_commits_meanwhile)
        body = client.get(f"/api/studies/{study_uid}").json()
        states = [event["to_state"] for event in body["history"]]
        assert (body["state"], body["verdict"], states[-1]) == ("SCORING", None, "SCORING"), (body["state"], states)
        monkeypatch.setattr(studies_module, "instance_history", real_instance_history)
        body = client.get(f"/api/studies/{study_uid}").json()
        states = [event["to_state"] for event in body["history"]]
        assert (body["state"], body["verdict"], states[-1]) == ("SCORED", "clean", "SCORED")
