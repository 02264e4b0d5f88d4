"""End to end, embedded mode: a `btd serve` subprocess (SQLite, no broker, tasks in its own thread)
receives the 20-slice CT series from dcmtk storescu, keeps every instance with its SHA-256, finds the
study stable, scores it with a (tiny, random) BTD model and shows the result over REST.

The helpers here are shared with tests/test_e2e_celery.py."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers_gateway import GatewayProcess, wait_until
from pydicom import dcmread
from sqlalchemy import select

from core.db.schema import Instance
from core.db.session import dispose_engines, session_scope
from core.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

SERIES = Path(__file__).parent / "fixtures" / "ct_series_20"
FINISHED = ("SCORED", "REPORTED", "DELIVERED", "FAILED_DELIVERY")


def series_files() -> list[Path]:
    return sorted(SERIES.glob("CT.*"))


def series_study_uid() -> str:
    return str(dcmread(series_files()[0], stop_before_pixels=True).StudyInstanceUID)


def send_series(port: int, ae_title: str = "BTD") -> None:
    """dcmtk storescu sends the JPEG 2000 series as it is (-xv); TCP_NODELAY avoids its 40 ms waits."""
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = ["storescu", "-aet", "E2ESCU", "-aec", ae_title, "-xv", "127.0.0.1", str(port), *map(str, series_files())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def dataset_part(data: bytes) -> bytes:
    """The bytes after the File Meta: what storescu sent unchanged (the receiver writes its own File Meta)."""
    assert data[128:132] == b"DICM"
    return data[144 + int.from_bytes(data[140:144], "little") :]


def assert_stored_with_sha256(settings: Settings, study_uid: str) -> None:
    """Every instance of the series is in the spool, its recorded SHA-256 is that of the stored bytes,
    and the dataset inside is byte for byte the one storescu read from the fixture."""
    sources = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in series_files()}
    with session_scope(settings) as session:
        rows = list(session.scalars(select(Instance).where(Instance.study_uid == study_uid)))
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sources)
    for row in rows:
        stored = (settings.spool_dir / row.path).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == row.sha256 and row.size == len(stored)
        assert dataset_part(stored) == dataset_part(sources[row.sop_instance_uid].read_bytes())


def api_get(port: int, path: str) -> Any:
    resp = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=30)
    resp.raise_for_status()
    return resp.json()


def wait_for_verdict(port: int, study_uid: str, timeout: float, gateway: GatewayProcess | None = None) -> dict:
    """Poll the REST API until the study has left scoring with a verdict; fail early on FAILED."""

    def finished() -> dict | None:
        if gateway is not None and gateway.proc is not None:
            assert gateway.proc.poll() is None, gateway.log_text()[-3000:]
        try:
            resp = httpx.get(f"http://127.0.0.1:{port}/api/studies/{study_uid}", timeout=30)
        except httpx.TimeoutException:  # a starved shared CPU can keep the API slow for a while
            return None
        if resp.status_code == 404:
            return None
        body = resp.json()
        assert body["state"] not in ("FAILED", "REJECTED"), body
        return body if body["state"] in FINISHED and body["verdict"] else None

    return wait_until(finished, timeout=timeout, interval=1.0, what=f"verdict of {study_uid}")


def assert_scored_result(body: dict, data_dir: Path) -> None:
    """One scoring of the whole series, visible over REST: verdict, score, per-instance results, maps."""
    assert body["verdict"] == "suspicious" and body["score"] is not None
    assert [e["to_state"] for e in body["history"]].count("SCORED") == 1
    (series,) = body["series"]
    assert series["series_uid"] == str(dcmread(series_files()[0], stop_before_pixels=True).SeriesInstanceUID)
    assert series["n_instances"] == 20 and series["n_assessed"] == 20 and series["model_name"] == "tiny-test"
    assert series["score"] == body["score"]
    sops = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series_files()}
    assert {i["sop_instance_uid"] for i in series["instances"]} == sops
    for inst in series["instances"]:
        assert inst["verdict"] == "suspicious" and inst["score"] is not None
        assert (data_dir / inst["map_path"]).is_file()
        assert inst["regions"] and inst["regions"][0]["outline"]  # the tiny model's threshold flags a region
    assert "TOTALSEG" not in str(body)  # the fixture's PatientID never leaves the gateway by default


def test_embedded_gateway_receives_scores_and_reports_over_rest(tmp_path: Path) -> None:
    from test_worker_pipeline import make_tiny_model

    data_dir = tmp_path / "data"
    model = make_tiny_model(tmp_path / "tiny.pt")
    gateway = GatewayProcess(
        data_dir, stable_seconds=2, model=str(model), device="cpu", min_free_bytes=0, monitor_interval=0.5
    )
    with gateway:
        settings = Settings(data_dir=data_dir)
        study_uid = series_study_uid()
        send_series(gateway.dicom_port)
        assert_stored_with_sha256(settings, study_uid)

        body = wait_for_verdict(gateway.http_port, study_uid, timeout=420, gateway=gateway)
        assert_scored_result(body, data_dir)
        states_seen = [e["to_state"] for e in body["history"]]
        assert states_seen[:5] == ["RECEIVING", "STABLE", "QUEUED", "SCORING", "SCORED"]
        assert body["attempts"] == 1

        listing = api_get(gateway.http_port, "/api/studies?verdict=suspicious")
        assert [s["study_uid"] for s in listing["items"]] == [study_uid]
        stats = api_get(gateway.http_port, "/api/stats")
        assert stats["queue_mode"] == "in-process" and stats["by_verdict"]["suspicious"] == 1
        ready = httpx.get(f"http://127.0.0.1:{gateway.http_port}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
    dispose_engines()
