"""CPU scoring paths switched off against on, alternately in one process, on whole series.

A benchmark, not a test (docs/bench/scoring.md). Separate processes (`benchmarks/fused_timing.py --root`)
are at the mercy of this VM's drift (~30 % within minutes); here one detector, with its model and caches,
scores a series in ABBA order with the switches named off (the parent's way) and on:
- attention: the U-Net's `stream_attention_on_cpu` (models/streamed_attention.py);
- rows: the detector's `row_threads.enabled`, a pass's slices on threads of their own (models/row_threads.py);
- ahead: the detector's `pass_ahead.enabled`, a series' next pass run while the batch before it is finished
  (models/pass_ahead.py);
- upsample: the U-Net's `phase_upsample_on_cpu` (models/fastconv.py, upsample_conv).
Usage: .venv/bin/python benchmarks/scoring_ab.py --switch rows [ahead ...] [--series b70f] [--pairs 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def switch(detector: Any, name: str, on: bool) -> None:
    """Set one path's switch on the detector or its U-Net."""
    unet = detector.diffusion.model
    if name == "attention":
        unet.stream_attention_on_cpu = on
    elif name == "rows":
        detector.row_threads.enabled = on
    elif name == "ahead":
        detector.pass_ahead.enabled = on
    elif name == "upsample":
        unet.phase_upsample_on_cpu = on
    else:
        raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--switch", nargs="+", choices=("attention", "rows", "ahead", "upsample"), required=True, help="one or several"
    )
    parser.add_argument("--series", choices=("lidc", "b70f"), default="b70f")
    parser.add_argument("--pairs", type=int, default=4, help="ABBA: each pair is one parent and one new run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.fused_timing import SERIES
    from models.allocator import keep_freed_memory
    from models.detector import Detector

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    detector = Detector.load(None, device="cpu")
    name, path = SERIES[args.series]
    for warm in (False, True):  # warm-up of both paths: allocator, caches, the row threads' pool
        for switch_name in args.switch:
            switch(detector, switch_name, warm)
        detector.score_series([path])
    order = [parent for pair in range(args.pairs) for parent in ((True, False) if pair % 2 == 0 else (False, True))]
    for parent in order:
        for switch_name in args.switch:
            switch(detector, switch_name, not parent)
        started = time.perf_counter()
        result = detector.score_series([path])
        seconds = time.perf_counter() - started
        record = {
            "series": name,
            "switch": "+".join(args.switch),
            "run": "parent" if parent else "this tree",
            "per_slice": round(seconds / max(len(result.instances), 1), 4),
            "verdict": result.verdict,
            "score": result.score,
            "cues": [(c.name, c.score) for c in result.cues],
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
