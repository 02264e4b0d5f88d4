"""Several scoring processes sharing one GPU: end-to-end slices/s of the whole study path per process count.

Why: on a GPU the model pass is the small part of a slice (benchmarks/gpu_scoring.py, docs/bench/gpu.md): one
H200 passes ~400 slices/s, while a process scores ~10 slices/s end to end, held by the per-slice work on the
CPU (decoding, masks, the cues, regions) that runs under one Python interpreter lock. Worker processes on one
GPU (`docker compose up --scale gpu-worker=N` on a one-GPU host, or N `btd worker` processes with
BTD_DEVICE=cuda) each bring their own lock and cores; this measures what N of them score together.

Each child loads the shipped model on the device, scores a few slices to warm up, says it is ready and waits;
the parent starts all children of one level at once and times from the start to the last child's end.
Every child scores its own copy of the same study (real slices cycled, as gpu_scoring.py makes them).

`--forked 4,16` then forks children from a parent that imported the scoring code but never touched CUDA, as
Celery's prefork pool does for BTD_WORKER_PROCESSES, each loading its model through `worker.pipeline`.

    .venv/bin/python benchmarks/gpu_processes.py --processes 1,2,4,8 --slices 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def child(study: Path, threads: int) -> int:
    """Load, warm up, print READY, wait for a line on stdin, score the study, print the figures as JSON."""
    import torch

    from models.detector import Detector

    torch.set_num_threads(threads)
    paths = sorted(str(p) for p in study.glob("*.dcm"))
    detector = Detector.load(None, device="auto")
    detector.score_series(paths[:4])
    print("READY", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    result = detector.score_series(paths)
    elapsed = time.perf_counter() - started
    cuda = detector.device.type == "cuda"
    print(
        json.dumps(
            {
                "slices": len(paths),
                "seconds": round(elapsed, 3),
                "verdict": result.verdict,
                "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            }
        ),
        flush=True,
    )
    return 0


def level(study: Path, processes: int, cores: int) -> dict[str, Any]:
    """Start `processes` children, start them together, time until the last one ends."""
    from core.settings import Settings

    threads = Settings(worker_processes=processes).scoring_torch_threads or cores  # the worker's share
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, __file__, "--child", str(study), "--threads", str(threads)]
    children = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(processes)
    ]
    finished = False
    try:
        for proc in children:
            line = proc.stdout.readline().strip() if proc.stdout else ""
            if line != "READY":
                raise RuntimeError(f"a child did not start: {line!r}")
        started = time.perf_counter()
        for proc in children:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = [json.loads(proc.stdout.readline()) for proc in children if proc.stdout]
        wall = time.perf_counter() - started
        finished = True
    finally:
        for proc in children:
            if not finished:
                proc.kill()  # a level that failed leaves no child waiting on its stdin
            proc.wait(timeout=60)
    slices = sum(r["slices"] for r in reports)
    return {
        "processes": processes,
        "torch_threads_each": threads,
        "slices": slices,
        "wall_s": round(wall, 3),
        "slices_per_s": round(slices / wall, 2),
        "per_process_slices_per_s": [round(r["slices"] / r["seconds"], 2) for r in reports],
        "peak_gpu_memory_mb_each": max((r["peak_gpu_memory_mb"] or 0) for r in reports),
        "verdicts": sorted({r["verdict"] for r in reports}),
    }


def forked_child(study: Path, processes: int, barrier: Any, results: Any) -> None:
    """A Celery prefork pool process's way: forked from a parent that imported the scoring code but never
    touched CUDA, it loads its model through the worker's own `get_detector` (its share of the cores)."""
    import torch

    from core.settings import Settings
    from worker import pipeline

    paths = sorted(str(p) for p in study.glob("*.dcm"))
    detector = pipeline.get_detector(Settings(device="auto", worker_processes=processes))
    detector.score_series(paths[:4])
    barrier.wait(timeout=300)
    started = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    result = detector.score_series(paths)
    results.put(
        {
            "slices": len(paths),
            "started": started,
            "ended": time.perf_counter(),
            "verdict": result.verdict,
            "torch_threads": torch.get_num_threads(),
            "device": str(detector.device),
        }
    )


def forked_level(study: Path, processes: int) -> dict[str, Any]:
    """`processes` children forked as Celery's prefork pool forks them, started together at a barrier."""
    import multiprocessing

    import models.detector  # noqa: F401 - the parent holds torch and the models, as a pool parent may
    from worker import pipeline  # noqa: F401

    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes), context.Queue()
    children = [
        context.Process(target=forked_child, args=(study, processes, barrier, results)) for _ in range(processes)
    ]
    for proc in children:
        proc.start()
    reports: list[dict[str, Any]] = []
    try:
        while len(reports) < processes:
            try:
                reports.append(results.get(timeout=2))
            except queue.Empty:
                failed = [proc.exitcode for proc in children if proc.exitcode not in (None, 0)]
                if failed:  # a child that died leaves the others waiting at the barrier: stop them all
                    raise RuntimeError(f"{len(failed)} forked children failed, exit codes {failed}") from None
    finally:
        for proc in children:
            proc.join(timeout=60 if len(reports) == processes else 0)
            if proc.is_alive():
                proc.kill()
    wall = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    slices = sum(r["slices"] for r in reports)
    return {
        "forked_processes": processes,
        "slices": slices,
        "wall_s": round(wall, 3),
        "slices_per_s": round(slices / wall, 2),
        "devices": sorted({r["device"] for r in reports}),
        "torch_threads_each": sorted({r["torch_threads"] for r in reports}),
        "exit_codes": [proc.exitcode for proc in children],
        "verdicts": sorted({r["verdict"] for r in reports}),
    }


def device_name() -> str:
    """The GPU's name, asked in a process of its own: CUDA initialised in this parent would make every forked
    child fail ("Cannot re-initialize CUDA in forked subprocess"), as it would in a Celery pool's parent."""
    asked = [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"]
    return subprocess.run(asked, capture_output=True, text=True, timeout=120).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2,4,8", help="comma-separated process counts")
    parser.add_argument("--slices", type=int, default=64, help="slices in each child's study")
    parser.add_argument("--source", type=Path, default=None, help="folder of real .dcm slices (default LIDC-IDRI-0001)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--forked", default="", help="then these process counts forked as Celery's prefork pool")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.threads)

    import torch

    from benchmarks.gpu_scoring import make_study, recorded

    cuda = torch.cuda.is_available()  # asks the driver without initialising CUDA in this process
    if not cuda:
        print("no CUDA device: the children score on the CPU, these are not GPU figures", file=sys.stderr)
    cores = len(os.sched_getaffinity(0))
    report: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_name() if cuda else "CPU",
            "cores": cores,
            "torch": torch.__version__,
            "slices_per_process": args.slices,
        },
        "levels": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="gpu-processes-"))
    try:
        make_study(workdir, args.slices, args.source)
        levels = [(int(p), False) for p in args.processes.split(",") if p]
        levels += [(int(p), True) for p in args.forked.split(",") if p]
        for processes, forked in levels:
            what = {"forked_processes" if forked else "processes": processes}
            measure = partial(forked_level, workdir, processes) if forked else partial(level, workdir, processes, cores)
            report["levels"].append(recorded(measure, what, cuda=False))  # this parent never touches CUDA
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
