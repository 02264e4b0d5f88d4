"""Probes of scoring changes that were measured and NOT shipped (docs/bench/forensics.md, "Removal >= 0.95"
and "Run-to-run spread"), kept so that those negative results can be re-run rather than taken on trust.

Each probe scores a benchmark (built with `btd bench build`) through the same code as `btd bench run`
(models/forensics/bench_run.py), default variant H, and prints one line per setting: slice AUC / AUC against
the tampered slices' own originals, the share caught at the operating threshold and the hit rate per
method, and the FPR of that threshold on the benchmark's genuine slices.

    .venv/bin/python benchmarks/forensic_probes.py model runs/bench-val --model runs/s1443.pt --out runs/p-model
    .venv/bin/python benchmarks/forensic_probes.py timestep runs/bench-val --out runs/p-t --timesteps 2,8
    .venv/bin/python benchmarks/forensic_probes.py background runs/bench-val --out runs/p-bg
    .venv/bin/python benchmarks/forensic_probes.py reference-split runs/bench-val --out runs/p-split

Choose settings on the validation benchmark (training patients) only; see docs/bench/forensics.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

import models.forensics.bench_run as bench_run
from models.anomaly import AnomalyModel
from models.corpus import CorpusSlice, discover
from models.forensics.baselines import _detector_residual, btd_detector, build_detectors
from models.forensics.bench import fixture_slices, load_item, read_manifest
from models.forensics.metrics import roc_auc, threshold_at_fpr

SHIPPED = Path("models/weights/btd-ct-default.pt")
METHOD_ORDER = (
    "inject-noise",
    "inject-smooth",
    "inject-3d",
    "inject-diffusion",
    "remove",
    "remove-diffusion",
    "copy-move",
)


def summary_line(label: str, variant: dict[str, Any]) -> str:
    cells = []
    for method in METHOD_ORDER:
        if method in variant["methods"]:
            m = variant["methods"][method]
            cells.append(
                f"{method} {m['auc']:.3f}/{m['auc_matched']:.3f} "
                f"caught {m['tpr_at_operating_threshold']:.2f} hit {m['hit_rate']:.2f}"
            )
    return f"{label}: FPR {variant['held_out_fpr_at_threshold']:.3f} | " + " | ".join(cells)


def probe_model(bench: Path, out: Path, model: Path) -> None:
    """Another model's weights (a second training run, a fine-tuned one) through variants H and C."""
    variants = {
        "H": bench_run.VARIANTS[bench_run.DEFAULT_VARIANT],
        "C": bench_run.VARIANTS["C + tissue normalisation, one-sided"],
    }
    results = bench_run.run_benchmark(bench, model, out, detectors=("btd",), variants=variants)
    for name, variant in results["detectors"]["btd"]["variants"].items():
        print(summary_line(f"{model.name} {name}", variant), flush=True)


def probe_timestep(bench: Path, out: Path, timesteps: Sequence[int]) -> None:
    """The residual with the image taken as x_t at t = k: the model's noise prediction there (t = 0 is BTD)."""
    items = read_manifest(bench)
    fit, calibration = bench_run.reference_slices(60)
    for k in timesteps:
        detector = btd_detector(SHIPPED)

        def residual_batch(x: torch.Tensor, k: int = k, detector: Any = detector) -> torch.Tensor:
            with torch.inference_mode():
                eps = detector.diffusion.predict_noise(x, k).float()
                return x.float() - detector.diffusion.btd_x_prev(x.float(), eps, 0) if k == 0 else eps

        detector.residual_batch = residual_batch
        cache = bench_run.ResidualCache(out / "cache", f"btd-t{k}", _detector_residual(detector))
        variants = {"H": bench_run.VARIANTS[bench_run.DEFAULT_VARIANT]}
        result = bench_run.evaluate_detector(bench, items, cache, fit, calibration, variants)
        print(summary_line(f"t = {k}", result["variants"]["H"]), flush=True)


def probe_reference_split(bench: Path, out: Path) -> None:
    """The anomaly reference fitted and calibrated on a per-patient-stratified split, and on more slices."""
    original = bench_run.reference_slices

    def stratified(n: int = 60, seed: int = 0, test_patients: Sequence[str] = bench_run.DEFAULT_TEST_PATIENTS):
        fit, calibration = original(n, seed, test_patients)
        drawn = [s for pair in zip(fit, calibration, strict=False) for s in pair] + fit[len(calibration) :]
        by_patient: dict[str, list[CorpusSlice]] = {}
        for item in drawn:
            by_patient.setdefault(item.patient, []).append(item)
        return (
            [s for items in by_patient.values() for s in items[0::2]],
            [s for items in by_patient.values() for s in items[1::2]],
        )

    variants = {"H": bench_run.VARIANTS[bench_run.DEFAULT_VARIANT]}
    for label, split, n in (
        ("stratified, 60", stratified, 60),
        ("stratified, all", stratified, 10_000),
        ("as shipped, all", original, 10_000),
    ):
        bench_run.reference_slices = split
        try:
            results = bench_run.run_benchmark(bench, SHIPPED, out, detectors=("btd",), variants=variants, n_reference=n)
        finally:
            bench_run.reference_slices = original
        print(
            summary_line(
                f"reference {label} {results['reference_slices']}", results["detectors"]["btd"]["variants"]["H"]
            ),
            flush=True,
        )


def probe_background(bench: Path, out: Path) -> None:
    """A per-series background: weight x the per-pixel median (or 75th percentile) of the anomaly maps of the
    series' other lung slices, widened, subtracted before the slice score. Mirrors evaluate_detector and
    series_relative_scores for variant H (weight 0 reproduces H's figures)."""
    items = read_manifest(bench)
    by_id = {item["id"]: item for item in items}
    fit, calibration = bench_run.reference_slices(60)
    cache = bench_run.ResidualCache(out / "cache", "btd", build_detectors(SHIPPED, ["btd"])["btd"])
    contexts = bench_run.SliceContexts(cache, AnomalyModel())

    def loader(key: str, corpus_slice: CorpusSlice | None) -> Callable[[], np.ndarray]:
        if key in by_id:
            return lambda: load_item(bench, by_id[key])[0]
        assert corpus_slice is not None
        return corpus_slice.hu

    corpus = discover() + fixture_slices()
    by_key = {s.key: s for s in corpus}
    members_of: dict[tuple[str, str], list[CorpusSlice]] = {}
    for s in corpus:
        members_of.setdefault(bench_run._series_key(s), []).append(s)

    def series_of(key: str) -> tuple[str, str]:
        known = by_key.get(key)
        return bench_run._series_key(known) if known is not None else ("", key)

    model = AnomalyModel().variant(**bench_run.VARIANTS[bench_run.DEFAULT_VARIANT])
    model = model.fit_reference([contexts.get(f"ref-{s.key}", s.hu) for s in fit])
    mapper = bench_run.VariantMaps(model, contexts, loader)
    maps: dict[str, np.ndarray] = {}

    def amap(key: str, corpus_slice: CorpusSlice | None = None) -> np.ndarray:
        if key not in maps:
            maps[key] = mapper.anomaly_map_of(key, corpus_slice, [])
        return maps[key]

    calibration_keys = [(f"ref-{s.key}", s) for s in calibration]
    calibration_members: dict[tuple[str, str], list[str]] = {}
    for key, s in calibration_keys:
        amap(key, s)
        series = series_of(s.key)
        if series not in calibration_members:
            calibration_members[series] = []
            for member in members_of.get(series, []):
                member_key = f"ref-{member.key}"
                amap(member_key, member)
                if mapper.maps[member_key].in_lungs:
                    calibration_members[series].append(member_key)
    genuine_by_series: dict[tuple[str, str], list[str]] = {}
    for item in items:
        amap(item["id"])
        if item["label"] == 0 and mapper.maps[item["id"]].in_lungs:
            genuine_by_series.setdefault(series_of(item["slice_key"]), []).append(item["id"])

    def background(keys: list[str], reduce: str, reach: int) -> np.ndarray | None:
        if len(keys) < model.series_min_slices:
            return None
        stack = np.stack([np.maximum(maps[k], 0) for k in keys])
        bg = np.median(stack, axis=0) if reduce == "median" else np.percentile(stack, 75, axis=0)
        return ndimage.maximum_filter(bg, size=reach) if reach > 1 else bg

    def scored(key: str, bg: np.ndarray | None, weight: float) -> tuple[float, np.ndarray]:
        adjusted = maps[key] if bg is None or weight == 0 else maps[key] - weight * bg
        adjusted = np.where(mapper.maps[key].search, adjusted, -np.inf)
        return float(adjusted.max()), adjusted

    def siblings(item: dict[str, Any]) -> list[str]:
        return [g for g in genuine_by_series.get(series_of(item["slice_key"]), []) if g != item["genuine_id"]]

    for weight, reduce, reach in (
        (0.0, "median", 1),
        (0.5, "median", 1),
        (1.0, "median", 1),
        (1.0, "median", 9),
        (1.0, "median", 15),
        (1.0, "p75", 9),
        (0.5, "p75", 15),
    ):
        raw_calibration: dict[str, float] = {}
        for members in calibration_members.values():
            bg = background(members, reduce, reach) if weight else None
            for key in members:
                raw_calibration[key] = scored(key, bg, weight)[0]
        for key, _ in calibration_keys:
            raw_calibration.setdefault(key, scored(key, None, weight)[0])
        lung = [raw_calibration[k] for k, _ in calibration_keys if mapper.maps[k].in_lungs]
        relative = model.variant(reference_median=float(np.median(lung)))
        calibration_scores = [
            raw_calibration[k]
            - relative.series_offset([raw_calibration[m] for m in calibration_members.get(series_of(s.key), [])])
            for k, s in calibration_keys
        ]
        threshold = threshold_at_fpr(calibration_scores, bench_run.OPERATING_FPR)
        raw, maps_by_item = {}, {}
        for item in items:
            bg = background(siblings(item), reduce, reach) if weight else None
            raw[item["id"]], maps_by_item[item["id"]] = scored(item["id"], bg, weight)
        scores: dict[str, dict[str, float]] = {}
        hits: dict[str, list[bool]] = {}
        for item in items:
            lung_scores = [raw[g] for g in siblings(item)]
            if mapper.maps[item["id"]].in_lungs:
                lung_scores.append(raw[item["id"]])
            scores.setdefault(item["method"], {})[item["id"]] = raw[item["id"]] - relative.series_offset(lung_scores)
            if item["label"] == 1:
                hits.setdefault(item["method"], []).append(bench_run._hit(maps_by_item[item["id"]], item["box"]))
        genuine = scores["genuine"]
        methods = {}
        for method in METHOD_ORDER:
            if method not in scores:
                continue
            tampered = list(scores[method].values())
            bases = {by_id[i]["genuine_id"] for i in scores[method]}
            methods[method] = {
                "auc": roc_auc(list(genuine.values()), tampered),
                "auc_matched": roc_auc([genuine[b] for b in bases if b in genuine], tampered),
                "tpr_at_operating_threshold": float(np.mean(np.asarray(tampered) > threshold)),
                "hit_rate": float(np.mean(hits[method])),
            }
        fpr = float(np.mean(np.asarray(list(genuine.values())) > threshold))
        variant = {"methods": methods, "held_out_fpr_at_threshold": fpr}
        print(summary_line(f"background weight {weight} {reduce} widened {reach} px", variant), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probe", choices=("model", "timestep", "background", "reference-split"))
    parser.add_argument("bench", type=Path, help="a benchmark folder from `btd bench build`")
    parser.add_argument("--out", type=Path, required=True, help="results and residual cache (per model)")
    parser.add_argument("--model", type=Path, default=SHIPPED, help="the `model` probe's weights")
    parser.add_argument("--timesteps", default="2,8", help="the `timestep` probe's k values")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.probe == "model":
        probe_model(args.bench, args.out, args.model)
    elif args.probe == "timestep":
        probe_timestep(args.bench, args.out, [int(k) for k in args.timesteps.split(",")])
    elif args.probe == "background":
        probe_background(args.bench, args.out)
    else:
        probe_reference_split(args.bench, args.out)


if __name__ == "__main__":
    main()
