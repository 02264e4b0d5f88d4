"""`btd serve` stopped in the middle of scoring a study (an operator's restart, a host reboot) exits
cleanly and loses nothing: the next start takes the study over at once and scores it exactly once."""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import pydicom
from helpers_gateway import GatewayProcess, wait_until
from pydicom.uid import generate_uid
from sqlalchemy import select

from core.contracts import State
from core.db.schema import SeriesResult, Study, StudyEvent
from core.db.session import dispose_engines, session_scope
from core.dicom import sender
from core.settings import Settings

# A chest slice with lungs: the fused detector runs no model pass for a slice without lung, so a study of the
# lungless ct_series_20 is scored too fast to be caught mid-way.
CHEST_SLICE = Path(__file__).parent / "fixtures" / "ct_transfer_syntaxes" / "CT1_J2KR"
N_SLICES = 16


def _chest_study(folder: Path) -> Path:
    """N_SLICES copies of the chest slice as one series (fresh UIDs, a slice thickness apart)."""
    folder.mkdir(parents=True)
    template = pydicom.dcmread(CHEST_SLICE)
    study_uid, series_uid = generate_uid(), generate_uid()
    x, y, z = (float(v) for v in template.ImagePositionPatient)
    for k in range(N_SLICES):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [x, y, z + k * float(ds.SliceThickness or 1.0)]
        ds.save_as(folder / f"CT{k:03d}.dcm")
    return folder


def _study(settings: Settings) -> Study:
    with session_scope(settings) as session:
        return session.scalars(select(Study)).one()


def test_stopped_mid_scoring_exits_cleanly_and_the_next_start_scores_the_study(tmp_path: Path) -> None:
    data_dir = tmp_path / "gw"
    # The shipped default model: the product's own scoring, slow enough on this CPU to be caught mid-way.
    gateway = GatewayProcess(data_dir, stable_seconds=1, monitor_interval=0.2, min_free_bytes=0)
    settings = Settings(data_dir=data_dir)
    try:
        gateway.start(timeout=120)
        study = _chest_study(tmp_path / "study")
        results = sender.send_files([study], "127.0.0.1", gateway.dicom_port, "BTD", "SHUTDOWN", timeout=60)
        assert len(results) == N_SLICES and all(r.ok for r in results)
        study_uid = wait_until(
            lambda: (s := _study(settings)).state == State.SCORING and s.study_uid, timeout=60, what="SCORING"
        )
        assert gateway.stop(timeout=60) == 0, gateway.log_text()[-2000:]
        log = gateway.log_text()
        assert "terminate called" not in log
        assert '"event": "gateway.stopped"' in log
        stopped = _study(settings)
        assert stopped.state == State.SCORING and stopped.lease_until is not None
        dispose_engines()

        gateway.start(timeout=120)
        url = f"http://127.0.0.1:{gateway.http_port}/api/studies/{study_uid}"
        wait_until(
            lambda: httpx.get(url, timeout=10).json()["state"] in (State.SCORED, State.REPORTED, State.DELIVERED),
            timeout=300,
            interval=1,
            what="study scored after the restart",
        )
    finally:
        gateway.stop(timeout=60)
        dispose_engines()
    with session_scope(settings) as session:
        results_rows = session.scalars(select(SeriesResult).where(SeriesResult.study_uid == study_uid)).all()
        scored_events = session.scalars(
            select(StudyEvent).where(StudyEvent.study_uid == study_uid, StudyEvent.to_state == State.SCORED)
        ).all()
    assert len(results_rows) == 1 and len(scored_events) == 1
    # every slice judged once, and judged: a chest slice with lungs
    assert results_rows[0].n_instances == N_SLICES and results_rows[0].n_assessed == N_SLICES
