"""The GPU benchmarks run end to end in their CPU mode: a device lease is short (15 minutes a session), and a
script that breaks there spends it (docs/bench/gpu.md). Here: every row measured, none recorded as an error,
the forked pool's children all scoring and exiting cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO.parent / "shared" / "data" / "chest-ct" / "lidc-idri" / "LIDC-IDRI-0001"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def run_benchmark(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_gpu_scoring_measures_every_row_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu-scoring.json"
    log = run_benchmark(
        "gpu_scoring.py", "--slices", "4", "--batch-sizes", "2", "--series", "2", "--repeats", "1", "--sweep", "2",
        "--profile", "--json", str(out),
    )
    assert "no CUDA device" in log  # says which figures these are
    report = json.loads(out.read_text())
    sweep, rows = report["meta"]["pass_sweep"], report["rows"]
    assert [(r["pass_batch_size"], r["precision"]) for r in sweep] == [(2, "bf16"), (2, "fp32")]
    assert all(r["pass_slices_per_s"] > 0 and "error" not in r for r in sweep)
    assert [(r["batch_size"], r["precision"]) for r in rows] == [(2, "fp32"), (2, "bf16")]
    assert all("error" not in r and r["end_to_end_slices_per_s"] > 0 for r in rows)
    assert [s["series_in_parallel"] for s in rows[0]["study"]] == [1, 2]
    assert rows[-1]["bf16_vs_fp32"]["verdicts_changed"] == 0
    assert "aten::" in report["meta"]["profile"]["table"]


def test_gpu_processes_scores_in_spawned_and_forked_processes(tmp_path: Path) -> None:
    out = tmp_path / "gpu-processes.json"
    source = ["--source", str(SOURCE)] if SOURCE.is_dir() else []
    run_benchmark("gpu_processes.py", *source, "--processes", "1", "--forked", "2", "--slices", "4", "--json", str(out))
    spawned, forked = json.loads(out.read_text())["levels"]
    assert spawned["processes"] == 1 and spawned["slices"] == 4 and spawned["slices_per_s"] > 0
    assert forked["forked_processes"] == 2 and forked["slices"] == 8 and forked["exit_codes"] == [0, 0]
    assert forked["torch_threads_each"] == [max(1, len(os.sched_getaffinity(0)) // 2)]  # BTD_WORKER_PROCESSES' share
