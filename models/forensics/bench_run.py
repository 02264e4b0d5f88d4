"""`btd bench run`: every detector on the benchmark, at patch level and at slice level (location unknown).

Protocols:
- patch level (the BTD paper's): mean r^2 of the raw residual in a 64 px patch centred on the tampered
  region, against the same patch of the genuine slice it came from;
- slice level (the service's job): the slice score of the anomaly map over the whole slice, genuine
  held-out slices against tampered ones, per method; TPR at 1 % and 5 % FPR; bootstrap 95 % CI of the AUC;
- localisation: the anomaly map's maximum lies within 8 px of the ground-truth box;
- operating point: the threshold that gives 5 % FPR on genuine TRAINING slices (calibration half), applied
  to the held-out slices: its real FPR and the TPR per method.

The anomaly model's reference statistics are fitted per detector on genuine training slices (the other
half), never on a held-out patient. Residual maps are cached (float16) so that ablations of the anomaly
model cost no model passes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.anomaly import AnomalyModel, SliceMap
from models.corpus import DEFAULT_TEST_PATIENTS, CorpusSlice, discover, split_by_patient
from models.forensics.bench import fixture_slices, load_item, read_manifest
from models.forensics.metrics import bootstrap_auc_ci, plot_rocs, roc_auc, threshold_at_fpr, tpr_at_fpr
from models.forensics.neighbours import NeighbourResolver, sphere_key
from models.lungmask import has_lungs

log = logging.getLogger(__name__)

PATCH = 64
HIT_MARGIN_PX = 8
OPERATING_FPR = 0.05

# The ablation ladder: each step adds one lever to the one before (docs/bench/forensics.md).
_TISSUE = dict(normalise=True, two_sided=False, lung_only=True, per_slice=False)
_NEIGHBOURS = dict(neighbour_weight=0.5, neighbour_reduce="max", neighbour_reach_px=15)
VARIANTS: dict[str, dict[str, Any]] = {
    "A raw tile max (FINDINGS protocol)": dict(
        normalise=False, two_sided=False, lung_only=False, per_slice=False, smoothing_px=PATCH, region_px=1
    ),
    "B + lung mask": dict(
        normalise=False, two_sided=False, lung_only=True, per_slice=False, smoothing_px=PATCH, region_px=1
    ),
    "C + tissue normalisation, one-sided": dict(_TISSUE),
    "D + two-sided": dict(normalise=True, two_sided=True, lung_only=True, per_slice=False),
    "E + two-sided + per-slice normalisation": dict(normalise=True, two_sided=True, lung_only=True, per_slice=True),
    "F one-sided + per-slice normalisation": dict(normalise=True, two_sided=False, lung_only=True, per_slice=True),
    "G C + neighbouring-slice consistency": dict(_TISSUE, **_NEIGHBOURS),
    "H C + series-relative scores (default)": dict(_TISSUE, series_relative=True),
    "I H + neighbouring-slice consistency": dict(_TISSUE, series_relative=True, **_NEIGHBOURS),
}
DEFAULT_VARIANT = "H C + series-relative scores (default)"


def reference_slices(
    n: int = 60, seed: int = 0, test_patients: Sequence[str] = DEFAULT_TEST_PATIENTS
) -> tuple[list[CorpusSlice], list[CorpusSlice]]:
    """Genuine TRAINING slices with lungs, spread over patients, split into (fit half, calibration half)."""
    train, _ = split_by_patient(discover(), test_patients)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    by_patient: dict[str, list[CorpusSlice]] = {}
    for index in order:
        by_patient.setdefault(train[int(index)].patient, []).append(train[int(index)])
    chosen: list[CorpusSlice] = []
    queues = list(by_patient.values())
    while len(chosen) < n and any(queues):
        for queue in queues:
            while queue and len(chosen) < n:
                item = queue.pop()
                if has_lungs(item.hu()):
                    chosen.append(item)
                    break
    return chosen[0::2], chosen[1::2]


class ResidualCache:
    """Residual maps per detector and item id, on disk as float16."""

    def __init__(self, root: Path, detector: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.dir = Path(root) / detector
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fn = fn

    def get(self, key: str, hu_loader: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.dir / f"{key.replace('/', '_')}.npy"
        if path.is_file():
            return np.load(path).astype(np.float32)
        residual = self.fn(hu_loader()).astype(np.float32)
        np.save(path, residual.astype(np.float16))
        return residual


def _box_patch(box: Sequence[int], shape: tuple[int, int]) -> tuple[slice, slice]:
    x0, y0, x1, y1 = box
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top = int(np.clip(cy - PATCH // 2, 0, shape[0] - PATCH))
    left = int(np.clip(cx - PATCH // 2, 0, shape[1] - PATCH))
    return slice(top, top + PATCH), slice(left, left + PATCH)


def _hit(amap: np.ndarray, box: Sequence[int]) -> bool:
    y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
    x0, y0, x1, y1 = box
    return bool(x0 - HIT_MARGIN_PX <= x < x1 + HIT_MARGIN_PX and y0 - HIT_MARGIN_PX <= y < y1 + HIT_MARGIN_PX)


def _method_metrics(genuine: list[float], tampered: list[float], hits: list[bool], threshold: float) -> dict:
    low, high = bootstrap_auc_ci(genuine, tampered, n=500)
    return {
        "n": len(tampered),
        "auc": roc_auc(genuine, tampered),
        "auc_ci95": [low, high],
        "tpr_at_1pct_fpr": tpr_at_fpr(genuine, tampered, 0.01),
        "tpr_at_5pct_fpr": tpr_at_fpr(genuine, tampered, 0.05),
        "hit_rate": float(np.mean(hits)) if hits else float("nan"),
        "tpr_at_operating_threshold": float(np.mean(np.asarray(tampered) > threshold)) if tampered else float("nan"),
    }


class SliceContexts:
    """Residual, HU and HU-derived features per cache key, loaded once and shared by every variant."""

    def __init__(self, cache: ResidualCache, feature_model: AnomalyModel) -> None:
        self.cache = cache
        self.feature_model = feature_model
        self.data: dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = {}

    def get(self, key: str, hu_loader: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
        if key not in self.data:
            hu = hu_loader()
            self.data[key] = (self.cache.get(key, lambda: hu), hu, self.feature_model.features(hu))
        return self.data[key]


class VariantMaps:
    """One variant's slice maps, each computed once: a slice is the neighbour of two others."""

    def __init__(
        self,
        model: AnomalyModel,
        contexts: SliceContexts,
        loader: Callable[[str, CorpusSlice | None], Callable[[], np.ndarray]],
    ) -> None:
        self.model = model
        self.contexts = contexts
        self.loader = loader
        self.maps: dict[str, SliceMap] = {}

    def slice_map(self, key: str, corpus_slice: CorpusSlice | None) -> SliceMap:
        if key not in self.maps:
            self.maps[key] = self.model.slice_map(*self.contexts.get(key, self.loader(key, corpus_slice)))
        return self.maps[key]

    def anomaly_map_of(
        self, key: str, corpus_slice: CorpusSlice | None, around: list[tuple[str, CorpusSlice] | None]
    ) -> np.ndarray:
        self.slice_map(key, corpus_slice)
        return self.anomaly_map(key, around)

    def anomaly_map(self, key: str, around: list[tuple[str, CorpusSlice] | None]) -> np.ndarray:
        own = self.slice_map(key, None)
        if self.model.neighbour_weight <= 0:
            return self.model.finish(own)
        return self.model.finish(own, [self.slice_map(*n) if n is not None else None for n in around])


def _series_key(item: CorpusSlice) -> tuple[str, str]:
    return (item.patient, item.series_uid or item.path)


def series_relative_scores(
    model: AnomalyModel,
    mapper: VariantMaps,
    calib: list[tuple[str, CorpusSlice, list]],
    calib_scores: list[float],
    items: list[dict[str, Any]],
    raw: dict[str, float],
    series_of: Callable[[str], tuple[str, str]],
    resolver: NeighbourResolver,
    slices_by_series: dict[tuple[str, str], list[CorpusSlice]],
) -> tuple[AnomalyModel, list[float], dict[str, float], dict[str, float]]:
    """Scores relative to their series, as the detector computes them (AnomalyModel.series_offset).

    The reference median comes from the calibration slices; a calibration slice's series median from every
    lung slice of its (training) series; a benchmark slice's from the genuine lung slices of its series, the
    slice it was made from replaced by the tampered one (a 2-D attacker changes that one slice).
    Returns (the model with its reference median, calibration scores, benchmark scores, and the maximum
    relative score of every calibration series over ALL its lung slices: what the series threshold needs).
    """
    lung_calib = [score for (key, _, _), score in zip(calib, calib_scores, strict=True) if mapper.maps[key].in_lungs]
    model = model.variant(reference_median=float(np.median(lung_calib or calib_scores)))
    member_scores: dict[tuple[str, str], list[float]] = {}
    for series in {series_of(corpus_slice.key) for _, corpus_slice, _ in calib}:
        for member in slices_by_series.get(series, []):
            key = f"ref-{member.key}"
            amap = mapper.anomaly_map_of(key, member, resolver.for_slice(member))
            if mapper.maps[key].in_lungs:
                member_scores.setdefault(series, []).append(model.slice_score(amap))
    calib_adjusted = [
        score - model.series_offset(member_scores.get(series_of(corpus_slice.key), []))
        for (_, corpus_slice, _), score in zip(calib, calib_scores, strict=True)
    ]
    series_maxima = {
        "/".join(series): max(members) - model.series_offset(members) for series, members in member_scores.items()
    }
    for (_, corpus_slice, _), score in zip(calib, calib_adjusted, strict=True):
        key = "/".join(series_of(corpus_slice.key))  # a series without lung slices: its calibration slices
        series_maxima[key] = max(series_maxima.get(key, -np.inf), score)
    genuine_by_series: dict[tuple[str, str], dict[str, float]] = {}
    for item in items:
        if item["label"] == 0 and mapper.maps[item["id"]].in_lungs:
            genuine_by_series.setdefault(series_of(item["slice_key"]), {})[item["id"]] = raw[item["id"]]
    adjusted: dict[str, float] = {}
    for item in items:
        siblings = dict(genuine_by_series.get(series_of(item["slice_key"]), {}))
        siblings.pop(item["genuine_id"], None)
        lung_scores = list(siblings.values())
        if mapper.maps[item["id"]].in_lungs:
            lung_scores.append(raw[item["id"]])
        adjusted[item["id"]] = raw[item["id"]] - model.series_offset(lung_scores)
    return model, calib_adjusted, adjusted, series_maxima


def series_level(
    items: list[dict[str, Any]],
    by_item: dict[str, float],
    series_of: Callable[[str], tuple[str, str]],
    calibration_series: dict[str, float],
    slice_threshold: float | None = None,
) -> dict[str, Any]:
    """Series level, location unknown: a series scores the maximum of its slices. A tampered series is a
    genuine held-out series with the tampered slice in place of the one it was made from (3-D spheres: one
    series per sphere); genuine series are the held-out series themselves. Few genuine series exist here:
    read `n_genuine_series` before the AUC.

    Two bars, as the SR reports them: above the series threshold the study reads SUSPICIOUS; above only the
    slice threshold it reads REVIEW (a flagged slice in a study under its threshold)."""
    genuine: dict[tuple[str, str], dict[str, float]] = {}
    for item in items:
        if item["label"] == 0:
            genuine.setdefault(series_of(item["slice_key"]), {})[item["id"]] = by_item[item["id"]]
    genuine_max = [max(scores.values()) for scores in genuine.values()]
    threshold = threshold_at_fpr(list(calibration_series.values()), OPERATING_FPR) if calibration_series else None
    tampered: dict[str, dict[Any, float]] = {}
    for item in items:
        if item["label"] != 1:
            continue
        series = series_of(item["slice_key"])
        key = (series, sphere_key(item)) if item["method"] == "inject-3d" else item["id"]
        others = {k: v for k, v in genuine.get(series, {}).items() if k != item["genuine_id"]}
        current = tampered.setdefault(item["method"], {}).get(key, max(others.values(), default=-np.inf))
        tampered[item["method"]][key] = max(current, by_item[item["id"]])
    out: dict[str, Any] = {
        "n_genuine_series": len(genuine_max),
        "threshold": threshold,
        "genuine_series_flagged": int(sum(m > threshold for m in genuine_max)) if threshold is not None else None,
        "slice_threshold": slice_threshold,
        "genuine_series_with_a_flagged_slice": (
            int(sum(m > slice_threshold for m in genuine_max)) if slice_threshold is not None else None
        ),
        "methods": {},
    }
    for method, maxima in tampered.items():
        values = list(maxima.values())
        out["methods"][method] = {
            "n": len(values),
            "auc": roc_auc(genuine_max, values),
            "tpr_at_operating_threshold": (
                float(np.mean(np.asarray(values) > threshold)) if threshold is not None else None
            ),
            "with_a_flagged_slice": (
                float(np.mean(np.asarray(values) > slice_threshold)) if slice_threshold is not None else None
            ),
        }
    return out


def evaluate_detector(
    bench_dir: Path,
    items: list[dict[str, Any]],
    cache: ResidualCache,
    fit_slices: list[CorpusSlice],
    calib_slices: list[CorpusSlice],
    variants: dict[str, dict[str, Any]],
    base: AnomalyModel | None = None,
    slices: list[CorpusSlice] | None = None,
) -> dict[str, Any]:
    """Metrics of one detector for each anomaly-model variant, plus the patch-level (paper) protocol.

    slices: every corpus slice (for the neighbours of benchmark and calibration slices; default: the corpus
    and the held-out fixtures). A variant with neighbour_weight > 0 judges each slice against them.
    """
    feature_model = base or AnomalyModel()
    contexts = SliceContexts(cache, feature_model)
    by_item_id = {item["id"]: item for item in items}

    def loader(key: str, corpus_slice: CorpusSlice | None) -> Callable[[], np.ndarray]:
        if key in by_item_id:
            return lambda: load_item(bench_dir, by_item_id[key])[0]
        if corpus_slice is not None:
            return corpus_slice.hu

        def unknown() -> np.ndarray:
            raise KeyError(f"no pixels known for {key}")

        return unknown

    all_slices = slices if slices is not None else discover() + fixture_slices()
    resolver = NeighbourResolver(items, all_slices)
    corpus_by_key = {s.key: s for s in all_slices}
    slices_by_series: dict[tuple[str, str], list[CorpusSlice]] = {}
    for corpus_slice in all_slices:
        slices_by_series.setdefault(_series_key(corpus_slice), []).append(corpus_slice)

    def series_of(slice_key: str) -> tuple[str, str]:
        known = corpus_by_key.get(slice_key)
        return _series_key(known) if known is not None else ("", slice_key)

    fit_pairs = [contexts.get(f"ref-{s.key}", s.hu) for s in fit_slices]
    calib = [(f"ref-{s.key}", s, resolver.for_slice(s)) for s in calib_slices]
    bench = [(item, item["id"], None, resolver.for_item(item)) for item in items]
    for key, corpus_slice, _ in calib:
        contexts.get(key, corpus_slice.hu)
    for _item, key, _, _ in bench:
        contexts.get(key, loader(key, None))

    # Patch level, the paper's protocol: raw mean r^2 at the tampered location vs the same place, genuine.
    patch: dict[str, Any] = {}
    methods = sorted({item["method"] for item in items if item["label"] == 1})
    for method in methods:
        negatives, positives = [], []
        for item, key, _, _ in bench:
            if item["method"] != method:
                continue
            residual = contexts.data[key][0]
            rows, cols = _box_patch(item["box"], residual.shape)
            genuine_residual = contexts.data[item["genuine_id"]][0]
            positives.append(float(np.mean(residual[rows, cols] ** 2)))
            negatives.append(float(np.mean(genuine_residual[rows, cols] ** 2)))
        patch[method] = {"n": len(positives), "auc": roc_auc(negatives, positives)}

    results: dict[str, Any] = {"patch_level": patch, "variants": {}}
    base = base or AnomalyModel()
    for name, settings in variants.items():
        model = base.variant(**settings)
        if model.normalise:
            model = model.fit_reference(fit_pairs)
        mapper = VariantMaps(model, contexts, loader)
        anomaly_map = mapper.anomaly_map

        calib_scores = [model.slice_score(anomaly_map(key, around)) for key, _, around in calib]
        raw: dict[str, float] = {}
        hits: dict[str, list[bool]] = {}
        for item, key, _, around in bench:
            amap = anomaly_map(key, around)
            raw[item["id"]] = model.slice_score(amap)
            if item["label"] == 1:
                hits.setdefault(item["method"], []).append(_hit(amap, item["box"]))
        calibration_series: dict[str, float] = {}
        if model.series_relative:
            model, calib_scores, by_item, calibration_series = series_relative_scores(
                model, mapper, calib, calib_scores, items, raw, series_of, resolver, slices_by_series
            )
        else:
            by_item = raw
            for (_, corpus_slice, _), score in zip(calib, calib_scores, strict=True):
                key = "/".join(series_of(corpus_slice.key))
                calibration_series[key] = max(calibration_series.get(key, -np.inf), score)
        threshold = threshold_at_fpr(calib_scores, OPERATING_FPR)
        scores: dict[str, list[float]] = {}
        for item in items:
            scores.setdefault(item["method"], []).append(by_item[item["id"]])
        genuine = scores.get("genuine", [])
        per_method = {m: _method_metrics(genuine, scores[m], hits.get(m, []), threshold) for m in methods}
        for m in methods:
            # Matched negatives: only the genuine slices the tampered ones were made from, so that a method
            # whose base slices happen to come from a noisier scanner cannot score by composition alone.
            bases = sorted({i["genuine_id"] for i in items if i["method"] == m})
            per_method[m]["auc_matched"] = roc_auc([by_item[b] for b in bases if b in by_item], scores[m])
        results["variants"][name] = {
            "threshold": threshold,
            "calibration_scores": {s.key: score for s, score in zip(calib_slices, calib_scores, strict=True)},
            "calibration_series_scores": calibration_series,
            "series_level": series_level(items, by_item, series_of, calibration_series, threshold),
            "held_out_fpr_at_threshold": float(np.mean(np.asarray(genuine) > threshold)) if genuine else None,
            "n_genuine": len(genuine),
            "methods": per_method,
            "scores": scores,
            "model": model.to_dict(),
        }
    return results


def run_benchmark(
    bench_dir: Path,
    model_path: Path,
    out_dir: Path,
    detectors: Sequence[str] = ("btd", "untrained", "anoddpm", "highpass"),
    published: Path | None = None,
    mode: str | None = None,
    n_reference: int = 60,
    variants: dict[str, dict[str, Any]] | None = None,
    limit: int | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Evaluate; write results.json and one ROC PNG per detector to out_dir; return the results."""
    import torch

    from models.forensics.baselines import build_detectors

    # One thread: on a shared CPU, two spin-waiting threads were 10x slower than one (training measured).
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = read_manifest(bench_dir)
    if limit:
        # A quick look: at most `limit` items per method, tampered ones only on the genuine slices kept.
        kept: dict[str, int] = {}
        chosen = []
        for item in items:
            if kept.get(item["method"], 0) < limit:
                kept[item["method"]] = kept.get(item["method"], 0) + 1
                chosen.append(item)
        genuine_ids = {i["id"] for i in chosen if i["label"] == 0}
        items = [i for i in chosen if i["label"] == 0 or i["genuine_id"] in genuine_ids] or chosen
    fit_slices, calib_slices = reference_slices(n_reference)
    functions = build_detectors(Path(model_path), list(detectors), published, mode)
    previous_path = out_dir / "results.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    results: dict[str, Any] = {
        "bench_dir": str(bench_dir),
        "model": str(model_path),
        "mode": mode,
        "n_items": len(items),
        "reference_slices": {"fit": len(fit_slices), "calibration": len(calib_slices)},
        # Detectors evaluated earlier into the same folder are kept (run the slow ones separately).
        "detectors": {k: v for k, v in previous.get("detectors", {}).items() if k not in functions},
    }
    for name, fn in functions.items():
        started = time.monotonic()
        cache = ResidualCache(out_dir / "cache", name, fn)
        chosen = variants or (VARIANTS if name == "btd" else {DEFAULT_VARIANT: VARIANTS[DEFAULT_VARIANT]})
        detector_results = evaluate_detector(bench_dir, items, cache, fit_slices, calib_slices, chosen)
        detector_results["seconds"] = round(time.monotonic() - started, 1)
        results["detectors"][name] = detector_results
        variant = detector_results["variants"].get(DEFAULT_VARIANT) or next(iter(detector_results["variants"].values()))
        scores = variant["scores"]
        curves = {m: (scores["genuine"], s) for m, s in scores.items() if m != "genuine"}
        plot_rocs(curves, f"{name}: slice level, location unknown", out_dir / f"roc_{name}.png")
        log.info("detector %s done in %.0f s", name, detector_results["seconds"])
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """The results as Markdown: one row per detector x variant x method."""
    lines = [
        "| detector | anomaly map | method | n | slice AUC [95% CI] | slice AUC, matched genuine | TPR@1%FPR | "
        "TPR@5%FPR | hit rate | TPR at op. threshold | held-out FPR at op. threshold | patch AUC (paper protocol) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for detector, data in results["detectors"].items():
        for variant, values in data["variants"].items():
            for method, m in values["methods"].items():
                patch = data["patch_level"].get(method, {}).get("auc", float("nan"))
                lines.append(
                    f"| {detector} | {variant} | {method} | {m['n']} | {m['auc']:.2f} "
                    f"[{m['auc_ci95'][0]:.2f}, {m['auc_ci95'][1]:.2f}] | {m.get('auc_matched', float('nan')):.2f} | "
                    f"{m['tpr_at_1pct_fpr']:.2f} | "
                    f"{m['tpr_at_5pct_fpr']:.2f} | {m['hit_rate']:.2f} | {m['tpr_at_operating_threshold']:.2f} | "
                    f"{values['held_out_fpr_at_threshold']:.2f} | {patch:.2f} |"
                )
    return "\n".join(lines) + "\n"
