"""`btd bench lofo`: leave-one-family-out evaluation of every cue, alone and fused (issue 12, items 1-2).

Protocol (docs/bench/forensics-lofo.md):
- units are whole series; patients split into SELECTION patients (train + validation of
  models.corpus.FORENSIC_SPLIT) and TEST patients (reported only);
- the cues' genuine tail models (models.cues.fusion.TailModel) and the per-scanner references are fitted on
  genuine series of the TRAIN patients only; no attack enters any fit;
- the operating thresholds are set on genuine SELECTION series only;
- a configuration (which cues, which fusion rule, the continuity cue's spacing limit) is chosen per held-out
  family on the OTHER families of the selection patients, and reported on the held-out family of the test
  patients ("LOFO" columns). The configuration shipped is the one chosen on all families of the selection
  patients; its test figures are reported beside, never instead of, the LOFO ones;
- two layouts: in series (each tampered object inside its complete series, as a PACS sends it) and single
  slice (every slice its own series, judged against the reference of its scanner key, or not assessed);
- 95 % intervals: bootstrap for AUCs (resampling slices), Wilson for rates; n everywhere.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.cues.copymove import copy_move_scores
from models.cues.fusion import TailModel, fused_score, series_correction
from models.forensics.lofo_build import FAMILY_OF, SeriesInfo, corpus_series
from models.forensics.lofo_score import load_keypoints, load_scores
from models.forensics.metrics import bootstrap_auc_ci, roc_auc
from models.reference import ReferenceKey, ReferenceSet, fit_references, slice_features

CUES = ("btd", "noise", "continuity", "copymove")
MIN_SERIES_SLICES = 8
HIT_MARGIN_PX = 8
CONTINUITY_LIMITS = (2.5, 5.0)
DEFAULT_T_REVIEW = 1.0  # series-corrected p <= 0.1
DEFAULT_T_SUSPICIOUS = 2.0  # series-corrected p <= 0.01


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


@dataclass
class Context:
    """One series as scored: genuine (oid None) or with one tampered object's slices in place."""

    sid: str
    oid: str | None
    raw: dict[str, np.ndarray]  # cue -> raw score per slice (nan where absent)
    peaks: dict[str, list[tuple[int, int] | None]]
    in_lungs: np.ndarray
    edited: dict[int, tuple[int, int, int, int]]  # slice index -> box (x0, y0, x1, y1)
    family: str = "genuine"


class Evaluation:
    """Loads the cached scores once; evaluates any configuration cheaply."""

    def __init__(self, bench_dir: Path, scores_dir: Path) -> None:
        self.bench_dir, self.scores_dir = Path(bench_dir), Path(scores_dir)
        self.series = {s.sid: s for s in corpus_series()}
        self.scores = load_scores(scores_dir)
        self.objects = [json.loads(line) for line in (self.bench_dir / "objects.jsonl").read_text().splitlines()]
        self.genuine = {sid: self._genuine_context(s) for sid, s in self.series.items()}
        self.tampered = [c for c in (self._object_context(o) for o in self.objects) if c is not None]
        self.references = self._fit_references()
        self.tails_series, self.tails_single = self._fit_tails()

    # ------------------------------------------------------------------ contexts
    def _entry(self, eid: str) -> dict[str, Any] | None:
        return self.scores.get(eid)

    def _genuine_context(self, s: SeriesInfo) -> Context:
        n = len(s.slices)
        raw = {c: np.full(n, np.nan) for c in CUES}
        peaks: dict[str, list] = {c: [None] * n for c in CUES}
        in_lungs = np.zeros(n, dtype=bool)
        for i in range(n):
            e = self._entry(f"g|{s.sid}|{i}")
            if e is None:
                continue
            in_lungs[i] = e["in_lungs"]
            for c in ("btd", "noise", "continuity"):
                value = e.get(c)
                if value and value[0] is not None:
                    raw[c][i], peaks[c][i] = value[0], (value[1], value[2])
        kps = [load_keypoints(self.scores_dir, f"g|{s.sid}|{i}") for i in range(n)]
        positions = [x.position_z for x in s.slices]
        for i, cue in enumerate(copy_move_scores(kps, positions, s.spacing_mm)):
            if cue.score is not None:
                raw["copymove"][i], peaks["copymove"][i] = cue.score, cue.peak
        self._genuine_kps = getattr(self, "_genuine_kps", {})
        self._genuine_kps[s.sid] = kps
        return Context(s.sid, None, raw, peaks, in_lungs, {})

    def _object_context(self, record: dict[str, Any]) -> Context | None:
        base = self.genuine.get(record["sid"])
        if base is None:
            return None
        s = self.series[record["sid"]]
        raw = {c: v.copy() for c, v in base.raw.items()}
        peaks = {c: list(v) for c, v in base.peaks.items()}
        in_lungs = base.in_lungs.copy()
        edited = {e["index"]: tuple(e["box"]) for e in record["slices"]}
        for i in edited:
            e = self._entry(f"t|{record['id']}|{i}")
            if e is None:
                return None
            in_lungs[i] = e["in_lungs"]
            for c in ("btd", "noise", "continuity"):
                value = e.get(c)
                raw[c][i], peaks[c][i] = (
                    (value[0], (value[1], value[2])) if value and value[0] is not None else (np.nan, None)
                )
        for j in {i + d for i in edited for d in (-1, 1)} - set(edited):
            e = self._entry(f"n|{record['id']}|{j}")
            if e is not None and e.get("continuity") and e["continuity"][0] is not None:
                raw["continuity"][j], peaks["continuity"][j] = (
                    e["continuity"][0],
                    (e["continuity"][1], e["continuity"][2]),
                )
        kps = list(self._genuine_kps[s.sid])
        for i in edited:
            kps[i] = load_keypoints(self.scores_dir, f"t|{record['id']}|{i}")
        positions = [x.position_z for x in s.slices]
        for i, cue in enumerate(copy_move_scores(kps, positions, s.spacing_mm, only=set(edited))):
            if i in edited:
                raw["copymove"][i] = cue.score if cue.score is not None else np.nan
                peaks["copymove"][i] = cue.peak
        return Context(s.sid, record["id"], raw, peaks, in_lungs, edited, record["family"])

    # ------------------------------------------------------------------ genuine fits (train patients only)
    def _fit_references(self) -> ReferenceSet:
        features = []
        for sid, ctx in self.genuine.items():
            s = self.series[sid]
            if s.split != "train":
                continue
            for i in range(len(s.slices)):
                if ctx.in_lungs[i]:
                    features.append(slice_features(s.key, sid, True, {c: _finite(ctx.raw[c][i]) for c in CUES}))
        return fit_references(features, "genuine slices of the train patients (models.corpus.FORENSIC_SPLIT)")

    def _fit_tails(self) -> tuple[dict[str, TailModel], dict[str, TailModel]]:
        in_series: dict[str, list[float]] = {c: [] for c in CUES}
        single: dict[str, list[float]] = {c: [] for c in CUES}
        for sid, ctx in self.genuine.items():
            s = self.series[sid]
            if s.split != "train":
                continue
            for c in CUES:
                for limit in CONTINUITY_LIMITS if c == "continuity" else (None,):
                    name = f"continuity@{limit}" if limit else c
                    rel = self.relative(
                        ctx, c, layout="series", exclude_self_reference=True, continuity_limit=limit or 2.5
                    )
                    if rel is not None:
                        in_series.setdefault(name, []).extend(
                            v for v, ok in zip(rel, ctx.in_lungs, strict=True) if ok and math.isfinite(v)
                        )
                for i in range(len(s.slices)):
                    value = self.single_relative(ctx, c, i, layout="site")
                    if value is not None and ctx.in_lungs[i]:
                        single[c].append(value)
        tails_series = {c: TailModel.fit(v) for c, v in in_series.items() if len(v) >= 10}
        tails_single = {c: TailModel.fit(v) for c, v in single.items() if len(v) >= 10}
        return tails_series, tails_single

    # ------------------------------------------------------------------ relative scores
    def relative(
        self,
        ctx: Context,
        cue: str,
        layout: str = "series",
        exclude_self_reference: bool = False,
        continuity_limit: float = 2.5,
    ) -> np.ndarray | None:
        """Relative scores of every slice in series layout (series median, or key reference if short)."""
        s = self.series[ctx.sid]
        raw = ctx.raw[cue].copy()
        if cue == "continuity" and (s.spacing_mm is None or s.spacing_mm > continuity_limit + 1e-6):
            return None
        lung = raw[ctx.in_lungs & np.isfinite(raw)]
        if len(lung) >= MIN_SERIES_SLICES:
            return raw - float(np.median(lung))
        found = self._lookup(s.key, exclude=ctx.sid if exclude_self_reference else None)
        if found is None:
            return None
        stats = found.cues.get(cue)
        if stats is None or stats.n == 0:
            return None
        return raw - stats.median

    def _lookup(self, key: ReferenceKey, exclude: str | None = None):
        cache = self.__dict__.setdefault("_lookup_cache", {})
        if (key, exclude) not in cache:
            cache[(key, exclude)] = self._lookup_uncached(key, exclude)
        return cache[(key, exclude)]

    def _lookup_uncached(self, key: ReferenceKey, exclude: str | None = None):
        if exclude is None:
            found = self.references.lookup(key)
            return found[0] if found else None
        # leave this series out of its own reference (used when fitting the single-slice tails)
        subset = ReferenceSet()
        for ref in self.references.by_key.values():
            if exclude in ref.series_uids:
                if len(ref.series_uids) == 1:
                    continue
                feats = []
                for sid in ref.series_uids:
                    if sid == exclude:
                        continue
                    ctx = self.genuine[sid]
                    feats += [
                        slice_features(ref.key, sid, True, {c: _finite(ctx.raw[c][i]) for c in CUES})
                        for i in range(len(ctx.in_lungs))
                        if ctx.in_lungs[i]
                    ]
                ref = type(ref).fit(ref.key, feats, ref.source)
            subset.add(ref)
        found = subset.lookup(key)
        return found[0] if found else None

    def single_relative(self, ctx: Context, cue: str, i: int, layout: str = "shipped") -> float | None:
        """Slice i judged alone (None: no reference, or the cue cannot speak for a single slice).

        layout "shipped": against the reference of its scanner key fitted on the TRAIN patients (lookup chain
        of models.reference; most keys here have none, so most slices are not assessed); "site": against a
        reference for exactly its scanner, simulated by the median of the OTHER genuine slices of its own
        series (what a site reference fitted on that scanner's genuine traffic approximates; optimistic,
        since it ignores the spread between series of one scanner)."""
        if cue == "continuity":
            return None  # a single slice has no neighbours
        raw = ctx.raw[cue][i]
        if cue == "copymove":
            raw = self._single_copymove(ctx, i)
        if raw is None or not math.isfinite(raw):
            return None
        if layout == "site":
            genuine = self.genuine[ctx.sid]
            values = (
                genuine.raw[cue]
                if cue != "copymove"
                else np.array([self._single_copymove(genuine, j) or np.nan for j in range(len(genuine.in_lungs))])
            )
            others = [v for j, v in enumerate(values) if j != i and genuine.in_lungs[j] and math.isfinite(v)]
            return float(raw) - float(np.median(others)) if len(others) >= 4 else None
        ref = self._lookup(self.series[ctx.sid].key)
        if ref is None or cue not in ref.cues:
            return None
        return float(raw) - ref.cues[cue].median

    def _single_copymove(self, ctx: Context, i: int) -> float | None:
        cache = self.__dict__.setdefault("_single_cm", {})
        key = (ctx.sid, ctx.oid, i)
        if key not in cache:
            eid = f"t|{ctx.oid}|{i}" if ctx.oid and i in ctx.edited else f"g|{ctx.sid}|{i}"
            kp = load_keypoints(self.scores_dir, eid)
            result = copy_move_scores([kp])[0] if kp is not None else None
            cache[key] = result.score if result is not None else None
        return cache[key]

    # ------------------------------------------------------------------ fused scores
    def fused_series(self, ctx: Context, config: dict[str, Any]) -> tuple[np.ndarray, list[str | None]]:
        """Fused, series-corrected score of every slice (nan: not assessed) and the cue that decided it."""
        n = len(ctx.in_lungs)
        p: dict[str, np.ndarray] = {}
        cache = self.__dict__.setdefault("_p_cache", {})
        for cue in config["cues"]:
            limit = config.get("continuity_limit", 2.5)
            key = (ctx.sid, ctx.oid, cue, limit if cue == "continuity" else None)
            if key not in cache:
                tail = self.tails_series.get(f"continuity@{limit}" if cue == "continuity" else cue)
                rel = self.relative(ctx, cue, continuity_limit=limit)
                cache[key] = (
                    None
                    if tail is None or rel is None
                    else np.array([tail.p_value(v) if math.isfinite(v) else np.nan for v in rel])
                )
            if cache[key] is not None:
                p[cue] = cache[key]
        correction = series_correction(int(ctx.in_lungs.sum()))
        out = np.full(n, np.nan)
        decided: list[str | None] = [None] * n
        if not p:
            return out, decided
        names = list(p)
        matrix = np.stack([p[c] for c in names], axis=1)  # (n, cues)
        matrix[~ctx.in_lungs] = np.nan
        finite = np.isfinite(matrix)
        count = finite.sum(axis=1)
        ok = count > 0
        if config["rule"] == "minp":
            smallest = np.where(finite, matrix, np.inf).min(axis=1)
            combined = np.minimum(1.0, np.maximum(smallest, 1e-12) * np.maximum(count, 1))
        else:
            from scipy.stats import chi2

            logs = np.log(np.maximum(np.where(finite, matrix, 1.0), 1e-12))
            statistic = -2.0 * np.where(finite, logs, 0.0).sum(axis=1)
            combined = np.maximum(chi2.sf(statistic, 2 * np.maximum(count, 1)), 1e-12)
        out[ok] = -np.log10(combined[ok]) - correction
        which = np.argmin(np.where(finite, matrix, np.inf), axis=1)
        for i in np.nonzero(ok)[0]:
            decided[i] = names[int(which[i])]
        return out, decided

    def fused_single(
        self, ctx: Context, i: int, config: dict[str, Any], layout: str = "shipped"
    ) -> tuple[float, str | None]:
        values = {}
        for cue in config["cues"]:
            tail = self.tails_single.get(cue)
            rel = self.single_relative(ctx, cue, i, layout)
            if tail is not None and rel is not None:
                values[cue] = tail.p_value(rel)
        if not values or not ctx.in_lungs[i]:
            return float("nan"), None
        return fused_score(values, config["rule"]), min(values, key=values.get)


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _hit(ctx: Context, i: int, cue: str | None) -> bool:
    if cue is None:
        return False
    peak = ctx.peaks[cue][i]
    if peak is None:
        return False
    y, x = peak
    x0, y0, x1, y1 = ctx.edited[i]
    return bool(x0 - HIT_MARGIN_PX <= x < x1 + HIT_MARGIN_PX and y0 - HIT_MARGIN_PX <= y < y1 + HIT_MARGIN_PX)


def configurations() -> list[dict[str, Any]]:
    out = []
    for r in range(1, len(CUES) + 1):
        for subset in itertools.combinations(CUES, r):
            for rule in ("minp", "fisher"):
                limits = CONTINUITY_LIMITS if "continuity" in subset else (2.5,)
                for limit in limits:
                    out.append({"cues": list(subset), "rule": rule, "continuity_limit": limit})
    return out


def config_name(config: dict[str, Any]) -> str:
    extra = f", continuity <= {config['continuity_limit']} mm" if "continuity" in config["cues"] else ""
    return "+".join(config["cues"]) + f" ({config['rule']}{extra})"


class Scored:
    """Every context scored under one configuration: slice scores per role/family, series maxima."""

    def __init__(self, ev: Evaluation, config: dict[str, Any]) -> None:
        self.ev, self.config = ev, config
        self.genuine: dict[str, tuple[np.ndarray, list]] = {
            sid: ev.fused_series(c, config) for sid, c in ev.genuine.items()
        }
        self.tampered: list[tuple[Context, np.ndarray, list]] = []
        for ctx in ev.tampered:
            scores, decided = ev.fused_series(ctx, config)
            self.tampered.append((ctx, scores, decided))

    def genuine_slices(self, role: str) -> list[float]:
        out = []
        for sid, (scores, _) in self.genuine.items():
            if self.ev.series[sid].role == role:
                out.extend(float(v) for v in scores if math.isfinite(v))
        return out

    def family_slices(self, family: str, role: str) -> tuple[list[float], list[bool], int]:
        """Tampered slices' scores (assessed ones), their hits, and how many were not assessed."""
        values, hits, missing = [], [], 0
        for ctx, scores, decided in self.tampered:
            if ctx.family != family or self.ev.series[ctx.sid].role != role:
                continue
            for i in ctx.edited:
                if math.isfinite(scores[i]):
                    values.append(float(scores[i]))
                    hits.append(_hit(ctx, i, decided[i]))
                else:
                    missing += 1
        return values, hits, missing

    def mean_auc(self, families: Sequence[str], role: str) -> float:
        genuine = self.genuine_slices(role)
        aucs = [roc_auc(genuine, self.family_slices(f, role)[0]) for f in families]
        aucs = [a for a in aucs if math.isfinite(a)]
        return float(np.mean(aucs)) if aucs else float("nan")


def select_thresholds(scored: Scored) -> dict[str, Any]:
    """Operating thresholds from genuine SELECTION series only: the statistical defaults (series-corrected
    p 0.1 / 0.01), raised until no genuine selection series reads REVIEW / SUSPICIOUS above the targets."""
    maxima = [
        float(np.nanmax(s))
        for sid, (s, _) in scored.genuine.items()
        if scored.ev.series[sid].role == "select" and np.isfinite(s).any()
    ]
    slices = scored.genuine_slices("select")
    review = DEFAULT_T_REVIEW
    # targets: REVIEW <= 1 in 10 series, slices flagged <= 1 %; SUSPICIOUS <= 1 in 20 series
    while (np.mean(np.asarray(maxima) >= review) > 0.1 or np.mean(np.asarray(slices) >= review) > 0.01) and review < 12:
        review += 0.1
    suspicious = max(DEFAULT_T_SUSPICIOUS, review + 1.0)
    while np.mean(np.asarray(maxima) >= suspicious) > 0.05 and suspicious < 14:
        suspicious += 0.1
    return {
        "review": round(review, 2),
        "suspicious": round(suspicious, 2),
        "n_series": len(maxima),
        "n_slices": len(slices),
    }


def single_threshold(ev: Evaluation, config: dict[str, Any], review: float) -> float:
    """The REVIEW threshold for a slice judged alone, on genuine SELECTION slices only (site-reference layout):
    at least the in-series one, raised until at most 1 % of them are flagged."""
    values = []
    for sid, ctx in ev.genuine.items():
        if ev.series[sid].role == "select":
            for i, ok in enumerate(ctx.in_lungs):
                if ok:
                    value = ev.fused_single(ctx, i, config, "site")[0]
                    if math.isfinite(value):
                        values.append(value)
    bar = review
    while values and np.mean(np.asarray(values) >= bar) > 0.01 and bar < 12:
        bar += 0.1
    return round(bar, 2)


def best_config(select_auc: dict[str, dict[str, float]], families: Sequence[str], excluded_group: str | None) -> str:
    """The configuration with the best mean SELECTION-patient AUC over the families outside `excluded_group`
    (a family's 2-D and 3-D forms share a group, models.forensics.lofo_build.FAMILY_OF): the held-out
    family's own AUCs are never read."""
    keep = [f for f in families if excluded_group is None or FAMILY_OF[f] != excluded_group]
    if not keep:
        raise ValueError("no family left to choose on")
    return max(select_auc, key=lambda name: float(np.nanmean([select_auc[name][f] for f in keep])))


def _auc_block(genuine: list[float], tampered: list[float], hits: list[bool], missing: int, threshold: float) -> dict:
    auc = roc_auc(genuine, tampered)
    ci = bootstrap_auc_ci(genuine, tampered, n=400) if tampered and genuine else (float("nan"), float("nan"))
    flagged = [v >= threshold for v in tampered]
    flagged_hits = [h for h, f in zip(hits, flagged, strict=True) if f]
    return {
        "n": len(tampered),
        "n_not_assessed": missing,
        "n_genuine": len(genuine),
        "auc": _r(auc),
        "auc_ci95": [_r(ci[0]), _r(ci[1])],
        "tpr_at_review": _r(float(np.mean(flagged))) if tampered else None,
        "tpr_ci95": wilson(int(sum(flagged)), len(flagged)),
        "hit_rate_flagged": _r(float(np.mean(flagged_hits))) if flagged_hits else None,
        "n_flagged": len(flagged_hits),
        "hit_rate_all": _r(float(np.mean(hits))) if hits else None,
    }


def _r(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def families_in(ev: Evaluation) -> list[str]:
    return sorted({c.family for c in ev.tampered})


def series_verdicts(scored: Scored, thresholds: dict[str, Any], role: str) -> dict[str, Any]:
    """Genuine series and tampered series (one object each) read SUSPICIOUS / at least REVIEW."""

    def verdict(maximum: float) -> str:
        if not math.isfinite(maximum):
            return "not_assessed"
        if maximum >= thresholds["suspicious"]:
            return "suspicious"
        return "review" if maximum >= thresholds["review"] else "no_evidence"

    genuine = [
        verdict(float(np.nanmax(s)) if np.isfinite(s).any() else float("nan"))
        for sid, (s, _) in scored.genuine.items()
        if scored.ev.series[sid].role == role
    ]
    out: dict[str, Any] = {"genuine": _verdict_counts(genuine), "families": {}}
    by_family: dict[str, list[str]] = {}
    for ctx, scores, _ in scored.tampered:
        if scored.ev.series[ctx.sid].role == role:
            by_family.setdefault(ctx.family, []).append(
                verdict(float(np.nanmax(scores)) if np.isfinite(scores).any() else float("nan"))
            )
    for family, verdicts in sorted(by_family.items()):
        out["families"][family] = _verdict_counts(verdicts)
    return out


def _verdict_counts(verdicts: list[str]) -> dict[str, Any]:
    n = len(verdicts)
    suspicious = sum(v == "suspicious" for v in verdicts)
    review_or_more = sum(v in ("suspicious", "review") for v in verdicts)
    return {
        "n": n,
        "suspicious": suspicious,
        "suspicious_ci95": wilson(suspicious, n),
        "review_only": review_or_more - suspicious,
        "at_least_review": review_or_more,
        "at_least_review_ci95": wilson(review_or_more, n),
        "not_assessed": sum(v == "not_assessed" for v in verdicts),
    }


def genuine_flags_by_key(scored: Scored, threshold: float, layout: str = "series") -> dict[str, Any]:
    """layout: "series", or a single-slice layout of Evaluation.single_relative ("shipped" / "site")."""
    """Genuine slices over the REVIEW threshold per scanner key (both roles), in-series or single-slice."""
    out: dict[str, dict[str, Any]] = {}
    for sid, ctx in scored.ev.genuine.items():
        s = scored.ev.series[sid]
        label = s.key.label() if s.key.known else "no DICOM header (pyradiomics NRRD)"
        entry = out.setdefault(label, {"n": 0, "flagged": 0, "not_assessed": 0, "patients": set()})
        entry["patients"].add(f"{s.patient} ({s.split})")
        values = (
            scored.genuine[sid][0]
            if layout == "series"
            else np.array(
                [scored.ev.fused_single(ctx, i, _single(scored.config), layout)[0] for i in range(len(ctx.in_lungs))]
            )
        )
        for i, ok in enumerate(ctx.in_lungs):
            if not ok:
                continue
            if not math.isfinite(values[i]):
                entry["not_assessed"] += 1
                continue
            entry["n"] += 1
            entry["flagged"] += int(values[i] >= threshold)
    for entry in out.values():
        entry["patients"] = sorted(entry["patients"])
        entry["rate"] = _r(entry["flagged"] / entry["n"]) if entry["n"] else None
        entry["rate_ci95"] = wilson(entry["flagged"], entry["n"])
    return out


def _single(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration as it applies to a single slice (no neighbours: no continuity cue)."""
    return {**config, "cues": [c for c in config["cues"] if c != "continuity"] or ["btd"]}


def single_slice_block(
    ev: Evaluation, config: dict[str, Any], threshold: float, role: str, layout: str = "shipped"
) -> dict[str, Any]:
    genuine, not_assessed = [], 0
    for sid, ctx in ev.genuine.items():
        if ev.series[sid].role != role:
            continue
        for i, ok in enumerate(ctx.in_lungs):
            if ok:
                value = ev.fused_single(ctx, i, config, layout)[0]
                if math.isfinite(value):
                    genuine.append(value)
                else:
                    not_assessed += 1
    out: dict[str, Any] = {
        "genuine": {
            "n": len(genuine),
            "not_assessed": not_assessed,
            "flagged": int(sum(v >= threshold for v in genuine)),
            "flagged_ci95": wilson(int(sum(v >= threshold for v in genuine)), len(genuine)),
        },
        "families": {},
    }
    for family in families_in(ev):
        values, hits, missing = [], [], 0
        for ctx in ev.tampered:
            if ctx.family != family or ev.series[ctx.sid].role != role:
                continue
            for i in ctx.edited:
                value, cue = ev.fused_single(ctx, i, config, layout)
                if math.isfinite(value):
                    values.append(value)
                    hits.append(_hit(ctx, i, cue))
                else:
                    missing += 1
        out["families"][family] = _auc_block(genuine, values, hits, missing, threshold)
    return out


def load_evaluation(bench_dir: Path, scores_dir: Path, cache: Path | None = None) -> Evaluation:
    """The Evaluation (a few minutes to build: copy-move search over every series), pickled in `cache`."""
    import pickle

    if cache is not None and Path(cache).is_file():
        return pickle.loads(Path(cache).read_bytes())
    ev = Evaluation(bench_dir, scores_dir)
    if cache is not None:
        Path(cache).write_bytes(pickle.dumps(ev))
    return ev


def run(bench_dir: Path, scores_dir: Path, out_dir: Path, cache: Path | None = None) -> dict[str, Any]:
    """The whole evaluation; writes results.json to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = load_evaluation(bench_dir, scores_dir, cache)
    ev.__dict__.pop("_lookup_cache", None)
    ev.__dict__.pop("_p_cache", None)
    ev.tails_series, ev.tails_single = ev._fit_tails()  # cheap; always with the current code
    families = families_in(ev)
    sorted({FAMILY_OF[f] for f in families})
    configs = configurations()
    scored = {config_name(c): Scored(ev, c) for c in configs}
    select_auc = {name: {f: s.mean_auc([f], "select") for f in families} for name, s in scored.items()}

    def best(excluded_group: str | None) -> str:
        return best_config(select_auc, families, excluded_group)

    shipped = best(None)
    shipped_scored = scored[shipped]
    thresholds = select_thresholds(shipped_scored)
    results: dict[str, Any] = {
        "shipped_config": shipped_scored.config,
        "shipped_name": shipped,
        "thresholds": thresholds,
        "tails_in_series": {c: t.to_dict() for c, t in ev.tails_series.items()},
        "tails_single": {c: t.to_dict() for c, t in ev.tails_single.items()},
        "references": ev.references.to_dict(),
        "lofo": {},
        "shipped_test": {},
        "cue_alone": {},
        "n_series": {r: sum(1 for s in ev.series.values() if s.role == r) for r in ("select", "test")},
    }
    for family in families:
        group = FAMILY_OF[family]
        chosen = best(group)
        s = scored[chosen]
        t = select_thresholds(s)
        values, hits, missing = s.family_slices(family, "test")
        results["lofo"][family] = {
            "config": chosen,
            "thresholds": t,
            **_auc_block(s.genuine_slices("test"), values, hits, missing, t["review"]),
        }
        values, hits, missing = shipped_scored.family_slices(family, "test")
        results["shipped_test"][family] = _auc_block(
            shipped_scored.genuine_slices("test"), values, hits, missing, thresholds["review"]
        )
    for cue in CUES:
        for name, s in scored.items():
            if s.config["cues"] == [cue] and s.config["rule"] == "minp":
                results["cue_alone"][name] = {
                    role: {f: _r(roc_auc(s.genuine_slices(role), s.family_slices(f, role)[0])) for f in families}
                    for role in ("select", "test")
                }
    results["select_auc_by_config"] = {name: {f: _r(v) for f, v in aucs.items()} for name, aucs in select_auc.items()}
    results["series_verdicts"] = {
        role: series_verdicts(shipped_scored, thresholds, role) for role in ("select", "test")
    }
    results["genuine_by_key_in_series"] = genuine_flags_by_key(shipped_scored, thresholds["review"], "series")
    single_config = _single(shipped_scored.config)
    thresholds["single_review"] = single_threshold(ev, single_config, thresholds["review"])
    single_bar = thresholds["single_review"]
    for name, layout in (("single_slice", "shipped"), ("single_slice_site", "site")):
        results[name] = {
            role: single_slice_block(ev, single_config, single_bar, role, layout) for role in ("select", "test")
        }
    results["genuine_by_key_single"] = genuine_flags_by_key(shipped_scored, single_bar, "shipped")
    results["genuine_by_key_single_site"] = genuine_flags_by_key(shipped_scored, single_bar, "site")
    results["genuine_slices_flagged"] = {
        role: {
            "n": len(g),
            "flagged": int(sum(v >= thresholds["review"] for v in g)),
            "ci95": wilson(int(sum(v >= thresholds["review"] for v in g)), len(g)),
        }
        for role in ("select", "test")
        for g in [shipped_scored.genuine_slices(role)]
    }
    results["timing_seconds_per_slice"] = _timing(ev)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    return results


def _timing(ev: Evaluation) -> dict[str, Any]:
    per: dict[str, list[float]] = {}
    for entry in ev.scores.values():
        for cue, seconds in (entry.get("seconds") or {}).items():
            if seconds > 0:
                per.setdefault(cue, []).append(seconds)
    return {
        cue: {"median": _r(float(np.median(v))), "p90": _r(float(np.quantile(v, 0.9))), "n": len(v)}
        for cue, v in per.items()
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bench_dir", type=Path)
    parser.add_argument("--scores", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None, help="pickle of the loaded evaluation (reused if present)")
    args = parser.parse_args()
    from models.forensics.lofo_report import markdown

    result = run(args.bench_dir, args.scores, args.out, args.cache)
    (args.out / "table.md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in ("shipped_name", "thresholds")}, indent=1))
