"""The chest-CT development corpus (../shared/data/chest-ct): slices in HU, lesion annotations, patient split.

Why a module of its own: training, calibration, tampering and the benchmark must all see the same slices
and, above all, the same patient-level split. A patient whose slices trained the model must never be
used to measure it, or every figure in the model card would be flattering and false.

Sources read here:
- DICOM folders (LIDC-IDRI, Lung-PET-CT-Dx, COVID-19-NY-SBU; axial only unless asked otherwise);
- the pyradiomics NRRD volume (axes x, y, z: a slice is ``volume[:, :, z].T`` in row/column order);
- annotations: LIDC XML nodule outlines (per SOP Instance UID), Lung-PET-CT-Dx VOC boxes (one XML per
  SOP Instance UID), the pyradiomics tumour label map.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage

from models.extras import require

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-ct"

# CT air is -1000 HU; vendors pad outside the field of view with -2000 or -3024. Clipping keeps the padding
# from looking like an extreme (and therefore suspicious) intensity.
HU_MIN = -1024.0
HU_MAX = 3071.0

# Held-out patients: never used for training or calibration. One LIDC patient (nodule outlines), two COVID
# patients (GE/Toshiba), the pyradiomics volume (tumour label map: removals), plus the TotalSegmentator
# series in tests/fixtures (Siemens).
DEFAULT_TEST_PATIENTS: tuple[str, ...] = (
    "LIDC-IDRI-0002",
    "A048383",
    "A058062",
    "pyradiomics-lung1",
    "TOTALSEG-EXAMPLE",
)

PYRADIOMICS_PATIENT = "pyradiomics-lung1"

# The collections `discover` reads by default: the ones the shipped model was trained and benchmarked on
# (2026-11). Kept as the default so that `btd train` and the 2026-11 benchmark reproduce their figures.
LEGACY_COLLECTIONS: tuple[str, ...] = ("lidc-idri", "lung-pet-ct-dx", "covid19-ny-sbu")
# Since 2026-12-02 the corpus also holds a Philips Brilliance Big Bore patient and a Siemens Sensation 16
# B70f (sharp kernel) patient; the leave-one-family-out evaluation (models/forensics/lofo.py) reads all.
ALL_COLLECTIONS: tuple[str, ...] = (*LEGACY_COLLECTIONS, "pancreatic-ct-cbct-seg", "cptac-lscc")

# The patient split of the leave-one-family-out evaluation (whole patients only). "train": the patients the
# shipped BTD model was trained on, whose genuine slices also fit the cues' genuine references; "validation":
# choices of scoring, fusion and threshold (with the train patients' genuine series); "test": reported only.
# The Siemens B70f patient is held out on purpose: a sharp kernel that no reference was fitted on.
FORENSIC_SPLIT: dict[str, str] = {
    "Lung_Dx-A0001": "train",
    "LIDC-IDRI-0001": "train",
    "A002304": "train",
    "A027284": "train",
    "A046441": "train",
    "A056642": "train",
    "Pancreas-CT-CB_001": "validation",
    "LIDC-IDRI-0002": "test",
    "A048383": "test",
    "A058062": "test",
    "pyradiomics-lung1": "test",
    "C3N-00247": "test",
    "TOTALSEG-EXAMPLE": "test",
}
NOT_DICOM_SUFFIXES = {".xml", ".json", ".txt", ".md", ".csv", ".nrrd", ".npy", ".npz", ".png"}


@dataclass(frozen=True)
class CorpusSlice:
    """One 2-D slice of the corpus, addressable without holding its pixels."""

    patient: str
    path: str
    index: int | None = None  # z index inside an NRRD volume; None for a DICOM file
    sop_instance_uid: str | None = None
    series_uid: str | None = None
    plane: str = "axial"
    position_z: float | None = None

    @property
    def key(self) -> str:
        """A stable identifier for logs and ground-truth files."""
        return self.sop_instance_uid or f"{Path(self.path).name}#{self.index}"

    def hu(self) -> np.ndarray:
        """Pixels in Hounsfield units, float32 (H, W), clipped to the physical CT range."""
        if self.index is not None:
            return read_nrrd_slice(Path(self.path), self.index)
        return dicom_to_hu(pydicom.dcmread(self.path))


@dataclass
class Lesion:
    """An annotated lesion on one slice: a box (x1/y1 exclusive) and, where the source has one, a mask."""

    slice_key: str
    x0: int
    y0: int
    x1: int
    y1: int
    source: str
    mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)

    def region_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The lesion as a boolean mask of the slice: the outline/label where known, else the box."""
        if self.mask is not None and self.mask.shape == shape:
            return self.mask
        out = np.zeros(shape, dtype=bool)
        out[max(self.y0, 0) : self.y1, max(self.x0, 0) : self.x1] = True
        return out


def dicom_to_hu(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values -> HU with RescaleSlope/Intercept, clipped to [HU_MIN, HU_MAX]."""
    pixels = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return np.clip(pixels * slope + intercept, HU_MIN, HU_MAX).astype(np.float32)


def read_nrrd_slice(path: Path, z: int) -> np.ndarray:
    return np.clip(_read_nrrd_volume(str(path))[:, :, z].T.astype(np.float32), HU_MIN, HU_MAX)


@functools.lru_cache(maxsize=2)
def _read_nrrd_volume(path: str) -> np.ndarray:
    """The volume is one gzip file: read it once, not once per slice."""
    nrrd = require("nrrd", "reading NRRD volumes")
    volume, _ = nrrd.read(path)
    volume.setflags(write=False)
    return volume


def _plane_of(ds: pydicom.Dataset) -> str:
    iop = [float(v) for v in getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    normal = np.abs(np.cross(iop[:3], iop[3:]))
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def discover_dicom(folder: Path, patient: str | None = None, planes: Sequence[str] = ("axial",)) -> list[CorpusSlice]:
    """Every readable CT image slice under folder, in the requested planes (headers only are read)."""
    found: list[CorpusSlice] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in NOT_DICOM_SUFFIXES):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - a stray non-DICOM file is not part of the corpus
            continue
        if getattr(ds, "Modality", "") != "CT" or "PixelData" not in ds and not hasattr(ds, "Rows"):
            continue
        plane = _plane_of(ds)
        if plane not in planes:
            continue
        position = getattr(ds, "ImagePositionPatient", None)
        found.append(
            CorpusSlice(
                patient=patient or str(getattr(ds, "PatientID", "") or path.parent.name),
                path=str(path),
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_uid=str(getattr(ds, "SeriesInstanceUID", "")),
                plane=plane,
                position_z=float(position[2]) if position else None,
            )
        )
    return found


def discover(
    root: Path = DEFAULT_DATA_ROOT, planes: Sequence[str] = ("axial",), collections: Sequence[str] = LEGACY_COLLECTIONS
) -> list[CorpusSlice]:
    """All slices of the chest-CT corpus: DICOM of the collections plus the pyradiomics volume."""
    slices: list[CorpusSlice] = []
    for collection in collections:
        base = root / collection
        if not base.is_dir():
            continue
        for patient_dir in sorted(p for p in base.iterdir() if p.is_dir() and p.name != "tumor_bbox_annotations"):
            slices.extend(discover_dicom(patient_dir, patient=patient_dir.name, planes=planes))
    nrrd_path = root / "pyradiomics" / "lung1_image.nrrd"
    if nrrd_path.is_file() and "axial" in planes:
        nrrd = require("nrrd", "reading NRRD volumes")
        header = nrrd.read_header(str(nrrd_path))
        origin_z = float(header["space origin"][2])
        step_z = float(header["space directions"][2][2])
        for z in range(int(header["sizes"][2])):
            slices.append(
                CorpusSlice(patient=PYRADIOMICS_PATIENT, path=str(nrrd_path), index=z, position_z=origin_z + z * step_z)
            )
    return slices


def split_by_patient(
    slices: Iterable[CorpusSlice], test_patients: Sequence[str] = DEFAULT_TEST_PATIENTS
) -> tuple[list[CorpusSlice], list[CorpusSlice]]:
    """(train, test): whole patients go to one side only."""
    held_out = set(test_patients)
    train, test = [], []
    for item in slices:
        (test if item.patient in held_out else train).append(item)
    return train, test


def patients_of(slices: Iterable[CorpusSlice]) -> list[str]:
    return sorted({s.patient for s in slices})


# ---------------------------------------------------------------- annotations


def _strip_ns(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def read_lidc_outlines(xml_path: Path, shape: tuple[int, int] = (512, 512)) -> dict[str, list[np.ndarray]]:
    """SOP Instance UID -> filled outline masks of every reader's nodule ROI (inclusion=TRUE, >= 3 points).

    Single-point marks (nodules < 3 mm, non-nodules) carry no outline and are ignored.
    """
    masks: dict[str, list[np.ndarray]] = {}
    tree = ET.parse(xml_path)
    for roi in tree.iter():
        if _strip_ns(roi.tag) != "roi":
            continue
        uid, inclusion, points = None, True, []
        for child in roi:
            name = _strip_ns(child.tag)
            if name == "imageSOP_UID":
                uid = (child.text or "").strip()
            elif name == "inclusion":
                inclusion = (child.text or "").strip().upper() == "TRUE"
            elif name == "edgeMap":
                coords = {_strip_ns(c.tag): int(float(c.text)) for c in child}
                points.append((coords.get("xCoord", 0), coords.get("yCoord", 0)))
        if not uid or not inclusion or len(points) < 3:
            continue
        mask = _polygon_mask(points, shape)
        if mask.sum() < 4:
            continue
        masks.setdefault(uid, []).append(mask)
    return masks


def _polygon_mask(points: Sequence[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray:
    """Fill a closed outline of pixel coordinates (the LIDC edge map is the boundary itself)."""
    mpl_path = require("matplotlib.path", "filling LIDC outlines")

    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    x0, x1 = max(xs.min(), 0), min(xs.max() + 1, shape[1])
    y0, y1 = max(ys.min(), 0), min(ys.max() + 1, shape[0])
    mask = np.zeros(shape, dtype=bool)
    if x1 <= x0 or y1 <= y0:
        return mask
    yy, xx = np.mgrid[y0:y1, x0:x1]
    inside = mpl_path.Path(np.stack([xs, ys], 1)).contains_points(np.stack([xx.ravel(), yy.ravel()], 1), radius=0.5)
    mask[y0:y1, x0:x1] = inside.reshape(yy.shape)
    mask[np.clip(ys, 0, shape[0] - 1), np.clip(xs, 0, shape[1] - 1)] = True
    return ndimage.binary_fill_holes(mask)


def _merge_masks(slice_key: str, masks: list[np.ndarray], source: str) -> list[Lesion]:
    """Readers outline the same nodule several times: merge overlapping outlines into one lesion each."""
    union = np.logical_or.reduce(masks)
    labels, count = ndimage.label(union)
    lesions = []
    for index in range(1, count + 1):
        component = labels == index
        ys, xs = np.nonzero(component)
        lesions.append(
            Lesion(slice_key, int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, source, component)
        )
    return lesions


def read_voc_box(xml_path: Path) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1; x1/y1 exclusive) of a Pascal VOC annotation file."""
    boxes = []
    for obj in ET.parse(xml_path).getroot().iter("bndbox"):
        values = {c.tag: int(float(c.text)) for c in obj}
        boxes.append((values["xmin"], values["ymin"], values["xmax"] + 1, values["ymax"] + 1))
    return boxes


def load_annotations(root: Path = DEFAULT_DATA_ROOT) -> dict[str, list[Lesion]]:
    """Slice key -> annotated lesions, from all three annotation sources of the corpus."""
    lesions: dict[str, list[Lesion]] = {}
    for xml_path in sorted((root / "lidc-idri").glob("*/*.xml")):
        for uid, masks in read_lidc_outlines(xml_path).items():
            lesions.setdefault(uid, []).extend(_merge_masks(uid, masks, "lidc-outline"))
    for xml_path in sorted((root / "lung-pet-ct-dx" / "tumor_bbox_annotations").glob("*/*.xml")):
        uid = xml_path.stem
        for x0, y0, x1, y1 in read_voc_box(xml_path):
            lesions.setdefault(uid, []).append(Lesion(uid, x0, y0, x1, y1, "voc-box"))
    label_path = root / "pyradiomics" / "lung1_label.nrrd"
    image_path = root / "pyradiomics" / "lung1_image.nrrd"
    if label_path.is_file():
        nrrd = require("nrrd", "reading NRRD volumes")
        labels, _ = nrrd.read(str(label_path))
        for z in range(labels.shape[2]):
            plane = labels[:, :, z].T > 0
            if plane.any():
                key = CorpusSlice(PYRADIOMICS_PATIENT, str(image_path), index=z).key
                lesions.setdefault(key, []).extend(_merge_masks(key, [plane], "pyradiomics-label"))
    return lesions
