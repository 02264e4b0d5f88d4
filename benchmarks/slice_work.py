"""The CPU work of scoring a slice besides the U-Net: decoding, masks, maps, cues, fusion, per slice.

A benchmark, not a test (docs/bench/scoring.md). Why on its own: on a GPU worker this work, not the model,
bounds the slices per second a process scores (docs/bench/gpu.md: ~0.1 s of a core per slice), and on the CPU
it runs beside the passes; in a whole-series timing it hides in the U-Net's noise. Here each distinct model
input is run through the U-Net once (the first, untimed run) and its residual kept; the timed runs score the
whole series as the worker does, with every model pass answered from that record, on one thread (no pass
ahead), so what is timed is everything else. `--root` times the models/ of another source tree (e.g. `git
archive <parent> models | tar -x -C /tmp/parent`); run the two alternately, in separate processes. Each process
times the convolution layouts once and takes one (models/fastconv.py); the two differ in float32 rounding, so
slice digests are compared between runs of the same "layout" (printed), or with `--layout` pinned.
Usage: .venv/bin/python benchmarks/slice_work.py [--series b70f] [--runs 3] [--root /tmp/parent] [--layout nchw]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any


def recorded_passes(detector: Any) -> None:
    """Answer the detector's model passes from a record filled by the first pass of each input."""
    from models.content_cache import image_key

    record: dict[Any, Any] = {}
    run_model = detector.residual_batch

    def residual_batch(x: Any) -> Any:
        key = image_key(x.contiguous().numpy())
        if key not in record:
            record[key] = run_model(x)
        return record[key].clone()

    detector.residual_batch = residual_batch


def slices_digest(instances: list[Any]) -> str:
    """A short digest of every slice's score, verdict and regions: equal digests, equal results."""
    rows = [
        (i.score, i.verdict, [(r.x0, r.y0, r.x1, r.y1, r.score, r.outline) for r in i.regions]) for i in instances
    ]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", choices=("lidc", "b70f"), default="b70f")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the recording one")
    parser.add_argument("--root", type=Path, help="another source tree whose models/ is timed instead of this one")
    parser.add_argument(
        "--layout", choices=("nchw", "channels_last"), help="the CPU convolutions' layout (default: timed per process)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, and models/ unless --root
    if args.root:
        sys.path.insert(0, str(args.root.resolve()))
    import torch

    from benchmarks.fused_timing import SERIES
    from models import fastconv
    from models.detector import Detector

    torch.set_num_threads(1)
    if args.layout:
        fastconv.set_conv_layout(args.layout)
    detector = Detector.load(None, device="cpu")
    detector.pass_ahead.enabled = False
    recorded_passes(detector)
    name, path = SERIES[args.series]
    detector.score_series([path])  # records every pass
    for _ in range(args.runs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = detector.score_series([path])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        slices = max(len(result.instances), 1)
        record = {
            "tree": str(args.root or "this checkout"),
            "series": name,
            "ms_per_slice_wall": round(1000 * wall / slices, 1),
            "ms_per_slice_cpu": round(1000 * cpu / slices, 1),
            "verdict": result.verdict,
            "score": result.score,
            "cues": [(c.name, c.score) for c in result.cues],
            "slices_digest": slices_digest(result.instances),
            "layout": fastconv.conv_layout(),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
