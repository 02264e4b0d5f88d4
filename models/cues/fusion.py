"""From raw cue scores to one calibrated score per slice, and to verdicts (issue 12, item 2).

Why calibrated p-values: the cues live on different scales (a z-like map, a noise-unit excess, a
correlation), and a fused score must mean the same thing on every scanner. Each cue's raw slice score is
first made relative (minus the median of the series' lung slices, or, for a series too short for that,
minus the median of genuine slices of the same scanner reference), then turned into a tail probability under
the distribution the same relative score has on GENUINE series (`TailModel`, fitted on genuine training
series only; no attack ever enters a fit). The fused slice score is -log10 of the smallest cue p-value times
the number of cues used (Bonferroni), minus log10 of the number of lung slices of the series (a series of
n slices offers n chances for a genuine slice to look unusual): a fused score of 1 means "a genuine series
of this length shows such a slice about once in 10", whatever the scanner. Thresholds are then set on
genuine validation series only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TAIL_FROM = 0.9  # the empirical distribution up to its 90th percentile, an exponential tail beyond
QUANTILE_GRID = np.linspace(0.0, TAIL_FROM, 91)
MIN_P = 1e-12


@dataclass
class TailModel:
    """Survival function of a cue's relative score on genuine slices: empirical, then exponential."""

    quantiles: list[float]  # values at QUANTILE_GRID
    beta: float  # mean excess over the TAIL_FROM quantile
    n: int

    @classmethod
    def fit(cls, values: Sequence[float]) -> TailModel:
        data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
        if data.size < 10:
            raise ValueError(f"a tail model needs at least 10 genuine values, got {data.size}")
        quantiles = np.quantile(data, QUANTILE_GRID)
        excess = data[data > quantiles[-1]] - quantiles[-1]
        beta = float(excess.mean()) if excess.size else float(np.std(data) + 1e-6)
        return cls([round(float(q), 6) for q in quantiles], round(max(beta, 1e-6), 6), int(data.size))

    def p_value(self, x: float) -> float:
        q = np.asarray(self.quantiles)
        if x > q[-1]:
            return max((1.0 - TAIL_FROM) * math.exp(-(x - q[-1]) / self.beta), MIN_P)
        # the fraction of genuine values >= x, interpolated on the quantile grid
        below = float(np.interp(x, q, QUANTILE_GRID, left=0.0))
        return max(1.0 - below, MIN_P)

    def to_dict(self) -> dict[str, Any]:
        return {"quantiles": self.quantiles, "beta": round(self.beta, 6), "n": self.n}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TailModel:
        return cls(list(data["quantiles"]), float(data["beta"]), int(data["n"]))


def fused_score(p_values: Mapping[str, float], rule: str = "minp") -> float:
    """-log10 of the combined p-value of the cues that spoke (Bonferroni min-p, or Fisher's method)."""
    ps = [max(p, MIN_P) for p in p_values.values() if p is not None and math.isfinite(p)]
    if not ps:
        return float("nan")
    if rule == "minp":
        return -math.log10(min(1.0, min(ps) * len(ps)))
    if rule == "fisher":
        from scipy.stats import chi2

        statistic = -2.0 * sum(math.log(p) for p in ps)
        return -math.log10(max(float(chi2.sf(statistic, 2 * len(ps))), MIN_P))
    raise ValueError(f"fusion rule {rule!r} unknown; use minp or fisher")


def series_correction(n_lung_slices: int) -> float:
    """What a series of n lung slices subtracts from each slice's fused score (multiplicity over slices)."""
    return math.log10(max(int(n_lung_slices), 1))


def relative_scores(
    raw: Sequence[float | None], in_lungs: Sequence[bool], min_slices: int, reference_median: float | None
) -> tuple[list[float | None], str | None]:
    """Raw scores minus the series' lung median (>= min_slices lung slices) or the reference median.

    Returns (relative scores, None) or ([None...], why the cue cannot be judged in this series)."""
    lung = [r for r, inside in zip(raw, in_lungs, strict=True) if inside and r is not None and math.isfinite(r)]
    if len(lung) >= min_slices:
        offset = float(np.median(lung))
    elif reference_median is not None:
        offset = float(reference_median)
    else:
        return [None] * len(raw), "series too short to judge against itself and no reference for its scanner"
    return [None if r is None or not math.isfinite(r) else float(r) - offset for r in raw], None
