"""What scoring returns: per-region, per-instance and per-series results (contract in docs/architecture.md).

Plain dataclasses with `to_dict()` so the worker can store them, the CLI can print them as JSON, and
nothing here depends on torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

NO_EVIDENCE = "no_evidence"
SUSPICIOUS = "suspicious"
# A series under the series threshold holding at least one slice over the slice threshold. Why a verdict of
# its own: the series bar is stricter (the highest of many slices), so such a series is neither a finding
# nor a clean pass; calling it "no evidence" beside a slice marked suspicious would be a silent pass.
REVIEW = "review"
NOT_ASSESSED = "not_assessed"
VERDICTS = (NO_EVIDENCE, REVIEW, SUSPICIOUS, NOT_ASSESSED)
# The one ranking of verdicts, worst first: a study (or a report) takes the first of these that any of its
# series has. Not assessed ranks last because it only says nothing could be judged; with any judged series
# beside it, that series' verdict is the study's.
VERDICTS_WORST_FIRST = (SUSPICIOUS, REVIEW, NO_EVIDENCE, NOT_ASSESSED)
UNCALIBRATED_REASON = "model not calibrated"


@dataclass
class Region:
    """A connected area of unusual residual. Box in pixel columns (x) and rows (y), x1/y1 exclusive.

    `outline` is a closed polygon ([x, y] points, the first repeated last) in the same pixel-edge
    coordinates as the box: (0, 0) is the top-left corner of the top-left pixel.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    score: float
    area_px: int
    outline: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InstanceResult:
    """One image (or one frame of a multi-frame image)."""

    path: str | None
    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None
    rows: int
    columns: int
    score: float | None
    verdict: str
    regions: list[Region] = field(default_factory=list)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["regions"] = [region.to_dict() for region in self.regions]
        return data


@dataclass
class SeriesResult:
    """One series: the max of its slice scores against the model's series threshold."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    verdict: str
    score: float | None
    reason: str | None
    instances: list[InstanceResult]
    n_assessed: int
    model: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["instances"] = [instance.to_dict() for instance in self.instances]
        return data


@dataclass
class ModelInfo:
    """Which model produced a verdict: enough to tie a stored verdict to exact weights."""

    name: str
    version: str
    weights_sha256: str
    modality: str
    layout: str
    channels: int
    patch_size: int
    calibrated: bool
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict_for(score: float | None, threshold: float | None) -> tuple[str, str | None]:
    """(verdict, reason) of a score against a calibrated threshold; never a pass without calibration."""
    if score is None:
        return NOT_ASSESSED, "no score"
    if threshold is None:
        return NOT_ASSESSED, UNCALIBRATED_REASON
    return (SUSPICIOUS if score >= threshold else NO_EVIDENCE), None


def worst_verdict(verdicts: Iterable[str]) -> str:
    """The worst of `verdicts` by `VERDICTS_WORST_FIRST`; not assessed when there is none to rank."""
    present = set(verdicts)
    return next((v for v in VERDICTS_WORST_FIRST if v in present), NOT_ASSESSED)


def study_verdict(series: Iterable[SeriesResult]) -> tuple[str, float | None, str | None]:
    """(verdict, score, reason) of a study: the max over its series; suspicious wins, then review, then
    no_evidence. The one ranking of study verdicts: the worker stores what this returns.

    A study with no assessable series is not assessed, with the series' reasons.
    """
    results = list(series)
    scores = [float(r.score) for r in results if r.score is not None and math.isfinite(r.score)]
    score = max(scores) if scores else None
    verdict = worst_verdict(r.verdict for r in results)
    if verdict == SUSPICIOUS:
        return SUSPICIOUS, score, None
    if verdict == REVIEW:
        flagged = sum(1 for r in results for i in r.instances if i.verdict == SUSPICIOUS)
        return REVIEW, score, f"{flagged} slice(s) over the slice threshold, no series over the series threshold"
    if verdict == NO_EVIDENCE:
        partial = [r for r in results if r.verdict == NOT_ASSESSED]
        reason = f"{len(partial)} of {len(results)} series not assessed" if partial else None
        return NO_EVIDENCE, score, reason
    reasons = sorted({r.reason or "not assessed" for r in results})
    return NOT_ASSESSED, score, "; ".join(reasons) if reasons else "no series"
