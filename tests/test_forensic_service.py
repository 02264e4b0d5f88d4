"""The fused detector inside the service (issue 12): what each cue said and the reference used reach the
database, the API, the dashboard and the SR; a site's quiet traffic teaches its scanner's reference, a
flagged study never does unless a person marks it genuine, and a single slice is judged only against a
reference for its scanner.

Real parts: LIDC-IDRI-0002 (12 slices, GE LightSpeed16, STANDARD kernel; decimated to 256 px for speed),
the real worker task on SQLite, the real report builder, the FastAPI app; a tiny random U-Net whose cues
(copy-move, header) do not depend on training (tests/test_fused_detector.py builds it the same way).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_fused_detector import LIDC2, _copy_patch, save_fused_model
from test_worker_pipeline import queue, receive

from core.contracts import State
from core.db import migrate
from core.db.schema import ReferenceSample, ScannerReference, SeriesResult, Study
from core.db.session import dispose_engines, session_scope
from core.settings import Settings
from models.results import NO_EVIDENCE, NOT_ASSESSED
from service.api.app import create_app
from worker import report_tasks, tasks
from worker.references import fold_samples

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not LIDC2.is_dir(), reason="shared chest-CT corpus not present")]


def tiny_fused_model(path: Path) -> Path:
    """Copy-move and header cues only (they need no training): genuine LIDC-IDRI-0002 reads no_evidence."""
    return save_fused_model(path, ["copymove"], review=1.5, suspicious=2.5)


@pytest.fixture(scope="module")
def lidc_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """LIDC-IDRI-0002 decimated to 256 x 256 (pixel spacing doubled), as files, in slice order."""
    out_dir = tmp_path_factory.mktemp("lidc")
    datasets = []
    for path in sorted(LIDC2.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array[::2, ::2].copy()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
        datasets.append(ds)
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    files = []
    for index, ds in enumerate(datasets):
        files.append(out_dir / f"{index:02d}.dcm")
        ds.save_as(files[-1])
    return files


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    torch.set_num_threads(1)
    data_dir = tmp_path_factory.mktemp("forensic-service")
    model = tiny_fused_model(data_dir / "tiny-fused.pt")
    settings = Settings(
        data_dir=data_dir, model=str(model), device="cpu", visibility_timeout=600, reference_hold_hours=0
    )
    migrate.upgrade(settings)
    yield SimpleNamespace(settings=settings)
    dispose_engines()


def study_of(settings: Settings, files: list[Path]) -> str:
    """A new study holding copies of `files` (fresh UIDs), received and queued as the gateway does."""
    study_uid = f"2.25.{uuid.uuid4().int}"
    for path in files:
        receive(settings, study_uid, source=path)
    queue(settings, study_uid)
    return study_uid


def score(settings: Settings, study_uid: str) -> SeriesResult:
    outcome = tasks.run_score_study(study_uid, settings, owner="w1", dispatch_next=False)
    assert outcome.kind == tasks.SCORED, outcome
    with session_scope(settings) as session:
        row = session.scalar(select(SeriesResult).where(SeriesResult.study_uid == study_uid))
        assert row is not None
        session.expunge(row)
        return row


def references(settings: Settings) -> list[ScannerReference]:
    with session_scope(settings) as session:
        rows = list(session.scalars(select(ScannerReference)))
        for row in rows:
            session.expunge(row)
        return rows


def test_each_cue_and_the_reference_reach_the_database_the_api_and_the_sr(env: SimpleNamespace, lidc_files) -> None:
    settings = env.settings.model_copy(update={"reference_hold_hours": 1000.0})  # nothing folds in this test
    study_uid = study_of(settings, lidc_files)
    series = score(settings, study_uid)
    assert series.verdict == NO_EVIDENCE
    assert {c["name"] for c in series.cues if c["used"]} == {"copymove", "header"}
    assert {c["name"] for c in series.cues if not c["used"]} == {"btd", "noise", "continuity"}  # each with a reason
    assert all(c["reason"] for c in series.cues if not c["used"])
    assert series.reference is None and series.scanner_key["kernel"] == "STANDARD"
    with session_scope(settings) as session:
        sample = session.scalar(select(ReferenceSample).where(ReferenceSample.study_uid == study_uid))
        assert sample is not None and sample.n_slices == len(lidc_files) and sample.folded_at is None

    body = TestClient(create_app(settings)).get(f"/api/studies/{study_uid}").json()
    api_series = body["series"][0]
    assert [c["name"] for c in api_series["cues"]] == [c["name"] for c in series.cues]
    assert api_series["reference"] is None and api_series["scanner_key"]["manufacturer"] == "GE MEDICAL SYSTEMS"
    page = TestClient(create_app(settings)).get(f"/ui/studies/{study_uid}").text
    assert "its own series (12 slices)" in page and "none fired" in page

    assert report_tasks.run_build_report(study_uid, settings, dispatch_next=False).kind == report_tasks.BUILT
    with session_scope(settings) as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        assert study is not None and study.state == State.REPORTED
        sr_path = settings.data_dir / session.scalars(select(report_tasks.Report.sr_path)).first()
    texts = [str(e.value) for e in pydicom.dcmread(sr_path).iterall() if e.keyword == "TextValue"]
    cues = next(t for t in texts if "cues" in t)
    assert "below threshold: copy-move, header consistency" in cues
    assert any("judged against its own 12 slices" in t for t in texts)


def test_quiet_traffic_teaches_the_scanners_reference_and_then_a_single_slice_is_judged(
    env: SimpleNamespace, lidc_files
) -> None:
    settings = env.settings
    before = score(settings, study_of(settings, lidc_files[5:6]))
    assert before.verdict == NOT_ASSESSED and "no reference for GE MEDICAL SYSTEMS" in (before.reason or "")

    score(settings, study_of(settings, lidc_files))  # quiet; the hold is 0 h here, so it teaches at once
    learnt = [r for r in references(settings) if r.kernel == "STANDARD"]
    assert len(learnt) == 1 and learnt[0].n_slices >= len(lidc_files) and learnt[0].source.startswith("site traffic")

    after = score(settings, study_of(settings, lidc_files[5:6]))
    assert after.verdict != NOT_ASSESSED
    assert after.reference["source"].startswith("site traffic") and after.reference["n_slices"] == learnt[0].n_slices
    listed = TestClient(create_app(settings)).get("/api/references").json()
    assert any(r["kernel"] == "STANDARD" and r["n_slices"] > learnt[0].n_slices for r in listed)  # refined by it
    assert "STANDARD" in TestClient(create_app(settings)).get("/").text


def test_a_flagged_study_teaches_nothing_until_a_person_marks_it_genuine(env: SimpleNamespace, lidc_files) -> None:
    import copy

    settings = env.settings
    tampered, _index, _where = _copy_patch([pydicom.dcmread(p) for p in lidc_files])
    paths = []
    for index, ds in enumerate(tampered):
        paths.append(settings.data_dir / f"tampered-{index:02d}.dcm")
        copy.deepcopy(ds).save_as(paths[-1])
    study_uid = study_of(settings, paths)
    assert score(settings, study_uid).verdict != NO_EVIDENCE
    with session_scope(settings) as session:
        assert fold_samples(session, settings) == []  # flagged: never folded on its own
        sample = session.scalar(select(ReferenceSample).where(ReferenceSample.study_uid == study_uid))
        assert sample is not None and sample.folded_at is None

    client = TestClient(create_app(settings))
    marked = client.post(f"/api/studies/{study_uid}/genuine")
    assert marked.status_code == 202 and marked.json()["samples_marked"] == 1
    with session_scope(settings) as session:
        assert fold_samples(session, settings, now=datetime.now(UTC))  # the marked sample teaches now
        sample = session.scalar(select(ReferenceSample).where(ReferenceSample.study_uid == study_uid))
        assert sample is not None and sample.folded_at is not None and sample.marked_genuine_by == "anonymous"
    assert client.post(f"/api/studies/{study_uid}/genuine").status_code == 409  # nothing left to teach
    assert client.post("/api/studies/2.25.1/genuine").status_code == 404
