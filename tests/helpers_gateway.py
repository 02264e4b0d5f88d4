"""Shared helpers for tests that run the gateway: free ports, throw-away Postgres databases, a migrated
database for given settings, and a `btd serve` subprocess.

Why subprocesses: restart and shutdown behaviour (a gateway stopped during the quiet period, SIGTERM)
can only be tested on a real process. Other engineers' tests import these helpers, so they stay general.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
POSTGRES_ADMIN_URL = os.environ.get("BTD_TEST_POSTGRES_ADMIN_URL", "postgresql+psycopg2://root@127.0.0.1:5432/postgres")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, host: str = "127.0.0.1", timeout: float = 30.0, proc: subprocess.Popen | None = None
) -> None:
    """Block until something accepts connections on host:port (fails early if `proc` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll `predicate()` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout} s")


def postgres_available() -> bool:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


def drop_postgres_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def postgres_database(prefix: str = "btd_test") -> Iterator[str]:
    """Create an empty Postgres database, yield its SQLAlchemy URL, drop it afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    if not postgres_available():
        pytest.skip(f"no Postgres at {POSTGRES_ADMIN_URL}")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        from core.db.session import dispose_engines

        dispose_engines()
        drop_postgres_database(name)


def gateway_env(data_dir: Path, **overrides: Any) -> dict[str, str]:
    """Environment for a `btd serve` subprocess: BTD_* settings from `overrides` (lower-case names)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTD_")}
    env["BTD_DATA_DIR"] = str(data_dir)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    for key, value in overrides.items():
        if value is None:
            continue
        env[f"BTD_{key.upper()}"] = ",".join(value) if isinstance(value, list | tuple) else str(value)
    return env


class GatewayProcess:
    """A `btd serve` subprocess with its ports; `stop()` sends SIGTERM and waits."""

    def __init__(self, data_dir: Path, log_path: Path | None = None, **settings: Any) -> None:
        self.data_dir = data_dir
        self.dicom_port = int(settings.pop("dicom_port", 0) or free_port())
        self.http_port = int(settings.pop("http_port", 0) or free_port())
        self.settings = settings
        self.log_path = log_path or data_dir / f"gateway-{self.dicom_port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 60.0) -> GatewayProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = gateway_env(
            self.data_dir,
            dicom_port=self.dicom_port,
            http_port=self.http_port,
            dicom_host="127.0.0.1",
            http_host="127.0.0.1",
            **self.settings,
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it for its whole life
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "btd.cli", "serve"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        if wait:
            wait_for_port(self.dicom_port, timeout=timeout, proc=self.proc)
            wait_for_port(self.http_port, timeout=timeout, proc=self.proc)
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1 and localhost, self-signed: it serves as its own CA for both ends."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )
    return cert, key
