"""The study benchmarks/e2e.py sends: made of any series folder, with fresh UIDs and one consistent stack.

Why: the large-study figures of docs/bench/e2e.md (issue 15 item 5) are only as good as the study they send.
Since 2026-12-05 `--source` makes it of a chest series from ../shared/data (files named *.dcm, beside licence
and readme files) instead of the fixture's CT.* files; a study that picked up a non-DICOM file, reused a UID
or stacked its copies on top of each other would time something else.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pydicom
import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "ct_series_20"


def _e2e_module():
    spec = importlib.util.spec_from_file_location("btd_e2e_benchmark", REPO / "benchmarks" / "e2e.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_study_made_of_a_dcm_series_cycles_it_with_fresh_uids_along_one_stack(tmp_path: Path) -> None:
    source = tmp_path / "series"
    source.mkdir()
    originals = sorted(FIXTURE.glob("CT.*"))
    for number, path in enumerate(originals):
        shutil.copy(path, source / f"{number:06d}.dcm")
    (source / "LICENSE.txt").write_text("not an image\n")
    (source / "metadata.csv").write_text("a,b\n")

    e2e = _e2e_module()
    study = e2e.make_study(tmp_path / "study", 50, source)

    made = sorted(study.iterdir())
    assert len(originals) == 20 and len(made) == 50  # two copies of the series and half a third; no text file
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in made]
    assert len({h.StudyInstanceUID for h in heads}) == 1 and len({h.SeriesInstanceUID for h in heads}) == 1
    assert len({h.SOPInstanceUID for h in heads}) == 50
    source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in originals}
    assert not source_uids & {h.SOPInstanceUID for h in heads}
    assert heads[0].StudyInstanceUID != pydicom.dcmread(originals[0], stop_before_pixels=True).StudyInstanceUID
    z = [float(h.ImagePositionPatient[2]) for h in sorted(heads, key=lambda h: int(h.InstanceNumber))]
    steps = [b - a for a, b in zip(z[:-1], z[1:], strict=True)]
    assert all(abs(step - steps[0]) < 1e-3 for step in steps), steps  # one stack, no copy on top of another


def test_a_folder_without_images_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("no images here\n")
    with pytest.raises(ValueError, match="no CT.* or .*dcm files"):
        _e2e_module().make_study(tmp_path / "study", 5, tmp_path)
