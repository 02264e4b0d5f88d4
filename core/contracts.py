"""Every name that two parts of btd must agree on, written once: the gateway, the worker, the API, the
dashboard and the SR read them from here (docs/architecture.md, "Contracts").

- study states (the values of `studies.state`) and which SOP classes can be scored;
- task names: the gateway and the worker meet only through the database and these names on the queue;
- verdicts and their ranking (defined by the science, `models.results`, re-exported here);
- delivery outcomes (the values of `delivery_attempts.outcome`);
- the default model;
- where files live under BTD_DATA_DIR: residual maps, scoring progress, reports;
- the software version.

Why typed enumerations: a wrong name then fails where it is written, not as a task nobody consumes or a
state no query matches. They are `StrEnum`s, so each member is the very string stored in the database and
sent on the queue.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from models import __version__ as _models_version
from models.metadata import DEFAULT_MODEL_PATH
from models.results import NO_EVIDENCE, NOT_ASSESSED, REVIEW, SUSPICIOUS, VERDICTS_WORST_FIRST, worst_verdict

VERSION = _models_version  # the installed distribution's version (pyproject.toml)


class State(StrEnum):
    """A study's place in its life cycle; every change is a compare-and-set (core.db.repository.transition)."""

    RECEIVING = "RECEIVING"
    STABLE = "STABLE"
    QUEUED = "QUEUED"
    SCORING = "SCORING"
    SCORED = "SCORED"
    REPORTED = "REPORTED"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"
    FAILED_DELIVERY = "FAILED_DELIVERY"
    REJECTED = "REJECTED"


ALL_STATES: tuple[State, ...] = tuple(State)

# A new instance for a study in one of these states only resumes it (nothing has been scored yet, and at
# STABLE no task was dispatched); in any other state it reopens the study as a new version.
RESUMABLE_STATES = (State.STABLE,)

# Failed for good until a person acts (rescore, redeliver).
FAILED_STATES = (State.FAILED, State.FAILED_DELIVERY)

# Waiting for a worker to take them.
WAITING_STATES = (State.STABLE, State.QUEUED)

# A study may be sent back to scoring only once nothing is working on it.
RESCORABLE_STATES = (
    State.SCORED,
    State.REPORTED,
    State.DELIVERED,
    State.FAILED,
    State.FAILED_DELIVERY,
    State.REJECTED,
)

# The milestones of one pass through the life cycle, in the order they happen (the dashboard's timeline).
MILESTONES = (
    State.RECEIVING,
    State.STABLE,
    State.QUEUED,
    State.SCORING,
    State.SCORED,
    State.REPORTED,
    State.DELIVERED,
)

# SOP classes whose instances the detector can score (CT and MR images, single- and multi-frame).
# Only these can change a verdict. Anything else arriving for a study past STABLE (btd's own SR and KOS
# routed back by a PACS rule that forwards whole studies, a radiologist's annotations) is stored but does
# not reopen it: reopening on our own report would score, report and forward the study forever.
SCOREABLE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
)


class Task(StrEnum):
    """The tasks the gateway hands to workers, by name (Celery task names; the in-process runner's keys)."""

    SCORE_STUDY = "btd.score_study"  # QUEUED -> SCORING -> SCORED
    BUILD_REPORT = "btd.build_report"  # SCORED -> REPORTED
    DELIVER_REPORT = "btd.deliver_report"  # REPORTED / FAILED_DELIVERY -> DELIVERED


class QueueRole(StrEnum):
    """The two queues: scoring (long jobs) and reports (build and deliver, seconds each).

    Why two: a report waiting behind a queue of long scoring jobs would hold back a finished study's
    verdict; with its own queue a study's report goes out while other studies are still scored."""

    SCORING = "scoring"
    REPORTS = "reports"


# Which queue carries which task.
TASK_QUEUE_ROLE: dict[Task, QueueRole] = {
    Task.SCORE_STUDY: QueueRole.SCORING,
    Task.BUILD_REPORT: QueueRole.REPORTS,
    Task.DELIVER_REPORT: QueueRole.REPORTS,
}


def queue_name(base: str, role: QueueRole | str) -> str:
    """The broker queue of a role: BTD_QUEUE_NAME for scoring, BTD_QUEUE_NAME + ".reports" for reports."""
    return base if QueueRole(role) == QueueRole.SCORING else f"{base}.{QueueRole.REPORTS.value}"


# The states that wait on a task, and that task: the stability monitor's sweepers re-dispatch it when its
# message is lost or its worker died (service/stability.py, core/liveness.py).
STEP_TASKS: dict[State, Task] = {
    State.QUEUED: Task.SCORE_STUDY,
    State.SCORING: Task.SCORE_STUDY,
    State.SCORED: Task.BUILD_REPORT,
    State.REPORTED: Task.DELIVER_REPORT,
}


class Verdict(StrEnum):
    """A study's, series' or slice's verdict; the values are `models.results`' (the science defines them)."""

    SUSPICIOUS = SUSPICIOUS
    REVIEW = REVIEW
    NO_EVIDENCE = NO_EVIDENCE
    NOT_ASSESSED = NOT_ASSESSED


# Worst first: what the API's filter offers and the dashboard lists, in this order.
VERDICTS: tuple[Verdict, ...] = tuple(Verdict(v) for v in VERDICTS_WORST_FIRST)

__all__ = [
    "ALL_STATES",
    "DEFAULT_MODEL_PATH",
    "FAILED_STATES",
    "MILESTONES",
    "RESCORABLE_STATES",
    "RESUMABLE_STATES",
    "SCOREABLE_SOP_CLASSES",
    "STEP_TASKS",
    "TASK_QUEUE_ROLE",
    "VERDICTS",
    "VERSION",
    "WAITING_STATES",
    "DeliveryOutcome",
    "QueueRole",
    "State",
    "Task",
    "Verdict",
    "map_relpath",
    "model_path",
    "progress_path",
    "queue_name",
    "report_relpath",
    "worst_verdict",
]


# The detector's cues (models.cues, models.fused) in the words the SR and the dashboard show a radiologist.
CUE_WORDS = {
    "btd": "diffusion residual",
    "noise": "noise texture",
    "continuity": "3-D continuity",
    "copymove": "copy-move",
    "header": "header consistency",
}


def cue_words(cue: str | None) -> str:
    """A cue's name for people; an unknown cue keeps its own name."""
    return CUE_WORDS.get(cue or "btd", cue or "btd")


class DeliveryOutcome(StrEnum):
    """The outcome of one delivery attempt of a report to one destination (`delivery_attempts.outcome`)."""

    SUCCESS = "success"
    FAILURE = "failure"


def model_path(configured: str | Path | None) -> Path:
    """The weights file that scores: BTD_MODEL when set, else the default model shipped with `models`."""
    return Path(configured) if configured else DEFAULT_MODEL_PATH


# --- files under BTD_DATA_DIR ---------------------------------------------------------------------------
# The spool's own layout is core.spool's; these are the files the worker writes and the gateway reads.

MAPS_DIR = "maps"
PROGRESS_DIR = "progress"
REPORTS_DIR = "reports"


def map_relpath(study_uid: str, sop_instance_uid: str, frame: int | None) -> str:
    """`maps/<study_uid>/<sop_uid>.npy`, relative to BTD_DATA_DIR (multi-frame: `_<frame>` before `.npy`).

    The worker saves the residual map of every suspicious instance there; the dashboard draws overlays
    from it. UIDs arrive validated by the listener (digits and dots), so they are safe path components."""
    name = sop_instance_uid if frame is None else f"{sop_instance_uid}_{frame}"
    return f"{MAPS_DIR}/{study_uid}/{name}.npy"


def progress_path(data_dir: Path, study_uid: str) -> Path:
    """`<DATA_DIR>/progress/<study_uid>.json`: {"done", "total", "updated_at"} while a study is scored.

    Why a file: a Celery worker and the gateway share the data directory (the worker reads the spool from
    it), so a small file is readable by the API in both deployment modes without a table written per slice.
    """
    return Path(data_dir) / PROGRESS_DIR / f"{study_uid}.json"


def report_relpath(study_folder: str, document_folder: str) -> str:
    """`reports/<study>/<document>.dcm`, relative to BTD_DATA_DIR; the arguments are sanitised UIDs."""
    return f"{REPORTS_DIR}/{study_folder}/{document_folder}.dcm"
