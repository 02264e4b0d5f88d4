"""Score one study: spool files -> models.Detector -> per-series results, residual maps, study verdict.

This module does the work of a scoring job and nothing about its bookkeeping: the state machine,
retries and dispatching live in worker/tasks.py. It knows the spool and the result tables, never the
network.

Why the detector is a process-wide singleton loaded lazily: loading weights takes seconds and a worker
scores many studies, so each worker process loads it once, on its first study (a worker that never
gets a study never pays for it).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.contracts import map_relpath, progress_path
from core.observability.logs import log_event
from core.observability.metrics import MODEL_LOAD_SECONDS, SCORING_SECONDS_PER_SLICE
from core.settings import Settings
from core.spool import sha256_file
from models.results import study_verdict as ranked_study_verdict

log = logging.getLogger("btd.worker.pipeline")


class PermanentScoringError(Exception):
    """A study that no retry can fix (its files are gone or altered): it goes straight to FAILED."""


# --------------------------------------------------------------------------------------------------
# The detector, once per process


_detector_lock = threading.Lock()
_detector: Any = None
_detector_key: tuple[str | None, str] | None = None


def get_detector(settings: Settings) -> Any:
    """The process's `models.Detector` for BTD_MODEL (None = the default model), loaded on first use."""
    global _detector, _detector_key
    key = (settings.model, settings.device)
    with _detector_lock:
        if _detector is None or _detector_key != key:
            from models import Detector  # torch is heavy: import it only in processes that score

            threads = settings.scoring_torch_threads
            if threads:
                import torch

                torch.set_num_threads(threads)
            started = time.perf_counter()
            _detector = Detector.load(path=settings.model, device=settings.device)
            seconds = time.perf_counter() - started
            MODEL_LOAD_SECONDS.observe(seconds)
            _detector_key = key
            log_event(log, "model.loaded", model=_model_name(_detector), seconds=round(seconds, 3))
        return _detector


def _model_name(detector: Any) -> str | None:
    info = getattr(detector, "info", None)
    return getattr(info, "name", None)


def model_sha256(detector: Any) -> str | None:
    info = getattr(detector, "info", None)
    return getattr(info, "weights_sha256", None)


# --------------------------------------------------------------------------------------------------
# Progress, readable by the API whichever process scores


def write_progress(data_dir: Path, study_uid: str, done: int, total: int) -> None:
    path = progress_path(data_dir, study_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"done": done, "total": total, "updated_at": datetime.now(UTC).isoformat()}
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def clear_progress(data_dir: Path, study_uid: str) -> None:
    progress_path(data_dir, study_uid).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Inputs: the study's latest-version files in the spool


@dataclass(frozen=True)
class SpoolFile:
    sop_instance_uid: str
    path: Path  # absolute
    sha256: str | None


@dataclass
class SeriesInput:
    series_uid: str
    modality: str | None
    files: list[SpoolFile] = field(default_factory=list)


def verify_spool_files(series: Sequence[SeriesInput]) -> None:
    """Refuse to score unless every file is present with the bytes recorded at receipt.

    Why: a verdict must be tied to the exact bytes the PACS sent (chain of custody). A missing file or
    one whose SHA-256 changed since receipt cannot be fixed by a retry, so it is a permanent error.
    """
    files = [f for s in series for f in s.files]
    if not files:
        raise PermanentScoringError("study has no instances in the spool")
    missing = [f for f in files if not f.path.is_file()]
    if missing:
        raise PermanentScoringError(f"spool files missing: {len(missing)} of {len(files)} (first: {missing[0].path})")
    for f in files:
        if f.sha256 and sha256_file(f.path) != f.sha256:
            raise PermanentScoringError(f"spool file altered since receipt (SHA-256 differs): {f.path}")


# --------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ScoredSeries:
    series_uid: str
    modality: str | None
    result: Any  # models.SeriesResult
    map_paths: dict[tuple[str, int | None], str]  # (sop_instance_uid, frame) -> path relative to DATA_DIR


@dataclass
class StudyScore:
    verdict: str
    score: float | None
    series: list[ScoredSeries]
    model_name: str | None
    model_sha256: str | None


def save_map(data_dir: Path, relpath: str, residual_map: np.ndarray) -> None:
    """Write a residual map as float16 .npy atomically (a reader never sees half a file)."""
    target = Path(data_dir) / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, np.asarray(residual_map, dtype=np.float16))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def study_verdict(series_results: Sequence[Any]) -> tuple[str, float | None]:
    """(verdict, score) of a study, ranked by `models.results.study_verdict` (its reason is not stored)."""
    verdict, score, _reason = ranked_study_verdict(series_results)
    return verdict, score


ProgressCallback = Callable[[int, int], None]


def series_threads(detector: Any, wanted: int | None) -> int:
    """How many series of a study to score at once: `wanted`, or 4 on a GPU and 1 on the CPU."""
    if wanted:
        return wanted
    device = getattr(detector, "device", None)
    return 4 if getattr(device, "type", "cpu") == "cuda" else 1


def score_study_files(
    detector: Any,
    study_uid: str,
    series: Sequence[SeriesInput],
    data_dir: Path,
    on_progress: ProgressCallback | None = None,
    references: Any = None,
    series_in_parallel: int | None = None,
) -> StudyScore:
    """Score every series of a study, saving the residual maps of suspicious instances as they stream.

    `references`: the site's own scanner references (models.reference.ReferenceSet), looked up before the
    model's shipped ones for a series too short to be judged against itself.
    `series_in_parallel`: series scored at once on threads of their own (`series_threads`); their model
    passes merge into shared batches in the detector. Results keep the study's series order either way."""
    total = sum(len(s.files) for s in series)
    counted = _StudyProgress(total, on_progress)
    counted.report()
    threads = min(series_threads(detector, series_in_parallel), max(1, len(series)))
    score = functools.partial(_score_one_series, detector, study_uid, data_dir, counted, references)
    if threads == 1:
        scored = [score(item) for item in series]
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="btd-series") as pool:
            scored = list(pool.map(score, series))  # the first error is raised here, after the others end
    counted.report()
    verdict, score_value = study_verdict([s.result for s in scored])
    return StudyScore(verdict, score_value, scored, _model_name(detector), model_sha256(detector))


class _StudyProgress:
    """Study-wide slice counts from the series' own progress calls, whichever thread they come from; the
    callback runs under a lock, so counts reach it in order (and an exception it raises, e.g. a lost
    lease, stops the series that reported)."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total, self.callback, self.done = total, callback, 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done = min(self.total, self.done + int(n))
            if self.callback:
                self.callback(self.done, self.total)

    def report(self) -> None:
        with self._lock:
            if self.callback:
                self.callback(self.done, self.total)


def _score_one_series(
    detector: Any, study_uid: str, data_dir: Path, counted: _StudyProgress, references: Any, item: SeriesInput
) -> ScoredSeries:
    map_paths: dict[tuple[str, int | None], str] = {}

    def on_flagged(instance_result: Any, residual_map: np.ndarray) -> None:
        # models calls this only for slices whose final verdict is suspicious
        key = (instance_result.sop_instance_uid, instance_result.frame)
        relpath = map_relpath(study_uid, *key)
        save_map(data_dir, relpath, residual_map)
        map_paths[key] = relpath

    reported = 0

    def progress(n_done: int) -> None:
        # models reports slices finished since its last call (never more than the series has)
        nonlocal reported
        n = min(int(n_done), len(item.files) - reported)
        reported += n
        counted.add(n)

    started = time.perf_counter()
    result = detector.score_series(
        [str(f.path) for f in item.files], progress=progress, on_flagged=on_flagged, reference=references
    )
    elapsed = time.perf_counter() - started
    counted.add(len(item.files) - reported)  # the series is done: count what it did not report
    n_slices = max(1, len(getattr(result, "instances", []) or []))
    for _ in range(n_slices):
        SCORING_SECONDS_PER_SLICE.observe(elapsed / n_slices)
    log_event(
        log,
        "series.scored",
        study_uid=study_uid,
        series_uid=item.series_uid,
        verdict=result.verdict,
        score=result.score,
        n_instances=len(item.files),
        seconds=round(elapsed, 3),
    )
    return ScoredSeries(item.series_uid, item.modality, result, map_paths)
