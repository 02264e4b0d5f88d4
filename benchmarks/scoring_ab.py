"""The U-Net's attention as the parent ran it against this tree's, alternately in one process, on whole series.

A benchmark, not a test (docs/bench/scoring.md, "The U-Net's linear attention streamed over positions").
Separate processes (`benchmarks/fused_timing.py --root`) are at the mercy of this VM's drift (~30 % within
minutes); here one detector, with its model and caches, scores a series in ABBA order, switching the U-Net's
`stream_attention_on_cpu`: off, the attention modules' own step-by-step forward (the parent's arithmetic);
on, the streamed blocks (models/streamed_attention.py).
Usage: .venv/bin/python benchmarks/attention_ab.py [--series b70f] [--pairs 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    detector.score_series([path])  # warm-up: allocator, caches
    order = [parent for pair in range(args.pairs) for parent in ((True, False) if pair % 2 == 0 else (False, True))]
    for parent in order:
        detector.diffusion.model.stream_attention_on_cpu = not parent
        started = time.perf_counter()
        result = detector.score_series([path])
        seconds = time.perf_counter() - started
        record = {
            "series": name,
            "attention": "parent" if parent else "this tree",
            "per_slice": round(seconds / max(len(result.instances), 1), 4),
            "verdict": result.verdict,
            "score": result.score,
            "cues": [(c.name, c.score) for c in result.cues],
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
