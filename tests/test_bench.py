"""The benchmark's metrics, and a run of the evaluation on a tiny benchmark built from a real chest slice."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
import pytest

from models.corpus import dicom_to_hu
from models.forensics.baselines import highpass_residual
from models.forensics.bench import BenchItem, BenchWriter, read_manifest
from models.forensics.bench_run import DEFAULT_VARIANT, VARIANTS, ResidualCache, evaluate_detector, markdown_table
from models.forensics.metrics import bootstrap_auc_ci, plot_rocs, roc_auc, threshold_at_fpr, tpr_at_fpr
from models.forensics.tamper import Tamper, inject_nodule, remove_lesion
from models.windowing import Window

TWO_SIDED = "E + two-sided + per-slice normalisation"


def test_auc_and_tpr_on_known_sets() -> None:
    assert roc_auc([0, 1, 2], [3, 4]) == 1.0
    assert roc_auc([3, 4], [0, 1, 2]) == 0.0
    assert roc_auc([1, 2], [1, 2]) == 0.5  # ties count one half
    assert abs(roc_auc([0, 2], [1, 3]) - 0.75) < 1e-12
    negatives = list(range(100))
    assert threshold_at_fpr(negatives, 0.05) == 94  # 95..99 above: 5 %
    assert tpr_at_fpr(negatives, [50, 95, 200], 0.05) == pytest.approx(2 / 3)
    low, high = bootstrap_auc_ci([0, 1, 2, 3], [2.5, 3.5, 4, 5], n=200)
    assert low <= roc_auc([0, 1, 2, 3], [2.5, 3.5, 4, 5]) <= high


@dataclass
class FixtureSlice:
    key: str
    values: np.ndarray

    def hu(self) -> np.ndarray:
        return self.values


def test_evaluation_on_a_tiny_benchmark(fixtures_dir, tmp_path) -> None:
    hu = dicom_to_hu(pydicom.dcmread(fixtures_dir / "ct_transfer_syntaxes" / "CT1_J2KR"))
    writer = BenchWriter(tmp_path / "bench")
    rng = np.random.default_rng(0)
    # Genuine variants of the one real slice: flips and small shifts keep real tissue and real noise.
    genuine = [hu, hu[:, ::-1], np.roll(hu, 6, axis=0)]
    for index, values in enumerate(genuine):
        writer.add(
            BenchItem(f"g{index}", "p", f"k{index}", 0, "genuine", f"g{index}", f"slices/g{index}.npz"), values, None
        )
    for index, values in enumerate(genuine):
        lesion = np.zeros_like(values, dtype=bool)
        injected = inject_nodule(values, rng, radius=7.0, noise_matched=False)
        assert isinstance(injected, Tamper)
        lesion = injected.hu > values + 300  # the injected nodule, to be erased again by a smooth removal
        removed = remove_lesion(injected.hu, lesion, rng, add_noise=False)
        assert isinstance(removed, Tamper)
        for method, result in (("inject-smooth", injected), ("remove-smooth", removed)):
            tid = f"t{method}{index}"
            base = f"g{index}"
            writer.add(
                BenchItem(tid, "p", f"k{index}", 1, method, base, f"slices/{tid}.npz", result.box),
                result.hu,
                result.mask,
            )
    writer.finish({})
    items = read_manifest(tmp_path / "bench")
    assert len(items) == 9

    cache = ResidualCache(tmp_path / "cache", "highpass", highpass_residual(Window(-1100, 300)))
    references = [FixtureSlice("r0", hu), FixtureSlice("r1", hu[::-1])]
    variants = {k: VARIANTS[k] for k in ("B + lung mask", TWO_SIDED, DEFAULT_VARIANT)}
    results = evaluate_detector(tmp_path / "bench", items, cache, references[:1], references[1:], variants, slices=[])
    default = results["variants"][TWO_SIDED]["methods"]
    assert set(default) == {"inject-smooth", "remove-smooth"}
    assert default["inject-smooth"]["n"] == 3
    # A noise-free edit is what the two-sided, tissue-normalised map is built to find.
    assert default["remove-smooth"]["auc"] > 0.9
    assert default["remove-smooth"]["hit_rate"] >= 2 / 3
    assert 0.0 <= results["patch_level"]["inject-smooth"]["auc"] <= 1.0
    assert "remove-smooth" in markdown_table({"detectors": {"highpass": results}})
    # Series-relative (the default): slices without a known series are judged against the reference median.
    relative = results["variants"][DEFAULT_VARIANT]
    assert relative["model"]["series_relative"] and relative["model"]["reference_median"] != 0.0
    assert len(relative["scores"]["genuine"]) == 3
    # Series level: without series membership every slice is a series of its own.
    series = relative["series_level"]
    assert series["n_genuine_series"] == 3 and series["methods"]["inject-smooth"]["n"] == 3
    assert 0.0 <= series["methods"]["remove-smooth"]["auc"] <= 1.0 and series["threshold"] is not None
    # REVIEW (a flagged slice) is a lower bar than SUSPICIOUS (the series threshold), never a higher one.
    assert series["slice_threshold"] <= series["threshold"]
    for method in series["methods"].values():
        assert method["with_a_flagged_slice"] >= method["tpr_at_operating_threshold"]
    scores = results["variants"][TWO_SIDED]["scores"]
    png = plot_rocs({"remove-smooth": (scores["genuine"], scores["remove-smooth"])}, "t", tmp_path / "roc.png")
    assert png.stat().st_size > 1000


def test_benchmark_neighbours_follow_the_series_and_the_attack() -> None:
    """2-D edits meet the genuine slices beside them; a 3-D sphere's slices meet each other; gaps break."""
    from models.corpus import CorpusSlice
    from models.forensics.neighbours import NeighbourResolver, neighbour_index

    series = [CorpusSlice("p", f"f{z}", series_uid="s", sop_instance_uid=f"k{z}", position_z=2.5 * z) for z in range(5)]
    series = [s for s in series if s.key != "k3"]  # a gap between k2 and k4
    lone = CorpusSlice("q", "lone", sop_instance_uid="lone", position_z=0.0)
    index = neighbour_index([*series, lone])
    assert [(a and a.key, b and b.key) for a, b in (index[k] for k in ("k0", "k1", "k2", "k4"))] == [
        (None, "k1"),
        ("k0", "k2"),
        ("k1", None),
        (None, None),
    ]
    assert "lone" not in index  # a single slice has no series to speak of

    sphere = {"hu": 20.0, "sphere_centre_slice": 1}
    items = [
        {"id": "g0", "slice_key": "k0", "label": 0, "method": "genuine", "patient": "p"},
        {"id": "g1", "slice_key": "k1", "label": 0, "method": "genuine", "patient": "p"},
        {"id": "t1", "slice_key": "k1", "label": 1, "method": "inject-noise", "patient": "p"},
        {"id": "t2", "slice_key": "k0", "label": 1, "method": "inject-3d", "patient": "p", "details": sphere},
        {"id": "t3", "slice_key": "k1", "label": 1, "method": "inject-3d", "patient": "p", "details": sphere},
    ]
    resolver = NeighbourResolver(items, [*series, lone])
    keys = lambda around: [n and n[0] for n in around]  # noqa: E731
    assert keys(resolver.for_item(items[2])) == ["g0", "ref-k2"]  # genuine neighbours of a 2-D edit
    assert keys(resolver.for_item(items[4])) == ["t2", "ref-k2"]  # the sphere's own slice, then genuine
    assert keys(resolver.for_slice(series[0])) == [None, "ref-k1"]
