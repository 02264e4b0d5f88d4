"""Shortcuts taken for speed in the scoring path must compute exactly what they replace.

The detector's calibration (thresholds, genuine tails, the leave-one-family-out figures) was measured with
scipy's disk-footprint filters and the hull of every boundary corner; a faster route that changed a single
value would silently move every verdict. So each is compared value for value with the computation it
replaces, on a real CT slice and on random input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from models import morphology
from models.corpus import dicom_to_hu
from models.cues.continuity import disk_filter, disk_footprint
from models.regions import EIGHT_CONNECTED, convex_hull, label_maxima, outline_of, row_extremes

CT = sorted((Path(__file__).parent / "fixtures" / "ct_series_20").glob("CT.*"))[10]


@pytest.mark.parametrize("radius", range(1, 9))
def test_disk_filter_equals_scipys_footprint_filter(radius: int) -> None:
    hu = ndimage.gaussian_filter(np.clip(dicom_to_hu(pydicom.dcmread(CT)), -1024, 400).astype(np.float32), 1.2)
    rng = np.random.default_rng(radius)
    noise = rng.normal(size=(37, 301)).astype(np.float32)
    # images narrower than the disk: scipy reflects them more than once, the padding must do the same
    tiny = [rng.normal(size=shape).astype(np.float32) for shape in ((5, 3), (1, 40), (40, 1))]
    disk = disk_footprint(radius)
    for image in (hu, noise, *tiny):
        assert np.array_equal(disk_filter(image, radius, np.maximum), ndimage.maximum_filter(image, footprint=disk))
        assert np.array_equal(disk_filter(image, radius, np.minimum), ndimage.minimum_filter(image, footprint=disk))


def test_hull_of_row_extremes_is_the_hull_of_all_corners() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        component = ndimage.binary_opening(rng.random((30, 40)) < rng.uniform(0.2, 0.9))
        if not component.any():
            continue
        rows, cols = np.nonzero(component)
        corners = np.concatenate([np.stack([cols + dx, rows + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(float)
        assert np.array_equal(convex_hull(row_extremes(corners)), convex_hull(corners))
    square = np.zeros((8, 8), dtype=bool)
    square[2:5, 3:7] = True
    assert outline_of(square[2:5, 3:7], 3, 2) == [[3.0, 2.0], [7.0, 2.0], [7.0, 5.0], [3.0, 5.0], [3.0, 2.0]]


def test_label_maxima_equal_scipys_per_label_maximum() -> None:
    """find_regions ranks its regions by these maxima: the same values, in the same type, as ndimage.maximum."""
    rng = np.random.default_rng(1)
    hu = ndimage.gaussian_filter(np.clip(dicom_to_hu(pydicom.dcmread(CT)), -1024, 400).astype(np.float32), 2.0)
    maps = [hu, -hu]
    for _ in range(300):
        shape = tuple(int(n) for n in rng.integers(1, 90, 2))
        dtype = np.float32 if rng.random() < 0.5 else np.float64
        maps.append(ndimage.gaussian_filter(rng.normal(size=shape), rng.uniform(0, 3)).astype(dtype))
    compared = 0
    for amap in maps:
        for quantile in (0.5, 0.9, 0.995):
            above = amap > np.quantile(amap, quantile)
            if not above.any():
                continue
            labels, count = ndimage.label(above, structure=EIGHT_CONNECTED)
            expected = np.asarray(ndimage.maximum(amap, labels, np.arange(1, count + 1)))
            found = label_maxima(amap, labels, above, count)
            assert found.dtype == expected.dtype
            assert np.array_equal(found, expected)
            compared += 1
    assert compared > 800


def test_continuity_reuses_each_images_envelopes_without_changing_a_value() -> None:
    """Along a series each image's smoothing and envelopes are kept for its neighbours (models/cues/continuity);
    the map and score of every slice must equal a computation from scratch."""
    from models.cues import continuity

    files = sorted((Path(__file__).parent / "fixtures" / "ct_series_20").glob("CT.*"))[:7]
    slices = [np.clip(dicom_to_hu(pydicom.dcmread(f)), -1024, 3071).astype(np.float32) for f in files]
    search = np.ones(slices[0].shape, dtype=bool)
    for i in range(1, len(slices) - 1):
        kept = continuity.continuity_map(slices[i], slices[i - 1], slices[i + 1], search, 1.25, 0.7)
        continuity._prepared.clear()
        fresh = continuity.continuity_map(slices[i], slices[i - 1], slices[i + 1], search, 1.25, 0.7)
        assert kept.score == fresh.score and kept.score is not None
        assert np.array_equal(kept.amap, fresh.amap)
        # the next slice finds this one's work kept again (what makes it faster)
        continuity.continuity_map(slices[i], slices[i - 1], slices[i + 1], search, 1.25, 0.7)


def test_masks_kept_by_content_equal_fresh_ones_and_cannot_be_spoilt() -> None:
    """Body and lung masks are kept per image content (models/content_cache.py): a second request gives the
    same mask as a computation from scratch, and a caller that writes into its copy changes nothing kept."""
    from models import lungmask

    hu = np.clip(dicom_to_hu(pydicom.dcmread(CT)), -1024, 3071).astype(np.float32)
    first = lungmask.body_mask(hu)
    first[:] = ~first  # the caller's own copy
    kept_body, kept_lungs = lungmask.body_mask(hu), lungmask.lung_mask(hu, dilate_px=3)
    kept_lungs_again = lungmask.lung_mask(hu, dilate_px=3)
    lungmask._masks.clear()
    fresh_body, fresh_lungs = lungmask.body_mask(hu), lungmask.lung_mask(hu, dilate_px=3)
    assert np.array_equal(kept_body, fresh_body) and fresh_body.any()
    assert np.array_equal(kept_lungs, fresh_lungs) and np.array_equal(kept_lungs_again, fresh_lungs)
    assert kept_body.flags.writeable


def test_sobel_magnitude_equals_scipys_sobels() -> None:
    """The tissue bins' structure class reads this gradient against fixed edges: one value off could move a
    pixel to another bin, so it must be scipy's value exactly, in its type."""
    from models.anomaly import sobel_magnitude

    rng = np.random.default_rng(2)
    smooth = ndimage.gaussian_filter(np.clip(dicom_to_hu(pydicom.dcmread(CT)), -1024, 3071).astype(np.float32), 3.0)
    images = [smooth, smooth[:37, :5], np.full((9, 9), 7.0, dtype=np.float32)]
    for _ in range(40):  # values spread over 16 decades, both signs: where a rounding shortcut would show
        shape = tuple(int(n) for n in rng.integers(1, 80, 2))
        images.append((rng.normal(size=shape) * 10.0 ** rng.uniform(-8, 8, size=shape)).astype(np.float32))
    for image in images:
        expected = np.hypot(ndimage.sobel(image, 0), ndimage.sobel(image, 1)) / 8.0
        found = sobel_magnitude(image)
        assert found.dtype == expected.dtype and np.array_equal(found, expected)


def test_z_map_reads_the_reference_tables_as_indexing_them_by_bin_does() -> None:
    """z_map picks each pixel's genuine mean and spread from the tables through one flat index: the values
    must be those of indexing the tables by (HU bin, structure bin), floor of the spread included."""
    from models.anomaly import AnomalyModel

    rng = np.random.default_rng(3)
    hu = np.clip(dicom_to_hu(pydicom.dcmread(CT)), -1024, 3071).astype(np.float32)
    model = AnomalyModel()
    shape = (len(model.hu_edges) + 1, len(model.structure_edges) + 1)
    spread = rng.uniform(0.0, 0.5, shape)
    spread[0, 0] = 1e-5  # under the floor
    model = model.variant(ref_mean=rng.normal(size=shape).tolist(), ref_std=spread.tolist())
    residual = rng.normal(0, 0.05, hu.shape).astype(np.float32)
    hu_bin, structure_bin = model.tissue_bins(hu)
    mean = np.asarray(model.ref_mean, dtype=np.float32)[hu_bin, structure_bin]
    std = np.asarray(model.ref_std, dtype=np.float32)[hu_bin, structure_bin]
    expected = (model.log_energy(residual) - mean) / np.maximum(std, 1e-3)
    found = model.z_map(residual, hu)
    assert found.dtype == expected.dtype and np.array_equal(found, expected)
    assert len(np.unique(hu_bin)) > 5 and len(np.unique(structure_bin)) > 2  # many table entries were read


def test_bin_index_equals_digitize() -> None:
    """The tissue bins compare in float32 where the edges allow it: the same bin for every value, the edges
    themselves, their float32 neighbours, NaN and infinities included; other edges go to digitize itself."""
    from models.anomaly import DEFAULT_HU_EDGES, DEFAULT_STRUCTURE_EDGES, bin_index

    rng = np.random.default_rng(4)
    hu = np.clip(dicom_to_hu(pydicom.dcmread(CT)), -1024, 3071).astype(np.float32)
    edge_values = np.array(DEFAULT_HU_EDGES + DEFAULT_STRUCTURE_EDGES, dtype=np.float32)
    special = np.concatenate([
        edge_values, np.nextafter(edge_values, np.float32(np.inf)), np.nextafter(edge_values, np.float32(-np.inf)),
        np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], dtype=np.float32),
    ])
    values = [ndimage.uniform_filter(hu, 5), special, rng.normal(0, 400, 5000).astype(np.float32)]
    edge_sets = [DEFAULT_HU_EDGES, DEFAULT_STRUCTURE_EDGES, [0.1, 0.2, 0.30000001], [250.0, 0.0, -950.0], [1.0]]
    many_edges = list(np.linspace(-1000.0, 1000.0, 40, dtype=np.float32).astype(float))  # past the counted path
    finite = [value[np.isfinite(value)] for value in values]  # without NaN: the counted path
    for edges in [*edge_sets, many_edges]:
        for value in values + finite:
            binned = bin_index(value, edges)
            assert np.array_equal(binned, np.digitize(value, edges))
            assert binned.dtype == np.intp  # used in index arithmetic: never a narrow type
    assert len(np.unique(bin_index(values[0], DEFAULT_HU_EDGES))) > 5


def _masks_to_compare() -> list[np.ndarray]:
    """The body and lung thresholds of a real slice (full and half size, as the masks are made) and random
    masks of several densities and shapes, down to one pixel and one row or column."""
    hu = np.clip(dicom_to_hu(pydicom.dcmread(CT)), -1024, 400)
    real = [hu > -500, hu < -400, hu[::2, ::2] > -500, (hu[::2, ::2] < -400) & (hu[::2, ::2] > -1000)]
    rng = np.random.default_rng(7)
    shapes = ((61, 83), (1, 1), (1, 17), (17, 1), (2, 3), (5, 5))
    return real + [rng.random(shape) < density for shape in shapes for density in (0.15, 0.5, 0.85)]


@pytest.mark.parametrize("iterations", [1, 2, 3, 6, 8, 12])
def test_binary_morphology_equals_scipys(iterations: int) -> None:
    """The masks' erosions, dilations, openings and closings (cross and 3 x 3 square, outside the image
    False) are the very arrays scipy.ndimage makes."""
    square = np.ones((3, 3), dtype=bool)
    for mask in _masks_to_compare():
        for shape_is_square, structure in ((False, None), (True, square)):
            kwargs = {"iterations": iterations, "square": shape_is_square}
            assert np.array_equal(
                morphology.erode(mask, **kwargs), ndimage.binary_erosion(mask, structure, iterations=iterations)
            )
            assert np.array_equal(
                morphology.dilate(mask, **kwargs), ndimage.binary_dilation(mask, structure, iterations=iterations)
            )
            assert np.array_equal(
                morphology.opening(mask, **kwargs), ndimage.binary_opening(mask, structure, iterations=iterations)
            )
            assert np.array_equal(
                morphology.closing(mask, **kwargs), ndimage.binary_closing(mask, structure, iterations=iterations)
            )


def test_hole_filling_equals_scipys() -> None:
    masks = _masks_to_compare()
    ring = np.zeros((9, 9), dtype=bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False  # one hole
    edge_bay = ring.copy()
    edge_bay[4, 2:5] = False  # a channel from the hole to the background: no longer a hole
    closed = ndimage.binary_closing(masks[0], iterations=3)
    for mask in [*masks, ring, edge_bay, closed, np.ones((4, 4), bool), np.zeros((4, 4), bool)]:
        filled = morphology.fill_holes(mask)
        assert filled.dtype == bool
        assert np.array_equal(filled, ndimage.binary_fill_holes(mask))
    assert morphology.fill_holes(ring)[4, 4] and not morphology.fill_holes(edge_bay)[4, 4]


def test_binary_morphology_leaves_its_input_alone() -> None:
    mask = _masks_to_compare()[0]
    before = mask.copy()
    for operation in (morphology.erode, morphology.dilate, morphology.opening, morphology.closing):
        result = operation(mask, 2)
        assert result is not mask
    morphology.fill_holes(mask)
    assert np.array_equal(mask, before)


def test_a_frozen_images_key_is_remembered_and_nothing_else_is() -> None:
    """image_key hashes a frozen image once; an image anyone can still change is hashed on every call, so a
    change is never hidden behind an old key (which would hand out another image's masks)."""
    import gc

    from models import content_cache

    rng = np.random.default_rng(3)
    frozen = rng.normal(size=(64, 80)).astype(np.float32)
    frozen.setflags(write=False)
    first = content_cache.image_key(frozen)
    assert content_cache.image_key(frozen) is first  # remembered, not recomputed
    assert content_cache.image_key(frozen.copy()) == first  # same content, same key

    writeable = rng.normal(size=(64, 80)).astype(np.float32)
    before = content_cache.image_key(writeable)
    writeable[3, 4] += 1.0
    assert content_cache.image_key(writeable) != before

    base = rng.normal(size=(2, 64, 80)).astype(np.float32)
    view = base[1]
    view.setflags(write=False)  # read-only, but its memory can still change through `base`
    before = content_cache.image_key(view)
    base[1, 0, 0] += 1.0
    assert content_cache.image_key(view) != before

    frozen_view = frozen[::2, ::2]  # a view of a frozen array is frozen too
    assert content_cache.image_key(frozen_view) is content_cache.image_key(frozen_view)

    identity = id(frozen)
    assert identity in content_cache._remembered_keys
    del frozen, frozen_view
    gc.collect()
    assert identity not in content_cache._remembered_keys  # forgotten with its array


def test_decoded_slices_are_frozen() -> None:
    """The scoring path reads slices from models.series.iter_slices: they must be read-only for their keys
    to be remembered, and nothing downstream may write into them."""
    from models.series import group_series, iter_slices

    (group,) = group_series([CT])
    ((_, values, reason),) = list(iter_slices(group))
    assert reason is None and values is not None
    assert not values.flags.writeable
    with pytest.raises(ValueError):
        values[0, 0] = 0.0


def test_half_size_masks_equal_masks_of_the_half_size_view_and_cost_one_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The half-size body and lung masks are kept under the full image's key (a half-size view is a new array on
    every call, and was hashed on every call): they are the masks segmented from that view, as before, and a
    frozen slice is hashed once for all of its masks."""
    import hashlib

    from models import content_cache, lungmask

    lowest = sorted(CT.parent.glob("CT.*"))[-1]  # the series' slice with the most lung
    hu = np.clip(dicom_to_hu(pydicom.dcmread(lowest)), -1024, 3071).astype(np.float32)
    hu.setflags(write=False)
    assert lungmask._scale(hu) == 2
    lungmask._masks.clear()
    hashes = []
    real_sha256 = hashlib.sha256

    def counted(data: object) -> object:
        hashes.append(1)
        return real_sha256(data)

    monkeypatch.setattr(content_cache.hashlib, "sha256", counted)
    body, lungs = lungmask.body_mask(hu), lungmask.lung_mask(hu, dilate_px=3)
    assert lungmask.body_mask(hu).any() and lungmask.lung_mask(hu).any()
    assert len(hashes) == 1

    half = hu[::2, ::2]
    expected_body = lungmask._upsample(lungmask._segment_body(half), hu.shape)
    assert np.array_equal(body, expected_body)
    # the lung mask from the earlier code path, written out: the half-size body, air inside it, sizes by scipy
    air = (half < lungmask.LUNG_HU) & lungmask._segment_body(half)
    labels, count = ndimage.label(air)
    sizes = ndimage.sum(air, labels, range(1, count + 1))
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    smallest = lungmask.MIN_LUNG_FRACTION * half.size
    keep = [i + 1 for i, size in enumerate(sizes) if size >= smallest and i + 1 not in border]
    expected = morphology.fill_holes(morphology.closing(np.isin(labels, keep), iterations=3, square=True))
    expected = morphology.dilate(expected, iterations=2) & lungmask._segment_body(half)
    assert np.array_equal(lungs, lungmask._upsample(expected, hu.shape)) and lungs.any()


def test_label_sizes_equal_scipys_per_label_sums() -> None:
    from models.lungmask import _label_sizes

    for mask in _masks_to_compare():
        labels, count = ndimage.label(mask)
        expected = ndimage.sum(mask, labels, range(1, count + 1))
        sizes = _label_sizes(labels, count)
        assert sizes.shape == (count,) and np.array_equal(sizes, expected)
        if count:
            assert int(np.argmax(sizes)) == int(np.argmax(expected))


def test_mask_share_equals_its_mean() -> None:
    from models.lungmask import share

    rng = np.random.default_rng(11)
    masks = [*_masks_to_compare(), np.zeros((7, 9), bool), np.ones((7, 9), bool)]
    masks += [rng.random(shape) < rng.random() for shape in ((512, 512), (3, 1000), (100, 100), (97, 103))]
    for mask in masks:
        assert share(mask) == mask.mean()
    # the threshold the detector applies, at and around it
    for count in range(2615, 2630):
        mask = np.zeros(512 * 512, bool)
        mask[:count] = True
        assert (share(mask) > 0.01) == bool(mask.mean() > 0.01)


def test_log_energy_of_one_channel_equals_the_channel_means() -> None:
    """log_energy squares a one-channel residual as it is instead of its mean over the channels: the same
    values, also for NaN, infinities, the smallest subnormal and a negative zero (whose mean is +0.0)."""
    from models.anomaly import AnomalyModel, _squared

    def before(residual: np.ndarray) -> np.ndarray:  # the expression it replaces
        res = residual if residual.ndim == 2 else residual.mean(axis=0)
        return res.astype(np.float32) ** 2

    rng = np.random.default_rng(5)
    one = rng.normal(size=(1, 64, 80)).astype(np.float32)
    one[0, 0, :5] = [np.nan, -0.0, np.inf, -np.inf, np.float32(1e-45)]
    model = AnomalyModel()
    for residual in (one, one[0], one.astype(np.float64), rng.normal(size=(3, 20, 30)).astype(np.float32)):
        squared = _squared(residual)
        assert squared.dtype == np.float32
        assert np.array_equal(squared, before(residual), equal_nan=True)
        assert np.array_equal(np.signbit(squared), np.signbit(before(residual)))
    energy = model.log_energy(one)
    expected = np.log(ndimage.uniform_filter(before(one), size=model.smoothing_px) + 1e-10).astype(np.float32)
    assert np.array_equal(energy, expected, equal_nan=True)
