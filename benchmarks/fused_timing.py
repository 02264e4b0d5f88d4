"""Seconds per slice of the shipped (fused) detector on whole real series of ../shared/data.

A benchmark, not a test (docs/bench/scoring.md, "The fused detector end to end"). `--root` times the
models/ of another source tree (e.g. `git archive <parent> models | tar -x -C /tmp/parent`), so a change is
compared with its parent on the same machine; run the two alternately.
Usage: .venv/bin/python benchmarks/fused_timing.py [--threads 2] [--root /tmp/parent] [--series lidc b70f]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-ct"
SERIES = {
    "lidc": ("LIDC-IDRI-0002 (12 slices, 1.25 mm)", DATA / "lidc-idri" / "LIDC-IDRI-0002"),
    "b70f": ("C3N-00247 Siemens B70f (99 slices, 3 mm)", DATA / "cptac-lscc" / "C3N-00247"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (BTD_TORCH_THREADS in a worker)")
    parser.add_argument("--root", type=Path, help="another source tree whose models/ is timed instead of this one")
    parser.add_argument("--series", nargs="+", choices=sorted(SERIES), default=sorted(SERIES))
    args = parser.parse_args()
    if args.root:
        sys.path.insert(0, str(args.root.resolve()))
    import torch

    from models.detector import Detector

    torch.set_num_threads(args.threads)
    detector = Detector.load(None, device="cpu")
    for key in args.series:
        name, path = SERIES[key]
        started = time.perf_counter()
        result = detector.score_series([path])
        seconds = time.perf_counter() - started
        record = {
            "tree": str(args.root or "this checkout"),
            "threads": args.threads,
            "series": name,
            "seconds": round(seconds, 1),
            "per_slice": round(seconds / max(len(result.instances), 1), 3),
            "verdict": result.verdict,
            "score": result.score,
            "reason": result.reason,
            "cues": [(c.name, c.used, c.score, c.reason) for c in result.cues],
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
