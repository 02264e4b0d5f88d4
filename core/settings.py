"""The one place that reads the environment: every setting of btd, with the prefix `BTD_`.

Why one object: the gateway, the worker and the CLI must agree on paths, ports and the database, and
tools outside the code (compose files, CI, the ingest benchmark) set these names; they are a contract
(docs/architecture.md). Lists are comma-separated strings in the environment (`BTD_ALLOWED_AETS=A,B`)
because that is what a compose file or a systemd unit can write without quoting JSON.
"""

from __future__ import annotations

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


class Settings(BaseSettings):
    """All of btd's configuration; field names are the environment names without `BTD_`."""

    model_config = SettingsConfigDict(env_prefix="BTD_", case_sensitive=False, extra="ignore")

    # DICOM listener
    ae_title: str = "BTD"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    allowed_aets: CsvList = Field(default_factory=list)  # empty = any calling AE title
    allowed_ips: CsvList = Field(default_factory=list)  # empty = any peer address
    min_free_bytes: int = 1_000_000_000  # below this free space on the spool's disk C-STORE answers 0xA700
    max_instance_bytes: int = 2 * 1024**3  # a larger dataset is answered 0xA700 (it is held in memory until whole)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

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
    queue_name: str = "btd"
    visibility_timeout: int = 7200  # seconds; longer than the longest scoring job
    stable_seconds: float = 30.0  # quiet time after the last instance before a study counts as complete
    monitor_interval: float = 1.0  # how often the stability monitor looks for quiet studies

    # Model and worker
    model: str | None = None  # None -> the models package's default model
    device: str = "auto"
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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (tests build `Settings(...)` directly)."""
    return Settings()
