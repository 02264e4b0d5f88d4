"""Maps computed only over the window their search region needs (models/window.py) equal the whole slice's.

Why these tests: the BTD anomaly map and the continuity cue now run their filters on a rectangle around the
search region instead of the whole slice (2026-12-05, issue 15 items 3 and 4). Every value a score, peak or
region reads must be the one the whole-slice computation gives; these compare the two on real CT slices,
windows cut inside the slice and windows that meet its edges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from models.anomaly import AnomalyModel
from models.corpus import dicom_to_hu
from models.cues import continuity, masked_max
from models.cues.continuity import disk_footprint
from models.window import Window, gaussian_reach, uniform_reach

FIXTURES = Path(__file__).parent / "fixtures"


def highpass(hu: np.ndarray) -> np.ndarray:
    """A stand-in for the BTD residual (a learned high-pass at t = 0): needs no network."""
    unit = np.clip((hu + 1100.0) / 1400.0, 0, 1) * 2 - 1
    return (unit - ndimage.median_filter(unit, size=3)).astype(np.float32)[None]


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    return dicom_to_hu(pydicom.dcmread(FIXTURES / "ct_transfer_syntaxes" / "CT1_J2KR")).astype(np.float32)


@pytest.fixture(scope="module")
def abdomen() -> list[np.ndarray]:
    files = sorted((FIXTURES / "ct_series_20").glob("CT.*"))[:5]
    return [np.clip(dicom_to_hu(pydicom.dcmread(f)), -1024, 3071).astype(np.float32) for f in files]


def test_window_bounds_a_mask_with_its_margin_inside_the_image() -> None:
    mask = np.zeros((40, 50), dtype=bool)
    mask[10:12, 20:31] = True
    window = Window.around(mask, 3)
    assert (window.top, window.bottom, window.left, window.right) == (7, 15, 17, 34)
    assert mask[window.index].sum() == mask.sum()
    assert Window.around(mask, 30).is_whole  # clipped to the image on every side
    assert Window.around(np.zeros((40, 50), dtype=bool), 3).is_whole  # nothing to bound: the whole slice
    outer = window.grown(2)
    assert outer.holds(window) and not window.holds(outer)
    assert window.union(Window(0, 1, 0, 1, (40, 50))) == Window(0, 15, 0, 34, (40, 50))
    with pytest.raises(ValueError, match="not inside"):
        outer.within(window)
    part = np.arange(window.bottom - window.top, dtype=np.float32)[:, None] * np.ones(window.right - window.left)
    pasted = window.pasted(part, -5.0)
    assert pasted.shape == (40, 50) and np.array_equal(pasted[window.index], part)
    assert (pasted[~np.pad(np.ones(part.shape, bool), ((7, 25), (17, 16)))] == -5.0).all()
    # A whole window pastes a copy too: callers write into what it returns and keep the part intact.
    whole = Window.whole((40, 50))
    full = np.ones((40, 50), dtype=np.float32)
    copied = whole.pasted(full, 0.0)
    copied[0, 0] = 9.0
    assert full[0, 0] == 1.0


@pytest.mark.parametrize("margin", [0, 7])
def test_local_filters_on_a_window_equal_the_whole_slices(chest: np.ndarray, margin: int) -> None:
    """A Gaussian and a box mean over a window, given their reach, equal the whole slice's value for value, for
    windows cut inside the slice and windows that meet its edges (where scipy's reflection must be kept)."""
    gaussian = lambda image: ndimage.gaussian_filter(image, 3.0)  # noqa: E731
    box = lambda image: ndimage.uniform_filter(image, 5)  # noqa: E731
    whole_gaussian, whole_box = gaussian(chest), box(chest)
    rows, columns = chest.shape
    for top, bottom, left, right in [(100, 300, 120, 380), (0, 90, 0, 512), (400, 512, 200, 512), (3, 509, 1, 60)]:
        window = Window(top, bottom, left, right, (rows, columns)).grown(margin)
        assert np.array_equal(window.filtered(chest, gaussian_reach(3.0), gaussian), whole_gaussian[window.index])
        assert np.array_equal(window.filtered(chest, uniform_reach(5), box), whole_box[window.index])
    # Leading axes (a residual's channels) pass through: the rows and columns are the last two axes.
    stacked = np.stack([chest, -chest])
    box_per_channel = lambda image: ndimage.uniform_filter(image, size=(1, 5, 5))  # noqa: E731
    inside = Window(100, 300, 120, 380, (rows, columns)).grown(margin)
    assert np.array_equal(
        inside.filtered(stacked, uniform_reach(5), box_per_channel), box_per_channel(stacked)[(..., *inside.index)]
    )
    # One pixel less reach than the filter has is wrong near a cut edge: the reach is what makes it exact.
    inside = Window(100, 300, 120, 380, (rows, columns))
    assert not np.array_equal(inside.filtered(chest, gaussian_reach(3.0) - 1, gaussian), whole_gaussian[inside.index])


def test_a_box_mean_over_values_of_many_decades_differs_at_most_in_the_last_bit() -> None:
    """scipy's box mean keeps a running sum along each line, so where a line starts can move the float32
    result by its last bit when values span many decades (residual energies): what models/window.py states."""
    rng = np.random.default_rng(7)
    energy = (rng.standard_normal((512, 512)).astype(np.float32) * 0.1) ** 2
    energy[rng.random((512, 512)) < 0.01] *= 1e-8
    whole = ndimage.uniform_filter(energy, 5)
    window = Window(100, 400, 80, 380, energy.shape)
    part = window.filtered(energy, uniform_reach(5), lambda image: ndimage.uniform_filter(image, 5))
    expected = whole[window.index]
    assert np.count_nonzero(part != expected) < part.size // 1000
    assert np.allclose(part, expected, rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("settings", [{}, {"per_slice": False}, {"two_sided": False, "region_px": 9}])
def test_the_anomaly_map_over_its_window_equals_the_whole_slices(chest, abdomen, settings) -> None:
    """The map the detector computes (tissue bins and energy over the search region's window) equals the map
    made from whole-slice features, value for value: a chest slice (lungs well inside the image) and an
    abdomen slice (no lung: the search falls back to the body, whose window meets the table's edge)."""
    model = AnomalyModel().fit_reference([(highpass(chest), chest)]).variant(**settings)
    for hu in (chest, abdomen[2]):
        residual = highpass(hu)
        windowed = model.slice_map(residual, hu)
        whole = model.slice_map(residual, hu, model.features(hu))
        assert whole.window is not None and whole.window.is_whole
        assert windowed.window is not None
        assert model.search_mask(hu)[windowed.window.index].sum() == windowed.search.sum()  # all of it inside
        if hu is chest:
            assert windowed.window.bottom - windowed.window.top < hu.shape[0]  # a real cut, not the whole slice
        amap, expected = model.finish(windowed), model.finish(whole)
        assert amap.shape == hu.shape and amap.dtype == np.float32
        assert np.array_equal(amap, expected)
        assert model.slice_score(amap) == model.slice_score(expected)
    # Maps compared with their neighbours are read around the search region: those stay whole.
    neighbours = model.variant(neighbour_weight=0.5)
    assert neighbours.slice_map(highpass(chest), chest).window.is_whole  # type: ignore[union-attr]


def test_whole_slice_features_are_made_again_where_a_windowed_set_cannot_serve(chest) -> None:
    """Fitting a reference reads the bins of every search pixel: handed windowed features, it makes whole ones."""
    model = AnomalyModel()
    windowed = model.features(chest, windowed=True)
    assert windowed["hu_bin"].shape != chest.shape
    fitted_from_windowed = model.fit_reference([(highpass(chest), chest, windowed)])
    fitted = model.fit_reference([(highpass(chest), chest)])
    assert fitted_from_windowed.ref_mean == fitted.ref_mean and fitted_from_windowed.ref_std == fitted.ref_std
    # A model whose region mean reads farther than the window of the features handed to it makes its own.
    wider = fitted.variant(region_px=15)
    narrow = fitted.features(chest, windowed=True)
    mapped = wider.finish(wider.slice_map(highpass(chest), chest, narrow))
    assert np.array_equal(mapped, wider.finish(wider.slice_map(highpass(chest), chest, wider.features(chest))))


def whole_slice_continuity(hu, before, after, search, reach):
    """The continuity map as the whole slice computes it, written with scipy's own footprint filters."""
    smooth = [ndimage.gaussian_filter(np.clip(a, -1024, 400).astype(np.float32), 1.2) for a in (before, hu, after)]
    disk = disk_footprint(reach)
    upper = np.maximum(*(ndimage.maximum_filter(smooth[k], footprint=disk) for k in (0, 2)))
    lower = np.minimum(*(ndimage.minimum_filter(smooth[k], footprint=disk) for k in (0, 2)))
    outside = np.maximum(smooth[1] - upper, 0.0) + np.maximum(lower - smooth[1], 0.0)
    values = (smooth[1] - 0.5 * (smooth[0] + smooth[2]))[search & (smooth[1] > -1000)]
    spread = float(np.median(np.abs(values - np.median(values))) * 1.4826)
    return masked_max(ndimage.uniform_filter(outside / max(spread, 1.0), 5), search)


def test_the_continuity_cue_over_its_window_equals_the_whole_slices(abdomen) -> None:
    """Along a series (each image kept for its neighbours over a window, widened when a neighbour's window
    does not fit) every map, score and peak equals the whole-slice computation."""
    continuity._prepared.clear()
    rows, columns = abdomen[0].shape
    yy, xx = np.mgrid[:rows, :columns]
    searches = [
        (yy - 250) ** 2 + (xx - 260) ** 2 < 90**2,  # inside the slice
        (yy - 240) ** 2 + (xx - 275) ** 2 < 120**2,  # a neighbour's window not held by the kept one: widened
        (yy < 60) & (xx > 300),  # meets the top and right edges
    ]
    compared = 0
    for search in searches:
        for i in range(1, len(abdomen) - 1):
            cue = continuity.continuity_map(abdomen[i], abdomen[i - 1], abdomen[i + 1], search, 1.25, 0.7)
            reach = continuity.reach_px(1.25, 0.7)
            expected, score = whole_slice_continuity(abdomen[i], abdomen[i - 1], abdomen[i + 1], search, reach)
            assert cue.amap is not None and np.array_equal(cue.amap, expected)
            assert cue.score == score and cue.peak == np.unravel_index(int(np.argmax(expected)), expected.shape)
            compared += 1
    assert compared == 9
