"""`btd bench build`: a labelled forensic benchmark from the HELD-OUT patients only.

Genuine slices (with lungs) of the test patients of models.corpus, and tampered copies per method, each
with its exact ground-truth mask. Stored as compressed .npz (HU as int16, rounded as a DICOM writer would,
and the mask) with a manifest.jsonl, and a log of every skipped case with its reason, so that nothing is
silently mislabelled. A held-out patient is never a copy-move donor for a training patient and vice versa:
donors come from the test patients too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.corpus import (
    DEFAULT_DATA_ROOT,
    DEFAULT_TEST_PATIENTS,
    CorpusSlice,
    Lesion,
    discover,
    discover_dicom,
    load_annotations,
    split_by_patient,
)
from models.forensics.methods import ALL_METHODS
from models.forensics.tamper import Skip, Tamper, inject_sphere
from models.lungmask import has_lungs

log = logging.getLogger(__name__)

TOTALSEG_FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "ct_series_20"


@dataclass
class BenchItem:
    id: str
    patient: str
    slice_key: str
    label: int
    method: str
    genuine_id: str
    file: str
    box: tuple[int, int, int, int] | None = None
    details: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "patient": self.patient,
            "slice_key": self.slice_key,
            "label": self.label,
            "method": self.method,
            "genuine_id": self.genuine_id,
            "file": self.file,
            "box": list(self.box) if self.box else None,
            "details": self.details or {},
        }


def test_slices(data_root: Path = DEFAULT_DATA_ROOT, test_patients: Sequence[str] = DEFAULT_TEST_PATIENTS) -> list:
    """The held-out slices: the corpus's test side plus the TotalSegmentator series of tests/fixtures."""
    _, test = split_by_patient(discover(data_root), test_patients)
    if "TOTALSEG-EXAMPLE" in test_patients:
        test += fixture_slices()
    return test


def fixture_slices() -> list[CorpusSlice]:
    """The held-out TotalSegmentator series of tests/fixtures (not in the chest-CT corpus folder)."""
    return discover_dicom(TOTALSEG_FIXTURE, patient="TOTALSEG-EXAMPLE") if TOTALSEG_FIXTURE.is_dir() else []


def _round_robin(items: list[CorpusSlice], limit: int, rng: np.random.Generator) -> list[CorpusSlice]:
    """Up to `limit` slices spread over patients (a 48-slice volume must not crowd out a 2-slice patient)."""
    by_patient: dict[str, list[CorpusSlice]] = {}
    for item in items:
        by_patient.setdefault(item.patient, []).append(item)
    queues = [list(rng.permutation(len(v))) for v in by_patient.values()]
    patients = list(by_patient.values())
    chosen: list[CorpusSlice] = []
    while len(chosen) < limit and any(queues):
        for queue, slices in zip(queues, patients, strict=True):
            if queue and len(chosen) < limit:
                chosen.append(slices[int(queue.pop())])
    return chosen


class BenchWriter:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        (self.out_dir / "slices").mkdir(parents=True, exist_ok=True)
        self.items: list[BenchItem] = []
        self.skips: list[dict[str, str]] = []
        # Building again into the same folder adds methods: earlier items (and their ids) are kept.
        if (self.out_dir / "manifest.jsonl").is_file():
            for entry in read_manifest(self.out_dir):
                entry["box"] = tuple(entry["box"]) if entry["box"] else None
                self.items.append(BenchItem(**entry))
            skipped = self.out_dir / "skipped.jsonl"
            if skipped.is_file():
                self.skips = [json.loads(line) for line in skipped.read_text().splitlines() if line]
        self.known = {item.id for item in self.items}

    def next_tamper_number(self) -> int:
        numbers = [int(item.id[1:]) for item in self.items if item.id.startswith("t")]
        return max(numbers, default=0)

    def add(self, item: BenchItem, hu: np.ndarray, mask: np.ndarray | None) -> None:
        if item.id in self.known:
            return
        self.known.add(item.id)
        hu16 = np.clip(np.round(hu), -32768, 32767).astype(np.int16)
        arrays = {"hu": hu16}
        if mask is not None:
            arrays["mask"] = mask
        np.savez_compressed(self.out_dir / item.file, **arrays)
        self.items.append(item)

    def skip(self, method: str, slice_key: str, reason: str) -> None:
        entry = {"method": method, "slice": slice_key, "reason": reason}
        if entry in self.skips:
            return
        self.skips.append({"method": method, "slice": slice_key, "reason": reason})
        log.info("bench skip %s %s: %s", method, slice_key, reason)

    def finish(self, info: dict[str, Any]) -> dict[str, Any]:
        with (self.out_dir / "manifest.jsonl").open("w") as handle:
            for item in self.items:
                handle.write(json.dumps(item.to_dict()) + "\n")
        (self.out_dir / "skipped.jsonl").write_text("".join(json.dumps(s) + "\n" for s in self.skips))
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.method] = counts.get(item.method, 0) + 1
        summary = {**info, "counts": counts, "skipped": len(self.skips)}
        (self.out_dir / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def build_benchmark(
    out_dir: Path,
    data_root: Path = DEFAULT_DATA_ROOT,
    methods: Sequence[str] = ALL_METHODS,
    per_method: int = 30,
    seed: int = 0,
    model_path: Path | None = None,
    test_patients: Sequence[str] = DEFAULT_TEST_PATIENTS,
) -> dict[str, Any]:
    """Write the benchmark to out_dir; returns its summary (counts per method, skips)."""
    from models.forensics.red_team import tamper_slice

    rng = np.random.default_rng(seed)
    writer = BenchWriter(out_dir)
    slices = test_slices(data_root, test_patients)
    annotations = load_annotations(data_root)
    model = None
    if any("diffusion" in m for m in methods):
        from models.checkpoint import load_model
        from models.forensics.red_team import default_model_path

        model = load_model(model_path or default_model_path())

    genuine: list[tuple[CorpusSlice, np.ndarray, BenchItem]] = []
    for index, item in enumerate(slices):
        hu = item.hu()
        if not has_lungs(hu):
            writer.skip("genuine", item.key, "no lungs in this slice")
            continue
        gid = f"g{index:04d}"
        record = BenchItem(gid, item.patient, item.key, 0, "genuine", gid, f"slices/{gid}.npz")
        writer.add(record, hu, None)
        genuine.append((item, hu, record))

    donors = [(item, hu, lesion) for item, hu, _ in genuine for lesion in annotations.get(item.key, [])]
    counter = writer.next_tamper_number()

    def add_tamper(base: tuple[CorpusSlice, np.ndarray, BenchItem], result: Tamper | Skip, method: str) -> None:
        nonlocal counter
        item, _, record = base
        if isinstance(result, Skip):
            writer.skip(method, item.key, result.reason)
            return
        counter += 1
        tid = f"t{counter:05d}"
        writer.add(
            BenchItem(
                tid, item.patient, item.key, 1, method, record.id, f"slices/{tid}.npz", result.box, result.details
            ),
            result.hu,
            result.mask,
        )

    pool = [g[0] for g in genuine]
    by_key = {g[0].key: g for g in genuine}
    for method in methods:
        if method in ("inject-noise", "inject-smooth", "inject-diffusion"):
            for item in _round_robin(pool, per_method, rng):
                base = by_key[item.key]
                add_tamper(base, tamper_slice(method, base[1], rng, model=model), method)
        elif method == "copy-move":
            if not donors:
                writer.skip(method, "*", "no annotated lesion among the held-out patients")
                continue
            for item in _round_robin(pool, per_method, rng):
                base = by_key[item.key]
                others = [d for d in donors if d[0].patient != item.patient] or donors
                donor_item, donor_hu, lesion = others[int(rng.integers(len(others)))]
                result = tamper_slice(method, base[1], rng, donor=(donor_hu, lesion))
                if not isinstance(result, Skip):
                    result.details["donor"] = donor_item.key
                add_tamper(base, result, method)
        elif method in ("remove", "remove-diffusion"):
            for item, hu, record in genuine:
                lesions: list[Lesion] = annotations.get(item.key, [])
                if not lesions:
                    continue
                add_tamper((item, hu, record), tamper_slice(method, hu, rng, lesions=lesions, model=model), method)
        elif method == "inject-3d":
            _add_spheres(genuine, rng, add_tamper)
    previous = (
        json.loads((Path(out_dir) / "bench.json").read_text()) if (Path(out_dir) / "bench.json").is_file() else {}
    )
    info = {
        "seed": seed,
        "per_method": per_method,
        "methods": sorted(set(previous.get("methods", [])) | set(methods)),
        "test_patients": list(test_patients),
        "model_for_diffusion_attacks": str(model_path) if model_path else None,
    }
    return writer.finish(info)


def _add_spheres(genuine: list, rng: np.random.Generator, add_tamper) -> None:
    """Two 3-D nodules per contiguous held-out series (slices sorted along z, same series)."""
    series: dict[tuple[str, str], list] = {}
    for entry in genuine:
        item = entry[0]
        if item.position_z is None:
            continue
        series.setdefault((item.patient, item.series_uid or item.path), []).append(entry)
    for entries in series.values():
        entries.sort(key=lambda e: e[0].position_z)
        if len(entries) < 3:
            continue
        zs = [e[0].position_z for e in entries]
        spacing = float(np.median(np.diff(zs)))
        pixel_mm = 0.7
        for _ in range(2):
            result = inject_sphere([e[1] for e in entries], spacing, pixel_mm, rng)
            if isinstance(result, Skip):
                add_tamper(entries[0], result, "inject-3d")
                continue
            for k, tamper in result:
                add_tamper(entries[k], tamper, "inject-3d")


def read_manifest(bench_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(bench_dir) / "manifest.jsonl").read_text().splitlines() if line]


def load_item(bench_dir: Path, item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(Path(bench_dir) / item["file"]) as data:
        hu = data["hu"].astype(np.float32)
        mask = data["mask"] if "mask" in data.files else None
    return hu, mask
