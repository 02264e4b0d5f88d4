"""The physical cues on real CT: each must see the edit it is built for and stay quiet on genuine slices."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from models.corpus import DEFAULT_DATA_ROOT, dicom_to_hu
from models.cues.continuity import continuity_map
from models.cues.copymove import copy_move_scores, keypoints
from models.cues.fusion import TailModel, fused_score, relative_scores, series_correction
from models.cues.header import header_findings, signature
from models.cues.noise import noise_map
from models.lungmask import lung_mask

LIDC2 = DEFAULT_DATA_ROOT / "lidc-idri" / "LIDC-IDRI-0002"
pytestmark = pytest.mark.skipif(not LIDC2.is_dir(), reason="shared chest-CT corpus not present")


@pytest.fixture(scope="module")
def lidc_series() -> list[np.ndarray]:
    """Five consecutive real slices (1.25 mm apart) of LIDC-IDRI-0002, in order along z."""
    def z(path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])

    paths = sorted(LIDC2.glob("*.dcm"), key=z)
    return [dicom_to_hu(pydicom.dcmread(p)) for p in paths[3:8]]


def _blob(hu: np.ndarray, lungs: np.ndarray, radius: int = 6) -> tuple[np.ndarray, tuple[int, int]]:
    inner = ndimage.binary_erosion(lungs, iterations=radius + 4) & (ndimage.uniform_filter(hu, 2 * radius + 1) < -700)
    cy, cx = np.argwhere(inner)[len(np.argwhere(inner)) // 2]
    yy, xx = np.mgrid[: hu.shape[0], : hu.shape[1]]
    weight = np.clip(radius - np.hypot(yy - cy, xx - cx) + 0.5, 0, 1)
    out = hu * (1 - weight) + weight * (20.0 + np.random.default_rng(0).normal(0, 15, hu.shape))
    return out.astype(np.float32), (int(cy), int(cx))


def test_continuity_sees_a_nodule_on_one_slice_only_and_says_when_too_coarse(lidc_series) -> None:
    before, hu, after = lidc_series[1:4]
    search = lung_mask(hu, dilate_px=10)
    genuine = continuity_map(hu, before, after, search, 1.25, 0.7)
    tampered_hu, (cy, cx) = _blob(hu, lung_mask(hu))
    tampered = continuity_map(tampered_hu, before, after, search, 1.25, 0.7)
    assert tampered.score > genuine.score + 2.0
    y, x = tampered.peak
    assert abs(y - cy) <= 8 and abs(x - cx) <= 8
    coarse = continuity_map(hu, before, after, search, 5.0, 0.7)
    assert coarse.score is None and "too coarse" in coarse.reason
    assert continuity_map(hu, None, after, search, 1.25, 0.7).reason == "no adjacent slice on both sides"


def test_noise_texture_finds_a_smoothed_region_of_lung(lidc_series) -> None:
    hu = lidc_series[2]
    lungs = lung_mask(hu)
    search = lung_mask(hu, dilate_px=10)
    inner = np.argwhere(ndimage.binary_erosion(lungs, iterations=20))
    cy, cx = inner[len(inner) // 3]
    smoothed = hu.copy()
    box = (slice(cy - 12, cy + 12), slice(cx - 12, cx + 12))
    smoothed[box] = ndimage.gaussian_filter(hu, 4.0)[box]
    genuine, tampered = noise_map(hu, search), noise_map(smoothed, search)
    assert tampered.score > genuine.score
    y, x = tampered.peak
    assert abs(y - cy) <= 16 and abs(x - cx) <= 16


def test_copy_move_finds_a_patch_duplicated_in_another_slice_and_not_genuine_neighbours(lidc_series) -> None:
    slices = [s.copy() for s in lidc_series]
    search = [lung_mask(s, dilate_px=10) for s in slices]
    genuine = copy_move_scores([keypoints(s, m) for s, m in zip(slices, search, strict=True)])
    # copy a dense structure of slice 0 (a vessel) into the lung of slice 4, elsewhere
    kp0 = keypoints(slices[0], search[0])
    y, x = kp0.points[0]
    lungs4 = ndimage.binary_erosion(lung_mask(slices[4]), iterations=20)
    ty, tx = np.argwhere(lungs4 & (ndimage.uniform_filter(slices[4], 15) < -750))[0]
    slices[4][ty - 10 : ty + 10, tx - 10 : tx + 10] = slices[0][y - 10 : y + 10, x - 10 : x + 10]
    search[4] = lung_mask(slices[4], dilate_px=10)
    copied = copy_move_scores([keypoints(s, m) for s, m in zip(slices, search, strict=True)])
    assert copied[4].score > 0.97
    assert copied[4].score > max(g.score for g in genuine) + 0.02
    py, px = copied[4].peak
    assert abs(py - ty) <= 10 and abs(px - tx) <= 10


def test_header_cue_fires_on_a_re_encoded_instance_and_not_on_file_meta_alone() -> None:
    base = {"BitsStored": "12", "PixelRepresentation": "0", "RescaleIntercept": "-1024", "private_groups": "0009,0019",
            "ImplementationClassUID": "1.2.3", "TransferSyntaxUID": "1.2.840.10008.1.2.1"}
    series = [dict(base) for _ in range(10)]
    findings, why = header_findings(series)
    assert findings == [] and why is None
    series[3] = {**base, "BitsStored": "16", "private_groups": ""}
    series[6] = {**base, "ImplementationClassUID": "1.2.826.0.1.3680043.8.498.1"}
    findings, why = header_findings(series)
    assert [(f.index, f.strong) for f in findings] == [(3, True), (6, False)]
    assert "BitsStored" in findings[0].describe()
    mixed = [{**base, "TransferSyntaxUID": str(i)} for i in range(10)]  # re-encoded test files: no majority
    assert header_findings(mixed)[0] == [] and "no clear majority" in header_findings(mixed)[1]
    assert "needs 5" in header_findings(series[:3])[1]


def test_header_signature_names_the_private_groups_of_real_files_from_several_scanners() -> None:
    """The private groups are read from the tags alone; they must be the groups of the decoded elements."""
    folders = [LIDC2, DEFAULT_DATA_ROOT / "cptac-lscc" / "C3N-00247", DEFAULT_DATA_ROOT / "covid19-ny-sbu"]
    files = [next(iter(sorted(folder.rglob("*.dcm")))) for folder in folders if folder.is_dir()]
    assert len(files) >= 2
    seen = set()
    for path in files:
        for header_only in (True, False):
            ds = pydicom.dcmread(path, stop_before_pixels=header_only)
            decoded = ",".join(sorted({f"{element.tag.group:04x}" for element in ds if element.tag.is_private}))
            assert signature(ds)["private_groups"] == decoded
            seen.add(decoded)
    assert all(seen) and len(seen) >= 2  # real private groups, and not the same set everywhere


def test_tail_model_p_values_fusion_and_series_correction() -> None:
    rng = np.random.default_rng(0)
    tail = TailModel.fit(rng.normal(0, 1, 2000))
    assert tail.p_value(-5) == pytest.approx(1.0)
    assert 0.4 < tail.p_value(0.0) < 0.6
    assert tail.p_value(3.0) < 0.01 and tail.p_value(6.0) < tail.p_value(3.0)
    assert TailModel.from_dict(tail.to_dict()).p_value(2.5) == pytest.approx(tail.p_value(2.5))
    assert fused_score({"a": 0.001, "b": 0.5}) == pytest.approx(-np.log10(0.002))
    assert fused_score({"a": 0.01, "b": 0.01}, "fisher") > fused_score({"a": 0.01, "b": 0.5}, "fisher")
    assert series_correction(100) == pytest.approx(2.0)
    rel, why = relative_scores([1.0, 2.0, 3.0], [True] * 3, min_slices=8, reference_median=None)
    assert rel == [None] * 3 and "too short" in why
    rel, why = relative_scores([1.0, 2.0, 3.0], [True] * 3, min_slices=2, reference_median=None)
    assert rel == [-1.0, 0.0, 1.0] and why is None
    with pytest.raises(ValueError):
        TailModel.fit([1.0, 2.0])
