"""`btd bench lofo-build`: the leave-one-family-out benchmark's series and tampered objects.

Why a benchmark of its own: the 2026-11 benchmark stored single slices of the held-out patients and
judged them against a reconstructed series; the independent evaluation sends tampered slices inside their
complete series, as a PACS does, and also as single-slice series. Here every genuine series of the corpus
(all collections, models.corpus.ALL_COLLECTIONS) is a unit, split by patient into selection patients
("train" + "validation" of models.corpus.FORENSIC_SPLIT: choices are made there) and test patients (only
reported). A tampered object is one attack on one series: a 2-D edit of one slice or a 3-D edit of every
slice it crosses, stored as the edited slices (HU int16, exact masks). The scoring step
(models/forensics/lofo.py) puts them back in their series.

Families: the five of models/forensics/families.py (2-D and 3-D forms) and the 2026-11 ones as they are
(models/forensics/tamper.py; inject-diffusion / remove-diffusion with the shipped model as the attacker's).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from models.corpus import (
    ALL_COLLECTIONS,
    DEFAULT_DATA_ROOT,
    FORENSIC_SPLIT,
    CorpusSlice,
    discover,
    load_annotations,
)
from models.forensics import families as fam
from models.forensics.bench import fixture_slices
from models.forensics.tamper import Skip, Tamper, copy_move, inject_nodule, inject_sphere, remove_lesion
from models.lungmask import has_lungs, lung_mask
from models.reference import ReferenceKey, reference_key, thickness_band

log = logging.getLogger(__name__)

NEW_2D = ("nps-nodule", "transplant", "inject-exemplar", "remove-exemplar", "copy-move-series")
NEW_3D = tuple(f"{f}-3d" for f in NEW_2D)
LEGACY = ("inject-noise", "inject-smooth", "copy-move", "remove", "inject-3d", "inject-diffusion", "remove-diffusion")
ALL_FAMILIES = (*NEW_2D, *NEW_3D, *LEGACY)
# The family each form belongs to for leave-one-family-out: the 2-D and 3-D forms of one family are left
# out together (a choice made on a family's 2-D form must not be reported on its 3-D form).
FAMILY_OF = {**{f: f for f in NEW_2D}, **{f"{f}-3d": f for f in NEW_2D}, **{f: "legacy-" + f for f in LEGACY}}


@dataclass
class SeriesInfo:
    """One genuine series of the corpus."""

    sid: str
    patient: str
    role: str  # "select" (train + validation patients) or "test"
    split: str  # train / validation / test
    key: ReferenceKey
    spacing_mm: float | None
    pixel_mm: float
    slices: list[CorpusSlice]
    lesions: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sid": self.sid,
            "patient": self.patient,
            "role": self.role,
            "split": self.split,
            "key": self.key.to_dict(),
            "spacing_mm": self.spacing_mm,
            "pixel_mm": self.pixel_mm,
            "n_slices": len(self.slices),
            "slice_keys": [s.key for s in self.slices],
        }


def _header_info(item: CorpusSlice) -> tuple[ReferenceKey, float]:
    if item.index is not None:  # the pyradiomics NRRD volume: no DICOM header, so no key
        import nrrd

        header = nrrd.read_header(item.path)
        pixel = abs(float(header["space directions"][0][0]))
        return ReferenceKey("", "", "", thickness_band(abs(float(header["space directions"][2][2])))), pixel
    ds = pydicom.dcmread(item.path, stop_before_pixels=True)
    pixel = float(ds.PixelSpacing[0]) if "PixelSpacing" in ds else 0.7
    return reference_key(ds), pixel


def corpus_series(data_root: Path = DEFAULT_DATA_ROOT) -> list[SeriesInfo]:
    """Every axial series of the corpus (and the TotalSegmentator fixture), sorted along z, with its role."""
    slices = discover(data_root, collections=ALL_COLLECTIONS) + fixture_slices()
    annotations = load_annotations(data_root)
    groups: dict[tuple[str, str], list[CorpusSlice]] = {}
    for item in slices:
        groups.setdefault((item.patient, item.series_uid or item.path), []).append(item)
    out = []
    for (patient, uid), members in sorted(groups.items()):
        members.sort(key=lambda s: s.position_z if s.position_z is not None else 0.0)
        key, pixel = _header_info(members[0])
        zs = [s.position_z for s in members if s.position_z is not None]
        gaps = np.diff(sorted(set(zs))) if len(zs) > 1 else np.array([])
        spacing = float(np.median(gaps)) if gaps.size else None
        split = FORENSIC_SPLIT.get(patient, "test")
        sid = f"{patient}/{uid[-12:]}"
        info = SeriesInfo(sid, patient, "test" if split == "test" else "select", split, key, spacing, pixel, members)
        for i, member in enumerate(members):
            for lesion in annotations.get(member.key, []):
                info.lesions.setdefault(i, []).append(lesion.region_mask((512, 512)))
        out.append(info)
    return out


class ObjectWriter:
    """Tampered objects on disk: OUT/objects/<id>.npz (hu int16 per slice, masks) + OUT/objects.jsonl."""

    def __init__(self, out_dir: Path) -> None:
        self.out = Path(out_dir)
        (self.out / "objects").mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        self.skips: list[dict[str, str]] = []

    def add(self, family: str, series: SeriesInfo, edits: list[tuple[int, Tamper]]) -> None:
        oid = f"o{len(self.records):05d}"
        arrays: dict[str, np.ndarray] = {}
        slices = []
        for index, tamper in edits:
            arrays[f"hu_{index}"] = np.clip(np.round(tamper.hu), -32768, 32767).astype(np.int16)
            arrays[f"mask_{index}"] = tamper.mask
            x0, y0, x1, y1 = tamper.box
            slices.append({"index": int(index), "box": [x0, y0, x1, y1]})
        np.savez_compressed(self.out / "objects" / f"{oid}.npz", **arrays)
        details = {k: v for k, v in edits[0][1].details.items() if isinstance(v, int | float | str | list)}
        self.records.append(
            {
                "id": oid,
                "family": family,
                "group": FAMILY_OF[family],
                "sid": series.sid,
                "role": series.role,
                "patient": series.patient,
                "slices": slices,
                "details": details,
            }
        )

    def skip(self, family: str, where: str, reason: str) -> None:
        self.skips.append({"family": family, "where": where, "reason": reason})

    def finish(self, info: dict[str, Any]) -> dict[str, Any]:
        (self.out / "objects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.records))
        (self.out / "skipped.jsonl").write_text("".join(json.dumps(s) + "\n" for s in self.skips))
        counts: dict[str, dict[str, int]] = {}
        for record in self.records:
            counts.setdefault(record["family"], {}).setdefault(record["role"], 0)
            counts[record["family"]][record["role"]] += 1
        summary = {**info, "counts": counts, "skipped": len(self.skips)}
        (self.out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _lesion_runs(series: SeriesInfo, max_len: int = 6) -> list[list[int]]:
    """Consecutive slice indices that carry an annotation (cut to max_len), one run per lesion stretch."""
    indices = sorted(series.lesions)
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1 and len(runs[-1]) < max_len:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [r for r in runs if len(r) >= 2]


def _donors(series_list: list[SeriesInfo], hu_of) -> list[fam.Donor]:
    """Real lesions as donors: every annotated lesion run (<= 6 slices) of every series."""
    donors = []
    for series in series_list:
        for run in _lesion_runs(series) + [[i] for i in sorted(series.lesions)[::3]]:
            masks = [np.logical_or.reduce(series.lesions[i]) for i in run]
            hus = [hu_of(series, i) for i in run]
            if all(float(h[m].mean()) > -600 for h, m in zip(hus, masks, strict=True)):
                donors.append(fam.Donor(series.patient, hus, masks, series.pixel_mm))
    return donors


def build(
    out_dir: Path,
    data_root: Path = DEFAULT_DATA_ROOT,
    per_family_2d: int = 12,
    per_family_3d: int = 4,
    seed: int = 0,
    families: tuple[str, ...] = ALL_FAMILIES,
    model_path: Path | None = None,
) -> dict[str, Any]:
    """Write the tampered objects of every family for both roles; returns the summary."""
    rng = np.random.default_rng(seed)
    series_list = corpus_series(data_root)
    (Path(out_dir)).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "series.json").write_text(json.dumps([s.to_dict() for s in series_list], indent=1) + "\n")
    cache: dict[tuple[str, int], np.ndarray] = {}

    def hu_of(series: SeriesInfo, i: int) -> np.ndarray:
        if (series.sid, i) not in cache:
            cache[(series.sid, i)] = series.slices[i].hu()
        return cache[(series.sid, i)]

    writer = ObjectWriter(out_dir)
    model = None
    if any("diffusion" in f for f in families):
        from models.checkpoint import load_model
        from models.forensics.red_team import default_model_path

        model = load_model(model_path or default_model_path())
    donors_all = _donors(series_list, hu_of)
    for role in ("select", "test"):
        mine = [
            s for s in series_list if s.role == role and any(has_lungs(hu_of(s, i)) for i in range(0, len(s.slices), 4))
        ]
        lung_slices = [(s, i) for s in mine for i in range(len(s.slices)) if has_lungs(hu_of(s, i))]
        multi = [s for s in mine if len(s.slices) >= 9]
        lesion_series = [s for s in mine if s.lesions]
        for family in families:
            made = 0
            attempts = 0
            target = per_family_3d if family.endswith("-3d") else per_family_2d
            while made < target and attempts < target * 6:
                attempts += 1
                result, series = _one(family, rng, mine, lung_slices, multi, lesion_series, donors_all, hu_of, model)
                if series is None:
                    writer.skip(family, role, "no series fits this family in this role")
                    break
                if isinstance(result, Skip):
                    writer.skip(family, series.sid, result.reason)
                    continue
                writer.add(family, series, result)
                made += 1
            log.info("%s %s: %d objects", role, family, made)
    return writer.finish(
        {
            "seed": seed,
            "per_family_2d": per_family_2d,
            "per_family_3d": per_family_3d,
            "families": list(families),
            "split": FORENSIC_SPLIT,
        }
    )


def _pick(items: list, rng: np.random.Generator):
    return items[int(rng.integers(len(items)))] if items else None


def _one(family, rng, mine, lung_slices, multi, lesion_series, donors_all, hu_of, model):
    """One attempt at one object of `family`: ([(index, Tamper)...] or Skip, the series) or (None, None)."""
    if family in (
        "nps-nodule",
        "inject-exemplar",
        "inject-noise",
        "inject-smooth",
        "inject-diffusion",
        "transplant",
        "copy-move",
    ):
        choice = _pick(lung_slices, rng)
        if choice is None:
            return None, None
        series, i = choice
        hu = hu_of(series, i)
        if family == "nps-nodule":
            result = fam.nps_nodule_2d(hu, rng)
        elif family == "inject-exemplar":
            result = fam.inject_exemplar_2d(hu, rng)
        elif family in ("inject-noise", "inject-smooth"):
            result = inject_nodule(hu, rng, noise_matched=family == "inject-noise")
        elif family == "inject-diffusion":
            from models.forensics.diffusion_attacks import inject_by_diffusion

            result = inject_by_diffusion(hu, rng, model)
        else:
            donors = [d for d in donors_all if d.patient != series.patient]
            donor = _pick(donors, rng)
            if donor is None:
                return Skip(family, "no donor lesion of another patient"), series
            if family == "transplant":
                result = fam.transplant_2d(hu, donor, int(rng.integers(len(donor.slices))), rng, series.pixel_mm)
            else:
                k = int(rng.integers(len(donor.slices)))
                result = copy_move(hu, donor.slices[k], donor.masks[k], rng)
        return (result if isinstance(result, Skip) else [(i, result)]), series
    if family in ("remove-exemplar", "remove", "remove-diffusion", "copy-move-series"):
        series = _pick(lesion_series, rng)
        if series is None:
            return None, None
        i = int(_pick(sorted(series.lesions), rng))
        hu = hu_of(series, i)
        lesion = np.logical_or.reduce(series.lesions[i])
        if family == "remove-exemplar":
            result = fam.remove_exemplar_2d(hu, lesion, rng)
        elif family == "remove":
            result = remove_lesion(hu, lesion, rng)
        elif family == "remove-diffusion":
            from models.forensics.diffusion_attacks import remove_by_diffusion

            result = remove_by_diffusion(hu, lesion, rng, model)
        else:
            volume = fam.Volume(
                [hu_of(series, k) for k in range(len(series.slices))],
                series.spacing_mm or 5.0,
                series.pixel_mm,
                series.lesions,
            )
            lungs = [k for k in range(len(series.slices)) if lung_mask(volume.slices[k]).mean() > 0.03]
            target = int(_pick(lungs, rng))
            result = fam.copy_move_series_2d(volume, i, target, rng)
            return (result if isinstance(result, Skip) else [(target, result)]), series
        return (result if isinstance(result, Skip) else [(i, result)]), series
    # 3-D forms
    pool = lesion_series if family in ("remove-exemplar-3d", "copy-move-series-3d") else multi
    series = _pick(pool, rng)
    if series is None:
        return None, None
    volume = fam.Volume(
        [hu_of(series, k) for k in range(len(series.slices))], series.spacing_mm or 5.0, series.pixel_mm, series.lesions
    )
    if family == "nps-nodule-3d":
        return fam.nps_nodule_3d(volume, rng), series
    if family == "inject-exemplar-3d":
        return fam.inject_exemplar_3d(volume, rng), series
    if family == "inject-3d":
        return inject_sphere(volume.slices, volume.spacing_mm, volume.pixel_mm, rng), series
    if family == "transplant-3d":
        donors = [d for d in donors_all if d.patient != series.patient and len(d.slices) >= 2]
        donor = _pick(donors, rng)
        if donor is None:
            return Skip(family, "no multi-slice donor of another patient"), series
        return fam.transplant_3d(volume, donor, rng), series
    runs = _lesion_runs(series)
    run = _pick(runs, rng)
    if run is None:
        return Skip(family, "no lesion annotated on consecutive slices"), series
    if family == "remove-exemplar-3d":
        return fam.remove_exemplar_3d(volume, run, rng), series
    return fam.copy_move_series_3d(volume, run, rng), series
