"""DICOM pixels -> HU on real files: every decodable transfer syntax, multi-frame, and what cannot be judged."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from models.preprocess import (
    NotAssessable,
    _exact_in_float32,
    normalise_mr,
    read_hu,
    rescale_per_frame,
    to_unit,
)
from models.windowing import BTD_CT_WINDOW

FIXTURES = Path(__file__).parent / "fixtures"
SYNTAXES = FIXTURES / "ct_transfer_syntaxes"
PYDICOM = FIXTURES / "pydicom"

LOSSLESS = [
    "CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm",
    "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm",
    "CTImage.dcm_BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2.dcm",
    "CTImage.dcm_DeflatedExplicitVRLittleEndianTransferSyntax_1.2.840.10008.1.2.1.99.dcm",
    "CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm",
    "CTImage.dcm_JPEGProcess14TransferSyntax_1.2.840.10008.1.2.4.57.dcm",
    "CTImage.dcm_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm",
    "CTImage.dcm_JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80.dcm",
    "CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm",
]

# Measured (2026-11-25) mean / max absolute HU error against the uncompressed slice, and the bound we hold.
# JPEG baseline is 8-bit: the file was requantised with RescaleSlope 32.12 HU per step, so its error is
# the requantisation's (mean 19.6, max 64.2 HU), bounded by one quantisation step on average.
LOSSY = {
    "CTImage.dcm_JPEG2000TransferSyntax_1.2.840.10008.1.2.4.91.dcm": (0.571, 5.0, 2.0),
    "CTImage.dcm_JPEGLSLossyTransferSyntax_1.2.840.10008.1.2.4.81.dcm": (0.694, 1.0, 2.0),
    "CTImage.dcm_JPEGProcess2_4TransferSyntax_1.2.840.10008.1.2.4.51.dcm": (3.835, 35.6, 6.0),
    "CTImage.dcm_JPEGProcess1TransferSyntax_1.2.840.10008.1.2.4.50.dcm": (19.575, 64.2, 32.2),
}


@pytest.fixture(scope="module")
def reference_hu() -> np.ndarray:
    return read_hu(SYNTAXES / "CTImage.dcm")


def test_reference_slice_is_in_hounsfield_units(reference_hu):
    assert reference_hu.shape == (1, 512, 512) and reference_hu.dtype == np.float32
    raw = pydicom.dcmread(SYNTAXES / "CTImage.dcm").pixel_array
    assert np.array_equal(reference_hu[0], raw.astype(np.float32) - 1024.0)  # RescaleIntercept -1024
    lung_and_air = np.mean(reference_hu < -500)
    assert 0.2 < lung_and_air < 0.9  # a chest slice: air and lung, and a body


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_syntaxes_give_identical_hu(name, reference_hu):
    assert np.array_equal(read_hu(SYNTAXES / name), reference_hu)


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_lossy_syntaxes_differ_only_by_codec_error(name, reference_hu):
    _, _, bound = LOSSY[name]
    values = read_hu(SYNTAXES / name)
    error = np.abs(values - reference_hu)
    assert 0 < error.mean() < bound
    assert np.corrcoef(values.ravel(), reference_hu.ravel())[0, 1] > 0.999


@pytest.mark.parametrize(
    "name",
    ["JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53", "JPEGProcess10_12TransferSyntax_1.2.840.10008.1.2.4.55"],
)
def test_retired_jpeg_syntaxes_are_not_assessed(name):
    with pytest.raises(NotAssessable, match="unsupported transfer syntax"):
        read_hu(SYNTAXES / f"CTImage.dcm_{name}.dcm")


def test_enhanced_ct_uses_functional_group_rescale():
    ds = pydicom.dcmread(PYDICOM / "eCT_Supplemental.dcm")
    values = read_hu(ds)
    raw = ds.pixel_array.astype(np.float64)
    assert values.shape == (2, 512, 512)
    assert np.array_equal(values, (raw - 1024.0).astype(np.float32))  # shared group: slope 1, intercept -1024


def test_per_frame_rescale_overrides_shared():
    ds = pydicom.dcmread(PYDICOM / "eCT_Supplemental.dcm")
    for index, intercept in enumerate((-1000.0, -2000.0)):
        transform = Dataset()
        transform.RescaleSlope = "2"
        transform.RescaleIntercept = str(intercept)
        transform.RescaleType = "HU"
        ds.PerFrameFunctionalGroupsSequence[index].PixelValueTransformationSequence = [transform]
    assert rescale_per_frame(ds, 2) == [(2.0, -1000.0), (2.0, -2000.0)]
    values = read_hu(ds)
    raw = ds.pixel_array.astype(np.float64)
    assert np.array_equal(values[1], (raw[1] * 2 - 2000).astype(np.float32))


def test_enhanced_mr_frames_are_identical_across_encodings():
    reference = read_hu(PYDICOM / "emri_small.dcm")
    assert reference.shape == (10, 64, 64)
    for name in ("emri_small_RLE.dcm", "emri_small_big_endian.dcm", "emri_small_jpeg_2k_lossless.dcm"):
        assert np.array_equal(read_hu(PYDICOM / name), reference)


def test_mr_normalisation_clips_percentiles_into_unit_range():
    values = read_hu(PYDICOM / "MR_small.dcm")[0]
    unit = normalise_mr(values)
    assert unit.min() == 0.0 and unit.max() == 1.0
    # 0.5 % of pixels at each end are clipped, the rest spread between
    assert 0.003 < np.mean(unit == 1.0) < 0.02
    assert np.all(np.diff(unit.ravel()[np.argsort(values.ravel(), kind="stable")]) >= 0)  # order kept
    channels = to_unit(values, "minmax", [], channels=3)
    assert channels.shape == (3, 64, 64) and np.array_equal(channels[2], unit)


def test_ct_unit_input_uses_the_btd_window(reference_hu):
    unit = to_unit(reference_hu[0], "window", [BTD_CT_WINDOW])
    assert unit.shape == (1, 512, 512)
    assert unit.min() == 0.0 and unit.max() <= 1.0
    assert np.all(unit[0][reference_hu[0] <= -700] == 0.0)


def _header(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def test_not_assessed_reasons(tmp_path):
    ct = _header(SYNTAXES / "CTImage.dcm")

    localiser = copy.deepcopy(ct)
    localiser.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    with pytest.raises(NotAssessable, match="localiser"):
        read_hu(localiser)

    other = copy.deepcopy(ct)
    other.Modality = "US"
    with pytest.raises(NotAssessable, match="unsupported modality 'US'"):
        read_hu(other)

    no_pixels = copy.deepcopy(ct)
    del no_pixels.PixelData
    with pytest.raises(NotAssessable, match="no pixel data"):
        read_hu(no_pixels)

    with pytest.raises(NotAssessable, match="too small"):
        read_hu(_tiny(ct))

    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(
        (SYNTAXES / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm").read_bytes()[:300_000]
    )
    with pytest.raises(NotAssessable, match="corrupt or truncated"):
        read_hu(truncated)

    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")
    with pytest.raises(NotAssessable, match="not a DICOM file"):
        read_hu(not_dicom)


def _tiny(ct: Dataset) -> Dataset:
    tiny = copy.deepcopy(ct)
    pixels = tiny.pixel_array[:32, :32].copy()
    tiny.Rows, tiny.Columns = 32, 32
    tiny.PixelData = pixels.tobytes()
    return tiny


def test_nan_pixels_are_not_assessed():
    ds = _header(SYNTAXES / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm")
    pixels = ds.pixel_array.astype(np.float32)
    pixels[100, 100] = np.nan
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.FloatPixelData = pixels.tobytes()
    with pytest.raises(NotAssessable, match="not finite"):
        read_hu(ds)


@pytest.mark.parametrize(
    ("representation", "slope", "intercept", "shortcut"),
    [
        (1, 1.0, -1024.0, True), (1, 1.0, 1_000_000.0, True), (0, 1.0, -8192.0, True),
        (1, 2.5, -1024.0, False), (1, 1.0, 0.5, False), (0, 1.0, 2.0**23, False),
    ],
)
def test_rescale_equals_float64_arithmetic_for_every_pixel_value(representation, slope, intercept, shortcut):
    """Unit slopes with integral intercepts take a float32 shortcut; every 16-bit value must come out as the
    float64 arithmetic rounded to float32 (non-unit slopes, fractional or huge intercepts take the float64 path)."""
    ds = _header(SYNTAXES / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm")
    dtype = np.int16 if representation else np.uint16
    every_value = np.arange(2**16, dtype=np.uint16).view(dtype).reshape(256, 256)
    ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 256, 256, 16, 15, representation
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = every_value.tobytes()
    assert _exact_in_float32(every_value.dtype, slope, intercept) is shortcut  # each path is exercised
    expected = (every_value.astype(np.float64) * slope + intercept).astype(np.float32)
    assert np.array_equal(read_hu(ds)[0], expected)
