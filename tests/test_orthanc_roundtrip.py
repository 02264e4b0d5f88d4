"""Orthanc (the Debian package, a real PACS) and btd, talking DICOM over loopback.

1. Delivery into a PACS: a scored study's SR and KOS, sent by `deliver_report`, land in the same
   Orthanc study as its images, with the verdict and the references to the images Orthanc holds.
2. The whole loop: Orthanc sends a study to `btd serve` (as its auto-routing would), btd scores it with a
   tiny random model and sends the SR (and KOS) back; checked through Orthanc's REST API.

Orthanc binds its ports on every interface (it cannot be told 127.0.0.1 alone), so the test picks free
ports and forbids remote access. Orthanc holds the whole 20-slice CT series and sends the study to
btd. The tiny model has four resolution levels so that its one full-attention block works on a 64x64
grid: whole-slice scoring (the default for our own models) of a 512x512 slice then takes about 1 s on
this machine; with two levels, attention over 256x256 positions took about 24 s per slice.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from helpers_gateway import GatewayProcess, free_port, wait_until
from test_delivery import CT_FILES, make_settings, reported_study, study_row
from test_viewer_check import check, viewer_check  # noqa: F401 - viewer_check is a (session) fixture

from core.contracts import State
from core.db.session import dispose_engines
from worker import report_tasks

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
ALL_CT_FILES = sorted(p for p in CT_FILES[0].parent.iterdir() if p.name.startswith("CT."))

pytestmark = [pytest.mark.slow, pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed")]


class Orthanc:
    """An Orthanc process with its own storage, ports and DICOM modalities, and a small REST client."""

    def __init__(self, root: Path, modalities: dict[str, list]) -> None:
        self.root = root
        self.http_port, self.dicom_port = free_port(), free_port()
        self.modalities = modalities
        self.proc: subprocess.Popen | None = None
        # No keep-alive: Orthanc may close an idle connection just as the client reuses it.
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=60,
                                 limits=httpx.Limits(max_keepalive_connections=0))

    @property
    def destination(self) -> str:
        return f"ORTHANC@127.0.0.1:{self.dicom_port}"

    def __enter__(self) -> Orthanc:
        config = {
            "Name": "btd-test", "StorageDirectory": str(self.root / "db"), "IndexDirectory": str(self.root / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "Plugins": [], "DicomModalities": self.modalities, "HttpThreadsCount": 4, "DicomThreadsCount": 2,
            "ConcurrentJobs": 1, "StorageCompression": False,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "orthanc.json").write_text(json.dumps(config))
        log = open(self.root / "orthanc.log", "wb")  # noqa: SIM115 - Orthanc writes to it while it runs
        self.proc = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._up, timeout=60, what="Orthanc's REST API")
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
        try:
            return self.http.get("/system").status_code == 200
        except httpx.HTTPError:
            return False

    def __exit__(self, *exc: object) -> None:
        self.http.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def upload(self, paths: list[Path]) -> None:
        for path in paths:
            response = self.http.post("/instances", content=path.read_bytes())
            response.raise_for_status()

    def study_id(self, study_uid: str) -> str:
        found = self.http.post("/tools/lookup", content=study_uid).json()
        ids = [f["ID"] for f in found if f["Type"] == "Study"]
        assert ids, f"Orthanc has no study {study_uid}"
        return ids[0]

    def instances_by_class(self, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
        """Every instance of the study as a dataset, grouped by SOP Class UID."""
        out: dict[str, list[pydicom.Dataset]] = {}
        for inst in self.http.get(f"/studies/{self.study_id(study_uid)}/instances").json():
            raw = self.http.get(f"/instances/{inst['ID']}/file").content
            ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
            out.setdefault(str(ds.SOPClassUID), []).append(ds)
        return out

    def file_of(self, ds: pydicom.Dataset) -> bytes:
        """The stored file of an instance, by its SOP Instance UID."""
        found = self.http.post("/tools/lookup", content=str(ds.SOPInstanceUID)).json()
        return self.http.get(f"/instances/{found[0]['ID']}/file").content

    def has_class(self, study_uid: str, sop_class: str) -> bool:
        try:
            return sop_class in self.instances_by_class(study_uid)
        except (AssertionError, httpx.TransportError):
            return False  # not there yet, or a dropped connection: ask again at the next poll


def evidence_uids(sr: pydicom.Dataset) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def region_references(sr: pydicom.Dataset) -> set[str]:
    refs: set[str] = set()

    def walk(items) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD":
                refs.update(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in item.ContentSequence)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return refs


def test_delivered_report_lands_in_the_orthanc_study(tmp_path: Path) -> None:
    with Orthanc(tmp_path / "orthanc", modalities={}) as orthanc:
        orthanc.upload(CT_FILES)
        settings = make_settings(tmp_path, destinations=[orthanc.destination])
        study_uid = reported_study(settings, flagged=True)
        assert report_tasks.run_deliver_report(study_uid, settings, timeout=20).kind == report_tasks.DELIVERED
        assert study_row(settings, study_uid).state == State.DELIVERED
        stored = orthanc.instances_by_class(study_uid)
    dispose_engines()
    images = {str(ds.SOPInstanceUID) for ds in stored["1.2.840.10008.5.1.4.1.1.2"]}
    (sr,), (kos,) = stored[SR_CLASS], stored[KOS_CLASS]
    assert sr.StudyInstanceUID == study_uid and "suspicious" in sr.CompletionFlagDescription
    assert "SUSPICIOUS" in sr.SeriesDescription
    assert evidence_uids(sr) == images
    assert region_references(sr) <= images and region_references(sr)
    kos_refs = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in kos.ContentSequence
                if i.ValueType == "IMAGE"}
    assert kos_refs == region_references(sr)


def btd_study_state(http_port: int, study_uid: str) -> str | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{http_port}/api/studies/{study_uid}", timeout=10)
    except httpx.TransportError:
        return None
    return response.json().get("state") if response.status_code == 200 else None


def tiny_model(folder: Path) -> Path:
    """A random dim-8 U-Net whose calibration flags everything: its metadata sets a slice/series threshold
    of 1.0 (the anomaly score of any body slice is far above) and a region threshold that marks the
    highest-energy spots, so the SR has regions to carry. It proves the plumbing, not the science."""
    import torch

    from models.checkpoint import save_model
    from models.diffusion import GaussianDiffusion
    from models.unet import Unet

    torch.manual_seed(0)
    unet = Unet(dim=8, dim_mults=(1, 2, 4, 8), channels=1, attn_heads=1, attn_dim_head=8)
    diffusion = GaussianDiffusion(unet, image_size=32)
    path = folder / "tiny.pt"
    save_model(diffusion, path, {
        "name": "btd-tiny-test", "modality": "CT", "patch_size": 64,
        "calibration": {"slice_threshold": 1.0, "series_threshold": 1.0},
        "anomaly": {"energy_mean": -30.0, "energy_std": 1.0, "smoothing_px": 9, "region_threshold": 20.0},
    })
    return path


def test_orthanc_sends_a_study_and_gets_the_sr_back(tmp_path: Path, viewer_check: Path) -> None:  # noqa: F811
    btd_port = free_port()
    with Orthanc(tmp_path / "orthanc", modalities={"btd": ["BTD", "127.0.0.1", btd_port]}) as orthanc:
        orthanc.upload(ALL_CT_FILES)
        gateway = GatewayProcess(
            tmp_path / "btd", dicom_port=btd_port, ae_title="BTD", stable_seconds=1, monitor_interval=0.2,
            model=str(tiny_model(tmp_path)), device="cpu", destinations=orthanc.destination, kos_enabled="true",
            delivery_retries=2, delivery_backoff_seconds=1,
        )
        with gateway:
            study_uid = str(pydicom.dcmread(CT_FILES[0], stop_before_pixels=True).StudyInstanceUID)
            response = orthanc.http.post("/modalities/btd/store",
                                         json={"Resources": [orthanc.study_id(study_uid)], "Synchronous": True})
            assert response.status_code == 200, response.text
            started = time.monotonic()
            try:
                def report_back() -> bool:
                    btd_state = btd_study_state(gateway.http_port, study_uid)
                    if btd_state in (State.FAILED, State.FAILED_DELIVERY, State.REJECTED):
                        raise TimeoutError(f"btd gave up on the study: {btd_state}")
                    return orthanc.has_class(study_uid, KOS_CLASS) and orthanc.has_class(study_uid, SR_CLASS)

                wait_until(report_back, timeout=300, interval=2.0, what="SR and KOS back in Orthanc")
            except TimeoutError:
                pytest.fail(f"no report after {time.monotonic() - started:.0f} s; gateway log:\n"
                            f"{gateway.log_text()[-4000:]}")
            stored = orthanc.instances_by_class(study_uid)
            orthanc_sr_bytes = orthanc.file_of(stored[SR_CLASS][0])
            state = httpx.get(f"http://127.0.0.1:{gateway.http_port}/api/studies/{study_uid}", timeout=10).json()
    images = {str(ds.SOPInstanceUID) for ds in stored["1.2.840.10008.5.1.4.1.1.2"]}
    assert len(images) == 20
    (sr,) = stored[SR_CLASS]
    assert sr.StudyInstanceUID == study_uid
    assert "suspicious" in sr.CompletionFlagDescription and "SUSPICIOUS" in sr.SeriesDescription
    assert evidence_uids(sr) == images
    assert region_references(sr) and region_references(sr) <= images
    assert state["state"] in (State.DELIVERED, State.REPORTED)  # REPORTED: the last ack is being recorded

    # The SR exactly as the PACS holds it, with the model's real region outlines: OHIF draws every region.
    sr_path = tmp_path / "from-orthanc.dcm"
    sr_path.write_bytes(orthanc_sr_bytes)
    series_dir = tmp_path / "ct"
    series_dir.mkdir()
    for path in ALL_CT_FILES:
        shutil.copy(path, series_dir / path.name)
    code, result = check(viewer_check, sr_path, series_dir)
    assert code == 0, result
    assert result["measurements"] and all(m["displayed"] for m in result["measurements"])
