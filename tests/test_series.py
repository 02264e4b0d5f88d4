"""Series assembly on real files: grouping, order along the slice normal (gantry tilt), fallbacks, streaming."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom

from models.series import expand_paths, group_series, iter_slices

FIXTURES = Path(__file__).parent / "fixtures"


def test_folder_of_one_series_sorted_along_the_normal():
    groups = group_series(expand_paths([FIXTURES / "ct_series_20"]))
    (series,) = [g for g in groups if g.series_instance_uid]
    assert series.modality == "CT" and len(series.slices) == 20
    positions = [s.position for s in series.slices]
    assert positions == sorted(positions) and len(set(positions)) == 20
    assert all(s.frame is None for s in series.slices)
    # the licence file is reported as unreadable, not dropped and not mixed into the series
    (unreadable,) = [g for g in groups if not g.series_instance_uid]
    assert unreadable.slices[0].problem.startswith("not a DICOM file")


def test_gantry_tilt_order_is_independent_of_input_order():
    files = sorted(str(p) for p in (FIXTURES / "head_tilt").glob("*.dcm"))
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)
    (series,) = group_series(shuffled)
    ordered = [Path(s.path).name for s in series.slices]
    assert ordered == [Path(f).name for f in files]  # 01..06 lie in increasing position along the normal
    # with an 18.5 degree tilt the z coordinate alone is not the distance along the normal
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert float(ds.GantryDetectorTilt) == 18.5
    steps = np.diff([s.position for s in series.slices])
    dz = np.diff([float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files])
    assert np.all(steps > 0) and not np.allclose(steps, dz)


def test_instance_number_decides_without_geometry():
    datasets = [pydicom.dcmread(f) for f in sorted((FIXTURES / "head_tilt").glob("*.dcm"))]
    for ds in datasets:
        del ds.ImagePositionPatient
    reversed_numbers = list(reversed(datasets))
    for number, ds in enumerate(reversed_numbers, start=1):
        ds.InstanceNumber = number
    (series,) = group_series(datasets)
    assert [s.instance_number for s in series.slices] == [1, 2, 3, 4, 5, 6]
    assert [s.source for s in series.slices] == reversed_numbers
    assert all(s.position is None for s in series.slices)


def test_multiframe_frames_are_slices_of_their_series():
    (series,) = group_series([FIXTURES / "pydicom" / "eCT_Supplemental.dcm"])
    assert [s.frame for s in series.slices] == [2, 1]  # frame 2 lies lower along the normal
    items = list(iter_slices(series))
    assert [hu.shape for _, hu, _ in items] == [(512, 512), (512, 512)]
    assert not np.array_equal(items[0][1], items[1][1])


def test_unassessable_slices_stream_with_their_reason():
    syntaxes = FIXTURES / "ct_transfer_syntaxes"
    files = [
        syntaxes / "CTImage.dcm",
        syntaxes / "CTImage.dcm_JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53.dcm",
    ]
    (series,) = group_series(files)
    results = {Path(ref.path).name: (hu, reason) for ref, hu, reason in iter_slices(series)}
    hu, reason = results["CTImage.dcm"]
    assert reason is None and hu.shape == (512, 512)
    hu, reason = results[files[1].name]
    assert hu is None and "unsupported transfer syntax" in reason


def test_blank_uids_fall_back_to_file_meta():
    (series,) = group_series([FIXTURES / "edge_cases" / "blank_uids" / "CT_blank_uids.dcm"])
    assert series.series_instance_uid == ""
    assert series.slices[0].sop_instance_uid == "1.3.12.2.1107.5.1.4.60064.30000022120808113428000016573"
    ((_, hu, reason),) = list(iter_slices(series))
    assert reason is None and hu.shape == (512, 512)


def test_slices_are_decoded_one_file_at_a_time(monkeypatch):
    """Streaming: a file's pixels are read only when its slice is reached, and only one file is held."""
    import models.series as series_module

    reads = []
    real_read_hu = series_module.read_hu

    def counting_read_hu(source, **kwargs):
        reads.append(source)
        return real_read_hu(source, **kwargs)

    monkeypatch.setattr(series_module, "read_hu", counting_read_hu)
    (series,) = [g for g in group_series(expand_paths([FIXTURES / "ct_series_20"])) if g.series_instance_uid]
    assert reads == []  # grouping reads headers only
    stream = iter_slices(series)
    next(stream)
    next(stream)
    assert len(reads) == 2
    assert sum(1 for _ in stream) == 18 and len(reads) == 20
