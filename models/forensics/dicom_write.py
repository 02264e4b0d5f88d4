"""Writing tampered pixels back into a real DICOM file, keeping its metadata as an attacker would.

Why the care: a tampered file that differs from the original in anything but the pixels of the region
(clipped padding, a changed rescale, a lossy re-encode) would be detectable for the wrong reason, and its
ground truth would be wrong. So the stored values outside the region are copied bit for bit; only the
region gets new stored values, computed with the file's own RescaleSlope/Intercept and clipped to the
range its BitsStored/PixelRepresentation allow. Compressed files are decompressed and written back in
Explicit VR Little Endian (the stored representation an editing tool would produce).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def stored_range(ds: pydicom.Dataset) -> tuple[int, int]:
    bits = int(getattr(ds, "BitsStored", 16))
    if int(getattr(ds, "PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def hu_to_stored(ds: pydicom.Dataset, hu: np.ndarray) -> np.ndarray:
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    low, high = stored_range(ds)
    return np.clip(np.round((hu - intercept) / slope), low, high)


def write_tampered(
    ds: pydicom.Dataset,
    hu: np.ndarray,
    mask: np.ndarray,
    out_path: Path,
    new_uids: dict[str, str] | None = None,
) -> Path:
    """Write ds with the HU of `hu` inside `mask` (stored values elsewhere untouched) to out_path.

    new_uids: replacement UIDs, e.g. {"SeriesInstanceUID": ..., "SOPInstanceUID": ...}; None keeps them all
    (an attacker overwriting the original in the PACS).
    """
    ds = ds.copy()
    original = ds.pixel_array.copy()
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    stored = original.astype(np.int64)
    if mask.any():
        stored[mask] = hu_to_stored(ds, hu[mask])
    ds.PixelData = stored.astype(original.dtype).tobytes()
    for keyword, value in (new_uids or {}).items():
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    return out_path


def fresh_uids(ds: pydicom.Dataset, series_uid: str) -> dict[str, str]:
    """New SOP Instance UID, the given new Series UID: the tampered copy lives beside the original."""
    return {"SOPInstanceUID": generate_uid(), "SeriesInstanceUID": series_uid}
