"""Scoring a large study on a GPU in batches: slices/s, memory, and what bf16 costs in score accuracy.

Why: a busy site sends thousands of slices an hour, and a GPU worker is sized by how many slices per second
one card scores with the default model. The detector already batches slices on CUDA (16 per forward pass
by default) under bf16 autocast and computes the residual in fp32 from the noise prediction (FINDINGS.md:
a residual taken as the difference of two bf16 images is destroyed); this script measures that path:

- throughput: slices per second through the model (`Detector.residual_maps`, the part a GPU speeds up) and
  end to end (`Detector.score_series` on DICOM files: decoding, the anomaly map, regions, the series
  verdict), for each batch size asked for, after a warm-up pass;
- memory: peak GPU memory allocated (torch.cuda.max_memory_allocated), or the process's peak RSS on CPU;
- accuracy: each slice's score under bf16 against fp32 (largest absolute and relative difference, and
  whether any verdict changed);
- cross-series batching: the study cut into `--series` series and scored as the worker does
  (`worker.pipeline.score_study_files`), one series at a time and all at once on threads sharing the
  model's passes (models/merged_passes.py): slices/s and the mean rows per model pass of each.

Without a CUDA device the same script runs on the CPU (fp32 and bf16 autocast) with a small study, and
says so in its output: the figures are then the CPU's, not a GPU's.

    .venv/bin/python benchmarks/gpu_scoring.py --slices 512 --batch-sizes 16,32,64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.detector import Detector  # noqa: E402
from models.preprocess import read_hu  # noqa: E402

# Real chest CT with lungs (LIDC-IDRI-0001, CC BY 3.0, TCIA LIDC-IDRI) when the shared data is present;
# else the fixture series of the tests (TotalSegmentator, Apache-2.0).
LIDC = REPO.parent / "shared" / "data" / "chest-ct" / "lidc-idri" / "LIDC-IDRI-0001"
FIXTURE_SERIES = REPO / "tests" / "fixtures" / "ct_series_20"


def source_slices(source: Path | None = None) -> list[Path]:
    folder = source or LIDC
    found = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    if source is not None and not found:
        raise SystemExit(f"--source {source}: no .dcm files there")
    return found or sorted(FIXTURE_SERIES.glob("CT.*"))


def make_study(out_dir: Path, n: int, source: Path | None = None) -> list[Path]:
    """N slices of one series (real slices cycled, each with its own UIDs and position), as files."""
    sources = source_slices(source)
    series_uid, study_uid = generate_uid(), generate_uid()
    paths = []
    for index in range(n):
        ds = pydicom.dcmread(sources[index % len(sources)])
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        if "ImagePositionPatient" in ds:
            x, y, _z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, -1.25 * index]
        paths.append(out_dir / f"{index:05d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_throughput(detector: Detector, values: list[np.ndarray], repeats: int) -> float:
    """Slices per second through the model's residual (batched by the detector's own batch size)."""
    detector.residual_maps(values[: max(1, detector.options.batch_size or 1)])  # warm-up: kernels, autotune
    synchronize(detector.device)
    started = time.perf_counter()
    for _ in range(repeats):
        detector.residual_maps(values)
    synchronize(detector.device)
    return repeats * len(values) / (time.perf_counter() - started)


def end_to_end(detector: Detector, paths: list[Path]) -> tuple[float, Any]:
    """Slices per second of `score_series` on the files (decoding and the anomaly model included)."""
    synchronize(detector.device)
    started = time.perf_counter()
    result = detector.score_series([str(p) for p in paths])
    synchronize(detector.device)
    return len(paths) / (time.perf_counter() - started), result


def study_throughput(detector: Detector, paths: list[Path], n_series: int, workdir: Path) -> list[dict[str, Any]]:
    """The worker's scoring of a study of `n_series` series, one series at a time and all at once."""
    from worker import pipeline

    cut = max(1, -(-len(paths) // n_series))
    series = [
        pipeline.SeriesInput(f"series-{k}", "CT", [pipeline.SpoolFile(p.name, p, None) for p in paths[k : k + cut]])
        for k in range(0, len(paths), cut)
    ]
    rows = []
    for threads in sorted({1, len(series)}):
        passes, rows_before = detector.model_passes.passes, detector.model_passes.rows
        synchronize(detector.device)
        started = time.perf_counter()
        pipeline.score_study_files(detector, "2.25.1", series, workdir / f"maps-{threads}", series_in_parallel=threads)
        synchronize(detector.device)
        elapsed = time.perf_counter() - started
        n_passes = max(1, detector.model_passes.passes - passes)
        rows.append(
            {
                "series": len(series),
                "series_in_parallel": threads,
                "study_slices_per_s": round(len(paths) / elapsed, 2),
                "rows_per_model_pass": round((detector.model_passes.rows - rows_before) / n_passes, 2),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def recorded(measure: Callable[[], dict[str, Any]], what: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """One row of figures, or, where measuring it failed (memory at a large batch, say), `what` with the error:
    a device call is short and cannot be repeated at will, so the other rows still run. Printed as it ends."""
    try:
        row = measure()
    except Exception as error:  # noqa: BLE001 - recorded in the report, then the next row
        traceback.print_exc()
        row = {**what, "error": repr(error)[:500]}
    print(json.dumps(row), file=sys.stderr)
    if cuda:
        torch.cuda.empty_cache()
    return row


def pass_sweep(args: argparse.Namespace, device: str, cuda: bool, channels: int) -> list[dict[str, Any]]:
    """The model pass alone on whole 512 x 512 slices already on the device, per batch size and precision:
    the GPU's own rate, without the per-slice CPU work (masks, decoding) that the end-to-end rows include."""
    rows = []
    for batch in [int(b) for b in (args.sweep or ("8,16,32,64,128" if cuda else "2")).split(",")]:
        for precision in ("bf16", "fp32"):

            def measure(batch: int = batch, precision: str = precision) -> dict[str, Any]:
                detector = Detector.load(args.model, device=device, batch_size=batch, precision=precision)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                x = torch.rand(batch, channels, 512, 512, device=detector.device) * 2 - 1
                detector._residual_batch_alone(x)  # warm-up
                synchronize(detector.device)
                passes = max(2, -(-256 // batch)) if cuda else 1
                started = time.perf_counter()
                for _ in range(passes):
                    detector._residual_batch_alone(x)
                synchronize(detector.device)
                rate = passes * batch / (time.perf_counter() - started)
                return {
                    "pass_batch_size": batch,
                    "precision": precision,
                    "pass_slices_per_s": round(rate, 2),
                    "peak_memory_mb": round(peak_memory_mb(detector.device), 1),
                }

            rows.append(recorded(measure, {"pass_batch_size": batch, "precision": precision}, cuda))
    return rows


def measure_row(
    args: argparse.Namespace,
    device: str,
    cuda: bool,
    batch: int,
    precision: str,
    values: list[np.ndarray],
    paths: list[Path],
    workdir: Path,
    results: dict[str, Any],
) -> dict[str, Any]:
    """One batch size and precision: model and end-to-end slices/s, peak memory, the study's series."""
    detector = Detector.load(args.model, device=device, batch_size=batch, precision=precision)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model_rate = model_throughput(detector, values, args.repeats)
    e2e_rate, result = end_to_end(detector, paths)
    results[precision] = result
    return {
        "batch_size": batch,
        "precision": precision,
        "model_slices_per_s": round(model_rate, 2),
        "end_to_end_slices_per_s": round(e2e_rate, 2),
        "peak_memory_mb": round(peak_memory_mb(detector.device), 1),
        "study": study_throughput(detector, paths, args.series or (4 if cuda else 2), workdir),
    }


def profile_pass(args: argparse.Namespace, device: str, values: list[np.ndarray]) -> dict[str, Any]:
    """Where one batch's model pass spends its time (torch.profiler, top operators by device time):
    what to speed up next if the slices/s fall short."""
    from torch.profiler import ProfilerActivity, profile

    batch = max(int(b) for b in (args.batch_sizes or "2").split(","))
    detector = Detector.load(args.model, device=device, batch_size=batch, precision="auto")
    chunk = values[:batch]
    detector.residual_maps(chunk)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        detector.residual_maps(chunk)
        synchronize(detector.device)
    averages = prof.key_averages()
    table, sort_by = "", ""
    keys = (["self_device_time_total", "self_cuda_time_total"] if device == "cuda" else []) + ["self_cpu_time_total"]
    for sort_by in keys:
        try:
            table = averages.table(sort_by=sort_by, row_limit=25)
            break
        except (KeyError, AttributeError, ValueError):
            continue
    print(table, file=sys.stderr)
    return {"batch_size": batch, "slices": len(chunk), "sort_by": sort_by, "table": table}


def compare(fp32: Any, bf16: Any) -> dict[str, Any]:
    """How far bf16 moves each slice's score from fp32's, and whether a verdict changes."""
    diffs, relative, changed = [], [], 0
    for a, b in zip(fp32.instances, bf16.instances, strict=True):
        if a.score is None or b.score is None:
            continue
        diffs.append(abs(a.score - b.score))
        relative.append(abs(a.score - b.score) / max(abs(a.score), 1e-9))
        changed += a.verdict != b.verdict
    return {
        "max_abs_score_diff": max(diffs, default=None),
        "max_rel_score_diff": max(relative, default=None),
        "verdicts_changed": changed,
        "series_verdicts": [fp32.verdict, bf16.verdict],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="weights (default: the shipped CT model)")
    parser.add_argument("--slices", type=int, default=None, help="slices in the study (default 512 GPU, 8 CPU)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 16,32,64 GPU; 2 CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the study for the model throughput")
    parser.add_argument("--series", type=int, default=None, help="series the study is cut into (default 4 GPU, 2 CPU)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--source", type=Path, default=None, help="folder of real .dcm slices (default LIDC-IDRI-0001)")
    parser.add_argument("--sweep", default=None, help="batch sizes of the pass-alone sweep (default 8,...,128 GPU)")
    parser.add_argument("--profile", action="store_true", help="then profile one pass at the largest batch size")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n = args.slices or (512 if cuda else 8)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("16,32,64" if cuda else "2")).split(",")]
    if not cuda:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        print("no CUDA device: this run measures the CPU path (fp32 and bf16 autocast), not a GPU", file=sys.stderr)
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU: {platform.processor() or platform.machine()}",
        "cuda": cuda,
        "torch": torch.__version__,
        "slices": n,
        "model": str(args.model or "default"),
    }
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="gpu-scoring-"))
    try:
        meta["pass_sweep"] = pass_sweep(args, device, cuda, int(Detector.load(args.model, device="cpu").info.channels))
        paths = make_study(workdir, n, args.source)
        values = [read_hu(pydicom.dcmread(p))[0] for p in paths]  # (H, W) in HU: the first (only) frame
        for batch in batch_sizes:
            results = {}
            for precision in ("fp32", "bf16"):
                rows.append(
                    recorded(
                        lambda batch=batch, precision=precision, results=results: measure_row(
                            args, device, cuda, batch, precision, values, paths, workdir, results
                        ),
                        {"batch_size": batch, "precision": precision},
                        cuda,
                    )
                )
            if len(results) == 2:
                rows[-1]["bf16_vs_fp32"] = compare(results["fp32"], results["bf16"])
        if args.profile:
            try:
                meta["profile"] = profile_pass(args, device, values)
            except Exception as error:  # noqa: BLE001 - recorded, the figures above stand
                traceback.print_exc()
                meta["profile"] = {"error": repr(error)[:500]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"meta": meta, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
