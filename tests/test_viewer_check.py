"""OHIF 3.13's own SR code (../shared/tools/viewer_check) on our SRs: regions drawn, clean SRs load.

The tool is copied to a writable temp dir and `npm ci` runs once per test session (it needs the npm
registry). Set BTD_VIEWER_CHECK_DIR to a copy that already has node_modules to skip the install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from worker.reports.findings import RegionFinding, ReplacedInstance, SeriesFinding, StudyFindings
from worker.reports.sr import build_sr

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CANDIDATES = [ROOT / "shared" / "tools" / "viewer_check", ROOT.parent / "shared" / "tools" / "viewer_check"]

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


_installed: list[Path] = []  # the copy installed in this session (other modules import this fixture)


@pytest.fixture(scope="session")
def viewer_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prepared = os.environ.get("BTD_VIEWER_CHECK_DIR")
    if prepared and (Path(prepared) / "node_modules").is_dir():
        return Path(prepared)
    if _installed:
        return _installed[0]
    source = next((p for p in CANDIDATES if (p / "check_sr.mjs").is_file()), None)
    if source is None:
        pytest.skip("viewer_check not found at ../shared/tools/viewer_check")
    target = tmp_path_factory.mktemp("viewer") / "viewer_check"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("node_modules"))
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=target, check=True, capture_output=True, timeout=600)
    _installed.append(target)
    return target


def check(tool: Path, sr_path: Path, images: Path) -> tuple[int, dict]:
    proc = subprocess.run(
        ["node", "check_sr.mjs", str(sr_path), "--images", str(images)],
        cwd=tool,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, json.loads(proc.stdout)


def headers(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.suffix != ".txt"
            and not p.name.startswith("LICENSE")]


def study_findings(images: list[Dataset], n_regions: int) -> StudyFindings:
    targets = [images[i * len(images) // max(n_regions, 1)] for i in range(n_regions)]
    regions = [
        RegionFinding(
            sop_instance_uid=str(t.SOPInstanceUID),
            score=0.5 + i / 10,
            outline=[[20.0 + i, 20.0], [50.0, 22.0], [55.0, 45.0], [35.0, 52.0], [18.0, 40.0], [15.0, 30.0]],
            frame=2 if int(t.get("NumberOfFrames", 1) or 1) > 1 else None,
        )
        for i, t in enumerate(targets)
    ]
    return StudyFindings(
        study_uid=str(images[0].StudyInstanceUID),
        study_version=1,
        verdict="suspicious" if regions else "no_evidence",
        score=0.7 if regions else 0.1,
        model_name="btd-test",
        model_sha256="f" * 64,
        series=[SeriesFinding("1.2.826.0.1.3680043.8.498.2", "OT", "not_assessed", None, "unsupported modality")],
        regions=regions,
    )


@pytest.fixture(scope="module")
def mr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """check_sr.mjs reads a folder of images: one with only the enhanced MR (10 frames)."""
    folder = tmp_path_factory.mktemp("emr")
    shutil.copy(FIXTURES / "pydicom" / "emri_small.dcm", folder / "emri_small.dcm")
    return folder


@pytest.mark.slow
def test_flagged_ct_sr_draws_every_region(viewer_check: Path, tmp_path: Path) -> None:
    series = FIXTURES / "ct_series_20"
    findings = study_findings(headers(series), n_regions=3)
    path = tmp_path / "sr.dcm"
    build_sr(headers(series), findings).save_as(path, enforce_file_format=True)
    code, result = check(viewer_check, path, series)
    assert code == 0, result
    assert result["n_measurement_groups"] == 3
    assert all(m["displayed"] for m in result["measurements"]), result["measurements"]
    assert {m["referenced_sop_instance_uid"] for m in result["measurements"]} == {
        r.sop_instance_uid for r in findings.regions
    }
    assert all(m["tracking_identifier"].startswith("BTD: possible tampering, slice ") for m in result["measurements"])


@pytest.mark.slow
def test_clean_ct_sr_loads_without_error(viewer_check: Path, tmp_path: Path) -> None:
    series = FIXTURES / "ct_series_20"
    path = tmp_path / "sr.dcm"
    build_sr(headers(series), study_findings(headers(series), n_regions=0)).save_as(path, enforce_file_format=True)
    code, result = check(viewer_check, path, series)
    assert code in (0, 2), result
    assert result["refused_reason"] is None and result["is_tid1500"]


@pytest.mark.slow
def test_flagged_enhanced_mr_sr_draws_its_region(viewer_check: Path, mr_dir: Path, tmp_path: Path) -> None:
    images = headers(mr_dir)
    path = tmp_path / "sr.dcm"
    build_sr(images, study_findings(images, n_regions=1)).save_as(path, enforce_file_format=True)
    code, result = check(viewer_check, path, mr_dir)
    assert code == 0, result
    assert [m["displayed"] for m in result["measurements"]] == [True]
    assert result["measurements"][0]["tracking_identifier"] == "BTD: possible tampering, frame 2"


@pytest.mark.slow
def test_sr_stating_a_replaced_instance_still_loads_and_draws(viewer_check: Path, tmp_path: Path) -> None:
    """The TEXT item for an instance replaced under its UID (issue 14) sits beside the verdict: the viewer
    still loads the report and draws its region."""
    series = FIXTURES / "ct_series_20"
    images = headers(series)
    findings = study_findings(images, n_regions=1)
    findings.replaced_instances = [ReplacedInstance(str(images[3].SOPInstanceUID), 2)]
    path = tmp_path / "sr.dcm"
    build_sr(images, findings).save_as(path, enforce_file_format=True)
    code, result = check(viewer_check, path, series)
    assert code == 0, result
    assert result["n_measurement_groups"] == 1 and all(m["displayed"] for m in result["measurements"])
