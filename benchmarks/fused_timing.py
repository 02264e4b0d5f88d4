"""Seconds per slice of the shipped (fused) detector on whole real series of ../shared/data, 1 torch thread.

A benchmark, not a test (docs/bench/forensics-lofo.md, "End to end").
Usage: .venv/bin/python benchmarks/fused_timing.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from models.detector import Detector

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-ct"
SERIES = {
    "LIDC-IDRI-0002 (12 slices, 1.25 mm)": DATA / "lidc-idri" / "LIDC-IDRI-0002",
    "C3N-00247 Siemens B70f (99 slices, 3 mm)": DATA / "cptac-lscc" / "C3N-00247",
}


def main() -> None:
    torch.set_num_threads(1)
    detector = Detector.load(None, device="cpu")
    for name, path in SERIES.items():
        started = time.perf_counter()
        result = detector.score_series([path])
        seconds = time.perf_counter() - started
        record = {
            "series": name,
            "seconds": round(seconds, 1),
            "per_slice": round(seconds / max(len(result.instances), 1), 2),
            "verdict": result.verdict,
            "score": result.score,
            "reason": result.reason,
            "cues": [(c.name, c.used, c.score, c.reason) for c in result.cues],
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
