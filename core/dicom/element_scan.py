"""Find a few top-level elements of an encoded dataset by walking its element structure, without pydicom.

Why: the listener needs ten identifying elements of every instance it receives. pydicom's `read_dataset`
with `specific_tags` still runs its general element generator over every element of the dataset (about a
hundred for a CT slice, each through several Python calls): 0.6 ms of the listener's ~4.5 ms of CPU per
512x512 CT instance on the benchmark machine (cProfile, 2026-12-03, docs/bench/ingest.md), all of it
holding the interpreter lock that every association thread shares. This walk reads only each element's
header with one `struct.unpack_from`, steps over values, sequences and encapsulated pixel data, and keeps
the raw values of the wanted tags.

It answers only for datasets whose structure is regular from first byte to last: every VR valid, every
length inside the bytes, every sequence and item closed where its length or delimiter says. For anything
else it answers None and the caller decodes with pydicom as before, so a dataset pydicom accepts or
refuses is accepted or refused as before; where both answer they yield the same raw elements (a test
compares them on every real dataset the project holds).
"""

from __future__ import annotations

import struct

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_VALID_VRS = frozenset(str(vr).encode("ascii") for vr in VR)
_LONG_VRS = frozenset(str(vr).encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)


class _Layout:
    """The struct formats of one byte order, built once: the walk runs for every received instance."""

    def __init__(self, order: str) -> None:
        self.implicit_header = struct.Struct(f"{order}HHL")  # also items and delimiters: tag + 4-byte length
        self.explicit_header = struct.Struct(f"{order}HH2sH")
        self.long_length = struct.Struct(f"{order}L")


_LAYOUTS = {True: _Layout("<"), False: _Layout(">")}  # by little endian


def _looks_explicit(data: bytes, pos: int) -> bool:
    """pydicom's test of an element's encoding: the two bytes after its tag are upper-case letters."""
    return len(data) - pos >= 6 and 0x40 < data[pos + 4] < 0x5B and 0x40 < data[pos + 5] < 0x5B


class _Irregular(Exception):
    """The structure is not the plain case this walk answers for; pydicom decides."""


class _Walk:
    """One pass over `data`: positions are offsets into it; `found` gathers the wanted top-level elements."""

    def __init__(self, data: bytes, implicit: bool, little: bool, wanted: frozenset[int]) -> None:
        layout = _LAYOUTS[little]
        self.data = data
        self.end = len(data)
        self.implicit = implicit
        self.little = little
        self.wanted = wanted
        self.implicit_header = layout.implicit_header
        self.explicit_header = layout.explicit_header
        self.long_length = layout.long_length
        self.found: dict[BaseTag, RawDataElement] = {}

    def elements(self, pos: int, nested: bool, implicit: bool) -> int:
        """Walk elements from `pos` to the end (top level) or to the item's delimiter (nested); return where
        the walk stopped. Fewer than 8 bytes left at the top level end the walk, as they end pydicom's.

        Written for speed (it runs over every element of every received instance under the interpreter
        lock): attributes read into locals once, and the group of an explicit VR header tested after one
        unpack of it instead of comparing a slice of every element first."""
        data, end, wanted = self.data, self.end, self.wanted
        explicit_header, implicit_header, long_length = self.explicit_header, self.implicit_header, self.long_length
        top = not nested
        while True:
            if end - pos < 8:
                if nested:
                    raise _Irregular
                return end
            if implicit:
                group, number, length = implicit_header.unpack_from(data, pos)
                vr = None
                pos += 8
            else:
                group, number, vr, length = explicit_header.unpack_from(data, pos)
                if group == 0xFFFE:  # delimiters have no VR, even explicit: the 4 bytes after the tag are a length
                    group, number, length = implicit_header.unpack_from(data, pos)
                    vr = None
                    pos += 8
                else:
                    pos += 8
                    if vr not in _VALID_VRS:
                        raise _Irregular
                    if vr in _LONG_VRS:
                        if length != 0 or end - pos < 4:
                            raise _Irregular
                        (length,) = long_length.unpack_from(data, pos)
                        pos += 4
            tag = group << 16 | number
            if group == 0xFFFE:
                if nested and tag == _ITEM_END and length == 0:
                    return pos
                raise _Irregular
            if length == _UNDEFINED:
                if top and tag in wanted:
                    raise _Irregular  # a wanted value pydicom would read its own way
                pos = self.items(pos, implicit)
                continue
            if length > end - pos:
                raise _Irregular
            if top and tag in wanted:
                self.keep(tag, vr, length, pos)
            pos += length

    def items(self, pos: int, implicit: bool) -> int:
        """Step over the items of an undefined-length value (a sequence, or encapsulated pixel data's
        fragments) up to and including its Sequence Delimitation Item; return the position after it.

        An item of an explicit VR dataset may be encoded implicit VR (some writers do; pydicom reads them
        so, judging by its first element), so the walk judges each item the same way."""
        data, end = self.data, self.end
        while True:
            if end - pos < 8:
                raise _Irregular
            group, number, length = self.implicit_header.unpack_from(data, pos)
            pos += 8
            tag = group << 16 | number
            if tag == _SEQUENCE_END:
                if length != 0:
                    raise _Irregular
                return pos
            if tag != _ITEM:
                raise _Irregular
            if length == _UNDEFINED:
                pos = self.elements(pos, nested=True, implicit=implicit or not _looks_explicit(data, pos))
            elif length > end - pos:
                raise _Irregular
            else:
                pos += length

    def keep(self, tag: int, vr: bytes | None, length: int, pos: int) -> None:
        """The raw element pydicom's generator would yield for this tag (same fields, same empty value)."""
        vr_name = vr.decode("ascii") if vr is not None else None
        value = self.data[pos : pos + length] if length else empty_value_for_VR(vr_name, raw=True)
        self.found[BaseTag(tag)] = RawDataElement(
            BaseTag(tag), vr_name, length, value, pos, self.implicit, self.little
        )


def scan_elements(
    data: bytes, implicit_vr: bool, little_endian: bool, wanted: frozenset[int]
) -> dict[BaseTag, RawDataElement] | None:
    """The raw top-level elements of `data` whose tags are in `wanted`, or None where the structure is not
    regular (then decode with pydicom). Wanted tags must not be sequences."""
    if len(data) >= 6 and _looks_explicit(data, 0) == implicit_vr:
        return None  # pydicom would switch encodings for this dataset: let it
    walk = _Walk(data, implicit_vr, little_endian, wanted)
    try:
        walk.elements(0, nested=False, implicit=implicit_vr)
    except _Irregular:
        return None
    return walk.found


def dataset_of(found: dict[BaseTag, RawDataElement], implicit_vr: bool, little_endian: bool) -> Dataset:
    """A Dataset of raw elements set up as pydicom's `read_dataset` sets up its own (character set from
    (0008,0005), original encoding), so values convert on access exactly as they would from pydicom."""
    ds = Dataset(found, parent_encoding=default_encoding)
    charset = found.get(BaseTag(0x00080005))
    encoding = convert_encodings(convert_raw_data_element(charset).value) if charset is not None else default_encoding
    ds.set_original_encoding(implicit_vr, little_endian, encoding)
    return ds
