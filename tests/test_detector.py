"""Scoring whole series with a tiny random BTD model: tiling, stitching, air skipping, regions, verdicts.

Real slices, kept small: the 128x128 CT_small and three slices of the real chest series decimated to
128x128 (the pixels stay real CT; only the header's size changes). A dim-8 U-Net keeps this fast.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from models import Detector, InstanceResult, Region, SeriesResult
from models.checkpoint import save_model
from models.detector import DetectorError, ScoringOptions
from models.diffusion import GaussianDiffusion
from models.metadata import ModelMetadata
from models.preprocess import read_hu
from models.regions import MAX_OUTLINE_POINTS, find_regions
from models.results import NO_EVIDENCE, NOT_ASSESSED, REVIEW, SUSPICIOUS, study_verdict
from models.tiling import residual_tiles, residual_whole, tile_starts
from models.unet import Unet

FIXTURES = Path(__file__).parent / "fixtures"
SERIES = sorted((FIXTURES / "ct_series_20").glob("CT.*"))


def tiny_model(path: Path, calibration: dict | None = None) -> Path:
    """A dim-8 random BTD model saved with our checkpoint format; anomaly stats put its z-scores near 0..10."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet(8, (1, 2, 4), 1), 32)
    meta = ModelMetadata(
        name="tiny-test",
        patch_size=32,
        anomaly={"energy_mean": -9.0, "energy_std": 1.0, "region_threshold": 1.0},
        calibration=calibration or {},
    )
    save_model(diffusion, path, meta)
    return path


def decimated(path: Path, factor: int = 4) -> pydicom.Dataset:
    """A real 512x512 slice decimated to 128x128, uncompressed."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array[::factor, ::factor].copy()
    ds.decompress()
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def detector(model_path) -> Detector:
    return Detector.load(model_path, device="cpu")


@pytest.fixture(scope="module")
def small_series() -> list[pydicom.Dataset]:
    return [decimated(path) for path in SERIES[:3]]


# --- tiling -----------------------------------------------------------------------------------------


def test_tile_starts_cover_the_slice_flush():
    assert tile_starts(128, 32, 24) == [0, 24, 48, 72, 96]
    assert tile_starts(100, 32, 24) == [0, 24, 48, 68]
    assert tile_starts(20, 32, 24) == [0]


def test_stitching_reproduces_the_per_pixel_value_whatever_the_overlap():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 70, 90)).astype(np.float32)
    for overlap in (0, 8, 16):
        (stitched,) = residual_tiles([image], [None], lambda x: x * 1.0, 32, overlap, 4, torch.device("cpu"))
        np.testing.assert_allclose(stitched, image, atol=1e-6)


def test_tiles_outside_the_body_are_not_run():
    image = np.ones((1, 96, 96), dtype=np.float32)
    mask = np.zeros((96, 96), dtype=bool)
    mask[10:20, 10:20] = True
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x

    (stitched,) = residual_tiles([image], [mask], fn, 32, 8, 64, torch.device("cpu"))
    assert sum(seen) == 1  # of 16 tiles only the one touching the mask ran
    assert stitched[0, 15, 15] == 1.0 and stitched[0, 80, 80] == 0.0


def test_whole_slice_pads_to_the_unet_multiple_and_crops_to_the_body():
    image = np.arange(1 * 50 * 70, dtype=np.float32).reshape(1, 50, 70)
    mask = np.zeros((50, 70), dtype=bool)
    mask[20:30, 30:40] = True
    shapes = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return x

    (result,) = residual_whole([image], [mask], fn, 8, 4, torch.device("cpu"), margin=4)
    assert shapes == [(1, 1, 24, 24)]  # box 18x18 (10 + 2*4) rounded up to multiples of 8
    np.testing.assert_array_equal(result[0, 16:34, 26:44], image[0, 16:34, 26:44])
    assert result[0, 0, 0] == 0.0
    (full,) = residual_whole([image], [None], fn, 8, 4, torch.device("cpu"))
    assert shapes[-1] == (1, 1, 56, 72) and np.array_equal(full, image)


def test_crops_of_different_sizes_go_to_the_model_together_when_it_takes_several_at_once():
    """residual_each gets every batch of the call at once (two lone crops can then run side by side), and the
    maps are those of the one-batch-at-a-time path."""
    rng = np.random.default_rng(4)
    images = [rng.normal(size=(1, 50, 70)).astype(np.float32) for _ in range(3)]
    masks = [np.zeros((50, 70), dtype=bool) for _ in range(3)]
    masks[0][20:30, 30:40] = masks[1][20:30, 30:40] = True  # one crop size for two slices
    masks[2][5:45, 10:60] = True  # another for the third
    seen: list[list[tuple[int, ...]]] = []

    def each(batches: list[torch.Tensor]) -> list[torch.Tensor]:
        seen.append([tuple(x.shape) for x in batches])
        return [x * 2 for x in batches]

    together = residual_whole(images, masks, lambda x: x * 2, 8, 4, torch.device("cpu"), margin=4, residual_each=each)
    one_by_one = residual_whole(images, masks, lambda x: x * 2, 8, 4, torch.device("cpu"), margin=4)
    assert seen == [[(2, 1, 24, 24), (1, 1, 48, 64)]]
    for a, b in zip(together, one_by_one, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_replaced_model_pass_sees_every_crop(model_path, small_series):
    """A benchmark or probe that replaces `residual_batch` gets every batch through it, crops of different sizes
    included, rather than the detector's own side-by-side path."""
    detector = Detector.load(model_path, device="cpu")
    slices = [read_hu(ds)[0] for ds in small_series]
    slices[1] = slices[1].copy()
    slices[1][:, : slices[1].shape[1] // 3] = -1000.0  # a narrower body: a crop of another size
    calls: list[int] = []
    sizes: set[tuple[int, ...]] = set()
    own = detector.residual_batch

    def replaced(x: torch.Tensor) -> torch.Tensor:
        calls.append(int(x.shape[0]))
        sizes.add(tuple(x.shape[2:]))
        return own(x)

    expected = detector.residual_maps(slices)
    detector.residual_batch = replaced
    got = detector.residual_maps(slices)
    assert sum(calls) == len(slices) and len(sizes) >= 2  # crops of at least two sizes, every one through it
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_one_tile_equals_the_diffusion_residual(detector):
    x = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, size=(1, 1, 32, 32)).astype(np.float32))
    direct = detector.diffusion.btd_residual(x)[0].numpy()
    (tiled,) = residual_tiles([x[0].numpy()], [None], detector.residual_batch, 32, 8, 4, torch.device("cpu"))
    np.testing.assert_allclose(tiled, direct, atol=1e-6)


def test_bf16_autocast_keeps_the_residual_close_to_fp32(model_path):
    fp32 = Detector.load(model_path, device="cpu", precision="fp32")
    bf16 = Detector.load(model_path, device="cpu", precision="bf16")
    x = torch.from_numpy(np.random.default_rng(3).uniform(-1, 1, size=(2, 1, 32, 32)).astype(np.float32))
    a, b = fp32.residual_batch(x), bf16.residual_batch(x)
    assert b.dtype == torch.float32
    # measured on this random dim-8 model: mean |diff| 0.0004 against mean |residual| 0.0046, r = 0.995
    assert (a - b).abs().mean() < 0.2 * a.abs().mean()
    assert np.corrcoef(a.numpy().ravel(), b.numpy().ravel())[0, 1] > 0.98


# --- regions ------------------------------------------------------------------------------------------


def test_regions_boxes_outlines_and_cap():
    amap = np.zeros((64, 64), dtype=np.float32)
    amap[10:20, 30:36] = 5.0
    amap[12, 32] = 9.0
    amap[40:44, 5:9] = 4.0
    amap[50, 50] = 3.5
    regions = find_regions(amap, threshold=3.0, max_regions=2)
    assert [(r.x0, r.y0, r.x1, r.y1, r.score, r.area_px) for r in regions] == [
        (30, 10, 36, 20, 9.0, 60),
        (5, 40, 9, 44, 4.0, 16),
    ]
    outline = regions[0].outline
    assert outline[0] == outline[-1] and len(outline) <= MAX_OUTLINE_POINTS + 1
    xs, ys = [p[0] for p in outline], [p[1] for p in outline]
    assert (min(xs), min(ys), max(xs), max(ys)) == (30, 10, 36, 20)  # the hull of the pixels' corners
    disc = np.hypot(*np.mgrid[-30:31, -30:31]) < 28
    (round_region,) = find_regions(disc.astype(np.float32) * 5, 3.0)
    assert len(round_region.outline) == MAX_OUTLINE_POINTS + 1


# --- detector -----------------------------------------------------------------------------------------


def test_default_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("models.detector.DEFAULT_MODEL_PATH", tmp_path / "btd-ct-default.pt")
    with pytest.raises(DetectorError, match="not found"):
        Detector.load(None)
    with pytest.raises(DetectorError, match="mode"):
        ScoringOptions(mode="sideways").validate()


def test_uncalibrated_model_never_passes(detector, small_series):
    maps = []
    result = detector.score_series(small_series, on_map=lambda inst, m: maps.append((inst, m)))
    assert isinstance(result, SeriesResult)
    assert result.verdict == NOT_ASSESSED and result.reason == "model not calibrated"
    assert result.n_assessed == 3 and result.model == "tiny-test"
    assert all(i.verdict == NOT_ASSESSED and i.reason == "model not calibrated" for i in result.instances)
    assert all(i.score is not None for i in result.instances)
    assert result.score == max(i.score for i in result.instances)
    assert [m.shape for _, m in maps] == [(128, 128)] * 3 and maps[0][1].dtype == np.float32
    assert [inst.sop_instance_uid for inst, _ in maps] == [i.sop_instance_uid for i in result.instances]
    data = result.to_dict()
    assert data["instances"][0]["rows"] == 128 and data["series_instance_uid"] == small_series[0].SeriesInstanceUID


def test_calibrated_verdicts_follow_the_thresholds(model_path, small_series, tmp_path):
    probe = Detector.load(model_path, device="cpu").score_series(small_series)
    scores = sorted(i.score for i in probe.instances)
    assert scores[0] < scores[-1]
    threshold = (scores[0] + scores[-1]) / 2
    calibrated_path = tiny_model(
        tmp_path / "cal.pt", calibration={"slice_threshold": threshold, "series_threshold": threshold, "fpr": 0.01}
    )
    detector = Detector.load(calibrated_path, device="cpu")
    assert detector.info.calibrated
    result = detector.score_series(small_series)
    verdicts = {i.sop_instance_uid: i.verdict for i in result.instances}
    expected = {i.sop_instance_uid: SUSPICIOUS if i.score >= threshold else NO_EVIDENCE for i in probe.instances}
    assert verdicts == expected and SUSPICIOUS in verdicts.values() and NO_EVIDENCE in verdicts.values()
    assert result.verdict == SUSPICIOUS and result.score == pytest.approx(scores[-1], abs=1e-5)
    threshold_r = detector.anomaly.region_threshold
    for instance in result.instances:
        assert bool(instance.regions) == (instance.score > threshold_r)
        assert all(isinstance(r, Region) and threshold_r < r.score <= instance.score + 1e-6 for r in instance.regions)
        assert all(r.x1 > r.x0 and r.y1 > r.y0 and r.area_px > 0 for r in instance.regions)
    assert any(instance.regions for instance in result.instances)
    assert study_verdict([result])[0] == SUSPICIOUS


def test_a_slice_flag_under_the_series_threshold_reads_review_never_no_evidence(model_path, small_series, tmp_path):
    """The series bar is stricter than the slice bar: a series between the two is sent for review."""
    probe = Detector.load(model_path, device="cpu").score_series(small_series)
    scores = sorted(i.score for i in probe.instances)
    slice_threshold = (scores[0] + scores[-1]) / 2
    calibrated_path = tiny_model(
        tmp_path / "review.pt",
        calibration={"slice_threshold": slice_threshold, "series_threshold": scores[-1] + 1.0, "fpr": 0.01},
    )
    result = Detector.load(calibrated_path, device="cpu").score_series(small_series)
    flagged = [i for i in result.instances if i.verdict == SUSPICIOUS]
    assert flagged and len(flagged) < len(result.instances)
    assert result.verdict == REVIEW and f"{len(flagged)} slice(s) over the slice threshold" in result.reason
    verdict, score, reason = study_verdict([result])
    assert verdict == REVIEW and score == result.score and reason.startswith(f"{len(flagged)} slice(s)")
    clean = dataclasses.replace(result, verdict=NO_EVIDENCE, reason=None, instances=[])
    assert study_verdict([clean, result])[0] == REVIEW
    assert study_verdict([result, dataclasses.replace(clean, verdict=SUSPICIOUS)])[0] == SUSPICIOUS


def test_modes_auto_whole_for_our_models_tiles_for_published(model_path, small_series):
    from models.detector import auto_mode
    from models.metadata import published_defaults

    assert Detector.load(model_path, device="cpu").options.mode == "whole"
    assert auto_mode(published_defaults("CT_model")) == "tiles"
    ours = Detector.load(model_path, device="cpu")
    assert (ours.options.mode, ours.options.run_region) == ("whole", "body")
    published = Detector(ours.diffusion, published_defaults("CT_model"), device="cpu")
    assert (published.options.mode, published.options.overlap, published.options.run_region) == ("tiles", 0, "search")
    result = Detector.load(model_path, device="cpu", mode="tiles").score_series(small_series[:1])
    (instance,) = result.instances
    assert isinstance(instance, InstanceResult) and instance.score is not None and np.isfinite(instance.score)


def test_not_assessable_items_are_reported_and_the_rest_goes_on(detector, small_series, tmp_path):
    localiser = copy.deepcopy(small_series[0])
    localiser.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localiser.SOPInstanceUID = "1.2.3.4.5"
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" * 10)
    results = list(detector.score_paths([small_series[1], localiser, broken]))
    series, unreadable = results
    by_uid = {i.sop_instance_uid: i for i in series.instances}
    assert by_uid["1.2.3.4.5"].verdict == NOT_ASSESSED and "localiser" in by_uid["1.2.3.4.5"].reason
    assert series.n_assessed == 1
    assert unreadable.series_instance_uid == "" and unreadable.verdict == NOT_ASSESSED
    assert "no assessable images" in unreadable.reason and unreadable.instances[0].path == str(broken)


def test_mr_series_is_not_judged_by_a_ct_model(detector):
    result = detector.score_series([FIXTURES / "pydicom" / "MR_small.dcm"])
    assert result.verdict == NOT_ASSESSED
    assert "judges CT, this series is MR" in result.instances[0].reason


def test_mr_model_scores_every_frame_of_an_enhanced_mr(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mr.pt"
    meta = ModelMetadata(name="tiny-mr", modality="MR", windows=[], normalization="minmax", patch_size=32)
    save_model(GaussianDiffusion(Unet(8, (1, 2, 4), 1), 32), path, meta)
    result = Detector.load(path, device="cpu").score_series([FIXTURES / "pydicom" / "emri_small.dcm"])
    assert result.modality == "MR" and result.n_assessed == 10
    assert sorted(i.frame for i in result.instances) == list(range(1, 11))
    assert all(i.score is not None and np.isfinite(i.score) for i in result.instances)


def test_running_only_the_search_region_leaves_scores_and_regions_unchanged(model_path):
    """run_region="search": fewer tiles run (only the lungs, plus the anomaly filters' reach), same verdict data."""
    slice_512 = pydicom.dcmread(FIXTURES / "ct_transfer_syntaxes" / "CT1_J2KR")  # a chest slice with lungs
    counts = {}
    results = {}
    for region in ("body", "search"):
        detector = Detector.load(model_path, device="cpu", mode="tiles", overlap=0, run_region=region)
        counted = detector.residual_batch

        def counting(x: torch.Tensor, _run=counted, _region=region) -> torch.Tensor:
            counts[_region] = counts.get(_region, 0) + x.shape[0]
            return _run(x)

        detector.residual_batch = counting
        (results[region],) = detector.score_series([slice_512]).instances
    assert counts["search"] <= counts["body"]
    values = read_hu(slice_512)[0]
    by_region = {
        region: Detector.load(model_path, device="cpu", run_region=region).body_mask(values).sum()
        for region in ("body", "search")
    }
    assert by_region["search"] < by_region["body"]
    assert results["search"].score == pytest.approx(results["body"].score, abs=1e-5)
    assert [(r.x0, r.y0, r.x1, r.y1) for r in results["search"].regions] == [
        (r.x0, r.y0, r.x1, r.y1) for r in results["body"].regions
    ]


def test_each_slice_is_finished_against_its_adjacent_slices_only(model_path):
    """Neighbouring-slice consistency: a slice meets the slices beside it, never across a gap in the series."""
    series = sorted((decimated(path) for path in SERIES[:6]), key=lambda ds: float(ds.ImagePositionPatient[2]))
    del series[3]  # a missing slice: 2 mm apart elsewhere, 4 mm here: not neighbours
    consistent = Detector.load(model_path, device="cpu")
    consistent.anomaly = consistent.anomaly.variant(neighbour_weight=0.5, neighbour_reach_px=5)
    seen: list[tuple[float, list[float | None]]] = []
    finish = consistent.anomaly.finish

    def recording_finish(own, neighbours=()):
        seen.append((float(own.z.mean()), [None if n is None else float(n.z.mean()) for n in neighbours]))
        return finish(own, neighbours)

    consistent.anomaly.finish = recording_finish  # type: ignore[method-assign]
    result = consistent.score_series(series)
    assert [i.sop_instance_uid for i in result.instances] == [str(ds.SOPInstanceUID) for ds in series]
    assert len(seen) == 5
    own = [mean for mean, _ in seen]
    present = [[n is not None for n in around] for _, around in seen]
    assert present == [[False, True], [True, True], [True, False], [False, True], [True, False]]
    assert seen[1][1] == [own[0], own[2]]  # the slices on either side, in order

    alone = Detector.load(model_path, device="cpu")
    alone.anomaly = alone.anomaly.variant(neighbour_weight=0.0)
    scores_alone = [i.score for i in alone.score_series(series).instances]
    scores_consistent = [i.score for i in result.instances]
    assert scores_alone != scores_consistent  # the neighbours changed what the slices score


def test_series_relative_scores_verdicts_and_regions_move_together(model_path, small_series, tmp_path):
    """A series-relative model subtracts the series offset from scores and regions and re-judges the verdicts."""
    calibrated = tiny_model(tmp_path / "cal.pt", calibration={"slice_threshold": 1.2, "series_threshold": 1.2})
    plain = Detector.load(calibrated, device="cpu")
    relative = Detector.load(calibrated, device="cpu")
    # The fixture's slices show no lung, so the series falls back to the genuine reference median.
    relative.anomaly = relative.anomaly.variant(series_relative=True, reference_median=0.5, series_max_lowering=0.25)
    flagged_plain: list = []
    flagged: list = []
    before = plain.score_series(small_series, on_flagged=lambda i, m: flagged_plain.append((i, m)))
    after = relative.score_series(small_series, on_flagged=lambda i, m: flagged.append((i, m)))
    # on_flagged: exactly the slices whose FINAL verdict is suspicious, with their residual maps.
    for results, calls in ((before, flagged_plain), (after, flagged)):
        suspicious = [i.sop_instance_uid for i in results.instances if i.verdict == SUSPICIOUS]
        assert [i.sop_instance_uid for i, _ in calls] == suspicious
        assert all(m.shape == (i.rows, i.columns) and m.dtype == np.float32 for i, m in calls)
    assert flagged  # the comparison above compared something
    for raw, moved in zip(before.instances, after.instances, strict=True):
        assert moved.score == pytest.approx(raw.score - 0.5)
        assert moved.verdict == (SUSPICIOUS if moved.score > 1.2 else NO_EVIDENCE)
        assert all(r.score > relative.anomaly.region_threshold for r in moved.regions)
    assert after.score == pytest.approx(before.score - 0.5)
    # Regions are found again at the exact bar: the same areas a plain model finds at threshold + offset.
    plain.anomaly = plain.anomaly.variant(region_threshold=plain.anomaly.region_threshold + 0.5)
    exact = plain.score_series(small_series)
    for moved, reference in zip(after.instances, exact.instances, strict=True):
        assert [(r.x0, r.y0, r.x1, r.y1, r.area_px) for r in moved.regions] == [
            (r.x0, r.y0, r.x1, r.y1, r.area_px) for r in reference.regions
        ]
        assert [r.score for r in moved.regions] == pytest.approx([r.score - 0.5 for r in reference.regions])
    assert any(i.regions for i in after.instances)  # the comparison above compared something
