"""Tampered copies of a real DICOM series, with a ground-truth sidecar: `btd tamper`.

Output: OUT/dicom/NNNN.dcm (the whole series, tampered slices included), OUT/ground_truth.json (method,
box, UIDs, skipped slices with reasons) and OUT/masks/NNNN.npy (exact changed-pixel masks).

A site can send the output to its own btd deployment and check that the SR flags the right slice and
region. The copy is a complete series (untouched slices included), so the service sees what a PACS would.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from models.corpus import Lesion, dicom_to_hu, load_annotations
from models.forensics.dicom_write import fresh_uids, write_tampered
from models.forensics.methods import FAMILY_SERIES_METHODS, TAMPER_METHODS
from models.forensics.tamper import Skip, Tamper, copy_move, inject_nodule, inject_sphere, remove_lesion
from models.lungmask import has_lungs
from models.metadata import DEFAULT_MODEL_PATH

log = logging.getLogger(__name__)

METHODS = TAMPER_METHODS


@dataclass
class SeriesSlice:
    path: Path
    ds: pydicom.Dataset
    hu: np.ndarray
    z: float


@dataclass
class TamperReport:
    """What was written and what was skipped (with why): the sidecar's content."""

    method: str
    out_dir: str
    keep_uids: bool
    tampered: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "out_dir": self.out_dir,
            "keep_uids": self.keep_uids,
            "tampered": self.tampered,
            "skipped": self.skipped,
        }


def read_series(folder: Path) -> list[SeriesSlice]:
    """The CT image files of one folder, sorted along z (files that are not CT images are ignored)."""
    slices = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - not DICOM: not part of the series
            continue
        if getattr(ds, "Modality", "") != "CT" or "PixelData" not in ds:
            continue
        position = getattr(ds, "ImagePositionPatient", None)
        z = float(position[2]) if position else float(getattr(ds, "InstanceNumber", 0) or 0)
        slices.append(SeriesSlice(path, ds, dicom_to_hu(ds), z))
    return sorted(slices, key=lambda s: s.z)


def _diffusion_model(model_path: Path | None):
    from models.checkpoint import load_model

    loaded = load_model(model_path) if model_path else load_model(default_model_path())
    return loaded


def default_model_path() -> Path:
    return DEFAULT_MODEL_PATH


def tamper_slice(
    method: str,
    hu: np.ndarray,
    rng: np.random.Generator,
    lesions: list[Lesion] | None = None,
    donor: tuple[np.ndarray, Lesion] | None = None,
    model: Any = None,
) -> Tamper | Skip:
    """One slice, one method (the 3-D method works on a series: see tamper_series)."""
    if method in ("nps-nodule", "inject-exemplar", "transplant", "remove-exemplar"):
        from models.forensics import families

        if method == "remove-exemplar":
            if not lesions:
                return Skip(method, "no annotated lesion on this slice")
            lesion = lesions[int(rng.integers(len(lesions)))]
            return families.remove_exemplar_2d(hu, lesion.region_mask(hu.shape), rng)
        if not has_lungs(hu):
            return Skip(method, "no lungs in this slice")
        if method == "nps-nodule":
            return families.nps_nodule_2d(hu, rng)
        if method == "inject-exemplar":
            return families.inject_exemplar_2d(hu, rng)
        if donor is None:
            return Skip(method, "no annotated lesion available to transplant")
        source_hu, lesion = donor
        # pixel sizes unknown here: the donor is pasted at its own scale
        donor_lesion = families.Donor("corpus", [source_hu], [lesion.region_mask(source_hu.shape)], 0.7)
        return families.transplant_2d(hu, donor_lesion, 0, rng, pixel_mm=0.7)
    if method in ("inject-noise", "inject-smooth", "inject-diffusion"):
        if not has_lungs(hu):
            return Skip(method, "no lungs in this slice")
        if method == "inject-diffusion":
            from models.forensics.diffusion_attacks import inject_by_diffusion

            return inject_by_diffusion(hu, rng, model)
        return inject_nodule(hu, rng, noise_matched=method == "inject-noise")
    if method == "copy-move":
        if donor is None:
            return Skip(method, "no annotated lesion available to copy")
        if not has_lungs(hu):
            return Skip(method, "no lungs in this slice")
        source_hu, lesion = donor
        return copy_move(hu, source_hu, lesion.region_mask(source_hu.shape), rng)
    if method in ("remove", "remove-diffusion"):
        if not lesions:
            return Skip(method, "no annotated lesion on this slice")
        lesion = lesions[int(rng.integers(len(lesions)))]
        if method == "remove-diffusion":
            from models.forensics.diffusion_attacks import remove_by_diffusion

            return remove_by_diffusion(hu, lesion.region_mask(hu.shape), rng, model)
        return remove_lesion(hu, lesion.region_mask(hu.shape), rng)
    return Skip(method, f"unknown method {method!r}; known: {', '.join(METHODS)}")


def tamper_series(
    folder: Path,
    out_dir: Path,
    method: str,
    count: int = 1,
    seed: int = 0,
    keep_uids: bool = False,
    model_path: Path | None = None,
) -> TamperReport:
    """Write a tampered copy of the series in `folder` to `out_dir` with `ground_truth.json` beside it."""
    rng = np.random.default_rng(seed)
    series = read_series(folder)
    report = TamperReport(method, str(out_dir), keep_uids)
    if not series:
        report.skipped.append({"slice": str(folder), "reason": "no CT image in this folder"})
        return _finish(report, series, {}, out_dir, keep_uids)
    needs_lesions = ("remove", "remove-diffusion", "copy-move", "transplant", "remove-exemplar")
    annotations = load_annotations() if method in needs_lesions else {}
    model = _diffusion_model(model_path) if "diffusion" in method else None
    tampers: dict[int, Tamper] = {}
    if method in FAMILY_SERIES_METHODS:
        from models.forensics import families

        spacing = abs(series[1].z - series[0].z) if len(series) > 1 else 1.0
        pixel_mm = float(series[0].ds.PixelSpacing[0]) if "PixelSpacing" in series[0].ds else 0.7
        volume = families.Volume([s.hu for s in series], spacing, pixel_mm)
        made = (families.nps_nodule_3d if method == "nps-nodule-3d" else families.inject_exemplar_3d)(volume, rng)
        if isinstance(made, Skip):
            report.skipped.append({"slice": "series", "reason": made.reason})
        else:
            tampers = dict(made)
    elif method == "inject-3d":
        spacing = abs(series[1].z - series[0].z) if len(series) > 1 else 1.0
        pixel_mm = float(series[0].ds.PixelSpacing[0]) if "PixelSpacing" in series[0].ds else 0.7
        result = inject_sphere([s.hu for s in series], spacing, pixel_mm, rng)
        if isinstance(result, Skip):
            report.skipped.append({"slice": "series", "reason": result.reason})
        else:
            tampers = dict(result)
    else:
        donor = _find_donor(annotations) if method in ("copy-move", "transplant") else None
        order = rng.permutation(len(series))
        for index in order:
            if len(tampers) >= count:
                break
            item = series[int(index)]
            uid = str(item.ds.SOPInstanceUID)
            result = tamper_slice(method, item.hu, rng, annotations.get(uid), donor, model)
            if isinstance(result, Skip):
                report.skipped.append({"slice": uid, "reason": result.reason})
                log.info("skip %s: %s", method, result.reason)
            else:
                tampers[int(index)] = result
    return _finish(report, series, tampers, out_dir, keep_uids)


def _find_donor(annotations: dict[str, list[Lesion]]) -> tuple[np.ndarray, Lesion] | None:
    """A real annotated lesion from the corpus (the LIDC outlines first: they are the exact shapes)."""
    from models.corpus import discover

    by_key = {s.key: s for s in discover()}
    for key, lesions in sorted(annotations.items(), key=lambda kv: kv[1][0].source != "lidc-outline"):
        if key in by_key:
            return by_key[key].hu(), lesions[0]
    return None


def _finish(
    report: TamperReport, series: list[SeriesSlice], tampers: dict[int, Tamper], out_dir: Path, keep_uids: bool
) -> TamperReport:
    # DICOM files alone in OUT/dicom (send or score that folder as it is); ground truth and masks beside it.
    out_dir = Path(out_dir)
    dicom_dir = out_dir / "dicom"
    mask_dir = out_dir / "masks"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for index, item in enumerate(series):
        tamper = tampers.get(index)
        uids = None if keep_uids else fresh_uids(item.ds, series_uid)
        mask = tamper.mask if tamper else np.zeros(item.hu.shape, dtype=bool)
        hu = tamper.hu if tamper else item.hu
        target = dicom_dir / f"{index:04d}.dcm"
        write_tampered(item.ds, hu, mask, target, uids)
        if tamper:
            written = pydicom.dcmread(target, stop_before_pixels=True)
            report.tampered.append(
                {
                    "file": f"dicom/{target.name}",
                    "original_file": str(item.path),
                    "sop_instance_uid": str(written.SOPInstanceUID),
                    "original_sop_instance_uid": str(item.ds.SOPInstanceUID),
                    "slice_index": index,
                    **tamper.ground_truth(),
                }
            )
            mask_dir.mkdir(exist_ok=True)
            np.save(mask_dir / f"{index:04d}.npy", tamper.mask)
            report.tampered[-1]["mask_file"] = f"masks/{index:04d}.npy"
    (out_dir / "ground_truth.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
