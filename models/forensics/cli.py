"""Sub-commands of `btd` for this area (registered by btd.cli): `btd tamper`, `btd bench build|run`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's sub-commands."""
    from models.forensics.methods import ALL_METHODS, TAMPER_METHODS

    tamper = subparsers.add_parser(
        "tamper", help="write a tampered copy of a DICOM CT series with ground truth (red-team your deployment)"
    )
    tamper.add_argument("series", type=Path, help="folder holding one CT series")
    tamper.add_argument(
        "--out", type=Path, required=True, help="output folder: dicom/ (send this), ground_truth.json, masks/"
    )
    tamper.add_argument("--method", choices=TAMPER_METHODS, default="inject-noise")
    tamper.add_argument("--count", type=int, default=1, help="slices to tamper (2-D methods)")
    tamper.add_argument("--seed", type=int, default=0)
    tamper.add_argument("--keep-uids", action="store_true", help="keep SOP/Series UIDs (overwrite-in-PACS attack)")
    tamper.add_argument("--model", type=Path, default=None, help="diffusion model for the diffusion methods")
    tamper.set_defaults(func=run_tamper)

    bench = subparsers.add_parser("bench", help="the forensic benchmark: build it, run detectors on it")
    actions = bench.add_subparsers(dest="bench_action", required=True)
    build = actions.add_parser("build", help="tampered + genuine slices of the held-out patients")
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--data", type=Path, default=None, help="chest-CT corpus root (default ../shared/data/chest-ct)")
    build.add_argument("--methods", default=",".join(ALL_METHODS))
    build.add_argument("--per-method", type=int, default=30)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--model", type=Path, default=None, help="diffusion model the attacker uses")
    build.add_argument(
        "--patients",
        default=None,
        help="comma-separated patients to build from (default: the held-out test patients). Training patients "
        "give a VALIDATION benchmark for choosing settings, never a figure to report",
    )
    build.set_defaults(func=run_bench_build)

    run = actions.add_parser("run", help="evaluate detectors on a built benchmark")
    run.add_argument("bench_dir", type=Path)
    run.add_argument("--model", type=Path, default=None, help="BTD model (default: the shipped CT model)")
    run.add_argument("--out", type=Path, required=True, help="results folder (results.json, ROC PNGs, table.md)")
    run.add_argument("--detectors", default="btd,untrained,anoddpm,highpass")
    run.add_argument("--published", type=Path, default=None, help="the published BTD CT weights, if you have them")
    run.add_argument("--mode", choices=("tiles", "whole"), default=None, help="scoring mode (default: the service's)")
    run.add_argument("--n-reference", type=int, default=60, help="genuine training slices for fitting + calibration")
    run.set_defaults(func=run_bench_run)

    # The leave-one-family-out evaluation (issue 12; docs/bench/forensics-lofo.md).
    lofo_build = actions.add_parser("lofo-build", help="independent attack families on every corpus series")
    lofo_build.add_argument("--out", type=Path, required=True)
    lofo_build.add_argument("--per-family-2d", type=int, default=16)
    lofo_build.add_argument("--per-family-3d", type=int, default=5)
    lofo_build.add_argument("--seed", type=int, default=0)
    lofo_build.set_defaults(func=run_lofo_build)
    lofo_score = actions.add_parser("lofo-score", help="raw cue scores of every slice (resumable, shardable)")
    lofo_score.add_argument("bench_dir", type=Path)
    lofo_score.add_argument("--out", type=Path, required=True)
    lofo_score.add_argument("--shard", default="0/1", help="i/n: this process scores every n-th entry from i")
    lofo_score.set_defaults(func=run_lofo_score)
    lofo_run = actions.add_parser("lofo-run", help="leave-one-family-out selection and report")
    lofo_run.add_argument("bench_dir", type=Path)
    lofo_run.add_argument("--scores", type=Path, required=True)
    lofo_run.add_argument("--out", type=Path, required=True)
    lofo_run.set_defaults(func=run_lofo_run)


def _one_thread() -> None:
    """On a shared CPU, torch's spin-waiting second thread made model passes 10x slower (measured here)."""
    import torch

    torch.set_num_threads(1)


def run_tamper(args: argparse.Namespace) -> int:
    from models.forensics.red_team import tamper_series

    _one_thread()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = tamper_series(args.series, args.out, args.method, args.count, args.seed, args.keep_uids, args.model)
    print(json.dumps({"tampered": len(report.tampered), "skipped": report.skipped, "out": str(args.out)}, indent=2))
    return 0 if report.tampered else 1


def run_bench_build(args: argparse.Namespace) -> int:
    from models.corpus import DEFAULT_DATA_ROOT, DEFAULT_TEST_PATIENTS
    from models.forensics.bench import build_benchmark

    _one_thread()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    methods = [m for m in args.methods.split(",") if m]
    patients = [p for p in (args.patients or "").split(",") if p] or list(DEFAULT_TEST_PATIENTS)
    summary = build_benchmark(
        args.out, args.data or DEFAULT_DATA_ROOT, methods, args.per_method, args.seed, args.model, patients
    )
    print(json.dumps(summary, indent=2))
    return 0


def run_bench_run(args: argparse.Namespace) -> int:
    from models.forensics.bench_run import markdown_table, run_benchmark
    from models.forensics.red_team import default_model_path

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = args.model or default_model_path()
    if not Path(model).is_file():
        print(f"error: model {model} not found", file=sys.stderr)
        return 2
    detectors = [d for d in args.detectors.split(",") if d]
    if args.published and "published" not in detectors:
        detectors.append("published")
    results = run_benchmark(args.bench_dir, model, args.out, detectors, args.published, args.mode, args.n_reference)
    table = markdown_table(results)
    (Path(args.out) / "table.md").write_text(table)
    print(table)
    return 0


def run_lofo_build(args: argparse.Namespace) -> int:
    from models.forensics.lofo_build import build

    _one_thread()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = build(args.out, per_family_2d=args.per_family_2d, per_family_3d=args.per_family_3d, seed=args.seed)
    print(json.dumps(summary["counts"], indent=2))
    return 0


def run_lofo_score(args: argparse.Namespace) -> int:
    from models.forensics.lofo_score import recompute_keypoints, score

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    a, b = (int(v) for v in args.shard.split("/"))
    computed = score(args.bench_dir, args.out, (a, b))
    if b == 1:
        recompute_keypoints(args.bench_dir, args.out)
    print(json.dumps({"computed": computed}))
    return 0


def run_lofo_run(args: argparse.Namespace) -> int:
    from models.forensics.lofo import run
    from models.forensics.lofo_report import markdown

    results = run(args.bench_dir, args.scores, args.out)
    table = markdown(results)
    (Path(args.out) / "table.md").write_text(table)
    print(table)
    return 0
