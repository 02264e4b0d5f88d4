"""Header and encoding consistency within a series: an instance re-written by another tool stands out.

Why: an attacker who edits a few slices re-writes only those files, with his own tool; genuine instances of
one series sent by one PACS normally agree on the pixel encoding (Bits Stored / Allocated, Pixel
Representation, rescale, padding value), on the set of private tag groups and on the scanner description,
and usually on the file meta (Implementation Class UID / Version Name, transfer syntax). Measured on all of
../shared/data first (docs/bench/forensics-lofo.md): genuine series are homogeneous in every field, and the
only mixed groups are test files re-encoded into many transfer syntaxes by several tools (no majority).
Because a PACS may re-compress or re-stamp some instances, a difference in the file meta ALONE is reported
but does not fire; a difference in the encoding, the private tag set or the scanner fields fires. The cue
only speaks when the series has a clear majority (>= MIN_MAJORITY_SHARE of at least MIN_INSTANCES).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

STRONG_FIELDS = (
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "PixelPaddingValue",
    "Manufacturer",
    "ManufacturerModelName",
    "ConvolutionKernel",
    "private_groups",
)
WEAK_FIELDS = ("ImplementationClassUID", "ImplementationVersionName", "TransferSyntaxUID")
MIN_INSTANCES = 5
MIN_MAJORITY_SHARE = 0.8


def signature(ds: Any) -> dict[str, str]:
    """The fields compared, as strings, from a pydicom Dataset (pixels not needed)."""
    meta = getattr(ds, "file_meta", None)
    out: dict[str, str] = {}
    for name in STRONG_FIELDS:
        if name == "private_groups":
            # From the tags alone (`keys()`, not the Dataset: iterating a Dataset yields its elements, each
            # decoded first: ~1.2 ms of a B70f header's 1.8 ms, 2026-12-05); the tags give the same groups.
            tags = ds.keys()
            groups = sorted({f"{tag.group:04x}" for tag in tags if tag.is_private})
            out[name] = ",".join(groups)
        else:
            value = ds.get(name, None)
            out[name] = "" if value is None else str(getattr(value, "value", value))
    for name in WEAK_FIELDS:
        value = meta.get(name, None) if meta is not None else None
        out[name] = "" if value is None else str(getattr(value, "value", value))
    return out


@dataclass
class HeaderFinding:
    """One instance that differs from its series' majority."""

    index: int
    fields: dict[str, tuple[str, str]]  # field -> (this instance, the majority)
    strong: bool

    def describe(self) -> str:
        parts = [f"{k} {v[0] or '(none)'} vs {v[1] or '(none)'}" for k, v in sorted(self.fields.items())]
        kind = "encoding/scanner fields" if self.strong else "file meta only (a PACS may re-encode)"
        return f"differs from its series in {kind}: " + "; ".join(parts)


def header_findings(signatures: list[dict[str, str] | None]) -> tuple[list[HeaderFinding], str | None]:
    """(instances differing from the majority, None) or ([], why the cue does not speak for this series)."""
    present = [(i, s) for i, s in enumerate(signatures) if s is not None]
    if len(present) < MIN_INSTANCES:
        return [], f"header cue not used: {len(present)} instance(s), needs {MIN_INSTANCES}"
    findings: dict[int, HeaderFinding] = {}
    for name in (*STRONG_FIELDS, *WEAK_FIELDS):
        counts = Counter(s.get(name, "") for _, s in present)
        majority, n = counts.most_common(1)[0]
        if n == len(present):
            continue
        if n < MIN_MAJORITY_SHARE * len(present):
            return [], f"header cue not used: the series has no clear majority for {name}"
        for i, s in present:
            if s.get(name, "") != majority:
                finding = findings.setdefault(i, HeaderFinding(i, {}, False))
                finding.fields[name] = (s.get(name, ""), majority)
                finding.strong |= name in STRONG_FIELDS
    return sorted(findings.values(), key=lambda f: f.index), None
