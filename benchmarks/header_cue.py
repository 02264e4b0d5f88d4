"""The header/encoding-consistency cue on genuine traffic (all of ../shared/data) and on re-written slices.

Why first on genuine data: a PACS may re-compress or re-stamp instances, and a cue outside the pixels that
false-alarms on its own would be worse than none (../shared/FINDINGS.md, 2026-12-02). Measured here:
1. every series of ../shared/data (grouped by Series Instance UID, headers only): how many instances the
   cue flags (strong: encoding / private tags / scanner fields; weak: file meta only), and how many series
   it cannot judge (fewer than 5 instances, or no clear majority);
2. the same series with N slices re-written the way an editing tool writes them (pydicom `save_as` with
   `enforce_file_format=True`, as models/forensics/dicom_write.py does), the other files as they were.

Usage: .venv/bin/python benchmarks/header_cue.py [--data ../shared/data] [--rewrite 1]
"""

from __future__ import annotations

import argparse
import io
import json
from collections import defaultdict
from pathlib import Path

import pydicom

from models.cues.header import header_findings, signature

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def series_of(root: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        if "SOPInstanceUID" not in ds:
            continue
        groups[str(ds.get("SeriesInstanceUID", "")) or f"(blank) {path.parent}"].append((path, ds))
    return groups


def rewritten(path: Path) -> pydicom.Dataset:
    """The instance as an editing tool writes it back (full dataset re-encoded by pydicom)."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer, stop_before_pixels=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--rewrite", type=int, default=1, help="instances re-written per series in part 2")
    args = parser.parse_args()
    groups = series_of(args.data)
    genuine = {"series": len(groups), "instances": 0, "strong": 0, "weak": 0, "not_judged": 0, "reasons": {}}
    rewrite = {"series_judged": 0, "rewritten_flagged_strong": 0, "rewritten_flagged_weak": 0, "rewritten": 0,
               "others_flagged": 0, "fields": defaultdict(int)}
    for uid, members in groups.items():
        signatures = [signature(ds) for _, ds in members]
        genuine["instances"] += len(members)
        findings, why = header_findings(signatures)
        if why:
            genuine["not_judged"] += 1
            short = why.split(":")[1].strip()[:40]
            genuine["reasons"][short] = genuine["reasons"].get(short, 0) + 1
            continue
        genuine["strong"] += sum(f.strong for f in findings)
        genuine["weak"] += sum(not f.strong for f in findings)
        if findings:
            genuine.setdefault("examples", []).append([uid[-12:], findings[0].describe()])
        changed = list(range(min(args.rewrite, len(members))))
        edited = list(signatures)
        for i in changed:
            edited[i] = signature(rewritten(members[i][0]))
        findings, why = header_findings(edited)
        if why:
            continue
        rewrite["series_judged"] += 1
        rewrite["rewritten"] += len(changed)
        for f in findings:
            if f.index in changed:
                rewrite["rewritten_flagged_strong" if f.strong else "rewritten_flagged_weak"] += 1
                for name in f.fields:
                    rewrite["fields"][name] += 1
            else:
                rewrite["others_flagged"] += 1
    print(json.dumps({"genuine": genuine, "rewritten": rewrite}, indent=1, default=dict))


if __name__ == "__main__":
    main()
