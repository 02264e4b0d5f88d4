"""The fused detector's series step: cues -> calibrated scores -> verdicts, regions and reasons. No torch.

Why a module of its own: models.detector runs the diffusion model and streams slices; everything after
the raw scores is plain numpy and must be testable (and usable by the service) without torch.

Contract (what `Detector.score_series` does when the model's metadata has a ``fusion`` block):
1. per slice, the raw score of each cue (models.cues; BTD from models.anomaly) and where its map peaks;
2. per cue, relative scores: minus the median over the series' lung slices when it has at least
   ``min_series_slices`` of them, else minus the median of the REFERENCE for the series' scanner key
   (models.reference); with neither, the cue is "not used" with the reason;
3. per cue, the genuine tail p-value (TailModel fitted on genuine training series: in-series tails for
   series-relative scores, single-slice tails for reference-relative ones); the fused slice score is
   -log10(Bonferroni min-p over the cues), minus log10(number of lung slices);
4. a slice at or over ``thresholds.review`` is suspicious (its regions: the deciding cue's peak); the series
   is SUSPICIOUS at or over ``thresholds.suspicious``, REVIEW when a slice is flagged or the header cue
   finds an instance re-written differently from its series (models.cues.header), else NO_EVIDENCE;
   NOT_ASSESSED when no cue could speak (no lungs, or a short series of a scanner key without reference).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.cues.continuity import continuity_map
from models.cues.copymove import SliceKeypoints, copy_move_scores, keypoints
from models.cues.fusion import TailModel, fused_score, series_correction
from models.cues.header import header_findings
from models.cues.noise import noise_map
from models.reference import Reference, ReferenceKey, ReferenceSet, slice_features
from models.results import NOT_ASSESSED, CueResult, InstanceResult, Region

PIXEL_CUES = ("btd", "noise", "continuity", "copymove")
REGION_HALF_PX = 8


@dataclass
class FusionConfig:
    """The fusion block of a model's metadata (written by models/forensics/lofo_ship.py)."""

    cues: list[str]
    rule: str
    continuity_limit_mm: float
    tails_in_series: dict[str, TailModel]
    tails_single: dict[str, TailModel]
    review: float
    suspicious: float
    single_review: float | None = None  # REVIEW bar for a short series judged against a reference
    min_series_slices: int = 8
    header_cue: bool = True

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any] | None) -> FusionConfig | None:
        if not data:
            return None
        return cls(
            cues=list(data["cues"]),
            rule=str(data.get("rule", "minp")),
            continuity_limit_mm=float(data.get("continuity_limit_mm", 2.5)),
            tails_in_series={c: TailModel.from_dict(t) for c, t in data.get("tails_in_series", {}).items()},
            tails_single={c: TailModel.from_dict(t) for c, t in data.get("tails_single", {}).items()},
            review=float(data["thresholds"]["review"]),
            suspicious=float(data["thresholds"]["suspicious"]),
            single_review=float(data["thresholds"].get("single_review", data["thresholds"]["review"])),
            min_series_slices=int(data.get("min_series_slices", 8)),
            header_cue=bool(data.get("header_cue", True)),
        )


# Why a slice without lung is not assessed: every pixel cue judges lung tissue (models.detector skips its model
# pass for that reason, and marks it with this too).
LUNGLESS_SLICE = "no lungs in this slice: the cues judge lung tissue"


@dataclass
class SliceCues:
    """One slice's raw cue scores, where each map peaks, and its copy-move keypoints."""

    raw: dict[str, float | None] = field(default_factory=dict)
    peaks: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    in_lungs: bool = False
    keypoints: SliceKeypoints | None = None


def slice_cues(
    config: FusionConfig,
    hu: np.ndarray,
    search: np.ndarray,
    in_lungs: bool,
    btd_map: np.ndarray | None,
    before: np.ndarray | None,
    after: np.ndarray | None,
    spacing_mm: float | None,
    pixel_mm: float,
) -> SliceCues:
    """Every pixel cue of one slice (BTD from its finished anomaly map; None: the slice had no model pass, and
    no BTD score)."""
    out = SliceCues(in_lungs=in_lungs)
    if btd_map is not None:
        y, x = np.unravel_index(int(np.argmax(btd_map)), btd_map.shape)
        out.raw["btd"], out.peaks["btd"] = float(btd_map.max()), (int(y), int(x))
    if "noise" in config.cues:
        cue = noise_map(hu, search)
        out.raw["noise"], out.peaks["noise"] = cue.score, cue.peak
        if cue.reason:
            out.reasons["noise"] = cue.reason
    if "continuity" in config.cues:
        cue = continuity_map(hu, before, after, search, spacing_mm, pixel_mm, config.continuity_limit_mm)
        out.raw["continuity"], out.peaks["continuity"] = cue.score, cue.peak
        if cue.reason:
            out.reasons["continuity"] = cue.reason
    if "copymove" in config.cues:
        out.keypoints = keypoints(hu, search)
    return out


def _region(peak: tuple[int, int], shape: tuple[int, int], score: float, cue: str) -> Region:
    y, x = peak
    x0, y0 = max(x - REGION_HALF_PX, 0), max(y - REGION_HALF_PX, 0)
    x1, y1 = min(x + REGION_HALF_PX + 1, shape[1]), min(y + REGION_HALF_PX + 1, shape[0])
    outline = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return Region(x0, y0, x1, y1, round(float(score), 4), (x1 - x0) * (y1 - y0), outline, cue)


@dataclass
class FusedSeries:
    """What the series step decided: per-cue results, the reference used, and per-slice features."""

    cues: list[CueResult]
    reference: dict[str, Any] | None
    features: list[dict[str, Any]]
    header_flagged: list[int]
    not_assessed_reason: str | None = None


def _reference_for(
    key: ReferenceKey, reference: Reference | ReferenceSet | None, shipped: ReferenceSet
) -> tuple[Reference, str] | None:
    if isinstance(reference, Reference):
        return reference, "given"
    if isinstance(reference, ReferenceSet):
        found = reference.lookup(key)
        if found:
            return found
    return shipped.lookup(key)


def fuse_series(
    config: FusionConfig,
    instances: Sequence[InstanceResult],
    cues: Sequence[SliceCues | None],
    key: ReferenceKey,
    series_uid: str,
    shipped: ReferenceSet,
    reference: Reference | ReferenceSet | None = None,
    signatures: Sequence[dict[str, str] | None] | None = None,
    positions: Sequence[float | None] | None = None,
    spacing_mm: float | None = None,
) -> FusedSeries:
    """Set each instance's fused score, verdict, regions and cue scores; return the series-level parts.

    instances[i] and cues[i] describe the same slice (cues None: the slice was not assessed)."""
    n = len(instances)
    lung = [i for i in range(n) if cues[i] is not None and cues[i].in_lungs]  # type: ignore[union-attr]
    raw: dict[str, np.ndarray] = {c: np.full(n, np.nan) for c in config.cues}
    peaks: dict[str, list] = {c: [None] * n for c in config.cues}
    for i, sc in enumerate(cues):
        if sc is None:
            continue
        for c in config.cues:
            value = sc.raw.get(c)
            if value is not None and math.isfinite(value):
                raw[c][i], peaks[c][i] = value, sc.peaks.get(c)
    if "copymove" in config.cues:
        kps = [sc.keypoints if sc is not None and sc.in_lungs else None for sc in cues]
        for i, cue in enumerate(copy_move_scores(kps, list(positions) if positions else None, spacing_mm)):
            if cue.score is not None:
                raw["copymove"][i], peaks["copymove"][i] = cue.score, cue.peak

    in_series = len(lung) >= config.min_series_slices
    found = None if in_series else _reference_for(key, reference, shipped)
    reference_info = found[0].info(found[1]) if found else None
    tails = config.tails_in_series if in_series else config.tails_single
    p: dict[str, np.ndarray] = {}
    cue_results: dict[str, CueResult] = {}
    for c in config.cues:
        tail = tails.get(c)
        values = raw[c][lung] if lung else np.array([])
        finite = values[np.isfinite(values)]
        if tail is None:
            why = (
                "a series too short to judge against itself has no neighbours to compare with"
                if c == "continuity" and not in_series
                else f"no genuine tail model for {c} in this layout"
            )
            cue_results[c] = CueResult(c, False, reason=why)
            continue
        if finite.size == 0:
            reasons = {sc.reasons.get(c) for sc in cues if sc is not None and sc.reasons.get(c)}
            cue_results[c] = CueResult(c, False, reason="; ".join(sorted(r for r in reasons if r)) or "no lungs")
            continue
        if in_series:
            offset = float(np.median(finite))
        elif found is not None and found[0].cues.get(c) is not None and found[0].cues[c].n > 0:
            offset = found[0].cues[c].median
        else:
            why = (
                f"no reference for {key.label()}; single slice cannot be judged against its own series"
                if key.known or found is None
                else f"reference has no statistics for {c}"
            )
            if not key.known:
                why = (
                    "unknown kernel (no ConvolutionKernel in the header): no reference can apply; "
                    "a short series cannot be judged against itself"
                )
            cue_results[c] = CueResult(c, False, reason=why)
            continue
        p[c] = np.array([tail.p_value(v - offset) if math.isfinite(v) else np.nan for v in raw[c]])
        cue_results[c] = CueResult(c, True, threshold=config.review)

    # In series: multiplicity over the series' lung slices. Against a reference: the score is lowered by how
    # much stricter the single-slice bar is, so that one pair of thresholds reads both cases.
    single_extra = (config.single_review or config.review) - config.review
    correction = series_correction(len(lung)) if in_series else single_extra
    features = []
    for i, instance in enumerate(instances):
        sc = cues[i]
        if sc is None:
            continue
        features.append(slice_features(key, series_uid, sc.in_lungs, {c: _finite(raw[c][i]) for c in config.cues}))
        if not sc.in_lungs:
            instance.score, instance.verdict, instance.regions = None, NOT_ASSESSED, []
            instance.reason = LUNGLESS_SLICE
            continue
        values = {c: float(v[i]) for c, v in p.items() if math.isfinite(v[i])}
        if not values:
            instance.score, instance.verdict, instance.regions = None, NOT_ASSESSED, []
            instance.reason = (
                "; ".join(sorted({r.reason for r in cue_results.values() if r.reason}))
                or "no cue could judge this slice"
            )
            continue
        instance.cue_scores = {c: round(-math.log10(max(v, 1e-300)) - correction, 4) for c, v in values.items()}
        score = fused_score(values, config.rule) - correction
        decided = min(values, key=values.get)
        instance.score = round(score, 4)
        if score >= config.review:
            instance.verdict, instance.reason = "suspicious", f"{decided} cue over the slice threshold"
            peak = peaks[decided][i]
            instance.regions = [_region(peak, (instance.rows, instance.columns), score, decided)] if peak else []
        else:
            instance.verdict, instance.reason, instance.regions = "no_evidence", None, []
    for c, result in cue_results.items():
        if not result.used:
            continue
        scores = [instance.cue_scores.get(c) for instance in instances if instance.cue_scores.get(c) is not None]
        result.score = round(max(scores), 4) if scores else None
        result.slices_fired = sum(1 for s in scores if s >= config.review)
        result.fired = result.slices_fired > 0

    header_flagged: list[int] = []
    ordered = [cue_results[c] for c in config.cues if c in cue_results]
    ordered += [
        CueResult(c, False, reason="not in this model's fusion (dropped by the leave-one-family-out selection)")
        for c in PIXEL_CUES
        if c not in config.cues
    ]
    if config.header_cue and signatures is not None:
        findings, why = header_findings(list(signatures))
        strong = [f for f in findings if f.strong]
        if why:
            ordered.append(CueResult("header", False, reason=why))
        else:
            header_flagged = [f.index for f in strong]
            detail = "; ".join(f"instance {f.index}: {f.describe()}" for f in findings[:3]) or None
            ordered.append(
                CueResult(
                    "header",
                    True,
                    score=float(len(strong)),
                    threshold=1.0,
                    fired=bool(strong),
                    reason=detail,
                    slices_fired=len(strong),
                )
            )
            for f in findings:
                if f.index < len(instances):
                    note = f"header: {f.describe()}"
                    instances[f.index].reason = (
                        f"{instances[f.index].reason}; {note}" if instances[f.index].reason else note
                    )
    used = [r for r in ordered if r.used and r.name != "header"]
    if not lung and not used:
        for r in ordered:
            if r.name != "header" and r.name in config.cues:
                r.reason = "no lungs in this series"
    why_not = None
    if not used:
        # the reasons of the cues this model fuses, the decisive ones first (a missing reference says more
        # than a missing neighbour)
        reasons = [cue_results[c].reason for c in config.cues if c in cue_results and cue_results[c].reason]
        reasons.sort(key=lambda r: ("neighbours" in r or "tail model" in r, r))
        why_not = "; ".join(dict.fromkeys(reasons)) or "no cue could judge this series"
        if not lung:
            why_not = "no lungs in this series: the cues judge lung tissue"
        if all(sc is None for sc in cues):
            why_not = None  # nothing was scored at all: the per-image reasons (not CT, unreadable...) say why
    return FusedSeries(ordered, reference_info, features, header_flagged, why_not)


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
