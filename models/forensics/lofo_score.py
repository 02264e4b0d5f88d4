"""Raw cue scores of every genuine slice and every tampered slice of the leave-one-family-out benchmark.

Why cached per slice: the evaluation (models/forensics/lofo.py) tries cue subsets, fusion rules and
thresholds, and puts tampered slices back into their series; none of that needs a model pass again. Per
entry (a genuine slice, a tampered slice, or a genuine neighbour of a tampered slice, whose continuity
changes) one JSON line: each cue's raw score and the (row, column) of its map's maximum, plus the copy-move
keypoints in a pickle. Resumable: entries already in the output are skipped; shards split the work
between processes (`--shard 0/2`, `--shard 1/2`).
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from models.cues.continuity import continuity_map
from models.cues.copymove import keypoints
from models.cues.noise import noise_map
from models.forensics.lofo_build import SeriesInfo, corpus_series

log = logging.getLogger(__name__)


def _peak(cue) -> list[Any] | None:
    if cue.score is None:
        return [None, None, None, cue.reason]
    y, x = cue.peak  # type: ignore[misc]
    return [round(float(cue.score), 5), y, x, None]


class SliceSource:
    """HU of genuine slices (read once) and of tampered slices (from the objects' npz)."""

    def __init__(self, bench_dir: Path, series: list[SeriesInfo]) -> None:
        self.bench = Path(bench_dir)
        self.series = {s.sid: s for s in series}
        self._genuine: dict[tuple[str, int], np.ndarray] = {}

    def genuine(self, sid: str, i: int) -> np.ndarray:
        if (sid, i) not in self._genuine:
            if len(self._genuine) > 300:
                self._genuine.pop(next(iter(self._genuine)))
            self._genuine[(sid, i)] = self.series[sid].slices[i].hu()
        return self._genuine[(sid, i)]

    def tampered(self, oid: str) -> dict[int, np.ndarray]:
        with np.load(self.bench / "objects" / f"{oid}.npz") as data:
            return {int(k[3:]): data[k].astype(np.float32) for k in data.files if k.startswith("hu_")}


def entries(bench_dir: Path, series: list[SeriesInfo]) -> Iterator[tuple[str, str, int, str | None]]:
    """(entry id, sid, slice index, object id or None) for every slice whose cues must be computed."""
    for s in series:
        for i in range(len(s.slices)):
            yield f"g|{s.sid}|{i}", s.sid, i, None
    for line in (Path(bench_dir) / "objects.jsonl").read_text().splitlines():
        record = json.loads(line)
        edited = {e["index"] for e in record["slices"]}
        for i in sorted(edited):
            yield f"t|{record['id']}|{i}", record["sid"], i, record["id"]
        for j in sorted({i + d for i in edited for d in (-1, 1)} - edited):
            if 0 <= j < len({x.sid: x for x in series}[record["sid"]].slices):
                yield f"n|{record['id']}|{j}", record["sid"], j, record["id"]


def score(bench_dir: Path, out_dir: Path, shard: tuple[int, int] = (0, 1), model_path: Path | None = None) -> int:
    """Compute every missing entry of this shard; returns how many were computed."""
    import torch

    from models.detector import Detector

    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    (out_dir / "keypoints").mkdir(parents=True, exist_ok=True)
    done_path = out_dir / f"scores-{shard[0]}.jsonl"
    done = set()
    for path in out_dir.glob("scores-*.jsonl"):
        done |= {json.loads(line)["id"] for line in path.read_text().splitlines() if line}
    series = corpus_series()
    source = SliceSource(bench_dir, series)
    detector = Detector.load(model_path, device="cpu")
    anomaly = detector.anomaly
    by_sid = {s.sid: s for s in series}
    tampered_cache: dict[str, dict[int, np.ndarray]] = {}
    computed = 0
    started = time.monotonic()
    with done_path.open("a") as handle:
        for n, (eid, sid, i, oid) in enumerate(entries(bench_dir, series)):
            if n % shard[1] != shard[0] or eid in done:
                continue
            info = by_sid[sid]
            edits = {}
            if oid is not None:
                if oid not in tampered_cache:
                    tampered_cache.clear()
                    tampered_cache[oid] = source.tampered(oid)
                edits = tampered_cache[oid]

            def hu_at(k: int, edits: dict = edits, info: SeriesInfo = info, sid: str = sid) -> np.ndarray | None:
                if k < 0 or k >= len(info.slices):
                    return None
                return edits[k] if k in edits else source.genuine(sid, k)

            hu = hu_at(i)
            timing: dict[str, float] = {}
            t0 = time.perf_counter()
            features = anomaly.features(hu)
            search = features["lungs"]
            in_lungs = bool(features["has_lungs"])
            record: dict[str, Any] = {"id": eid, "in_lungs": in_lungs}
            if not eid.startswith("n|"):
                residual = detector.residual_maps([hu])[0]
                timing["btd"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                amap = anomaly.finish(anomaly.slice_map(residual, hu, features))
                y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
                record["btd"] = [round(float(amap.max()), 5), int(y), int(x), None]
                timing["btd"] += time.perf_counter() - t1
                t1 = time.perf_counter()
                record["noise"] = _peak(noise_map(hu, search))
                timing["noise"] = time.perf_counter() - t1
                t1 = time.perf_counter()
                kp = keypoints(hu, search)
                timing["copymove_keypoints"] = time.perf_counter() - t1
                (out_dir / "keypoints" / f"{eid.replace('/', '_')}.pkl").write_bytes(pickle.dumps(kp))
            t1 = time.perf_counter()
            spacing = info.spacing_mm
            record["continuity"] = _peak(
                continuity_map(hu, hu_at(i - 1), hu_at(i + 1), search, spacing, info.pixel_mm, max_spacing_mm=99.0)
            )
            timing["continuity"] = time.perf_counter() - t1
            record["seconds"] = {k: round(v, 3) for k, v in timing.items()}
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            computed += 1
            if computed % 20 == 0:
                log.info("shard %s: %d entries, %.0f s", shard, computed, time.monotonic() - started)
    return computed


def load_scores(out_dir: Path) -> dict[str, dict[str, Any]]:
    scores: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(out_dir).glob("scores-*.jsonl")):
        for line in path.read_text().splitlines():
            if line:
                record = json.loads(line)
                scores[record["id"]] = record
    return scores


KEYPOINTS_DIR = "keypoints-v2"  # the copy-move keypoints of models.cues.copymove as committed (noise-floor test)


def load_keypoints(out_dir: Path, eid: str):
    path = Path(out_dir) / KEYPOINTS_DIR / f"{eid.replace('/', '_')}.pkl"
    return pickle.loads(path.read_bytes()) if path.is_file() else None


def recompute_keypoints(bench_dir: Path, out_dir: Path) -> int:
    """Copy-move keypoints of every genuine and tampered slice with the current cue code (cheap: no model).

    Why separate: the keypoint descriptor changed after the first scoring run (2026-12-02: a noise-floor
    test replaced a fine-texture correlation); the other cues' cached scores are unaffected."""
    from models.lungmask import lung_mask

    target = Path(out_dir) / KEYPOINTS_DIR
    target.mkdir(parents=True, exist_ok=True)
    series = corpus_series()
    source = SliceSource(bench_dir, series)
    count = 0
    tampered: dict[str, dict[int, np.ndarray]] = {}
    for eid, sid, i, oid in entries(bench_dir, series):
        if eid.startswith("n|"):
            continue
        path = target / f"{eid.replace('/', '_')}.pkl"
        if path.is_file():
            continue
        if oid is not None and oid not in tampered:
            tampered.clear()
            tampered[oid] = source.tampered(oid)
        hu = tampered[oid][i] if oid is not None else source.genuine(sid, i)
        path.write_bytes(pickle.dumps(keypoints(hu, lung_mask(hu, dilate_px=10))))
        count += 1
    return count


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bench_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--keypoints-only", action="store_true", help="recompute the copy-move keypoints only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.keypoints_only:
        print(recompute_keypoints(args.bench_dir, args.out))
    else:
        a, b = (int(v) for v in args.shard.split("/"))
        print(score(args.bench_dir, args.out, (a, b)))
