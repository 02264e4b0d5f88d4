"""The site's own genuine references per scanner and kernel, learnt from its quiet traffic (issue 12).

Why: a reference fitted on a handful of training patients makes every score follow the scanner and its
kernel (a sharp Siemens kernel sat a whole unit above it). The detector judges a long series against itself,
but a short one (a single slice) only against a reference for its (manufacturer, model, kernel, thickness
band); without one it says "not assessed" instead of guessing. So each site grows references of its own:

1. every scored series leaves a `reference_samples` row: its scanner key and per-slice features
   (models: `Detector.reference_features`), with the series' verdict;
2. a sample teaches its key's reference (`fold_samples`) only when its study has stayed quiet for
   BTD_REFERENCE_HOLD_HOURS (its verdict still no_evidence, its version unchanged: not rescored, not
   reopened, not replaced) or when a person marked the study genuine (`POST /api/studies/{uid}/genuine`,
   core.db.repository.mark_genuine);
   a sample of a study that is flagged is never folded unless a person says it is genuine;
3. the reference is refitted robustly (medians and MADs, models.reference) and stored with its provenance
   (slices, series, when, from what), which the dashboard lists and every SR names.

Samples and references live in the database, so every worker process sees the same ones; folding is a
compare-and-set on `folded_at`, so two workers never fold one sample twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from core.contracts import Verdict
from core.db.base import utcnow
from core.db.schema import ReferenceSample, ScannerReference, Study
from core.observability.logs import log_event
from core.settings import Settings
from models.reference import Reference, ReferenceKey, ReferenceSet

log = logging.getLogger("btd.worker.references")

SITE_SOURCE = "site traffic"


def site_references(session: Session) -> ReferenceSet:
    """Every reference this site has learnt (empty at first: the model's shipped references then serve)."""
    return ReferenceSet(Reference.from_dict(row.reference) for row in session.scalars(select(ScannerReference)))


def record_samples(session: Session, study_uid: str, version: int, series_results: Iterable[Any]) -> int:
    """Keep each scored series' features for its scanner's reference; returns how many series had some."""
    kept = 0
    now = utcnow()
    for result in series_results:
        features = [dict(f) for f in getattr(result, "features", None) or []]
        key_data = getattr(result, "scanner_key", None)
        if not features or not key_data:
            continue
        key = ReferenceKey.from_dict(key_data)
        if not key.known:  # no kernel: nothing to key a reference by
            continue
        session.add(
            ReferenceSample(
                study_uid=study_uid,
                study_version=version,
                series_uid=str(result.series_instance_uid),
                manufacturer=key.manufacturer[:64],
                model=key.model[:64],
                kernel=key.kernel[:64],
                band=key.band[:16],
                verdict=str(result.verdict),
                features=features,
                n_slices=len(features),
                created_at=now,
            )
        )
        kept += 1
    return kept


def _ready(session: Session, hold: timedelta, now: datetime) -> list[ReferenceSample]:
    """Samples that may teach their reference now: marked genuine, or quiet for the hold time and their
    study still at the same version with verdict no_evidence."""
    quiet = (
        (ReferenceSample.verdict == Verdict.NO_EVIDENCE.value)
        & (ReferenceSample.created_at <= now - hold)
        & (Study.verdict == Verdict.NO_EVIDENCE.value)
        & (Study.version == ReferenceSample.study_version)
    )
    query = (
        select(ReferenceSample)
        .join(Study, Study.study_uid == ReferenceSample.study_uid)
        .where(ReferenceSample.folded_at.is_(None), or_(ReferenceSample.marked_genuine_by.is_not(None), quiet))
        .order_by(ReferenceSample.id)
    )
    return list(session.scalars(query))


def fold_samples(session: Session, settings: Settings, now: datetime | None = None) -> list[str]:
    """Fold every ready sample into its key's reference (creating it if new); returns the keys refitted.

    Each sample is claimed with a compare-and-set on `folded_at` before its features are used, so a
    sample folded by another worker meanwhile is skipped. The caller commits."""
    now = now or utcnow()
    hold = timedelta(hours=settings.reference_hold_hours)
    by_key: dict[ReferenceKey, list[ReferenceSample]] = {}
    for sample in _ready(session, hold, now):
        claimed = session.execute(
            update(ReferenceSample)
            .where(ReferenceSample.id == sample.id, ReferenceSample.folded_at.is_(None))
            .values(folded_at=now)
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount == 1:  # type: ignore[attr-defined]
            key = ReferenceKey(sample.manufacturer, sample.model, sample.kernel, sample.band)
            by_key.setdefault(key, []).append(sample)
    refitted = []
    for key, samples in by_key.items():
        features = [f for sample in samples for f in sample.features]
        _store(session, key, features, samples, now)
        refitted.append(key.label())
    return refitted


def _store(
    session: Session, key: ReferenceKey, features: list[Any], samples: list[ReferenceSample], now: datetime
) -> None:
    """Create or refine the key's reference from the folded samples' features."""
    row = session.scalar(
        select(ScannerReference).where(
            ScannerReference.manufacturer == key.manufacturer,
            ScannerReference.model == key.model,
            ScannerReference.kernel == key.kernel,
            ScannerReference.band == key.band,
        )
    )
    marked = sum(1 for s in samples if s.marked_genuine_by)
    source = f"{SITE_SOURCE}: {len(samples)} series ({marked} marked genuine), last folded {now:%Y-%m-%d %H:%M} UTC"
    if row is None:
        reference = Reference.fit(key, features, source)
        row = ScannerReference(
            manufacturer=key.manufacturer,
            model=key.model,
            kernel=key.kernel,
            band=key.band,
            fitted_at=now,
        )
        session.add(row)
    else:
        reference = Reference.from_dict(row.reference).refine(features, source)
    row.reference = reference.to_dict()
    row.n_slices = reference.n_slices
    row.n_series = reference.n_series
    row.source = source
    row.updated_at = now
    session.flush()
    log_event(log, "reference.refitted", reference=key.label(), n_slices=reference.n_slices, series=len(samples))
