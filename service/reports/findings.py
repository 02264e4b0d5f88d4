"""What a report says, as plain data: the study verdict, each series' result and the suspicious regions.

Why a type of our own: the SR and KOS builders must not depend on the ORM or on `models` (they are
tested on real DICOM files without a database), and the database rows of one study version are read in
one place (`load_findings`), so the SR says exactly what the database says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class RegionFinding:
    """One suspicious region on one image (pixel coordinates; x = column, y = row)."""

    sop_instance_uid: str
    score: float
    outline: list[list[float]]
    frame: int | None = None  # 1-based frame of a multi-frame image, None for single-frame images
    x0: float = 0.0
    y0: float = 0.0
    x1: float = 0.0
    y1: float = 0.0


@dataclass(frozen=True)
class SeriesFinding:
    """The verdict on one series; `reason` says why a series was not assessed."""

    series_uid: str
    modality: str
    verdict: str  # "no_evidence" | "suspicious" | "not_assessed"
    score: float | None = None
    reason: str | None = None
    n_instances: int = 0
    n_assessed: int = 0


@dataclass
class StudyFindings:
    """Everything one SR reports for one version of a study."""

    study_uid: str
    study_version: int
    verdict: str  # "no_evidence" | "suspicious" | "not_assessed"
    score: float | None
    model_name: str = "btd"
    model_version: str = "unknown"
    model_sha256: str | None = None
    # How far the verdict can be trusted: the model's operating point measured on held-out patients.
    operating_point: str | None = None
    series: list[SeriesFinding] = field(default_factory=list)
    regions: list[RegionFinding] = field(default_factory=list)
    # SOP Instance UIDs the detector judged suspicious (the KOS lists these, region or not).
    flagged_instances: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return self.verdict == "suspicious" or bool(self.flagged_instances) or bool(self.regions)

    @property
    def not_assessed(self) -> list[SeriesFinding]:
        return [s for s in self.series if s.verdict == "not_assessed"]


def load_findings(session: Session, study_uid: str, study_version: int | None = None) -> StudyFindings:
    """Read the verdict of one study version from the database (the latest version when None).

    Plain SQL on the contract's table and column names (docs/architecture.md) rather than the ORM
    classes, so the report code depends on the schema contract only.
    """
    study = session.execute(
        text("SELECT verdict, score, version FROM studies WHERE study_uid = :uid"), {"uid": study_uid}
    ).one_or_none()
    if study is None:
        raise LookupError(f"no study {study_uid}")
    version = study_version if study_version is not None else int(study.version or 1)
    series_rows = session.execute(
        text(
            "SELECT id, series_uid, modality, verdict, score, reason, n_instances, n_assessed, model_name,"
            " model_sha256 FROM series_results WHERE study_uid = :uid AND study_version = :v ORDER BY id"
        ),
        {"uid": study_uid, "v": version},
    ).all()
    series = [
        SeriesFinding(
            series_uid=r.series_uid,
            modality=r.modality or "",
            verdict=r.verdict,
            score=r.score,
            reason=r.reason,
            n_instances=int(r.n_instances or 0),
            n_assessed=int(r.n_assessed or 0),
        )
        for r in series_rows
    ]
    regions: list[RegionFinding] = []
    flagged: list[str] = []
    ids = [r.id for r in series_rows]
    if ids:
        inst_rows = session.execute(
            text(
                "SELECT id, sop_instance_uid, verdict FROM instance_results"
                " WHERE series_result_id IN (" + ",".join(str(int(i)) for i in ids) + ") ORDER BY id"
            )
        ).all()
        flagged = [r.sop_instance_uid for r in inst_rows if r.verdict == "suspicious"]
        inst_ids = [r.id for r in inst_rows]
        if inst_ids:
            region_rows = session.execute(
                text(
                    "SELECT sop_instance_uid, frame, x0, y0, x1, y1, score, outline FROM regions"
                    " WHERE instance_result_id IN (" + ",".join(str(int(i)) for i in inst_ids) + ") ORDER BY id"
                )
            ).all()
            regions = [
                RegionFinding(
                    sop_instance_uid=r.sop_instance_uid,
                    frame=r.frame,
                    score=float(r.score),
                    outline=_outline(r.outline),
                    x0=float(r.x0),
                    y0=float(r.y0),
                    x1=float(r.x1),
                    y1=float(r.y1),
                )
                for r in region_rows
            ]
    model_row = next((r for r in series_rows if r.model_name), None)
    model_name = model_row.model_name if model_row else "btd"
    return StudyFindings(
        study_uid=study_uid,
        study_version=version,
        verdict=study.verdict or _worst(series),
        score=study.score,
        model_name=model_name,
        # The model's version is not a db column; its name (e.g. "btd-ct-v1") is what the db stores.
        model_version=model_name,
        model_sha256=model_row.model_sha256 if model_row else None,
        series=series,
        regions=regions,
        flagged_instances=flagged,
    )


def _outline(value: object) -> list[list[float]]:
    """The JSON column comes back as a list (JSON type) or a string (TEXT on some backends)."""
    if isinstance(value, str):
        value = json.loads(value)
    return [[float(p[0]), float(p[1])] for p in (value or [])]


def _worst(series: list[SeriesFinding]) -> str:
    verdicts = {s.verdict for s in series}
    for v in ("suspicious", "no_evidence"):
        if v in verdicts:
            return v
    return "not_assessed"
