"""One real flow shared by the browser and log tests (a pytest plugin: `pytest_plugins = ["dashboard_flow"]`).

A `btd serve` subprocess (embedded mode: SQLite, tasks in its own thread) receives the 20-slice CT series
from dcmtk storescu (TCP_NODELAY=1), finds it stable, scores it and delivers its SR to a real dcmtk storescp.
Scoring the series is the expensive part on a shared 2-core CPU, so it happens once per test session
however many modules look at the result.

The model is a tiny random BTD model (models.checkpoint.save_model) whose calibration thresholds are set
far below any score, so every assessed slice is "suspicious": the study is FLAGGED deterministically. It
says nothing about tampering; these tests check what radiology IT sees, not the science.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers_gateway import GatewayProcess, free_port, wait_for_port, wait_until
from pydicom import dcmread

SERIES_DIR = Path(__file__).parent / "fixtures" / "ct_series_20"
FLAG_EVERYTHING = -1.0e9
SCORED_STATES = ("SCORED", "REPORTED", "DELIVERED", "FAILED_DELIVERY")
DELIVERY_DONE = ("DELIVERED", "FAILED_DELIVERY")
DESTINATION_AET = "DASHPACS"


def make_flagging_model(path: Path) -> Path:
    """A tiny random model (dim 8, four levels so attention runs at 8x8 only) that flags every slice."""
    import torch

    from models.checkpoint import save_model
    from models.diffusion import GaussianDiffusion
    from models.metadata import ModelMetadata
    from models.unet import Unet

    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2, 4, 8), channels=1), image_size=64)
    metadata = ModelMetadata(
        name="dashboard-tiny-random",
        modality="CT",
        channels=1,
        patch_size=64,
        # Far below any score: every assessed slice and the series come out "suspicious".
        calibration={"slice_threshold": FLAG_EVERYTHING, "series_threshold": FLAG_EVERYTHING},
        # Residual energy statistics low enough that regions appear, so boxes reach the overlay.
        anomaly={"energy_mean": -12.0, "energy_std": 1.0, "region_threshold": 3.0},
    )
    save_model(diffusion, path, metadata)
    return path


def series_files() -> list[Path]:
    return sorted(SERIES_DIR.glob("CT.*"))


def send_series(port: int, files: list[Path], ae_title: str = "BTD") -> None:
    """dcmtk storescu as a PACS would send: the files as they are (-xv), TCP_NODELAY against 40 ms stalls."""
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = ["storescu", "-aet", "DASHSCU", "-aec", ae_title, "-xv", "127.0.0.1", str(port), *map(str, files)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@dataclass
class ScoredFlow:
    gateway: GatewayProcess
    base_url: str
    study_uid: str
    patient_name: str
    patient_id: str
    data_dir: Path
    artifacts: Path

    def study(self) -> dict:
        return httpx.get(f"{self.base_url}/api/studies/{self.study_uid}", timeout=10).json()


def _start_storescp(folder: Path) -> tuple[subprocess.Popen, int]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", DESTINATION_AET, "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, timeout=20, proc=proc)
    return proc, port


@pytest.fixture(scope="session")
def scored_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScoredFlow]:
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        pytest.skip("dcmtk (storescu, storescp) is not installed")
    root = tmp_path_factory.mktemp("dashboard-flow")
    artifacts = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
    artifacts.mkdir(parents=True, exist_ok=True)
    pacs, pacs_port = _start_storescp(root / "pacs")
    model = make_flagging_model(root / "tiny.pt")
    gateway = GatewayProcess(
        root / "data",
        log_path=root / "gateway.log",
        stable_seconds=2,
        monitor_interval=0.5,
        model=str(model),
        device="cpu",
        min_free_bytes=0,
        destinations=[f"{DESTINATION_AET}@127.0.0.1:{pacs_port}"],
        delivery_retries=2,
        delivery_backoff_seconds=1,
    )
    first = dcmread(series_files()[0], stop_before_pixels=True)
    flow = ScoredFlow(
        gateway=gateway,
        base_url=f"http://127.0.0.1:{gateway.http_port}",
        study_uid=str(first.StudyInstanceUID),
        patient_name=str(first.PatientName),
        patient_id=str(first.PatientID),
        data_dir=root / "data",
        artifacts=artifacts,
    )
    try:
        gateway.start(timeout=120)
        wait_for_port(gateway.http_port, timeout=60, proc=gateway.proc)
        send_series(gateway.dicom_port, series_files())

        def state_in(states: tuple[str, ...]) -> dict | None:
            assert gateway.proc is not None and gateway.proc.poll() is None, gateway.log_text()[-3000:]
            response = httpx.get(f"{flow.base_url}/api/studies/{flow.study_uid}", timeout=10)
            if response.status_code != 200:
                return None
            body = response.json()
            assert body["state"] not in ("FAILED", "REJECTED"), body
            return body if body["state"] in states else None

        wait_until(lambda: state_in(SCORED_STATES), timeout=900, interval=1.0, what="study scored")
        # Building and sending the SR takes seconds; wait for it so the pages show a delivery too. Reporting
        # is another area's job (tests/test_delivery.py): if it has not finished, the dashboard tests go on.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: state_in(DELIVERY_DONE), timeout=120, interval=1.0, what="report delivered")
        yield flow
    finally:
        gateway.stop()
        pacs.terminate()
        pacs.wait(timeout=10)
        if gateway.log_path.exists():  # kept as a test artefact beside the screenshots
            shutil.copyfile(gateway.log_path, artifacts.parent / "dashboard-flow-gateway.log")
