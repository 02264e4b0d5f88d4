"""Speed of scoring 512x512 CT slices: our Detector against the authors' reference computation.

Reference (as the BTD authors' code computes it): 96x96 patches laid over the slice, one reverse step at
t = 0 in float32 with `p_sample` (x_prev), residual = x - x_prev, patch score = mean(residual^2).

Ours: tiles of the model's patch size with overlap (air-only tiles skipped) or the whole slice (cropped
to the body), fp32 or bf16 autocast. All methods run in the same process, interleaved, on the same real
slices (tests/fixtures/ct_series_20), so a busy machine slows them alike; peak memory is measured in a
fresh subprocess per method (ru_maxrss after the run minus after loading the model).

Scores "match" when the per-96-px-patch mean squared residual of our stitched map agrees with the
reference's on the patches inside the body (Pearson r, and the relative difference of the slice score =
max over those patches).

    .venv/bin/python benchmarks/scoring.py --config default --slices 2 --out docs/bench/scoring.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.detector import Detector, ScoringOptions  # noqa: E402
from models.diffusion import GaussianDiffusion  # noqa: E402
from models.metadata import ModelMetadata  # noqa: E402
from models.preprocess import read_hu  # noqa: E402
from models.tiling import tile_starts  # noqa: E402
from models.unet import Unet  # noqa: E402

# Chest slices with lungs (where the threat model tampers and the anomaly model searches): LIDC-IDRI-0001
# from the shared data (CC BY 3.0, TCIA LIDC-IDRI, Armato et al. 2011); the fixture series otherwise.
LIDC = REPO.parent / "shared" / "data" / "chest-ct" / "lidc-idri" / "LIDC-IDRI-0001"
FIXTURE_SERIES = REPO / "tests" / "fixtures" / "ct_series_20"
SLICES = sorted(LIDC.glob("*.dcm"))[4:] if LIDC.is_dir() else sorted(FIXTURE_SERIES.glob("CT.*"))
REFERENCE_PATCH = 96

# The default model's architecture (models/training.py TrainConfig) and the published configuration.
CONFIGS = {
    "default": {
        "unet": {"dim": 8, "dim_mults": (1, 2, 4, 8), "attn_heads": 2, "attn_dim_head": 8},
        "patch": 64,
        "windows": [{"low": -1100.0, "high": 300.0}],  # training.LUNG_WINDOW
    },
    "published": {
        "unet": {"dim": 32, "dim_mults": (1, 2, 4, 8)},
        "patch": 96,
        "windows": [{"low": -700.0, "high": 2000.0}],
    },
}

METHODS: dict[str, dict] = {
    "tiles": {"mode": "tiles", "skip_air": True, "precision": "fp32"},
    "tiles-all": {"mode": "tiles", "skip_air": False, "precision": "fp32"},
    "tiles-bf16": {"mode": "tiles", "skip_air": True, "precision": "bf16"},
    "tiles96-nooverlap": {"mode": "tiles", "skip_air": True, "precision": "fp32", "overlap": 0, "patch": 96},
    "tiles96-search": {"mode": "tiles", "precision": "fp32", "overlap": 0, "patch": 96, "run_region": "search"},
    "tiles96-search-bf16": {
        "mode": "tiles",
        "precision": "bf16",
        "overlap": 0,
        "patch": 96,
        "run_region": "search",
    },
    "tiles-search": {"mode": "tiles", "precision": "fp32", "run_region": "search"},
    "tiles-nooverlap-search": {"mode": "tiles", "precision": "fp32", "overlap": 0, "run_region": "search"},
    "whole-search": {"mode": "whole", "precision": "fp32", "run_region": "search"},
    "whole": {"mode": "whole", "skip_air": True, "precision": "fp32"},
    "whole-full": {"mode": "whole", "skip_air": False, "precision": "fp32"},
    "whole-bf16": {"mode": "whole", "skip_air": True, "precision": "bf16"},
}
DESCRIPTIONS = {
    "tiles": "tiles of the model's patch, overlap 1/4, air skipped, fp32",
    "tiles-all": "tiles of the model's patch, overlap 1/4, all tiles, fp32",
    "tiles-bf16": "tiles of the model's patch, overlap 1/4, air skipped, bf16 autocast",
    "tiles96-nooverlap": "96-px tiles on the reference grid, no overlap, air skipped, fp32",
    "tiles96-search": "96-px tiles on the reference grid, only where the anomaly model searches (lungs), fp32",
    "tiles96-search-bf16": "96-px tiles on the reference grid, only the lungs, bf16 autocast",
    "tiles-search": "tiles of the model's patch, overlap 1/4, only where the anomaly model searches, fp32",
    "tiles-nooverlap-search": "tiles of the model's patch, no overlap, only where the anomaly model searches, fp32",
    "whole-search": "whole slice cropped to the search region (lungs), fp32",
    "whole": "whole slice cropped to the body, fp32",
    "whole-full": "whole slice, no crop, fp32",
    "whole-bf16": "whole slice cropped to the body, bf16 autocast",
}
# pairs whose difference on body pixels shows what skipping air changes
AIR_PAIRS = (("tiles", "tiles-all"), ("whole", "whole-full"), ("tiles96-search", "tiles96-nooverlap"))
BF16_PAIRS = (("tiles", "tiles-bf16"), ("whole", "whole-bf16"))


WEIGHTS: dict[str, Path] = {}  # config name -> trained weights to use instead of random ones (--weights)


def build_detector(config_name: str, options: dict) -> Detector:
    """Random weights are fine for speed; the seed fixes them so every method sees the same model.

    With --weights, the trained model is loaded instead (to see whether scores agree with trained weights)."""
    config = CONFIGS[config_name]
    if config_name in WEIGHTS:
        from models.checkpoint import load_model

        loaded = load_model(WEIGHTS[config_name])
        meta = loaded.metadata
        meta.patch_size = options.get("patch", meta.patch_size)
        opts = {k: v for k, v in options.items() if k in ScoringOptions.__dataclass_fields__}
        return Detector(loaded.diffusion, meta, device="cpu", options=ScoringOptions(batch_size=1, **opts))
    torch.manual_seed(0)
    unet = Unet(channels=1, **config["unet"])
    diffusion = GaussianDiffusion(unet, config["patch"])
    patch = options.get("patch", config["patch"])
    meta = ModelMetadata(name=f"bench-{config_name}", patch_size=patch, windows=config["windows"])
    opts = {k: v for k, v in options.items() if k in ScoringOptions.__dataclass_fields__}
    return Detector(diffusion, meta, device="cpu", options=ScoringOptions(batch_size=1, **opts))


def reference_residuals(detector: Detector, slices: list[np.ndarray]) -> list[np.ndarray]:
    """The authors' computation: 96-px patches, p_sample at t = 0 in fp32, residual = x - x_prev."""
    maps = []
    for values in slices:
        x = torch.from_numpy(detector.model_input(values))[None]
        out = torch.zeros_like(x)
        starts = tile_starts(x.shape[-1], REFERENCE_PATCH, REFERENCE_PATCH)
        tiles = [(y, xx) for y in starts for xx in starts]
        for begin in range(0, len(tiles), 32):  # the authors' DataLoader batch size
            chunk = tiles[begin : begin + 32]
            batch = torch.cat([x[..., y : y + REFERENCE_PATCH, xx : xx + REFERENCE_PATCH] for y, xx in chunk])
            with torch.inference_mode():
                x_prev = detector.diffusion.p_sample_btd(batch)
            residual = batch - x_prev
            for (y, xx), tile in zip(chunk, residual, strict=True):
                out[0, :, y : y + REFERENCE_PATCH, xx : xx + REFERENCE_PATCH] = tile
        maps.append(out[0].numpy())
    return maps


def patch_scores(residual: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean squared residual of each 96-px reference patch that touches the body."""
    starts = tile_starts(residual.shape[-1], REFERENCE_PATCH, REFERENCE_PATCH)
    values = []
    for y in starts:
        for x in starts:
            if mask[y : y + REFERENCE_PATCH, x : x + REFERENCE_PATCH].any():
                values.append(float(np.mean(residual[:, y : y + REFERENCE_PATCH, x : x + REFERENCE_PATCH] ** 2)))
    return np.asarray(values)


def timed(fn: Callable[[], list[np.ndarray]]) -> tuple[float, list[np.ndarray]]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_timing(config_name: str, n_slices: int, repeats: int, methods: list[str]) -> dict:
    slices = [read_hu(path)[0] for path in SLICES[:n_slices]]
    detectors = {name: build_detector(config_name, METHODS[name]) for name in methods}
    ref_detector = build_detector(config_name, {"precision": "fp32"})
    masks = [ref_detector.anomaly.body_mask(values) for values in slices]
    # warm-up (first calls allocate and pick kernels)
    ref_detector.residual_maps([slices[0][:128, :128]])
    times: dict[str, list[float]] = {"reference (96 px patches, p_sample, fp32)": []}
    times.update({name: [] for name in methods})
    maps: dict[str, list[np.ndarray]] = {}
    for _ in range(repeats):
        elapsed, maps["reference"] = timed(lambda: reference_residuals(ref_detector, slices))
        times["reference (96 px patches, p_sample, fp32)"].append(elapsed / len(slices))
        for name, detector in detectors.items():
            elapsed, maps[name] = timed(lambda d=detector: d.residual_maps(slices))
            times[name].append(elapsed / len(slices))
    reference_time = min(times["reference (96 px patches, p_sample, fp32)"])
    ref_scores = [patch_scores(r, m) for r, m in zip(maps["reference"], masks, strict=True)]
    anomaly = ref_detector.anomaly

    def product_scores(residuals: list[np.ndarray]) -> np.ndarray:
        """The product's slice score: the anomaly model's map of the residual, its maximum."""
        return np.array(
            [anomaly.slice_score(anomaly.anomaly_map(r, v)) for r, v in zip(residuals, slices, strict=True)]
        )

    ref_product = product_scores(maps["reference"])
    rows = []
    for name, values in times.items():
        key = "reference" if name.startswith("reference") else name
        ours = [patch_scores(r, m) for r, m in zip(maps[key], masks, strict=True)]
        a, b = np.concatenate(ref_scores), np.concatenate(ours)
        slice_ref = np.array([s.max() for s in ref_scores])
        slice_ours = np.array([s.max() for s in ours])
        rows.append(
            {
                "method": name,
                "description": DESCRIPTIONS.get(name, name),
                "s_per_slice": min(values),
                "slices_per_s": 1.0 / min(values),
                "speedup_vs_reference": reference_time / min(values),
                "patch_score_pearson_r": float(np.corrcoef(a, b)[0, 1]),
                "slice_score_rel_diff_max": float(np.max(np.abs(slice_ours - slice_ref) / slice_ref)),
                "anomaly_score_rel_diff_max": float(
                    np.max(np.abs(product_scores(maps[key]) - ref_product) / np.maximum(np.abs(ref_product), 1e-9))
                ),
            }
        )

    def body_difference(first: str, second: str) -> dict:
        inside = [np.broadcast_to(m, r.shape) for r, m in zip(maps[first], masks, strict=True)]
        full = np.concatenate([r[i] for r, i in zip(maps[first], inside, strict=True)])
        other = np.concatenate([r[i] for r, i in zip(maps[second], inside, strict=True)])
        return {
            "mean_abs_diff": float(np.mean(np.abs(full - other))),
            "max_abs_diff": float(np.max(np.abs(full - other))),
            "mean_abs_residual": float(np.mean(np.abs(full))),
            "pearson_r": float(np.corrcoef(full, other)[0, 1]),
            "anomaly_score_abs_diff_max": float(
                np.max(np.abs(product_scores(maps[first]) - product_scores(maps[second])))
            ),
        }

    air = {f"{a} vs {b}": body_difference(a, b) for a, b in AIR_PAIRS if a in maps and b in maps}
    bf16 = {f"{b} vs {a}": body_difference(a, b) for a, b in BF16_PAIRS if a in maps and b in maps}
    unet = ref_detector.diffusion.model
    return {
        "config": config_name,
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in CONFIGS[config_name]["unet"].items()},
        "patch": CONFIGS[config_name]["patch"],
        "n_params": sum(p.numel() for p in unet.parameters()),
        "slices": n_slices,
        "repeats": repeats,
        "body_fraction": float(np.mean([m.mean() for m in masks])),
        "rows": rows,
        "air_skip_effect_on_body_residual": air,
        "bf16_vs_fp32_residual": bf16,
    }


def _maxrss_mb() -> float:
    """Peak resident memory of this process (VmHWM): unlike ru_maxrss it is not inherited through fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_memory_child(config_name: str, method: str) -> None:
    """In a fresh process: the peak memory one slice adds on top of the loaded model."""
    values = read_hu(SLICES[0])[0]
    if method == "reference":
        detector = build_detector(config_name, {"precision": "fp32"})
        before = _maxrss_mb()
        reference_residuals(detector, [values])
    else:
        detector = build_detector(config_name, METHODS[method])
        before = _maxrss_mb()
        detector.residual_maps([values])
    print(json.dumps({"peak_rss_mb": _maxrss_mb(), "added_mb": _maxrss_mb() - before}))


def run_memory(config_name: str, methods: list[str]) -> dict[str, dict]:
    results = {}
    for method in ["reference", *methods]:
        completed = subprocess.run(
            [sys.executable, __file__, "--config", config_name, "--memory-child", method]
            + (["--weights", str(WEIGHTS[config_name])] if config_name in WEIGHTS else []),
            capture_output=True,
            text=True,
            check=True,
        )
        results[method] = json.loads(completed.stdout.strip().splitlines()[-1])
    return results


def machine() -> dict:
    load = os.getloadavg()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1_5_15": [round(v, 2) for v in load],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory per method (subprocesses)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--weights", type=Path, help="trained weights for --config instead of random ones")
    parser.add_argument("--out", type=Path, help="append the JSON result to this file (one object per line)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.weights:
        WEIGHTS[args.config] = args.weights
    if args.memory_child:
        run_memory_child(args.config, args.memory_child)
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods: {', '.join(unknown)}")
    result = {"machine": machine(), **run_timing(args.config, args.slices, args.repeats, methods)}
    result["weights"] = str(args.weights) if args.weights else "random (seed 0)"
    result["slice_files"] = [str(p.relative_to(REPO.parent)) for p in SLICES[: args.slices]]
    if args.memory:
        result["memory"] = run_memory(args.config, methods)
    result["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
