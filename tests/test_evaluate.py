"""Evaluation metrics against hand-computed values, and the authors' CSV layout on real fixture slices."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import save_model
from models.detector import Detector
from models.diffusion import GaussianDiffusion
from models.evaluate import (
    bootstrap_ci,
    centred_patch,
    label_of,
    patch_scores,
    plot_roc,
    read_label_csv,
    roc_auc,
    roc_curve,
    summary,
    tpr_at_fpr,
)
from models.metadata import ModelMetadata
from models.preprocess import read_hu
from models.unet import Unet

FIXTURES = Path(__file__).parent / "fixtures"


def test_auc_matches_pairwise_counting_with_ties():
    scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.2]
    labels = [0, 0, 1, 1, 1, 0]
    pairs = [
        (p, n)
        for p, lp in zip(scores, labels, strict=True)
        if lp
        for n, ln in zip(scores, labels, strict=True)
        if not ln
    ]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(scores, labels) == pytest.approx(expected)
    assert roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0 and roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0


def test_roc_curve_and_tpr_at_fpr():
    scores = np.r_[np.arange(100), np.arange(50, 150)].astype(float)
    labels = np.r_[np.zeros(100), np.ones(100)].astype(int)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1 and thresholds[0] == np.inf
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(scores, labels))
    # positives 50..149, negatives 0..99: 1 % FPR allows one negative (99): threshold 99 -> 50 positives
    assert tpr_at_fpr(scores, labels, 0.01) == pytest.approx(0.51)
    assert tpr_at_fpr(scores, labels, 0.0) == pytest.approx(0.5)


def test_bootstrap_interval_contains_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0, 1, 200), rng.normal(1, 1, 200)]
    labels = np.r_[np.zeros(200), np.ones(200)].astype(int)
    low, high = bootstrap_ci(scores, labels, roc_auc, n=200, seed=1)
    assert low < roc_auc(scores, labels) < high and high - low < 0.15
    assert bootstrap_ci(scores, labels, roc_auc, n=200, seed=1) == (low, high)


def test_plot_roc_writes_a_png(tmp_path):
    path = plot_roc({"a": ([0.1, 0.9, 0.4, 0.6], [0, 1, 0, 1])}, tmp_path / "roc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_and_patches_follow_the_authors_reading():
    assert label_of("FM") == 1 and label_of("real") == 0 and label_of("1") == 1
    with pytest.raises(ValueError):
        label_of("maybe")
    image = np.arange(200 * 300, dtype=np.float32).reshape(200, 300)
    inside = centred_patch(image, 150, 100, 96)
    assert np.array_equal(inside, image[52:148, 102:198])
    corner = centred_patch(image, 10, 190, 96)  # clipped at the left and bottom, zero-padded bottom/right
    assert corner.shape == (96, 96)
    assert np.array_equal(corner[:58, :58], image[142:200, 0:58]) and corner[60:, 60:].max() == 0


@pytest.fixture(scope="module")
def labelled_set(tmp_path_factory) -> Path:
    """A small CSV in the authors' layout built from real slices saved as .npy in HU; the tampered copies
    carry a pasted bright disc (a crude injection) at the labelled location."""
    folder = tmp_path_factory.mktemp("evalset")
    rows = []
    rng = np.random.default_rng(0)
    for index, source in enumerate(sorted((FIXTURES / "ct_series_20").glob("CT.*"))[:3]):
        hu = read_hu(source)[0]
        genuine = folder / f"genuine_{index}.npy"
        np.save(genuine, hu)
        x, y = int(rng.integers(200, 312)), int(rng.integers(200, 312))
        tampered = hu.copy()
        yy, xx = np.mgrid[: hu.shape[0], : hu.shape[1]]
        tampered[(xx - x) ** 2 + (yy - y) ** 2 < 12**2] = 60.0
        np.save(folder / f"tampered_{index}.npy", tampered)
        rows += [(genuine.name, x, y, "real"), (f"tampered_{index}.npy", x, y, "fake")]
    csv_path = folder / "CT_injection.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "x", "y", "type"])
        writer.writerows(rows)
    return csv_path


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Detector:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("evalmodel") / "tiny.pt"
    save_model(GaussianDiffusion(Unet(8, (1, 2, 4), 1), 96), path, ModelMetadata(name="tiny-eval", patch_size=96))
    return Detector.load(path, device="cpu")


def test_patch_scores_are_the_mean_squared_residual_of_the_patch(labelled_set, detector):
    torch.set_num_threads(1)
    rows = read_label_csv(labelled_set)
    assert [r.label for r in rows] == [0, 1] * 3 and rows[0].path.parent == labelled_set.parent
    scores = list(patch_scores(detector, rows, "CT"))
    assert len(scores) == 6 and all(s > 0 for s in scores)
    # by hand for the first row: window, patch, [-1, 1], one residual
    hu = np.load(rows[0].path)
    unit = np.clip((hu + 700) / 2700, 0, 1)
    patch = centred_patch(unit, rows[0].x, rows[0].y, 96)
    x = torch.from_numpy((patch * 2 - 1)[None, None].astype(np.float32))
    expected = float((detector.diffusion.btd_residual(x).double() ** 2).mean())
    assert scores[0] == pytest.approx(expected, rel=1e-4)
    assert summary(scores, [r.label for r in rows], n_bootstrap=50)["n_tampered"] == 3
