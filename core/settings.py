"""The one place that reads the environment: every setting of btd, with the prefix `BTD_`.

Why one object: the gateway, the worker and the CLI must agree on paths, ports and the database, and
tools outside the code (compose files, CI, the ingest benchmark) set these names; they are a contract
(docs/architecture.md). Lists are comma-separated strings in the environment (`BTD_ALLOWED_AETS=A,B`)
because that is what a compose file or a systemd unit can write without quoting JSON.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(value: Any) -> Any:
    """Accept "A, B,C" (the environment's form) as well as a list (a caller building Settings in code)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CsvList = Annotated[list[str], NoDecode, BeforeValidator(_split_csv)]


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's cpuset counts, not the host's cores)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """All of btd's configuration; field names are the environment names without `BTD_`."""

    model_config = SettingsConfigDict(env_prefix="BTD_", case_sensitive=False, extra="ignore")

    # DICOM listener
    ae_title: str = "BTD"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    allowed_aets: CsvList = Field(default_factory=list)  # empty = any calling AE title
    # The AE titles a peer may call us by; empty = only AE_TITLE. Why checked: a PACS routing rule that
    # names the wrong node must be told at once (A-ASSOCIATE-RJ "called AE title not recognised"), not
    # silently stored by a receiver that was meant for something else.
    called_aets: CsvList = Field(default_factory=list)
    allowed_ips: CsvList = Field(default_factory=list)  # empty = any peer address
    min_free_bytes: int = 1_000_000_000  # below this free space on the spool's disk C-STORE answers 0xA700
    max_instance_bytes: int = 2 * 1024**3  # a larger dataset is answered 0xA700 (it is held in memory until whole)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Processes serving DICOM associations on the port (service/dicom/receivers.py). 1: the gateway's own
    # listener alone. More (PostgreSQL only): the gateway starts that many minus one receiving processes
    # sharing the port, so several associations at once are not limited by one interpreter lock; measured in
    # docs/bench/ingest.md. At most one per core is useful. 0 (the default): 2 on PostgreSQL when the process
    # may use two cores or more, else 1 (SQLite takes one writer; a single core gains nothing) — see
    # `_automatic_dicom_processes`.
    dicom_processes: int = Field(default=0, ge=0, le=32)

    # REST API and dashboard (access control: README "Security", docs/deploy.md)
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    api_token: str | None = None  # Bearer token with every role (view and act)
    view_tokens: CsvList = Field(default_factory=list)  # "TOKEN" or "NAME:TOKEN": read-only (dashboard, API, metrics)
    act_tokens: CsvList = Field(default_factory=list)  # as view_tokens, and may rescore and redeliver
    users_file: Path | None = None  # dashboard users, one "name:role:scrypt-hash" a line (`btd user-line`)
    session_secret: str | None = None  # signs the dashboard's login cookie; None -> random per process
    session_hours: float = 8.0  # a dashboard login lasts this long
    http_tls_cert: Path | None = None  # PEM certificate: the API serves HTTPS itself (with http_tls_key)
    http_tls_key: Path | None = None
    # Binding the API beyond loopback without any credential configured refuses to start unless this is set.
    allow_unauthenticated_network: bool = False
    expose_patient_ids: bool = False

    # Storage and queue
    data_dir: Path = Path("./var")
    database_url: str | None = None  # None -> sqlite:///<DATA_DIR>/btd.sqlite3
    broker_url: str | None = None  # None -> tasks run in a thread of `btd serve`
    # Scoring messages go to QUEUE_NAME, report and delivery messages to QUEUE_NAME + ".reports" (one
    # long study never delays another study's report); `btd worker` consumes both unless told otherwise.
    queue_name: str = "btd"
    worker_queues: CsvList = Field(default_factory=lambda: ["scoring", "reports"])  # roles `btd worker` takes
    # Redis re-delivers a message whose consumer died after this many seconds. It is only a backstop: the
    # stability monitor re-dispatches from the database (an expired lease, a lost message) within minutes.
    # Why two hours: longer than any retry countdown (at most 600 s) and than a long scoring job, so a live
    # job or a retry waiting on its timer is not handed to a second worker (which would only find it leased).
    visibility_timeout: int = 7200
    # A worker's claim on a study step (scoring, delivery), renewed every third of it by a heartbeat thread.
    # Why one minute: a killed worker's study is taken over about a minute later, while a live worker
    # (renewing three times a minute) survives a database or CPU hiccup of some 40 s without losing it.
    lease_seconds: float = 60.0
    # A step waiting for a message (QUEUED, SCORED, REPORTED) whose message is neither waiting in the queue
    # nor held under a live lease is dispatched again after this long. Why a minute: a message lost with a
    # Redis restart, or a dispatch that failed while the broker was down, is re-sent promptly, and a message
    # still in the queue (a backlog) is never duplicated whatever the wait.
    redispatch_seconds: float = 60.0
    # A step that has not moved for this long although nothing legitimately holds it (no message waiting in
    # the queue, no live lease, no retry timer) is stuck: /readyz says so, `btd_studies_stuck` counts it,
    # the dashboard shows it. Why ten minutes: the monitor has re-dispatched it about ten times by then, so
    # a person must look (no worker for its queue, a broker that drops messages, a bug).
    stuck_seconds: float = 600.0
    # Celery workers publish a heartbeat (with their metrics) every WORKER_HEARTBEAT_SECONDS; /readyz says
    # "no worker" when none has been seen for WORKER_ABSENT_SECONDS. Why two minutes: longer than a worker
    # restart (model load included), shorter than a lease plus its re-dispatch.
    worker_heartbeat_seconds: float = 15.0
    worker_absent_seconds: float = 120.0
    stable_seconds: float = 30.0  # quiet time after the last instance before a study counts as complete
    monitor_interval: float = 1.0  # how often the stability monitor looks for quiet studies

    # Model and worker
    model: str | None = None  # None -> the models package's default model
    device: str = "auto"
    # CPU threads torch may use in a scoring process (None: torch's default, one per core). A worker that
    # shares its machine with the gateway or with other workers should get its share of the cores, e.g. 1
    # per worker on a 2-core machine: on a shared CPU, torch's spin-waiting threads slowed model passes
    # tenfold (measured: models/forensics/cli.py). On a GPU worker the threads only feed the device.
    torch_threads: int | None = Field(default=None, ge=1)
    # Series of one study scored at once, on threads sharing the model's passes (same-shape crops of
    # different series run as one batch: models/merged_passes.py). None: 4 on a GPU, where a lone series
    # leaves the device idle between small passes; 1 on the CPU, where torch already uses every core.
    series_in_parallel: int | None = Field(default=None, ge=1)
    # Studies one `btd worker` takes at once. 1 (default): Celery's prefork pool, one study per process, as
    # every fault test runs it. More: a pool of threads in one process sharing one model, whose passes merge
    # across the studies (models/merged_passes.py), so a GPU stays busy while a study decodes, waits on the
    # database or builds its cues; each thread holds its own lease (worker/lease.py).
    studies_in_parallel: int = Field(default=1, ge=1)
    # Scoring processes one `btd worker` runs (Celery's prefork pool, one study each, each its own model and
    # lease). 1 (default). More: for a GPU host, where one process scores ~7 slices/s end to end, held by its
    # per-slice work on the CPU under one interpreter lock, while the GPU passes ~400 (docs/bench/gpu.md: 16
    # processes on one H200 with 16 cores, 88 slices/s). Each takes its share of the cores for torch unless
    # BTD_TORCH_THREADS says otherwise; one or the other of this and BTD_STUDIES_IN_PARALLEL.
    worker_processes: int = Field(default=1, ge=1)
    score_retries: int = 3  # scoring attempts after the first before the study is FAILED
    score_backoff_seconds: float = 10.0  # first retry delay; each later one doubles
    # How long a study must stay quiet (verdict no_evidence, not rescored or reopened) before its series teach
    # their scanner's reference (worker/references.py). A day lets a radiologist's doubt, a rescore or a
    # replaced instance come first; a study marked genuine over the API teaches at once.
    reference_hold_hours: float = 24.0

    # Reports
    destinations: CsvList = Field(default_factory=list)  # "AET@host:port", comma-separated
    kos_enabled: bool = True  # also send a Key Object Selection of flagged images (viewers that skip SR regions)
    delivery_retries: int = 5
    delivery_backoff_seconds: float = 30.0

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _default_database_url(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'btd.sqlite3').resolve()}"
        return self

    @model_validator(mode="after")
    def _automatic_dicom_processes(self) -> Settings:
        """0 means "as measured": two processes serving DICOM on PostgreSQL with two cores or more. Why not more
        by default: two is what docs/bench/ingest.md measured (one study over 4 and 8 associations, 1.04-1.29x
        one process on quiet 2-core VMs, one association unchanged); beyond it a site sets the number."""
        if self.dicom_processes == 0:
            self.dicom_processes = 2 if not self.uses_sqlite and _usable_cores() >= 2 else 1
        return self

    @model_validator(mode="after")
    def _processes_need_a_server_database(self) -> Settings:
        if self.dicom_processes > 1 and self.uses_sqlite:
            raise ValueError(
                "BTD_DICOM_PROCESSES > 1 needs a database server (BTD_DATABASE_URL, PostgreSQL): SQLite takes "
                "one writer at a time, so receiving processes would queue for its lock"
            )
        return self

    @model_validator(mode="after")
    def _one_way_to_run_studies_at_once(self) -> Settings:
        if self.worker_processes > 1 and self.studies_in_parallel > 1:
            raise ValueError(
                "BTD_WORKER_PROCESSES > 1 and BTD_STUDIES_IN_PARALLEL > 1 together: choose one (several scoring "
                "processes, or several studies on threads of one process)"
            )
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ValueError("BTD_HTTP_TLS_CERT and BTD_HTTP_TLS_KEY go together: set both or neither")
        return self

    @property
    def auth_configured(self) -> bool:
        """True when any credential is configured: then every route but the probes needs one."""
        return bool(self.api_token or self.view_tokens or self.act_tokens or self.users_file)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def resolved_database_url(self) -> str:
        """The database URL, never None (the validator fills the SQLite default)."""
        assert self.database_url is not None
        return self.database_url

    @property
    def uses_sqlite(self) -> bool:
        """SQLite (the single-machine default): one writer at a time, a file beside the data."""
        return self.resolved_database_url.startswith("sqlite")

    @property
    def scoring_torch_threads(self) -> int | None:
        """Torch's CPU threads in a scoring process: BTD_TORCH_THREADS, else each of BTD_WORKER_PROCESSES its
        share of the cores (processes that each took every core would spin against each other), else None
        (torch's default, one per core)."""
        if self.torch_threads:
            return self.torch_threads
        if self.worker_processes > 1:
            return max(1, _usable_cores() // self.worker_processes)
        return None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (tests build `Settings(...)` directly)."""
    return Settings()
