"""Per-scanner references: keys from headers, robust fits with provenance, JSON round trips, lookup chain."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from models.reference import (
    MIN_SLICES_TO_JUDGE,
    Reference,
    ReferenceKey,
    ReferenceSet,
    fit_references,
    reference_key,
    slice_features,
    thickness_band,
    tissue_histogram,
)

SIEMENS = ReferenceKey("SIEMENS", "SENSATION 16", "B70F", "1.5-3mm")


def _features(key: ReferenceKey, values: list[float], series: str = "s1") -> list[dict]:
    return [slice_features(key, series, True, {"btd": v, "noise": v * 2}) for v in values]


def test_key_from_a_real_header_and_thickness_bands(fixtures_dir) -> None:
    ds = pydicom.dcmread(next((fixtures_dir / "ct_series_20").glob("CT.*")), stop_before_pixels=True)
    key = reference_key(ds)
    assert key.manufacturer == "SIEMENS" and key.kernel == "BR38F/3" and key.band == "1.5-3mm"
    assert key.known and "BR38F/3" in key.label()
    assert thickness_band(None) == "unknown" and thickness_band(1.25) == "<=1.5mm" and thickness_band(5.0) == "3-6mm"
    assert not reference_key(pydicom.Dataset()).known


def test_fit_is_robust_keeps_provenance_and_round_trips_through_json() -> None:
    values = [1.0] * 20 + [1.1] * 20 + [50.0]  # one wild slice must not move a robust fit
    lungless = slice_features(SIEMENS, "s2", False, {"btd": 99.0})
    reference = Reference.fit(SIEMENS, _features(SIEMENS, values) + [lungless], source="site genuine traffic")
    assert 1.0 <= reference.cues["btd"].median <= 1.1  # a mean would be 2.2
    assert reference.n_slices == len(values) and reference.n_series == 1  # the lungless slice is not counted
    assert reference.source == "site genuine traffic" and reference.fitted_at
    again = Reference.from_dict(json.loads(json.dumps(reference.to_dict())))
    assert again.to_dict() == reference.to_dict()
    assert again.relative("btd", 2.05) == pytest.approx(2.05 - reference.cues["btd"].median)
    assert "fitted on 41 slices of 1 series" in again.describe()
    refined = reference.refine(_features(SIEMENS, [3.0] * 100, "s3"))
    assert refined.n_slices == 141 and refined.n_series == 2 and refined.cues["btd"].median == pytest.approx(3.0)


def test_lookup_chain_and_no_guess_for_unknown_or_thin_references() -> None:
    other_band = ReferenceKey("SIEMENS", "SENSATION 16", "B70F", "3-6mm")
    same_kernel_other_model = ReferenceKey("SIEMENS", "SOMATOM", "B70F", "1.5-3mm")
    references = fit_references(_features(SIEMENS, list(np.linspace(0, 1, 30))), source="test")
    assert references.lookup(SIEMENS)[1] == "exact"
    assert references.lookup(other_band)[1] == "any-thickness"
    assert references.lookup(same_kernel_other_model) is None  # another model's kernel of the same name
    assert references.lookup(ReferenceKey("GE", "LIGHTSPEED", "STANDARD", "<=1.5mm")) is None
    assert references.lookup(ReferenceKey("SIEMENS", "SENSATION 16", "", "1.5-3mm")) is None  # unknown kernel
    thin = fit_references(_features(SIEMENS, [1.0] * (MIN_SLICES_TO_JUDGE - 1)), source="test")
    assert thin.lookup(SIEMENS) is None
    assert len(ReferenceSet.from_dict(references.to_dict())) == 1


def test_tissue_table_from_histograms_matches_the_data() -> None:
    rng = np.random.default_rng(0)
    energy = rng.normal(-8.0, 0.5, (64, 64)).astype(np.float32)
    hu_bin = np.zeros((64, 64), dtype=int)
    structure_bin = np.zeros((64, 64), dtype=int)
    histogram = tissue_histogram(energy, hu_bin, structure_bin, np.ones((64, 64), bool), 2, 2)
    feature = slice_features(SIEMENS, "s1", True, {"btd": 1.0}, histogram)
    table = Reference.fit(SIEMENS, [feature] * 3, source="test").tissue
    assert table["ref_mean"][0][0] == pytest.approx(-8.0, abs=0.15)
    assert table["ref_std"][0][0] == pytest.approx(0.5, abs=0.1)
    assert table["ref_mean"][1][1] == pytest.approx(table["ref_mean"][0][1], abs=1e-6)  # sparse bins borrow
