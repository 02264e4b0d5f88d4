"""Genuine references per scanner and kernel (issue 12, item 3). Pure Python/numpy: no torch, no service.

Why: one reference fitted on six training patients made every score follow the scanner and the kernel (a
Siemens B70f series sat a whole unit above it). A reference is therefore keyed by (manufacturer, model,
convolution kernel, slice-thickness band), fitted with robust statistics on genuine slices only, and
carries its provenance. A series long enough to be judged against itself needs no reference (the cues are
series-relative); a short series (a single slice) is judged against the reference of its key, and when
there is none it is NOT judged: `not_assessed` with the reason, never a guess.

Contract for the service (the lead wires it into worker, DB, SR, API, dashboard):
- ``reference_key(ds) -> ReferenceKey``: from any pydicom Dataset (headers only);
- ``slice_features(...)`` / ``Detector.reference_features(result)``: per-slice features (JSON-able dicts)
  of a scored series, to accumulate from the quiet majority of genuine traffic (never from a flagged study);
- ``Reference.fit(key, features, source)`` and ``reference.refine(features)``: robust fit / update;
- ``Reference.to_dict()`` / ``Reference.from_dict()``: JSON-able, with provenance (n_slices, n_series,
  fitted_at, source);
- ``ReferenceSet.lookup(key)``: exact key, then the same scanner model and kernel in any thickness band;
  None when nothing matches (never another model's kernel of the same name);
- ``reference.relative(cue, raw)``: a raw cue score relative to this reference (what the detector uses for
  series too short to judge against themselves).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

THICKNESS_BANDS = ((1.5, "<=1.5mm"), (3.05, "1.5-3mm"), (6.05, "3-6mm"))
MAX_SAMPLES_PER_CUE = 4000  # raw scores kept per cue, so that a refined reference is an exact robust fit
MIN_SLICES_TO_JUDGE = 5  # a reference fitted on fewer genuine slices judges nothing


def thickness_band(thickness_mm: float | None) -> str:
    if thickness_mm is None or not math.isfinite(thickness_mm) or thickness_mm <= 0:
        return "unknown"
    for limit, label in THICKNESS_BANDS:
        if thickness_mm <= limit:
            return label
    return ">6mm"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "/".join(str(v).strip() for v in value)
    return str(value).strip()


@dataclass(frozen=True)
class ReferenceKey:
    """(manufacturer, model, convolution kernel, slice-thickness band); empty strings where unknown."""

    manufacturer: str
    model: str
    kernel: str
    band: str

    @property
    def known(self) -> bool:
        """A key with no kernel cannot be matched to a reference: "unknown kernel"."""
        return bool(self.kernel)

    def label(self) -> str:
        parts = [
            self.manufacturer or "unknown manufacturer",
            self.model or "unknown model",
            self.kernel or "unknown kernel",
        ]
        return " ".join(parts) + f" ({self.band})"

    def to_dict(self) -> dict[str, str]:
        return {"manufacturer": self.manufacturer, "model": self.model, "kernel": self.kernel, "band": self.band}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceKey:
        return cls(
            str(data.get("manufacturer", "")),
            str(data.get("model", "")),
            str(data.get("kernel", "")),
            str(data.get("band", "unknown")),
        )

    def as_string(self) -> str:
        return "|".join((self.manufacturer, self.model, self.kernel, self.band))


def reference_key(ds: Any) -> ReferenceKey:
    """The reference key of a pydicom Dataset (or anything with .get): headers only."""
    get = ds.get if hasattr(ds, "get") else (lambda name, default=None: getattr(ds, name, default))
    thickness = get("SliceThickness", None)
    try:
        thickness_mm = float(getattr(thickness, "value", thickness)) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness_mm = None

    def value(name: str) -> str:
        raw = get(name, None)
        return _text(getattr(raw, "value", raw)).upper()

    return ReferenceKey(
        value("Manufacturer"), value("ManufacturerModelName"), value("ConvolutionKernel"), thickness_band(thickness_mm)
    )


@dataclass
class CueStats:
    """Robust statistics of one cue's raw slice score on genuine lung slices of one key."""

    median: float
    mad: float
    n: int
    samples: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def fit(cls, values: Sequence[float]) -> CueStats:
        data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
        if data.size == 0:
            return cls(float("nan"), float("nan"), 0, [])
        median = float(np.median(data))
        mad = float(np.median(np.abs(data - median)) * 1.4826)
        if data.size > MAX_SAMPLES_PER_CUE:
            data = np.quantile(data, np.linspace(0, 1, MAX_SAMPLES_PER_CUE))  # keeps the distribution's shape
        return cls(round(median, 6), round(mad, 6), int(data.size), [round(float(v), 5) for v in data])

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "mad": self.mad, "n": self.n, "samples": self.samples}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CueStats:
        return cls(
            float(data["median"]), float(data["mad"]), int(data["n"]), [float(v) for v in data.get("samples", [])]
        )


@dataclass
class Reference:
    """A genuine reference for one key: per-cue robust statistics, optional BTD tissue table, provenance."""

    key: ReferenceKey
    cues: dict[str, CueStats]
    n_slices: int
    n_series: int
    fitted_at: str
    source: str
    tissue: dict[str, Any] | None = None  # BTD per-tissue table (ref_mean/ref_std by HU x structure bin)
    series_uids: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def fit(
        cls,
        key: ReferenceKey,
        features: Iterable[Mapping[str, Any]],
        source: str,
        tissue_edges: Mapping[str, Any] | None = None,
    ) -> Reference:
        """Fit from per-slice features (dicts from `slice_features`); only lung slices of this key count.

        Robust: medians and MADs of the raw cue scores; the BTD tissue table (when the features carry
        tissue histograms) from the pooled histograms' medians and MADs per bin."""
        chosen = [f for f in features if f.get("in_lungs", True)]
        per_cue: dict[str, list[float]] = {}
        for feature in chosen:
            for cue, raw in (feature.get("cues") or {}).items():
                if raw is not None:
                    per_cue.setdefault(cue, []).append(float(raw))
        series = sorted({str(f.get("series_uid", "")) for f in chosen})
        tissue = _tissue_table([f["tissue_hist"] for f in chosen if f.get("tissue_hist")], tissue_edges)
        return cls(
            key=key,
            cues={cue: CueStats.fit(values) for cue, values in sorted(per_cue.items())},
            n_slices=len(chosen),
            n_series=len(series),
            fitted_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            source=source,
            tissue=tissue,
            series_uids=series,
        )

    def refine(self, features: Iterable[Mapping[str, Any]], source: str | None = None) -> Reference:
        """This reference updated with more genuine slices (its kept samples plus the new ones)."""
        new = [f for f in features if f.get("in_lungs", True)]
        old = [{"in_lungs": True, "series_uid": None, "cues": {c: v}} for c, s in self.cues.items() for v in s.samples]
        refined = Reference.fit(self.key, old + new, source or self.source)
        uids = sorted(set(self.series_uids) | {str(f.get("series_uid", "")) for f in new})
        refined.n_slices = self.n_slices + len(new)
        refined.n_series = len(uids)
        refined.series_uids = uids
        refined.tissue = self.tissue
        return refined

    def usable(self) -> bool:
        return self.n_slices >= MIN_SLICES_TO_JUDGE

    def relative(self, cue: str, raw: float | None) -> float | None:
        """A raw cue score relative to this reference's genuine median (None when the cue has no stats)."""
        stats = self.cues.get(cue)
        if raw is None or stats is None or stats.n == 0 or not math.isfinite(stats.median):
            return None
        return float(raw) - stats.median

    def describe(self) -> str:
        return f"reference for {self.key.label()}, fitted on {self.n_slices} slices of {self.n_series} series"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key.to_dict(),
            "cues": {c: s.to_dict() for c, s in self.cues.items()},
            "n_slices": self.n_slices,
            "n_series": self.n_series,
            "fitted_at": self.fitted_at,
            "source": self.source,
            "tissue": self.tissue,
            "series_uids": self.series_uids,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reference:
        return cls(
            key=ReferenceKey.from_dict(data["key"]),
            cues={c: CueStats.from_dict(s) for c, s in (data.get("cues") or {}).items()},
            n_slices=int(data.get("n_slices", 0)),
            n_series=int(data.get("n_series", 0)),
            fitted_at=str(data.get("fitted_at", "")),
            source=str(data.get("source", "")),
            tissue=data.get("tissue"),
            series_uids=[str(u) for u in data.get("series_uids", [])],
        )

    def info(self, match: str) -> dict[str, Any]:
        """What a result reports about the reference it was scored against."""
        return {
            "key": self.key.to_dict(),
            "label": self.key.label(),
            "n_slices": self.n_slices,
            "n_series": self.n_series,
            "fitted_at": self.fitted_at,
            "source": self.source,
            "match": match,
        }


class ReferenceSet:
    """References by key, with the lookup chain the detector uses."""

    def __init__(self, references: Iterable[Reference] = ()) -> None:
        self.by_key: dict[ReferenceKey, Reference] = {}
        for reference in references:
            self.add(reference)

    def add(self, reference: Reference) -> None:
        self.by_key[reference.key] = reference

    def __len__(self) -> int:
        return len(self.by_key)

    def lookup(self, key: ReferenceKey) -> tuple[Reference, str] | None:
        """(reference, how it matched: exact | any-thickness) or None. Unknown kernels match nothing."""
        if not key.known:
            return None
        exact = self.by_key.get(key)
        if exact is not None and exact.usable():
            return exact, "exact"
        # Same scanner model and kernel in another thickness band. Not further: a kernel name shared by two
        # models of one vendor is not the same kernel (measured: the Philips Big Bore's "B" judged against the
        # Brilliance16's "B" flagged 19 of 46 genuine single slices; docs/bench/forensics-lofo.md).
        candidates = [
            r
            for k, r in self.by_key.items()
            if (k.manufacturer, k.model, k.kernel) == (key.manufacturer, key.model, key.kernel) and r.usable()
        ]
        if candidates:
            return max(candidates, key=lambda r: r.n_slices), "any-thickness"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"references": [r.to_dict() for r in self.by_key.values()]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ReferenceSet:
        return cls(Reference.from_dict(r) for r in (data or {}).get("references", []))


def fit_references(features: Iterable[Mapping[str, Any]], source: str) -> ReferenceSet:
    """One reference per key present in the features (each feature carries its key as a dict)."""
    by_key: dict[ReferenceKey, list[Mapping[str, Any]]] = {}
    for feature in features:
        by_key.setdefault(ReferenceKey.from_dict(feature["key"]), []).append(feature)
    return ReferenceSet(Reference.fit(key, group, source) for key, group in by_key.items())


def slice_features(
    key: ReferenceKey,
    series_uid: str,
    in_lungs: bool,
    cues: Mapping[str, float | None],
    tissue_hist: Sequence[Sequence[Sequence[int]]] | None = None,
) -> dict[str, Any]:
    """One genuine slice's features, JSON-able: what a site accumulates to fit its own reference."""
    return {
        "key": key.to_dict(),
        "series_uid": series_uid,
        "in_lungs": bool(in_lungs),
        "cues": {c: (None if v is None or not math.isfinite(v) else round(float(v), 6)) for c, v in cues.items()},
        "tissue_hist": tissue_hist,
    }


# BTD log-energy histograms per tissue bin: enough to refit the per-tissue table robustly.
ENERGY_BINS = np.linspace(-16.0, 0.0, 65)


def tissue_histogram(
    log_energy: np.ndarray, hu_bin: np.ndarray, structure_bin: np.ndarray, mask: np.ndarray, n_hu: int, n_structure: int
) -> list[list[list[int]]]:
    """Counts of the BTD log-energy per (HU bin, structure bin, energy bin) inside mask (JSON-able)."""
    energy_bin = np.clip(np.digitize(log_energy[mask], ENERGY_BINS) - 1, 0, len(ENERGY_BINS) - 2)
    flat = (hu_bin[mask] * n_structure + structure_bin[mask]) * (len(ENERGY_BINS) - 1) + energy_bin
    counts = np.bincount(flat, minlength=n_hu * n_structure * (len(ENERGY_BINS) - 1))
    return counts.reshape(n_hu, n_structure, len(ENERGY_BINS) - 1).tolist()


def _tissue_table(histograms: list, edges: Mapping[str, Any] | None, min_count: int = 200) -> dict[str, Any] | None:
    """Median and MAD per tissue bin from pooled histograms; sparse bins borrow the nearest HU bin's."""
    if not histograms:
        return None
    pooled = np.sum(np.asarray(histograms, dtype=np.int64), axis=0)
    centres = 0.5 * (ENERGY_BINS[1:] + ENERGY_BINS[:-1])
    n_hu, n_structure, _ = pooled.shape
    mean = np.full((n_hu, n_structure), np.nan)
    std = np.full((n_hu, n_structure), np.nan)
    for i in range(n_hu):
        for j in range(n_structure):
            counts = pooled[i, j]
            if counts.sum() < min_count:
                continue
            cdf = np.cumsum(counts) / counts.sum()
            median = float(np.interp(0.5, cdf, centres))
            q25, q75 = np.interp([0.25, 0.75], cdf, centres)
            mean[i, j], std[i, j] = median, max(float(q75 - q25) / 1.349, 0.05)
    for j in range(n_structure):
        good = np.nonzero(np.isfinite(mean[:, j]))[0]
        for i in range(n_hu):
            if not np.isfinite(mean[i, j]):
                if len(good):
                    nearest = good[np.argmin(np.abs(good - i))]
                    mean[i, j], std[i, j] = mean[nearest, j], std[nearest, j]
                else:
                    mean[i, j], std[i, j] = np.nanmedian(mean), np.nanmedian(std)
    return {"ref_mean": np.round(mean, 5).tolist(), "ref_std": np.round(std, 5).tolist(), **dict(edges or {})}
