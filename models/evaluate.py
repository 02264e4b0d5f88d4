"""Detection metrics (ROC, AUC, TPR at a fixed FPR, bootstrap intervals, ROC plots) and the authors'
test-set reader, so that `btd evaluate` and the benchmarks compute the same numbers the same way.

Labels: 1 = tampered (positive), 0 = genuine. Scores: higher = more suspicious.

The BTD authors' test sets are CSV files with columns `path, x, y, type` (plus one 0/1 column per
tampering tool, e.g. `CTGAN-CT-injection`). CT rows point at `.npy` slices in HU, MRI rows at 8-bit
images; the score of a row is the mean squared BTD residual over a patch (96 px CT, 128 px MRI) centred
on (x, y), cut and zero-padded the way the authors' evaluation notebook cuts it (start = max(0, c - p/2),
end = min(size, c + p/2), padding at the bottom/right). That notebook also passes MRI images (already in
[0, 1]) through the CT window, which squeezes them into [0.259, 0.260]; we feed MRI in [0, 1], as the
authors' MRI trainer does.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.windowing import BTD_CT_WINDOW

Metric = Callable[[np.ndarray, np.ndarray], float]

POSITIVE_TYPES = {
    "1",
    "true",
    "fake",
    "tampered",
    "deepfake",
    "injected",
    "injection",
    "removed",
    "removal",
    "fm",
    "fb",
}
NEGATIVE_TYPES = {"0", "false", "real", "genuine", "original", "authentic", "tm", "tb"}
PUBLISHED_PATCH = {"CT": 96, "MR": 128}


def _arrays(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and labels must be 1-D and of the same length")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0 (genuine) or 1 (tampered)")
    return s, y


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): a point per distinct score, from (0, 0) (threshold +inf) to (1, 1)."""
    s, y = _arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs both genuine and tampered examples")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thresholds


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve = P(tampered scores above genuine), ties counted half (Mann-Whitney)."""
    s, y = _arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both genuine and tampered examples")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_s))[0] + 1]
    ends = np.r_[starts[1:], s.size]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # average 1-based rank of the tie group
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tpr_at_fpr(scores: Sequence[float], labels: Sequence[int], fpr: float) -> float:
    """The highest true-positive rate whose false-positive rate does not exceed `fpr`."""
    fprs, tprs, _ = roc_curve(scores, labels)
    return float(tprs[fprs <= fpr + 1e-12].max())


def bootstrap_ci(
    scores: Sequence[float],
    labels: Sequence[int],
    metric: Metric = roc_auc,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of `metric`, resampling examples with replacement.

    Resamples that lack one of the classes are drawn again (they have no ROC).
    """
    s, y = _arrays(scores, labels)
    rng = np.random.default_rng(seed)
    values = []
    while len(values) < n:
        index = rng.integers(0, s.size, s.size)
        if y[index].min() == y[index].max():
            continue
        values.append(metric(s[index], y[index]))
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def plot_roc(curves: dict[str, tuple[Sequence[float], Sequence[int]]], path: str | Path, title: str = "ROC") -> Path:
    """Write a PNG with one ROC curve per named (scores, labels) pair, AUC in the legend."""
    from models.extras import require

    matplotlib = require("matplotlib", "plotting ROC curves")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_curve(scores, labels)
        axes.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(scores, labels):.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def summary(scores: Sequence[float], labels: Sequence[int], n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """AUC (with bootstrap 95 % interval) and TPR at 1 % and 5 % FPR."""
    s, y = _arrays(scores, labels)
    return {
        "n": int(s.size),
        "n_tampered": int(y.sum()),
        "auc": roc_auc(s, y),
        "auc_ci95": bootstrap_ci(s, y, roc_auc, n=n_bootstrap, seed=seed) if n_bootstrap else None,
        "tpr_at_fpr_1pct": tpr_at_fpr(s, y, 0.01),
        "tpr_at_fpr_5pct": tpr_at_fpr(s, y, 0.05),
    }


# --- the authors' published test-set layout --------------------------------------------------------------


@dataclass
class LabelledPatch:
    path: Path
    x: int
    y: int
    label: int


def label_of(value: str) -> int:
    text = str(value).strip().lower()
    if text in POSITIVE_TYPES:
        return 1
    if text in NEGATIVE_TYPES:
        return 0
    raise ValueError(f"unknown type {value!r}: use 0/1, real/fake, genuine/tampered")


def read_label_csv(
    csv_path: str | Path, root: str | Path | None = None, only: str | None = None
) -> list[LabelledPatch]:
    """Rows of a `path, x, y, type` CSV; relative paths are taken from `root` (default: the CSV's folder).

    `only` keeps the rows whose column of that name is 1 (the authors' per-tool columns).
    """
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    rows = []
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if only is not None and str(row.get(only, "")).strip() not in ("1", "1.0", "True", "true"):
                continue
            path = Path(row["path"])
            rows.append(
                LabelledPatch(
                    path if path.is_absolute() else base / path,
                    int(float(row["x"])),
                    int(float(row["y"])),
                    label_of(row["type"]),
                )
            )
    return rows


def load_unit_image(path: Path, modality: str) -> np.ndarray:
    """A test-set image in the model's [0, 1]: CT `.npy` in HU through the BTD window; MRI 8-bit / 255."""
    if path.suffix.lower() == ".npy":
        values = np.load(path, allow_pickle=False).astype(np.float32)
        if modality == "CT":
            return BTD_CT_WINDOW.apply(values)
        return np.clip(values / (255.0 if values.max() > 1.0 else 1.0), 0.0, 1.0)
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def centred_patch(image: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """The authors' patch: [c - size/2, c + size/2) clipped to the image, zero-padded at bottom/right."""
    half = size // 2
    x0, x1 = max(0, x - half), min(image.shape[1], x + half)
    y0, y1 = max(0, y - half), min(image.shape[0], y + half)
    patch = image[y0:y1, x0:x1]
    return np.pad(patch, ((0, size - patch.shape[0]), (0, size - patch.shape[1])), mode="constant")


def patch_scores(
    detector: Any, rows: Sequence[LabelledPatch], modality: str, patch_size: int | None = None, batch_size: int = 16
) -> Iterator[float]:
    """Mean squared residual over each row's patch (the paper's reading), in row order."""
    import torch

    size = patch_size or PUBLISHED_PATCH.get(modality, detector.info.patch_size)
    multiple = int(detector.diffusion.model.downsample_factor)
    padded = -(-size // multiple) * multiple
    channels = detector.info.channels
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        patches = []
        for row in chunk:
            patch = centred_patch(load_unit_image(row.path, modality), row.x, row.y, size)
            patch = np.pad(patch, ((0, padded - size), (0, padded - size)), mode="reflect") if padded > size else patch
            patches.append(np.repeat(patch[None], channels, axis=0) * 2.0 - 1.0)
        batch = torch.from_numpy(np.stack(patches).astype(np.float32)).to(detector.device)
        residual = detector.residual_batch(batch).float().cpu().numpy()[:, :, :size, :size]
        yield from (float(np.mean(r.astype(np.float64) ** 2)) for r in residual)
