"""What arrived, as evidence: every version of every instance, identical resends and replacements.

Why on the API: the listener keeps different bytes under a known SOP Instance UID as a new version with
`conflict` set, and counts identical resends in `duplicates` (docs/architecture.md, `instances`). A
replacement under the same UID is itself a sign of tampering (something changed the image and sent it
again as the same object), so radiology IT's tools must see it without opening the dashboard: per
instance and per study in `/api/studies/{uid}`, as a filter of the list, in `/api/stats` and as metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db.schema import Instance
from service.api.schemas import ForensicSummary, InstanceOut, InstanceVersionOut


@dataclass
class StudyCounts:
    instances: int = 0  # distinct SOP Instance UIDs
    versions: int = 0  # stored objects (an instance replaced once has two)
    duplicates: int = 0  # identical resends, nothing stored for them
    conflicting_instances: int = 0  # SOP Instance UIDs with more than one version

    def summary(self) -> dict[str, object]:
        """The fields every study summary carries."""
        return {
            "duplicates": self.duplicates,
            "conflicting_instances": self.conflicting_instances,
            "conflict": self.conflicting_instances > 0,
        }

    def forensics(self) -> ForensicSummary:
        return ForensicSummary(
            instances=self.instances,
            versions=self.versions,
            duplicates=self.duplicates,
            conflicting_instances=self.conflicting_instances,
            conflict=self.conflicting_instances > 0,
        )


def study_counts(session: Session, study_uids: list[str]) -> dict[str, StudyCounts]:
    """The counts of each study in one grouped query (a study with no instance counts zero)."""
    counts = {uid: StudyCounts() for uid in study_uids}
    if not study_uids:
        return counts
    conflicting = func.count(func.distinct(Instance.sop_instance_uid)).filter(Instance.conflict.is_(True))
    rows = session.execute(
        select(
            Instance.study_uid,
            func.count(func.distinct(Instance.sop_instance_uid)),
            func.count(),
            func.coalesce(func.sum(Instance.duplicates), 0),
            conflicting,
        )
        .where(Instance.study_uid.in_(study_uids))
        .group_by(Instance.study_uid)
    ).all()
    for uid, n_instances, n_versions, n_duplicates, n_conflicting in rows:
        counts[uid] = StudyCounts(int(n_instances), int(n_versions), int(n_duplicates), int(n_conflicting))
    return counts


def instance_history(session: Session, study_uid: str) -> list[InstanceOut]:
    """Every instance of the study in receipt order, with all its versions, oldest first."""
    rows = session.scalars(
        select(Instance).where(Instance.study_uid == study_uid).order_by(Instance.id)
    ).all()
    by_sop: dict[str, list[Instance]] = {}
    for row in rows:
        by_sop.setdefault(row.sop_instance_uid, []).append(row)
    out = []
    for sop, versions in by_sop.items():
        versions.sort(key=lambda r: r.version)
        first = versions[0]
        out.append(
            InstanceOut(
                sop_instance_uid=sop,
                series_uid=first.series_uid,
                sop_class_uid=versions[-1].sop_class_uid,
                modality=versions[-1].modality,
                current_version=versions[-1].version,
                duplicates=sum(v.duplicates for v in versions),
                conflict=any(v.conflict for v in versions),
                versions=[
                    InstanceVersionOut(
                        version=v.version,
                        sha256=v.sha256,
                        size=v.size,
                        received_at=v.received_at,
                        calling_ae=v.calling_ae,
                        peer=v.peer,
                        transfer_syntax=v.transfer_syntax,
                        duplicates=v.duplicates,
                    )
                    for v in versions
                ],
            )
        )
    return out


def count_forensics(session: Session) -> dict[str, int]:
    """Across every study: instances replaced under their UID, the studies holding them, identical resends."""
    replaced = session.execute(
        select(
            func.count(func.distinct(Instance.sop_instance_uid)),
            func.count(func.distinct(Instance.study_uid)),
        ).where(Instance.conflict.is_(True))
    ).one()
    resends = session.scalar(select(func.coalesce(func.sum(Instance.duplicates), 0)))
    return {
        "conflicting_instances": int(replaced[0]),
        "studies_with_conflicts": int(replaced[1]),
        "duplicate_resends": int(resends or 0),
    }
