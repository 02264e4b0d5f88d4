"""Thresholds from genuine scans: at a chosen false-positive rate, per slice and per series.

A verdict is "suspicious" when score >= threshold. The threshold is set just above the (k+1)-th highest
genuine score, k = floor(fpr * n), so that at most a fraction `fpr` of the genuine scans scored here
would be flagged (the empirical rate, exactly, not an interpolated quantile). With few genuine series,
the series threshold ends above their maximum: calibrate on as many genuine series as the site has.
The result is written into the model's metadata file, so the calibration ships with the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.metadata import ModelMetadata, metadata_path_for


def threshold_at_fpr(genuine_scores: Sequence[float], fpr: float) -> float:
    """The lowest threshold that flags at most floor(fpr * n) of these genuine scores."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    scores = np.sort(np.asarray([s for s in genuine_scores if s is not None and math.isfinite(s)], dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no genuine scores to calibrate on")
    allowed = int(math.floor(fpr * scores.size + 1e-9))
    descending = scores[::-1]
    return float(np.nextafter(descending[allowed], np.inf))


def calibration_record(
    slice_scores: Sequence[float],
    series_scores: Sequence[float],
    fpr: float,
    series_fpr: float | None = None,
    source: str = "",
) -> dict[str, Any]:
    """The `calibration` block of a model's metadata."""
    series_fpr = fpr if series_fpr is None else series_fpr
    slice_array = np.asarray(slice_scores, dtype=np.float64)
    return {
        "slice_threshold": threshold_at_fpr(slice_scores, fpr),
        "series_threshold": threshold_at_fpr(series_scores, series_fpr),
        "fpr": fpr,
        "series_fpr": series_fpr,
        "n_slices": int(slice_array.size),
        "n_series": len(series_scores),
        "slice_score_quantiles": {
            q: float(np.quantile(slice_array, float(q))) for q in ("0.5", "0.9", "0.99") if slice_array.size
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
    }


def calibrate_detector(
    detector: Any,
    paths: Iterable[str | Path],
    fpr: float,
    series_fpr: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score genuine scans with `detector` (a models.Detector) and return its calibration block."""
    slice_scores: list[float] = []
    series_scores: list[float] = []
    for result in detector.score_paths(list(paths), progress=progress):
        scores = [i.score for i in result.instances if i.score is not None]
        if not scores:
            continue
        slice_scores.extend(scores)
        series_scores.append(max(scores))
    if not slice_scores:
        raise ValueError("none of the given scans could be scored; nothing to calibrate on")
    record = calibration_record(slice_scores, series_scores, fpr, series_fpr, source=f"{len(series_scores)} series")
    record["scoring"] = detector.options.calibration_key()  # thresholds hold only for this way of scoring
    return record


def write_calibration(model_path: str | Path, calibration: dict[str, Any]) -> Path:
    """Store the calibration in the model's metadata file (NAME.json beside NAME.pt); returns its path.

    The rest of the metadata (and its weights_sha256, which ties the thresholds to these weights) is kept.
    A published checkpoint without a metadata file gets one from its published defaults.
    """
    meta_path = metadata_path_for(Path(model_path))
    if meta_path.is_file():
        metadata = ModelMetadata.read(meta_path)
    else:
        from models.checkpoint import load_model

        loaded = load_model(model_path)
        metadata = loaded.metadata
        metadata.weights_sha256 = loaded.weights_sha256
    metadata.calibration = dict(calibration)
    metadata.write(meta_path)
    return meta_path
