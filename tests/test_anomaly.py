"""The anomaly model: tissue-normalised, two-sided, searched in the lungs.

The residual here is a plain high-pass of the image (FINDINGS.md: BTD's t = 0 residual behaves like a
learned high-pass filter), so the test needs no trained network and runs in a second.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from models.anomaly import AnomalyModel
from models.corpus import dicom_to_hu
from models.forensics.inpaint import harmonic_fill
from models.lungmask import lung_mask


def highpass(hu: np.ndarray) -> np.ndarray:
    unit = np.clip((hu + 1100.0) / 1400.0, 0, 1) * 2 - 1
    return (unit - ndimage.median_filter(unit, size=3)).astype(np.float32)


@pytest.fixture(scope="module")
def chest(fixtures_dir):
    return dicom_to_hu(pydicom.dcmread(fixtures_dir / "ct_transfer_syntaxes" / "CT1_J2KR"))


@pytest.fixture(scope="module")
def fitted(chest):
    return AnomalyModel().fit_reference([(highpass(chest), chest)])


def test_smoothed_inpainted_region_is_more_unusual_than_genuine_tissue(chest, fitted) -> None:
    lungs = ndimage.binary_erosion(lung_mask(chest), iterations=20)
    cy, cx = np.argwhere(lungs)[len(np.argwhere(lungs)) // 2]
    region = np.zeros_like(lungs)
    region[cy - 10 : cy + 10, cx - 10 : cx + 10] = True
    tampered = chest.copy()
    tampered[region] = harmonic_fill(chest, region)[region]  # a noise-free in-painting

    genuine_map = fitted.anomaly_map(highpass(chest), chest)
    tampered_map = fitted.anomaly_map(highpass(tampered), tampered)
    assert tampered_map[region].mean() > np.percentile(genuine_map[lung_mask(chest)], 99)
    assert fitted.slice_score(tampered_map) > fitted.slice_score(genuine_map)
    y, x = np.unravel_index(int(np.argmax(tampered_map)), tampered_map.shape)
    assert region[max(y - 8, 0) : y + 9, max(x - 8, 0) : x + 9].any()  # and it points at the region

    # The one-sided variant (the published score's direction) cannot see a removal: it looks LESS unusual.
    one_sided = fitted.variant(two_sided=False)
    assert one_sided.anomaly_map(highpass(tampered), tampered)[region].mean() < 0


def test_map_is_zero_outside_the_search_region_and_metadata_round_trips(chest, fitted) -> None:
    amap = fitted.anomaly_map(highpass(chest), chest)
    assert amap.shape == chest.shape and amap.dtype == np.float32
    assert (amap[~fitted.search_mask(chest)] == 0).all()
    again = AnomalyModel.from_metadata(fitted.to_dict())
    assert np.allclose(again.anomaly_map(highpass(chest), chest), amap)


def test_first_version_metadata_still_loads() -> None:
    old = AnomalyModel.from_metadata({"kind": "log-energy-z", "energy_mean": -9.0, "energy_std": 2.0})
    assert not old.two_sided and not old.ref_mean and old.energy_mean == -9.0
    assert AnomalyModel.from_metadata(None).two_sided


def test_neighbouring_slices_cancel_what_spans_them_and_keep_what_does_not(chest, fitted) -> None:
    """Rough texture on three adjacent slices is anatomy; the same texture on the middle slice alone is an edit."""
    rng = np.random.default_rng(3)
    lungs = ndimage.binary_erosion(lung_mask(chest), iterations=25)
    points = np.argwhere(lungs)
    real_at = tuple(int(v) for v in points[len(points) // 4])
    edit_at = tuple(int(v) for v in points[3 * len(points) // 4])
    yy, xx = np.mgrid[: chest.shape[0], : chest.shape[1]]

    def textured(hu: np.ndarray, at: tuple[int, int]) -> np.ndarray:
        disc = (yy - at[0]) ** 2 + (xx - at[1]) ** 2 <= 7**2
        out = hu.copy()
        out[disc] += rng.normal(0.0, 250.0, int(disc.sum()))
        return out

    slices = [textured(np.roll(chest, k - 1, axis=1), real_at) for k in range(3)]  # moved a little per slice
    slices[1] = textured(slices[1], edit_at)

    model = fitted.variant(two_sided=False, neighbour_weight=0.5, neighbour_reach_px=15)
    maps = [model.slice_map(highpass(hu), hu) for hu in slices]
    alone = model.finish(maps[1])
    in_series = model.finish(maps[1], [maps[0], maps[2]])

    def peak(amap: np.ndarray, at: tuple[int, int]) -> float:
        return float(amap[at[0] - 6 : at[0] + 7, at[1] - 6 : at[1] + 7].max())

    # Alone, both patches stand out alike; beside its neighbours only the edit does.
    assert abs(peak(alone, real_at) - peak(alone, edit_at)) < 0.2 * peak(alone, edit_at)
    assert peak(in_series, edit_at) - peak(in_series, real_at) > 0.3 * peak(alone, edit_at)
    y, x = np.unravel_index(int(np.argmax(in_series)), in_series.shape)
    assert abs(y - edit_at[0]) <= 8 and abs(x - edit_at[1]) <= 8
    # A missing neighbour (None) or consistency switched off: the slice keeps its own map.
    assert np.allclose(model.finish(maps[1], [None, None]), alone)
    assert np.allclose(fitted.variant(two_sided=False).finish(maps[1], [maps[0], maps[2]]), alone)
    assert AnomalyModel.from_metadata(model.to_dict()).neighbour_weight == 0.5


def test_series_offset_is_the_median_of_lung_slices_with_a_floor_and_a_fallback() -> None:
    model = AnomalyModel(series_relative=True, series_min_slices=4, reference_median=2.0, series_max_lowering=0.5)
    assert model.series_offset([3.0, 3.5, 2.5, 9.0]) == 3.25  # one edited slice does not move the median much
    assert model.series_offset([3.0, 9.0]) == 2.0  # too few lung slices: the genuine reference
    assert model.series_offset([0.1, 0.2, 0.3, 0.4]) == 1.5  # a quiet series lowers the bar by 0.5 at most
    assert model.lowest_series_offset() == 1.5
    assert AnomalyModel().series_offset([3.0, 3.5, 2.5, 9.0]) == 0.0 == AnomalyModel().lowest_series_offset()


def test_a_reference_is_fitted_on_its_own_bins_even_when_given_features_of_other_edges(chest) -> None:
    # The benchmark computes features once with the shipped edges and fits variants with other edges: each
    # variant must bin the pixels with its own edges, not reuse the shipped model's bins.
    shipped_features = AnomalyModel().features(chest)
    coarse = AnomalyModel(hu_edges=[-800.0, 0.0])
    given = coarse.fit_reference([(highpass(chest), chest, shipped_features)])
    computed = coarse.fit_reference([(highpass(chest), chest)])
    assert np.asarray(given.ref_mean).shape == (3, len(coarse.structure_edges) + 1)
    assert np.allclose(given.ref_mean, computed.ref_mean) and np.allclose(given.ref_std, computed.ref_std)
