"""Ship the default CT model: export the training run's EMA weights, benchmark them, and store the anomaly
reference and the calibration that the benchmark measured into the model's metadata.

Reproduce: ``python -m models.forensics.ship --run runs/btd-ct-default --bench runs/bench
--results runs/bench-results`` (after ``btd bench build --out runs/bench``); ``--keep-weights`` instead of
``--run`` re-benchmarks and re-calibrates the shipped weights without exporting them again. What it writes:
models/weights/btd-ct-default.pt + .json, docs/model-card-loss.png, and results.json/table.md/ROC PNGs.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.corpus import discover
from models.forensics.bench_run import DEFAULT_VARIANT, OPERATING_FPR, markdown_table, run_benchmark
from models.metadata import DEFAULT_MODEL_PATH
from models.training import export_from_checkpoint, read_losses

WEIGHTS = DEFAULT_MODEL_PATH
LOSS_PNG = Path(__file__).resolve().parents[2] / "docs" / "model-card-loss.png"


def plot_loss(run_dir: Path, path: Path) -> Path:
    from models.extras import require

    matplotlib = require("matplotlib", "plotting the training loss")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = read_losses(Path(run_dir) / "loss.jsonl")
    steps = np.array([e["step"] for e in losses])
    values = np.array([e["loss"] for e in losses])
    window = 25
    smooth = np.convolve(values, np.ones(window) / window, mode="valid") if len(values) > window else values
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(steps, values, color="#bbbbbb", linewidth=0.6, label="loss per step")
    ax.plot(steps[len(steps) - len(smooth) :], smooth, color="#1f77b4", label=f"mean of {window} steps")
    ax.set_xlabel("step (batch of 16 patches, 64 x 64)")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def calibration_from_results(btd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(anomaly block, calibration block) of the default variant, from the benchmark's btd results."""
    from models.calibration import calibration_record

    variant = btd["variants"][DEFAULT_VARIANT]
    scores: dict[str, float] = variant["calibration_scores"]
    series: dict[str, float] = dict(variant.get("calibration_series_scores") or {})
    if not series:  # results of an older bench run: group the calibration slices themselves
        by_key = {s.key: s for s in discover()}
        for key, score in scores.items():
            item = by_key.get(key)
            group = f"{item.patient}/{item.series_uid or item.path}" if item else key
            series[group] = max(series.get(group, -np.inf), score)
    record = calibration_record(
        list(scores.values()),
        list(series.values()),
        OPERATING_FPR,
        source=f"{len(scores)} genuine slices of the training patients (calibration half; not used to fit); "
        f"series threshold from the maxima of {len(series)} training series over all their lung slices",
    )
    record["scoring"] = {"mode": "whole", "overlap": None, "skip_air": True}
    anomaly = dict(variant["model"])
    anomaly["region_threshold"] = record["slice_threshold"]
    return anomaly, record


ATTACK_WORDS = {
    "inject-noise": "noise-matched nodule injections",
    "remove": "lesion removals",
    "inject-3d": "3-D nodule injections",
    "inject-diffusion": "diffusion in-painted nodules",
    "copy-move": "real lesions copied from another slice",
}


def performance_from_results(btd: dict[str, Any], date: str) -> dict[str, Any]:
    """The default variant's held-out operating point, as numbers and as one sentence for the SR."""
    variant = btd["variants"][DEFAULT_VARIANT]
    methods = variant["methods"]
    fpr = float(variant["held_out_fpr_at_threshold"])
    attacks = {
        m: {
            "n": methods[m]["n"],
            "auc": round(methods[m]["auc"], 3),
            "tpr": round(methods[m]["tpr_at_operating_threshold"], 3),
        }
        for m in ATTACK_WORDS
        if m in methods
    }
    found = "; ".join(
        f"{round(100 * a['tpr'])} % of {ATTACK_WORDS[m]} (AUC {a['auc']:.2f}, n={a['n']})" for m, a in attacks.items()
    )
    series = variant.get("series_level") or {}
    series_words = ""
    if series.get("methods") and series.get("genuine_series_flagged") is not None:
        caught = "; ".join(
            f"{ATTACK_WORDS[m].replace('injections', 'injection').replace('removals', 'removal')}: "
            f"{round(100 * series['methods'][m]['tpr_at_operating_threshold'])} % SUSPICIOUS, "
            f"{round(100 * (series['methods'][m].get('with_a_flagged_slice') or 0))} % at least REVIEW "
            f"(n={series['methods'][m]['n']})"
            for m in ("inject-noise", "remove")
            if m in series["methods"]
        )
        series_words = (
            f" Study verdict (stricter series threshold; REVIEW = a slice flagged in a study under it): of "
            f"{series['n_genuine_series']} genuine held-out series {series['genuine_series_flagged']} read "
            f"SUSPICIOUS and {series.get('genuine_series_with_a_flagged_slice', 0)} had a flagged slice; series "
            f"with one {caught}."
        )
    summary = (
        f"Measured on held-out patients ({date}, slice level, location unknown, docs/bench/forensics.md): flags "
        f"{100 * fpr:.1f} % of {variant['n_genuine']} genuine slices; finds {found}.{series_words} "
        "No evidence does not mean authentic."
    )
    return {
        "date": date,
        "held_out_fpr": round(fpr, 4),
        "n_genuine": variant["n_genuine"],
        "attacks": attacks,
        "series_level": series,
        "summary": summary,
    }


def ship(run_dir: Path | None, bench_dir: Path, results_dir: Path, detectors: list[str], n_reference: int = 60) -> dict:
    """Export + benchmark + calibrate. With detectors not containing "btd", only adds baselines.

    run_dir None: keep the shipped weights as they are and only re-benchmark and re-calibrate them (a new
    anomaly-model setting; the training run's checkpoints do not survive to a new machine).
    """
    from models.metadata import ModelMetadata

    if "btd" not in detectors:
        results = run_benchmark(bench_dir, WEIGHTS, results_dir, detectors, n_reference=n_reference)
        (Path(results_dir) / "table.md").write_text(markdown_table(results))
        return results
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    if run_dir is not None:
        export_from_checkpoint(run_dir, WEIGHTS)
    results = run_benchmark(bench_dir, WEIGHTS, results_dir, detectors, n_reference=n_reference)
    (Path(results_dir) / "table.md").write_text(markdown_table(results))
    anomaly, calibration = calibration_from_results(results["detectors"]["btd"])
    json_path = WEIGHTS.with_suffix(".json")
    metadata = ModelMetadata.read(json_path)
    metadata.anomaly = anomaly
    metadata.calibration = calibration
    metadata.performance = performance_from_results(results["detectors"]["btd"], calibration["date"][:10])
    metadata.write(json_path)
    if run_dir is not None:
        plot_loss(run_dir, LOSS_PNG)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("runs/btd-ct-default"))
    parser.add_argument(
        "--keep-weights", action="store_true", help="re-benchmark and re-calibrate the shipped weights only"
    )
    parser.add_argument("--bench", type=Path, default=Path("runs/bench"))
    parser.add_argument("--results", type=Path, default=Path("runs/bench-results"))
    parser.add_argument("--detectors", default="btd,anoddpm,untrained,highpass")
    parser.add_argument("--n-reference", type=int, default=60)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = ship(
        None if args.keep_weights else args.run, args.bench, args.results, args.detectors.split(","), args.n_reference
    )
    print(json.dumps({k: v.get("seconds") for k, v in results["detectors"].items()}))


if __name__ == "__main__":
    main()
