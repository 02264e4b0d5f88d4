"""What an SR or KOS needs of a source image it only cites: the four UIDs and the modality.

Why not the image's header: a report cites every instance of the study (the Current Requested Procedure
Evidence Sequence), but reads attributes only of a few (the first for the patient and study modules, and
the images its regions or key-object selection point at). Reading every header held about 0.5 MB of
Python objects per instance while the report was built (1.3 GB for a 2,000-slice study, issue 15); these
stand-ins hold a few hundred bytes each and come from the database, without opening the files.
"""

from __future__ import annotations

from pydicom.dataset import Dataset


def evidence_reference(
    study_uid: str, series_uid: str, sop_class_uid: str, sop_instance_uid: str, modality: str | None
) -> Dataset:
    """A dataset that stands for one cited image: enough for the evidence sequence and the procedure code."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    if modality:
        ds.Modality = modality
    return ds
