"""Group DICOM files into series, order their slices along the patient, and stream their pixels.

Only headers are kept while grouping (pixels are deferred), and `iter_slices` decodes one file at a
time, so a 1,000-slice series never has all its pixels in memory.

Order: the slice normal (cross product of the ImageOrientationPatient row and column directions) dotted
with ImagePositionPatient. It is right for gantry tilt (the slices stay parallel planes, only sheared) and
for uneven gaps (order does not care about spacing). Without geometry on every slice, InstanceNumber,
then the file name, decide.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from models.preprocess import (
    SUPPORTED_MODALITIES,
    NotAssessable,
    PathOrDataset,
    assessability_problem,
    header_value,
    number_of_frames,
    open_dataset,
    read_hu,
)

UNREADABLE_SERIES = ""


@dataclass
class SliceRef:
    """One frame to score: where it comes from and where it lies."""

    source: PathOrDataset
    path: str | None
    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None  # 1-based for multi-frame instances, None for single-frame ones
    rows: int
    columns: int
    position: float | None  # along the series' slice normal, mm
    instance_number: int | None
    problem: str | None = None  # why it cannot be judged, known from the header (or the file being unreadable)


@dataclass
class SeriesGroup:
    """The slices of one series in anatomical order (pixels not loaded)."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    slices: list[SliceRef] = field(default_factory=list)


# Slices are neighbours when they lie at most this many times the series' usual spacing apart: a missing
# slice or a second stack in the same series is a gap, never a neighbour.
ADJACENT_SPACING_FACTOR = 1.5
_SAME_POSITION_MM = 1e-3


def usual_spacing(positions: Iterable[float]) -> float | None:
    """A series' usual distance between slices: the median of the gaps between distinct positions."""
    gaps = np.diff(sorted(set(positions)))
    gaps = gaps[gaps > _SAME_POSITION_MM]
    return float(np.median(gaps)) if gaps.size else None


def adjacent(a: float | None, b: float | None, spacing: float | None) -> bool:
    """Whether slices at positions a and b (mm along the series) are neighbours in a series of this spacing."""
    if spacing is None or a is None or b is None:
        return False
    return _SAME_POSITION_MM < abs(a - b) <= ADJACENT_SPACING_FACTOR * spacing


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Files as given, folders walked recursively (sorted, hidden files skipped)."""
    files: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(str(Path(root) / n) for n in sorted(names) if not n.startswith("."))
        else:
            files.append(str(path))
    return files


def _vector(value: object, length: int) -> np.ndarray | None:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return array if array.shape == (length,) and np.isfinite(array).all() else None


def _functional(ds: Dataset, index: int, sequence: str, keyword: str) -> object:
    """A value from the per-frame functional group of frame `index`, else the shared group, else top level."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for groups in (per_frame[index] if per_frame and index < len(per_frame) else None, shared[0] if shared else None):
        if groups is not None and sequence in groups and groups[sequence]:
            value = groups[sequence][0].get(keyword)
            if value is not None:
                return value
    return ds.get(keyword)


def _normal(ds: Dataset) -> np.ndarray | None:
    orientation = _vector(_functional(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    if orientation is None:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 1e-6 else None


def _sop_instance_uid(ds: Dataset, fallback: str) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(
        header_value(ds, "SOPInstanceUID")
        or (header_value(meta, "MediaStorageSOPInstanceUID") if meta is not None else None)
        or fallback
    )


def _instance_number(ds: Dataset) -> int | None:
    try:
        return int(header_value(ds, "InstanceNumber"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def describe(
    source: PathOrDataset, modalities: tuple[str, ...] = SUPPORTED_MODALITIES
) -> tuple[tuple[str, str, str], list[SliceRef]]:
    """Read one file's header: its (study, series, modality) key and a SliceRef per frame."""
    path = None if isinstance(source, Dataset) else str(source)
    fallback_uid = Path(path).name if path else "unknown"
    try:
        ds = source if isinstance(source, Dataset) else _read_header(path)  # type: ignore[arg-type]
    except NotAssessable as exc:
        ref = SliceRef(source, path, fallback_uid, "", None, 0, 0, None, None, exc.reason)
        return (UNREADABLE_SERIES, UNREADABLE_SERIES, ""), [ref]
    key = (
        str(header_value(ds, "StudyInstanceUID", "")),
        str(header_value(ds, "SeriesInstanceUID", "")),
        str(header_value(ds, "Modality", "")),
    )
    sop_uid = _sop_instance_uid(ds, fallback_uid)
    sop_class = str(
        header_value(ds, "SOPClassUID", "")
        or header_value(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID", "")
    )
    problem = assessability_problem(ds, modalities)
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    normal = _normal(ds)
    n_frames = number_of_frames(ds)
    refs = []
    for index in range(n_frames):
        position = _vector(_functional(ds, index, "PlanePositionSequence", "ImagePositionPatient"), 3)
        along = float(np.dot(normal, position)) if normal is not None and position is not None else None
        frame = index + 1 if n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds else None
        refs.append(
            SliceRef(source, path, sop_uid, sop_class, frame, rows, columns, along, _instance_number(ds), problem)
        )
    return key, refs


def _read_header(path: str) -> Dataset:
    # defer_size keeps PixelData out of memory but leaves its presence visible to the header checks
    try:
        import pydicom

        return pydicom.dcmread(path, defer_size=4096)
    except Exception:
        return open_dataset(path)  # gives the NotAssessable reason the same way read_hu does


def _sort(slices: list[SliceRef]) -> list[SliceRef]:
    if slices and all(s.position is not None for s in slices):
        return sorted(slices, key=lambda s: (s.position, s.instance_number or 0, s.frame or 0))
    return sorted(slices, key=lambda s: (s.instance_number is None, s.instance_number or 0, s.path or "", s.frame or 0))


def group_series(
    sources: Iterable[PathOrDataset], modalities: tuple[str, ...] = SUPPORTED_MODALITIES
) -> list[SeriesGroup]:
    """Files (or Datasets) -> series in first-seen order, each with its slices sorted along the patient.

    Unreadable files form one group with an empty series UID, so they are reported rather than dropped.
    """
    groups: dict[tuple[str, str, str], SeriesGroup] = {}
    for source in sources:
        key, refs = describe(source, modalities)
        group = groups.get(key)
        if group is None:
            group = groups[key] = SeriesGroup(*key)
        group.slices.extend(refs)
    for group in groups.values():
        group.slices = _sort(group.slices)
    return list(groups.values())


def iter_slices(
    group: SeriesGroup, modalities: tuple[str, ...] = SUPPORTED_MODALITIES
) -> Iterator[tuple[SliceRef, np.ndarray | None, str | None]]:
    """(slice, modality units (H, W) float32 or None, reason it is not assessed or None), in order.

    Decodes each file when first needed and keeps only the last decoded file (a multi-frame instance is
    decoded once for all its frames).
    """
    cached_key: object = None
    cached: np.ndarray | NotAssessable | None = None
    for ref in group.slices:
        if ref.problem:
            yield ref, None, ref.problem
            continue
        key = id(ref.source) if isinstance(ref.source, Dataset) else ref.path
        if key != cached_key:
            cached_key = key
            try:
                cached = read_hu(ref.source, modalities=modalities)
                # Frozen: nothing downstream writes into a slice, and a frozen slice's content key is computed
                # once however often its masks and cues ask for it (models/content_cache.py).
                cached.setflags(write=False)
            except NotAssessable as exc:
                cached = exc
        if isinstance(cached, NotAssessable):
            yield ref, None, cached.reason
        else:
            index = (ref.frame or 1) - 1
            yield ref, cached[index], None  # type: ignore[index]
