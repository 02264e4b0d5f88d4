"""The fused detector end to end (tiny random U-Net, real slices decimated to 256 px): the cues' verdicts,
regions named by cue, the reference used or the reason none could be, the header cue, site references."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from models import Detector
from models.checkpoint import save_model
from models.corpus import DEFAULT_DATA_ROOT
from models.cues.fusion import TailModel
from models.diffusion import GaussianDiffusion
from models.metadata import ModelMetadata
from models.reference import Reference, ReferenceKey, ReferenceSet, reference_key
from models.results import NO_EVIDENCE, NOT_ASSESSED, REVIEW, SUSPICIOUS
from models.unet import Unet

LIDC2 = DEFAULT_DATA_ROOT / "lidc-idri" / "LIDC-IDRI-0002"
pytestmark = pytest.mark.skipif(not LIDC2.is_dir(), reason="shared chest-CT corpus not present")


def fusion_block(cues: list[str], review: float = 1.0, suspicious: float = 2.0) -> dict:
    rng = np.random.default_rng(0)
    tails = {"btd": TailModel.fit(rng.normal(0, 5, 500)), "noise": TailModel.fit(rng.normal(0, 5, 500)),
             "continuity": TailModel.fit(rng.normal(0, 5, 500)),
             "copymove": TailModel.fit(rng.normal(0, 0.15, 500))}
    tails = {c: t.to_dict() for c, t in tails.items()}
    return {"cues": cues, "rule": "minp", "continuity_limit_mm": 2.5, "tails_in_series": tails,
            "tails_single": tails, "thresholds": {"review": review, "suspicious": suspicious}}


def save_fused_model(path: Path, cues: list[str], **thresholds: float) -> Path:
    """A tiny random U-Net with a fusion block over `cues` (their tails random but fixed), saved at `path`."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet(8, (1, 2, 4), 1), 32)
    block = fusion_block(cues, **thresholds)
    meta = ModelMetadata(
        name="tiny-fused", patch_size=32, windows=[{"low": -1100.0, "high": 300.0}],
        anomaly={"energy_mean": -9.0, "energy_std": 1.0, "region_threshold": 1.0, "two_sided": False},
        calibration={
            "slice_threshold": block["thresholds"]["review"],
            "series_threshold": block["thresholds"]["suspicious"],
            "scoring": {"mode": "whole", "overlap": None, "skip_air": True},
        },
        fusion=block,
    )
    save_model(diffusion, path, meta)
    return path


def fused_detector(tmp_path, cues: list[str], references: ReferenceSet | None = None, **thresholds) -> Detector:
    path = save_fused_model(tmp_path / "tiny-fused.pt", cues, **thresholds)
    return Detector.load(path, device="cpu", references=references)


@pytest.fixture(scope="module")
def lidc() -> list[pydicom.Dataset]:
    """LIDC-IDRI-0002 (12 slices, 1.25 mm) decimated to 256 x 256, pixel spacing doubled."""
    out = []
    for path in sorted(LIDC2.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array[::2, ::2].copy()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
        out.append(ds)
    return sorted(out, key=lambda d: float(d.ImagePositionPatient[2]))


def _copy_patch(series: list[pydicom.Dataset]) -> tuple[list[pydicom.Dataset], int, tuple[int, int]]:
    """A 20 px patch around a dense structure of slice 2 pasted into the lung of slice 9: a copy-move."""
    from scipy import ndimage

    from models.corpus import dicom_to_hu
    from models.lungmask import lung_mask

    tampered = [copy.deepcopy(ds) for ds in series]
    source, target = tampered[2], tampered[9]
    hu_s, hu_t = dicom_to_hu(source), dicom_to_hu(target)
    from models.cues.copymove import keypoints

    sy, sx = keypoints(hu_s, lung_mask(hu_s, dilate_px=5)).points[0]  # a lesion-like dense structure
    empty = ndimage.binary_erosion(lung_mask(hu_t), iterations=12) & (ndimage.uniform_filter(hu_t, 15) < -750)
    ty, tx = np.argwhere(empty)[len(np.argwhere(empty)) // 2]
    stored_s, stored_t = source.pixel_array.copy(), target.pixel_array.copy()
    stored_t[ty - 10 : ty + 10, tx - 10 : tx + 10] = stored_s[sy - 10 : sy + 10, sx - 10 : sx + 10]
    target.PixelData = stored_t.tobytes()
    return tampered, 9, (int(ty), int(tx))


def test_a_copy_moved_patch_is_flagged_by_the_copy_move_cue_at_its_place(tmp_path, lidc) -> None:
    detector = fused_detector(tmp_path, ["copymove"], review=1.5, suspicious=2.5)
    genuine = detector.score_series(lidc)
    assert genuine.verdict == NO_EVIDENCE, [i.score for i in genuine.instances]
    assert [c.name for c in genuine.cues] == ["copymove", "btd", "noise", "continuity", "header"]
    assert [c.used for c in genuine.cues] == [True, False, False, False, True] and genuine.reference is None
    assert "not in this model's fusion" in genuine.cues[1].reason
    assert genuine.scanner_key["kernel"] == "STANDARD"
    tampered, index, (ty, tx) = _copy_patch(lidc)
    result = detector.score_series(tampered)
    flagged = result.instances[index]
    assert flagged.verdict == SUSPICIOUS and result.verdict in (REVIEW, SUSPICIOUS)
    region = flagged.regions[0]
    assert region.cue == "copymove" and region.x0 - 8 <= tx < region.x1 + 8 and region.y0 - 8 <= ty < region.y1 + 8
    cue = next(c for c in result.cues if c.name == "copymove")
    assert cue.used and cue.fired and cue.slices_fired >= 1
    assert result.to_dict()["cues"][0]["name"] == "copymove" and "features" not in result.to_dict()


def test_a_single_slice_of_a_scanner_without_reference_is_not_assessed_with_the_reason(tmp_path, lidc) -> None:
    detector = fused_detector(tmp_path, ["btd", "noise", "continuity", "copymove"])
    result = detector.score_series([lidc[5]])
    assert result.verdict == NOT_ASSESSED
    assert "no reference for GE MEDICAL SYSTEMS LIGHTSPEED16 STANDARD" in result.reason
    assert "single slice cannot be judged against its own series" in result.reason
    continuity = next(c for c in result.cues if c.name == "continuity")
    assert not continuity.used and continuity.reason
    # the same slice against a site reference for its key: assessed, and the result says which reference
    key = reference_key(lidc[5])
    features = detector.reference_features(detector.score_series(lidc))
    assert len(features) == len(lidc) and features[0]["key"] == key.to_dict()
    site = Reference.fit(key, features, source="site genuine traffic, test")
    judged = detector.score_series([lidc[5]], reference=site)
    assert judged.verdict != NOT_ASSESSED
    assert judged.reference["match"] == "given" and judged.reference["n_slices"] == len(lidc)
    with_set = fused_detector(tmp_path, ["btd", "noise"], references=ReferenceSet([site])).score_series([lidc[5]])
    assert with_set.reference["match"] == "exact"


def test_an_unknown_kernel_and_a_lungless_series_say_why(tmp_path, lidc, ct_series_dir) -> None:
    detector = fused_detector(tmp_path, ["btd", "noise"])
    blank = copy.deepcopy(lidc[5])
    del blank.ConvolutionKernel
    assert not ReferenceKey.from_dict(reference_key(blank).to_dict()).known
    result = detector.score_series([blank])
    assert result.verdict == NOT_ASSESSED and "unknown kernel" in result.reason
    abdomen = []
    for path in sorted(ct_series_dir.glob("CT.*"))[:3]:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array[::2, ::2].copy()
        ds.decompress()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        abdomen.append(ds)
    lungless = detector.score_series(abdomen)
    assert lungless.verdict == NOT_ASSESSED and "no lungs" in lungless.reason


def test_an_instance_re_encoded_differently_from_its_series_reads_review(tmp_path, lidc) -> None:
    detector = fused_detector(tmp_path, ["btd"], review=50.0, suspicious=60.0)  # pixel cues cannot fire
    assert detector.score_series(lidc).verdict == NO_EVIDENCE
    edited = [copy.deepcopy(ds) for ds in lidc]
    edited[4].BitsStored = 12
    edited[4].HighBit = 11
    result = detector.score_series(edited)
    header = next(c for c in result.cues if c.name == "header")
    assert header.used and header.fired and header.slices_fired == 1
    assert result.verdict == REVIEW and "header cue" in result.reason
    assert "BitsStored" in result.instances[4].reason


def _lungs_filled(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of a chest slice whose air (lungs and outside the body alike) reads as soft tissue: no lung left."""
    out = copy.deepcopy(ds)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    pixels = ds.pixel_array.copy()
    pixels[pixels * slope + intercept < -300] = round((40 - intercept) / slope)
    out.PixelData = pixels.tobytes()
    return out


def _counting_rows(detector: Detector) -> tuple[Detector, list[int]]:
    """The detector with every U-Net pass's rows counted (whichever way its batches reach the model)."""
    rows: list[int] = []
    run = detector.row_threads.fn

    def counting(x: torch.Tensor) -> torch.Tensor:
        rows.append(int(x.shape[0]))
        return run(x)

    detector.row_threads.fn = counting
    return detector, rows


def test_slices_without_lung_skip_the_model_and_every_result_stays_the_same(tmp_path, lidc) -> None:
    """A fused model marks a lungless slice not assessed whatever its residual, so it runs no pass for it; the
    lung slices beside it (their continuity cue reads its pixels) and the series score exactly as with a pass
    for every slice (`on_map` asks for every residual, so it forces them)."""
    from models.fused import LUNGLESS_SLICE

    series = [_lungs_filled(ds) if k in (0, 5, 11) else ds for k, ds in enumerate(lidc)]
    lungless = {series[k].SOPInstanceUID for k in (0, 5, 11)}
    results = {}
    for forced in (False, True):
        detector, rows = _counting_rows(fused_detector(tmp_path, ["btd", "continuity"]))
        mapped: list[str] = []
        on_map = (lambda instance, residual, seen=mapped: seen.append(instance.sop_instance_uid)) if forced else None
        results[forced] = detector.score_series(series, on_map=on_map)
        assert sum(rows) == len(series) - (0 if forced else len(lungless))
        assert len(mapped) == (len(series) if forced else 0)
    skipped, passed = results[False], results[True]
    assert [i.sop_instance_uid for i in skipped.instances] == [ds.SOPInstanceUID for ds in series]
    for a, b in zip(skipped.instances, passed.instances, strict=True):
        assert (a.verdict, a.reason, a.regions) == (b.verdict, b.reason, b.regions)
        assert _close(a.score, b.score) and a.cue_scores.keys() == b.cue_scores.keys()
        assert all(_close(a.cue_scores[c], b.cue_scores[c]) for c in a.cue_scores)
        if a.sop_instance_uid in lungless:
            assert a.verdict == NOT_ASSESSED and a.reason == LUNGLESS_SLICE
        else:
            assert a.verdict != NOT_ASSESSED and a.cue_scores
    assert (skipped.verdict, skipped.reason) == (passed.verdict, passed.reason)
    assert _close(skipped.score, passed.score)
    for a, b in zip(skipped.cues, passed.cues, strict=True):
        assert (a.name, a.used, a.reason, a.fired) == (b.name, b.used, b.reason, b.fired) and _close(a.score, b.score)
    # Only a lungless slice's own BTD feature is missing (a site reference reads lung slices only).
    for a, b in zip(skipped.features, passed.features, strict=True):
        assert a["in_lungs"] == b["in_lungs"]
        assert a["cues"]["continuity"] == b["cues"]["continuity"]
        if a["in_lungs"]:
            assert _close(a["cues"]["btd"], b["cues"]["btd"])
        else:
            assert a["cues"]["btd"] is None and b["cues"]["btd"] is not None


def _close(a: float | None, b: float | None) -> bool:
    """Equal, or within float32 rounding of the model pass: once lungless slices drop out of the batches, other
    slices share a pass, and with one torch thread a batched pass and a lone one differ by ~1e-6 (with the row
    threads each slice runs alone and the results are identical); scores are rounded to 4 decimals."""
    return a == b or (a is not None and b is not None and abs(a - b) <= 2e-4)


def test_a_long_run_of_lungless_slices_is_finished_in_order_a_few_at_a_time(tmp_path, lidc) -> None:
    """More lungless slices in a row than a batch gathers: sent on without a pass, in order, none lost."""
    series = [copy.deepcopy(ds) for ds in lidc[:2]]
    for k in range(10):
        filled = _lungs_filled(lidc[2 + k % 8])
        filled.SOPInstanceUID = f"{filled.SOPInstanceUID[:60]}.{k}"
        filled.ImagePositionPatient = [*lidc[-1].ImagePositionPatient[:2], float(lidc[-1].ImagePositionPatient[2]) + k]
        series.append(filled)
    detector, rows = _counting_rows(fused_detector(tmp_path, ["btd", "continuity"]))
    counted: list[int] = []
    result = detector.score_series(series, progress=counted.append)
    assert sum(rows) == 2
    assert sum(counted) == len(series) and max(counted) <= 8 + (detector.options.batch_size or 1)
    assert counted[-1] == 2  # the two after the first eight lungless ones
    assert [i.verdict for i in result.instances[2:]] == [NOT_ASSESSED] * 10
    assert {i.sop_instance_uid for i in result.instances} == {ds.SOPInstanceUID for ds in series}


def test_a_large_batch_of_lung_slices_is_not_cut_short_by_the_lungless_bound(tmp_path, lidc) -> None:
    """The bound on slices riding without a pass leaves a GPU-sized batch of lung slices whole."""
    path = save_fused_model(tmp_path / "tiny-fused.pt", ["btd", "continuity"])
    detector = Detector.load(path, device="cpu", batch_size=16)
    counted: list[int] = []
    detector.score_series(lidc, progress=counted.append)
    assert counted == [len(lidc)]
