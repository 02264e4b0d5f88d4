"""What scoring returns: per-region, per-instance and per-series results (contract in docs/architecture.md).

Plain dataclasses with `to_dict()` so the worker can store them, the CLI can print them as JSON, and
nothing here depends on torch.

Since issue 12 (fused cues, per-scanner references), additions only; existing fields keep their meaning:
- ``Region.cue``: which cue found the region ("btd", "noise", "continuity", "copymove"; None = the BTD map of
  a model without fusion);
- ``InstanceResult.cue_scores``: per cue, the slice's calibrated score (-log10 of its genuine tail p-value;
  absent when the cue did not speak for this slice);
- ``SeriesResult.cues``: one ``CueResult`` per cue: its series score (the highest slice), the threshold it
  is compared with, whether it fired, or ``used=False`` with the reason ("too coarse: slice spacing 5 mm >
  2.5 mm", "no reference for <key>; ...", "header cue not used: ...");
- ``SeriesResult.reference``: the reference the series was scored against (key, label, n_slices, n_series,
  fitted_at, source, match), or None when the series was judged against itself only.
The verdict names stay ``no_evidence | review | suspicious | not_assessed``.
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
    cue: str | None = None  # the cue whose map holds this region (None: the BTD map of an unfused model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CueResult:
    """One cue's part in a series verdict: its score against its threshold, or why it was not used."""

    name: str
    used: bool
    score: float | None = None  # calibrated: -log10 of the genuine tail p-value, series-corrected
    threshold: float | None = None
    fired: bool = False
    reason: str | None = None  # why not used, or what it found (e.g. the header cue's differing fields)
    slices_fired: int = 0

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
    cue_scores: dict[str, float] = field(default_factory=dict)

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
    cues: list[CueResult] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    scanner_key: dict[str, str] | None = None  # models.reference.ReferenceKey.to_dict() of the series
    # Per-slice features for fitting a site reference (Detector.reference_features); not part of to_dict:
    # the service accumulates them only from series it decides are quiet genuine traffic.
    features: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("features", None)
        data["instances"] = [instance.to_dict() for instance in self.instances]
        data["cues"] = [cue.to_dict() for cue in self.cues]
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
