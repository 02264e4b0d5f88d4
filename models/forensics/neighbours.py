"""Which slices lie next to a benchmark slice, so that the benchmark judges a slice as the service does:
within its series, against the slices on either side.

Why a module of its own: the benchmark stores single slices, but the detector finishes every slice
against its neighbours (models.anomaly, step 6). A tampered slice's neighbours are the GENUINE slices
beside the one it was made from (a 2-D attacker edits one slice), except for the 3-D attack, whose
neighbours are the other tampered slices of the same sphere where it reached them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from models.corpus import CorpusSlice
from models.series import adjacent, usual_spacing


def neighbour_index(slices: Iterable[CorpusSlice]) -> dict[str, tuple[CorpusSlice | None, CorpusSlice | None]]:
    """slice key -> (previous, next) adjacent slice of the same series along z; None where there is none."""
    series: dict[tuple[str, str], list[CorpusSlice]] = {}
    for item in slices:
        if item.position_z is not None:
            series.setdefault((item.patient, item.series_uid or item.path), []).append(item)
    index: dict[str, tuple[CorpusSlice | None, CorpusSlice | None]] = {}
    for members in series.values():
        members.sort(key=lambda s: s.position_z or 0.0)
        spacing = usual_spacing(s.position_z for s in members if s.position_z is not None)
        for i, item in enumerate(members):
            before = members[i - 1] if i > 0 and adjacent(members[i - 1].position_z, item.position_z, spacing) else None
            after = (
                members[i + 1]
                if i + 1 < len(members) and adjacent(item.position_z, members[i + 1].position_z, spacing)
                else None
            )
            if spacing is not None:
                index[item.key] = (before, after)
    return index


def sphere_key(item: dict[str, Any]) -> tuple[Any, ...]:
    """The 3-D attack's slices of one sphere share the patient, the HU level and the centre slice."""
    details = item.get("details") or {}
    return (item["patient"], details.get("hu"), details.get("sphere_centre_slice"))


class NeighbourResolver:
    """For a benchmark item or a corpus slice: the cache keys (and loaders) of the slices beside it."""

    def __init__(self, items: list[dict[str, Any]], slices: Iterable[CorpusSlice]) -> None:
        self.index = neighbour_index(slices)
        self.genuine_by_slice = {i["slice_key"]: i["id"] for i in items if i["label"] == 0}
        self.spheres: dict[tuple[Any, ...], dict[str, str]] = {}
        for item in items:
            if item["method"] == "inject-3d":
                self.spheres.setdefault(sphere_key(item), {})[item["slice_key"]] = item["id"]

    def genuine_key(self, neighbour: CorpusSlice) -> str:
        """The genuine slice's cache key: its benchmark item when it has one (same pixels), else ref-<key>."""
        return self.genuine_by_slice.get(neighbour.key) or f"ref-{neighbour.key}"

    def for_item(self, item: dict[str, Any]) -> list[tuple[str, CorpusSlice] | None]:
        """(cache key, the corpus slice) of each neighbour of a benchmark item, None where there is none."""
        sphere = self.spheres.get(sphere_key(item), {}) if item["method"] == "inject-3d" else {}
        out: list[tuple[str, CorpusSlice] | None] = []
        for neighbour in self.index.get(item["slice_key"], (None, None)):
            if neighbour is None:
                out.append(None)
            elif neighbour.key in sphere:
                out.append((sphere[neighbour.key], neighbour))
            else:
                out.append((self.genuine_key(neighbour), neighbour))
        return out

    def for_slice(self, item: CorpusSlice) -> list[tuple[str, CorpusSlice] | None]:
        """The same for a genuine corpus slice (the calibration slices of the training patients)."""
        return [(f"ref-{n.key}", n) if n is not None else None for n in self.index.get(item.key, (None, None))]
