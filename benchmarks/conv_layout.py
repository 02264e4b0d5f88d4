"""Each kxk convolution of a U-Net pass timed in both layouts models/fastconv.py can run it in, on this CPU.

A benchmark, not a test (docs/bench/scoring.md, "The convolutions' layout chosen per CPU"). Why: which layout
oneDNN runs faster depends on the machine (the channels-last copy won on an AMD EPYC VM, the usual layout on an
Intel Xeon VM), and each scoring process chooses by timing one probe convolution (`fastconv.conv_layout`). This
prints every convolution of a real pass, with the scoring process's allocator settings, so that the probe's
choice can be checked against the whole pass on a new machine. One thread (a row thread's share on the CPU).
Usage: .venv/bin/python benchmarks/conv_layout.py [--model default|published] [--repeats 15]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scoring import CONFIGS  # noqa: E402 - the architectures benchmarks/scoring.py times

# The input of one pass: a whole 496 x 512 slice for the default model, a batch of 8 tiles of 96 x 96 for the
# published configuration (its `mode="auto"`).
MODELS = {"default": (1, 1, 496, 512), "published": (8, 1, 96, 96)}


def pass_convolutions(model: str) -> Counter[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """(input shape, weight shape, padding) of every kxk convolution one pass runs, with its count."""
    import torch

    from models import fastconv, unet

    seen: Counter[tuple[tuple[int, ...], tuple[int, ...], int]] = Counter()
    original = fastconv.spatial_conv

    def recording(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
        seen[(tuple(x.shape), tuple(weight.shape), padding)] += 1
        return original(x, weight, bias, padding)

    shape = MODELS[model]
    network = unet.Unet(channels=1, **CONFIGS[model]["unet"]).eval()
    fastconv.spatial_conv = unet.spatial_conv = recording  # type: ignore[assignment]
    try:
        with torch.inference_mode():
            network(torch.randn(*shape), torch.zeros(shape[0]))
    finally:
        fastconv.spatial_conv = unet.spatial_conv = original  # type: ignore[assignment]
    return seen


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="default")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    import torch

    from models import fastconv
    from models.allocator import keep_freed_memory

    keep_freed_memory()  # as a scoring process does: without it the usual layout faults its buffers in afresh
    torch.set_num_threads(1)
    totals = {fastconv.NCHW: 0.0, fastconv.CHANNELS_LAST: 0.0}
    for (x_shape, w_shape, padding), count in pass_convolutions(args.model).items():
        x, weight, bias = torch.randn(*x_shape), torch.randn(*w_shape), torch.randn(w_shape[0])
        times = {}
        for layout in totals:
            fastconv.set_conv_layout(layout)
            convolution = functools.partial(fastconv.spatial_conv, x, weight, bias, padding)
            with torch.inference_mode():
                times[layout] = median_ms(convolution, args.repeats)
            totals[layout] += count * times[layout]
        print(json.dumps({"input": x_shape, "weight": w_shape, "per_pass": count, "ms": times}), flush=True)
    fastconv.set_conv_layout(None)
    print(json.dumps({"model": args.model, "pass_ms": totals, "probe_chooses": fastconv.conv_layout()}), flush=True)


if __name__ == "__main__":
    main()
