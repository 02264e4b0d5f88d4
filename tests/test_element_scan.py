"""core.dicom.element_scan against pydicom's own reader, on every real dataset the tests hold.

The walk may decline (None: the listener then asks pydicom), but where it answers it must find the very
raw elements pydicom finds, and never accept a dataset that pydicom refuses."""

from __future__ import annotations

import zlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from core.dicom.element_scan import dataset_of, scan_elements
from core.dicom.wire import unpadded_text
from service.dicom.listener import _IDENTIFYING_TAGS, _WANTED_TAGS, _text

FIXTURES = Path(__file__).parent / "fixtures"
DATASETS = sorted(
    path
    for path in FIXTURES.rglob("*")
    if path.is_file() and not path.name.startswith(("LICENSE", "README")) and "btd-reference" not in path.parts
)
KEYWORDS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "StudyDate"]
TEXT_KEYWORDS = ["PatientName", "PatientID", "StudyDescription"]


def dataset_bytes(path: Path) -> tuple[bytes, UID]:
    """The dataset after the File Meta, as a peer would send it, inflated if deflated, and its syntax."""
    with path.open("rb") as handle:
        read_preamble(handle, force=False)
        start = handle.tell()
        meta = read_file_meta_info(path)
        handle.seek(start)
        raw = handle.read()
    # read_file_meta_info reads the group; skip its bytes: group length element + the value it gives
    group_length = int.from_bytes(raw[8:12], "little")
    data = raw[12 + group_length :]
    syntax = UID(meta.TransferSyntaxUID)
    if syntax.is_deflated:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    return data, syntax


def pydicom_raw(data: bytes, syntax: UID) -> dict[int, tuple]:
    ds = read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, specific_tags=_IDENTIFYING_TAGS)
    return {int(tag): _fields(element) for tag, element in ds._dict.items() if int(tag) in _WANTED_TAGS}


def _fields(element) -> tuple:  # noqa: ANN001 - a RawDataElement
    return (element.VR, element.length, element.value, element.value_tell, element.is_implicit_VR)


def test_every_fixture_is_read_by_the_walk_as_pydicom_reads_it() -> None:
    answered = 0
    for path in DATASETS:
        data, syntax = dataset_bytes(path)
        found = scan_elements(data, syntax.is_implicit_VR, syntax.is_little_endian, _WANTED_TAGS)
        if found is None:
            continue
        answered += 1
        assert {int(tag): _fields(element) for tag, element in found.items()} == pydicom_raw(data, syntax), path
        fast = dataset_of(found, syntax.is_implicit_VR, syntax.is_little_endian)
        slow = read_dataset(
            BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, specific_tags=_IDENTIFYING_TAGS
        )
        for keyword in KEYWORDS + TEXT_KEYWORDS:
            assert str(fast.get(keyword)) == str(slow.get(keyword)), (path, keyword)
    # The plain case must be the common one: every transfer syntax, encapsulated pixel data and
    # undefined-length sequences included (the walk steps over their items).
    assert answered == len(DATASETS), f"the walk declined {len(DATASETS) - answered} of {len(DATASETS)}"


@pytest.mark.parametrize(
    "name",
    [
        "ct_transfer_syntaxes/CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm",
        "ct_transfer_syntaxes/CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm",
        "ct_transfer_syntaxes/CTImage.dcm_BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2.dcm",
        "ct_transfer_syntaxes/CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm",
        "pydicom/eCT_Supplemental.dcm",
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns of the damaged character sets
def test_a_cut_or_damaged_dataset_is_declined_or_read_as_pydicom_reads_it(name: str) -> None:
    """Cut the dataset short at many points, and overwrite bytes with 0xFF at many others: wherever the
    walk still answers, pydicom reads the same elements without raising."""
    data, syntax = dataset_bytes(FIXTURES / name)
    step = max(len(data) // 300, 1)
    variants = [data[:cut] for cut in range(0, len(data), step)]
    variants += [data[:at] + b"\xff\xff\xff\xff" + data[at + 4 :] for at in range(0, min(len(data), 4000), 7)]
    declined = 0
    for variant in variants:
        found = scan_elements(variant, syntax.is_implicit_VR, syntax.is_little_endian, _WANTED_TAGS)
        if found is None:
            declined += 1
            continue
        assert {int(tag): _fields(element) for tag, element in found.items()} == pydicom_raw(variant, syntax)
    assert 0 < declined < len(variants)


def test_the_listeners_malformed_sequence_is_declined() -> None:
    """An unterminated sequence (tests/test_listener.py's malformed file) is left to pydicom, which refuses it."""
    junk = b"\x08\x00\x18\x00SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x18\x00UI\xff\x00"
    assert scan_elements(junk, False, True, _WANTED_TAGS) is None


def reference_text(data: bytes, syntax: UID, keyword: str) -> str | None:
    """What the listener read for a PN or LO element before its ASCII shortcut: pydicom's conversion."""
    value = read_dataset(
        BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, specific_tags=_IDENTIFYING_TAGS
    ).get(keyword)
    return None if value is None else unpadded_text(str(value)) or None


def listener_text(data: bytes, syntax: UID, keyword: str) -> str | None:
    found = scan_elements(data, syntax.is_implicit_VR, syntax.is_little_endian, _WANTED_TAGS)
    assert found is not None
    return _text(dataset_of(found, syntax.is_implicit_VR, syntax.is_little_endian), keyword)


def test_patient_and_study_text_reads_as_pydicom_reads_it_on_every_fixture() -> None:
    for path in DATASETS:
        data, syntax = dataset_bytes(path)
        for keyword in TEXT_KEYWORDS:
            assert listener_text(data, syntax, keyword) == reference_text(data, syntax, keyword), (path, keyword)


@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192", "ISO_IR 13", ["", "ISO 2022 IR 87"]])
@pytest.mark.parametrize(
    "raw",
    [b"Doe^John", b"  Doe^John ", b"Doe^John^^^", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B", b"A\\B",
     b"M\xfcller", b"M\xc3\xbcller", b"", b"~tilde\r\n", b"\x00"],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns of bytes its character set cannot decode
def test_patient_and_study_text_reads_as_pydicom_reads_it_in_every_character_set(
    charset: str | list[str] | None, raw: bytes
) -> None:
    """The shortcut for plain ASCII must agree with pydicom wherever it applies, and step aside elsewhere
    (ESC sequences of ISO 2022, several values, bytes over 0x7F, other character sets)."""
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.StudyDescription = "x"
    ds.PatientName = "x"
    ds.PatientID = "x"
    for keyword, vr in (("StudyDescription", "LO"), ("PatientName", "PN"), ("PatientID", "LO")):
        ds[keyword] = DataElement(Tag(keyword), vr, raw + (b" " if len(raw) % 2 else b""))
    ds.SOPInstanceUID = "2.25.1"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    syntax = UID("1.2.840.10008.1.2.1")
    for keyword in TEXT_KEYWORDS:
        assert listener_text(data, syntax, keyword) == reference_text(data, syntax, keyword), keyword
