"""Detection metrics for the forensic benchmark: ROC AUC, TPR at a fixed FPR, bootstrap intervals, ROC plots.

Written here because models/evaluate.py (the scoring engineer's) had not landed when the benchmark was
built; the definitions are the standard ones (AUC = Mann-Whitney probability, ties count one half).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def roc_auc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counted one half; nan when a side is empty."""
    neg = np.asarray(negatives, dtype=np.float64)
    pos = np.asarray(positives, dtype=np.float64)
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    scores = np.concatenate([neg, pos])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty_like(order, dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks for ties
    unique, first_index, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first_index + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    rank_sum = ranks[neg.size :].sum()
    return float((rank_sum - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def threshold_at_fpr(negatives: Sequence[float], fpr: float) -> float:
    """The smallest threshold (score > threshold is positive) whose false-positive rate is <= fpr."""
    neg = np.sort(np.asarray(negatives, dtype=np.float64))
    if neg.size == 0:
        return float("inf")
    allowed = int(np.floor(fpr * neg.size))
    return float(neg[neg.size - 1 - allowed]) if allowed < neg.size else float(neg[0]) - 1e-9


def tpr_at_fpr(negatives: Sequence[float], positives: Sequence[float], fpr: float) -> float:
    pos = np.asarray(positives, dtype=np.float64)
    if pos.size == 0:
        return float("nan")
    return float((pos > threshold_at_fpr(negatives, fpr)).mean())


def bootstrap_auc_ci(
    negatives: Sequence[float], positives: Sequence[float], n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the AUC when both sides are resampled with replacement."""
    neg = np.asarray(negatives, dtype=np.float64)
    pos = np.asarray(positives, dtype=np.float64)
    if neg.size == 0 or pos.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = [roc_auc(rng.choice(neg, neg.size), rng.choice(pos, pos.size)) for _ in range(n)]
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def roc_curve(negatives: Sequence[float], positives: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    neg = np.asarray(negatives, dtype=np.float64)
    pos = np.asarray(positives, dtype=np.float64)
    thresholds = np.unique(np.concatenate([neg, pos, [np.inf]]))[::-1]
    fpr = np.array([(neg >= t).mean() for t in thresholds])
    tpr = np.array([(pos >= t).mean() for t in thresholds])
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], tpr, [1.0]])


def plot_rocs(curves: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, path: Path) -> Path:
    """One PNG with a ROC curve per label: {label: (negatives, positives)}."""
    from models.extras import require

    matplotlib = require("matplotlib", "plotting ROC curves")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for label, (neg, pos) in curves.items():
        fpr, tpr = roc_curve(neg, pos)
        ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc(neg, pos):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false-positive rate (genuine slices)")
    ax.set_ylabel("true-positive rate (tampered slices)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
