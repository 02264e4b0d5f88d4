"""Key Object Selection document listing the images btd flagged.

Why beside the SR: many viewers and PACS do not draw SR regions but do show "key images" (a KOS) as a
flagged subset of the study; a radiologist on such a viewer still finds the suspicious slices. Only
built when something is flagged: a KOS with nothing in it would only confuse.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from core.contracts import VERSION
from worker.reports.findings import StudyFindings
from worker.reports.sr import MANUFACTURER, MODEL_NAME, device_uid, report_uid, verdict_text

KOS_SERIES_NUMBER = 9902


def flagged_uids(findings: StudyFindings) -> list[str]:
    """The SOP Instance UIDs to list: every instance judged suspicious, carrying a region or replaced by
    different bytes under its UID (the one a radiologist must look at first), in order."""
    seen: dict[str, None] = {}
    replaced = (r.sop_instance_uid for r in findings.replaced_instances)
    for uid in [*findings.flagged_instances, *(r.sop_instance_uid for r in findings.regions), *replaced]:
        seen.setdefault(uid, None)
    return list(seen)


def build_kos(source_datasets: Sequence[Dataset], findings: StudyFindings) -> Dataset | None:
    """The KOS of one study version, or None when nothing is flagged (or no flagged image is at hand)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    selected = [by_uid[uid] for uid in flagged_uids(findings) if uid in by_uid]
    if not selected:
        return None
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(), name="BTD", manufacturer_name=MANUFACTURER, model_name=MODEL_NAME
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=selected,
        observer_device_context=observer,
        description=verdict_text(findings)[:1024],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=selected,
        content=content,
        series_instance_uid=report_uid("kos-series", findings.study_uid, findings.study_version),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=report_uid("kos", findings.study_uid, findings.study_version),
        instance_number=findings.study_version,
        manufacturer=MANUFACTURER,
        series_description="BTD flagged images",
        manufacturer_model_name=MODEL_NAME,
        software_versions=VERSION,
    )
    return kos
