"""What a report says, as plain data: the study verdict, each series' result and the suspicious regions.

Why a type of our own: the SR and KOS builders must not depend on the ORM (they are tested on real DICOM
files without a database), and the database rows of one study version are read in one place
(`load_findings`), so the SR says exactly what the database says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import Verdict, cue_words, worst_verdict
from core.db.repository import replaced_instances
from core.db.schema import InstanceResult, Region, SeriesResult, Study
from core.forensics import verdict_with_replacements


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
    cue: str | None = None  # the cue whose map holds the region (None: the diffusion residual of an unfused model)


@dataclass(frozen=True)
class SeriesFinding:
    """The verdict on one series; `reason` says why a series was not assessed."""

    series_uid: str
    modality: str
    verdict: str  # a core.contracts.Verdict value
    score: float | None = None
    reason: str | None = None
    n_instances: int = 0
    n_assessed: int = 0
    cues: tuple[dict, ...] = ()  # models.results.CueResult dicts: each cue's score, threshold, fired, reason
    reference: dict | None = None  # the scanner reference judged against (None: the series against itself)

    def cue_summary(self) -> str | None:
        """What the cues said of this series, in words: which fired, which could not be used and why."""
        if not self.cues:
            return None
        fired = [c for c in self.cues if c.get("used") and c.get("fired")]
        quiet = [c for c in self.cues if c.get("used") and not c.get("fired")]
        unused = [c for c in self.cues if not c.get("used")]
        parts = []
        if fired:
            parts.append("fired: " + ", ".join(_cue_with_score(c) for c in fired))
        if quiet:
            parts.append("below threshold: " + ", ".join(cue_words(c.get("name")) for c in quiet))
        if unused:
            parts.append("not used: " + "; ".join(f"{cue_words(c.get('name'))} ({c.get('reason')})" for c in unused))
        return f"series {self.series_uid}: cues " + "; ".join(parts)

    def reference_summary(self) -> str:
        """Against what the series was judged: a scanner reference with its provenance, or itself."""
        if self.reference:
            ref = self.reference
            return (
                f"series {self.series_uid}: scored against the reference for {ref.get('label')}, fitted on "
                f"{ref.get('n_slices')} slices of {ref.get('n_series')} series ({ref.get('source')}; "
                f"{ref.get('match', 'exact')} match)"
            )
        return f"series {self.series_uid}: judged against its own {self.n_assessed} slices (no scanner reference)"


def _cue_with_score(cue: dict) -> str:
    score, threshold = cue.get("score"), cue.get("threshold")
    if score is None or threshold is None:
        return cue_words(cue.get("name"))
    return f"{cue_words(cue.get('name'))} ({float(score):.2f} >= {float(threshold):.2f})"


@dataclass(frozen=True)
class ReplacedInstance:
    """An instance received again with different bytes under the same SOP Instance UID (core/forensics.py)."""

    sop_instance_uid: str
    version: int  # the version scored and reported (2 = replaced once)


@dataclass
class StudyFindings:
    """Everything one SR reports for one version of a study."""

    study_uid: str
    study_version: int
    verdict: str  # a core.contracts.Verdict value
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
    # Instances replaced by different bytes under their UID: stated in the SR, and the verdict is at least review.
    replaced_instances: list[ReplacedInstance] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return self.verdict == Verdict.SUSPICIOUS or bool(self.flagged_instances) or bool(self.regions)

    @property
    def not_assessed(self) -> list[SeriesFinding]:
        return [s for s in self.series if s.verdict == Verdict.NOT_ASSESSED]


def load_findings(session: Session, study_uid: str, study_version: int | None = None) -> StudyFindings:
    """Read the verdict of one study version from the database (the latest version when None)."""
    study = session.execute(
        select(Study.verdict, Study.score, Study.version).where(Study.study_uid == study_uid)
    ).one_or_none()
    if study is None:
        raise LookupError(f"no study {study_uid}")
    version = study_version if study_version is not None else int(study.version or 1)
    series_rows = session.scalars(
        select(SeriesResult)
        .where(SeriesResult.study_uid == study_uid, SeriesResult.study_version == version)
        .order_by(SeriesResult.id)
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
            cues=tuple(r.cues or ()),
            reference=r.reference,
        )
        for r in series_rows
    ]
    instance_rows = session.execute(
        select(InstanceResult.sop_instance_uid, InstanceResult.verdict)
        .where(InstanceResult.series_result_id.in_([r.id for r in series_rows]))
        .order_by(InstanceResult.id)
    ).all()
    region_rows = session.scalars(
        select(Region)
        .join(InstanceResult, InstanceResult.id == Region.instance_result_id)
        .join(SeriesResult, SeriesResult.id == InstanceResult.series_result_id)
        .where(SeriesResult.study_uid == study_uid, SeriesResult.study_version == version)
        .order_by(Region.id)
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
            cue=r.cue,
        )
        for r in region_rows
    ]
    model_row = next((r for r in series_rows if r.model_name), None)
    model_name = model_row.model_name if model_row else "btd"
    replaced = [ReplacedInstance(sop, n) for sop, n in replaced_instances(session, study_uid)]
    verdict = verdict_with_replacements(study.verdict or worst_verdict(s.verdict for s in series), len(replaced))
    return StudyFindings(
        study_uid=study_uid,
        study_version=version,
        verdict=verdict or Verdict.NOT_ASSESSED,
        score=study.score,
        model_name=model_name,
        # The model's version is not a db column; its name (e.g. "btd-ct-v1") is what the db stores.
        model_version=model_name,
        model_sha256=model_row.model_sha256 if model_row else None,
        series=series,
        regions=regions,
        flagged_instances=[r.sop_instance_uid for r in instance_rows if r.verdict == Verdict.SUSPICIOUS],
        replaced_instances=replaced,
    )


def _outline(value: object) -> list[list[float]]:
    """The JSON column comes back as a list (JSON type) or a string (TEXT on some backends)."""
    if isinstance(value, str):
        value = json.loads(value)
    return [[float(p[0]), float(p[1])] for p in (value or [])]
