"""`btd score`, `btd calibrate` and `btd evaluate` (registered by btd.cli).

Exit codes: 0 = every image was scored; 1 = some items could not be assessed (each named on stderr,
the rest was still scored); 2 = nothing could run (bad model, bad arguments).
Heavy modules (torch) are imported inside the commands, so `btd --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's sub-commands."""
    score = subparsers.add_parser("score", help="score DICOM files or folders for tampering")
    score.add_argument("paths", nargs="+", help="DICOM files or folders (searched recursively)")
    _model_arguments(score)
    score.add_argument("--format", choices=("table", "json", "jsonl"), default="table")
    score.add_argument("--maps", type=Path, help="write each residual map as float32 <SOPInstanceUID>.npy here")
    score.set_defaults(func=run_score)

    calibrate = subparsers.add_parser("calibrate", help="set a model's thresholds from genuine scans")
    calibrate.add_argument("paths", nargs="+", help="genuine DICOM files or folders")
    _model_arguments(calibrate, required=True)
    calibrate.add_argument("--fpr", type=float, default=0.01, help="false-positive rate per slice (default 0.01)")
    calibrate.add_argument("--series-fpr", type=float, help="false-positive rate per series (default: --fpr)")
    calibrate.add_argument("--dry-run", action="store_true", help="print the thresholds, do not write them")
    calibrate.set_defaults(func=run_calibrate)

    evaluate = subparsers.add_parser("evaluate", help="AUC and TPR@FPR on a labelled patch set (authors' CSV)")
    evaluate.add_argument("labels", type=Path, help="CSV with columns path, x, y, type")
    _model_arguments(evaluate)
    evaluate.add_argument("--modality", choices=("CT", "MR"), default="CT")
    evaluate.add_argument("--root", type=Path, help="folder that relative paths start from (default: the CSV's)")
    evaluate.add_argument("--only", help="keep rows whose column of this name is 1 (e.g. CTGAN-CT-injection)")
    evaluate.add_argument("--patch", type=int, help="patch size (default 96 CT, 128 MR)")
    evaluate.add_argument("--roc", type=Path, help="ROC PNG to write (default <CSV name>_roc.png here)")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC interval")
    evaluate.add_argument("--json", action="store_true", help="print the summary as JSON")
    evaluate.set_defaults(func=run_evaluate)


def _model_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--model", type=Path, required=required, help="model .pt (default: the shipped CT model in models/weights)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument(
        "--mode",
        choices=("auto", "tiles", "whole"),
        help="tile the slice or run it whole (default: as calibrated, else auto: tiles for published weights)",
    )
    parser.add_argument("--batch-size", type=int, help="slices per batch (default 2 on CPU, 16 on CUDA)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights of a Trainer checkpoint")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (1 is fastest on a busy 2-core machine: docs/bench/scoring.md)"
    )


def _load_detector(args: argparse.Namespace) -> Any:
    import torch

    from models.checkpoint import CheckpointError
    from models.detector import Detector, DetectorError
    from models.metadata import MetadataError

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)

    try:
        return Detector.load(
            args.model,
            device=args.device,
            use_ema=args.ema,
            mode=args.mode,
            batch_size=args.batch_size,
            precision=args.precision,
        )
    except (CheckpointError, DetectorError, MetadataError, OSError) as exc:
        print(f"error: cannot load the model: {exc}", file=sys.stderr)
        return None


def _progress_bar(total: int, description: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="slice", desc=description, file=sys.stderr, disable=None)


# --- btd score ------------------------------------------------------------------------------------------


def is_failure(instance: Any) -> bool:
    """Could not be scored because of the item itself (an uncalibrated model still gives scores)."""
    return instance.score is None


def instance_record(instance: Any, series: Any) -> dict[str, Any]:
    return {
        "type": "instance",
        "path": instance.path,
        "sop_instance_uid": instance.sop_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid,
        "frame": instance.frame,
        "score": instance.score,
        "verdict": instance.verdict,
        "reason": instance.reason,
        "regions": [
            {"x0": r.x0, "y0": r.y0, "x1": r.x1, "y1": r.y1, "score": r.score, "area_px": r.area_px}
            for r in instance.regions
        ],
    }


def series_record(series: Any) -> dict[str, Any]:
    data = series.to_dict()
    data.pop("instances")
    data["n_instances"] = len(series.instances)
    return {"type": "series", **data}


def _fmt(score: float | None) -> str:
    return "-" if score is None else f"{score:.3f}"


def _write_table(series: Any, out: TextIO) -> None:
    print(
        f"series {series.series_instance_uid or '(none)'}  {series.modality or '?'}  {series.verdict}  "
        f"score {_fmt(series.score)}  assessed {series.n_assessed}/{len(series.instances)}"
        + (f"  ({series.reason})" if series.reason else ""),
        file=out,
    )
    for instance in series.instances:
        name = instance.path or instance.sop_instance_uid
        frame = f"[{instance.frame}]" if instance.frame else ""
        print(
            f"  {instance.verdict:<13} {_fmt(instance.score):>8}  regions {len(instance.regions)}  {name}{frame}"
            + (f"  ({instance.reason})" if instance.reason and series.reason != instance.reason else ""),
            file=out,
        )


def map_file_name(instance: Any) -> str:
    """<SOPInstanceUID>.npy; frames of a multi-frame instance get _<frame> before the suffix."""
    suffix = f"_{instance.frame}" if instance.frame else ""
    return f"{instance.sop_instance_uid}{suffix}.npy"


def run_score(args: argparse.Namespace) -> int:
    import numpy as np

    detector = _load_detector(args)
    if detector is None:
        return EXIT_ERROR
    groups = detector.group(args.paths)
    if not groups:
        print("error: no files found", file=sys.stderr)
        return EXIT_ERROR
    on_map = None
    if args.maps:
        args.maps.mkdir(parents=True, exist_ok=True)

        def on_map(instance: Any, residual: Any) -> None:
            np.save(args.maps / map_file_name(instance), residual.astype(np.float32))

    out = sys.stdout
    failed = 0
    collected = []
    with _progress_bar(sum(len(g.slices) for g in groups), "scoring") as bar:
        for group in groups:
            series = detector.score_group(group, on_map=on_map, progress=bar.update)
            for instance in series.instances:
                if is_failure(instance):
                    failed += 1
                    print(f"error: {instance.path or instance.sop_instance_uid}: {instance.reason}", file=sys.stderr)
            if args.format == "jsonl":
                for instance in series.instances:
                    out.write(json.dumps(instance_record(instance, series)) + "\n")
                out.write(json.dumps(series_record(series)) + "\n")
                out.flush()
            elif args.format == "table":
                _write_table(series, out)
            else:
                collected.append(series.to_dict())
    if args.format == "json":
        json.dump({"model": detector.info.to_dict(), "series": collected}, out, indent=2)
        out.write("\n")
    return EXIT_SOME_FAILED if failed else EXIT_OK


# --- btd calibrate --------------------------------------------------------------------------------------


def run_calibrate(args: argparse.Namespace) -> int:
    from models.calibration import calibrate_detector, write_calibration

    detector = _load_detector(args)
    if detector is None:
        return EXIT_ERROR
    groups = detector.group(args.paths)
    with _progress_bar(sum(len(g.slices) for g in groups), "calibrating") as bar:
        try:
            calibration = calibrate_detector(detector, args.paths, args.fpr, args.series_fpr, progress=bar.update)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
    calibration["weights_sha256"] = detector.info.weights_sha256
    print(json.dumps(calibration, indent=2))
    if not args.dry_run:
        written = write_calibration(args.model, calibration)
        print(f"calibration written to {written}", file=sys.stderr)
    return EXIT_OK


# --- btd evaluate ---------------------------------------------------------------------------------------


def run_evaluate(args: argparse.Namespace) -> int:
    from models.evaluate import patch_scores, plot_roc, read_label_csv, summary
    from models.extras import require

    try:  # before the scoring, not after it: the ROC plot needs the research extra
        require("matplotlib", "btd evaluate's ROC plot")
    except ModuleNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR

    try:
        rows = read_label_csv(args.labels, root=args.root, only=args.only)
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: cannot read {args.labels}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not rows:
        print(f"error: {args.labels} has no rows to evaluate", file=sys.stderr)
        return EXIT_ERROR
    detector = _load_detector(args)
    if detector is None:
        return EXIT_ERROR
    scores = []
    with _progress_bar(len(rows), "evaluating") as bar:
        for score in patch_scores(detector, rows, args.modality, args.patch):
            scores.append(score)
            bar.update(1)
    labels = [row.label for row in rows]
    try:
        result = summary(scores, labels, n_bootstrap=args.bootstrap)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    roc_path = args.roc or Path(f"{args.labels.stem}_roc.png")
    plot_roc({detector.info.name: (scores, labels)}, roc_path, title=f"BTD on {args.labels.name}")
    result["roc_png"] = str(roc_path)
    result["model"] = detector.info.name
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        low, high = result["auc_ci95"] or (float("nan"), float("nan"))
        print(f"patches: {result['n']} ({result['n_tampered']} tampered)")
        print(f"AUC: {result['auc']:.4f} (95% CI {low:.4f}-{high:.4f})")
        print(f"TPR at 1% FPR: {result['tpr_at_fpr_1pct']:.4f}")
        print(f"TPR at 5% FPR: {result['tpr_at_fpr_5pct']:.4f}")
        print(f"ROC: {roc_path}")
    return EXIT_OK
