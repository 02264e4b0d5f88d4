"""Reports on disk: `<DATA_DIR>/reports/<study_uid>/<sop_instance_uid>.dcm`, written durably.

Why durable writes: the reports row is committed right after the file is written and delivery may
happen hours later (a PACS that is down); the file must survive a crash in between. The bytes go to a
temporary file in the same folder, are fsynced and renamed into place, and the folder is fsynced.
Names derive from the document's SOP Instance UID, which derives from the study version, so writing
the same report twice replaces identical content instead of piling up copies.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from core.contracts import report_relpath
from core.spool import fsync_dir, sanitise_uid


def report_relative_path(study_uid: str, sop_instance_uid: str) -> str:
    """Path of a report document relative to BTD_DATA_DIR (what the reports table stores)."""
    return report_relpath(sanitise_uid(study_uid), sanitise_uid(sop_instance_uid))


def write_document(data_dir: Path, ds: Dataset) -> str:
    """Write an SR or KOS durably under the data dir; return its path relative to the data dir."""
    relative = report_relative_path(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    target = Path(data_dir) / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return relative


def read_document(data_dir: Path, relative: str) -> Dataset | None:
    """A stored report, or None if its file is gone (a predecessor whose file was cleaned up)."""
    path = Path(data_dir) / relative
    if not path.is_file():
        return None
    return pydicom.dcmread(path)
