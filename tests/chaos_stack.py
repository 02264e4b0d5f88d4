"""The chaos suite's deployment on loopback, with a hand on every fault: `btd serve`, two `btd worker`
processes (one per queue), a throw-away `redis-server` of its own (so stopping it harms nobody), the
shared PostgreSQL reached through a TCP proxy the test can cut, and dcmtk `storescp` as the PACS behind a
proxy that can refuse or hang. Used by tests/test_chaos.py.

Why proxies instead of stopping the servers: PostgreSQL is shared by the team (never stopped), and a
proxy cuts both directions at once, like a network fault; a hanging PACS (TCP accepted, no answer) is the
only way to catch a worker in the middle of a delivery.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from helpers_gateway import PYTHON, REPO_ROOT, GatewayProcess, free_port, gateway_env, wait_for_port
from sqlalchemy import func, select

from core.db.schema import Instance, Report, Study, StudyEvent
from core.db.session import session_scope
from core.settings import Settings

SERIES = Path(__file__).parent / "fixtures" / "ct_series_20"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}


# --------------------------------------------------------------------------------------------- faults


class TcpProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target`. `down()` closes the listening socket and every
    connection (peers get "connection refused" / a reset), `up()` listens again on the same port; `hang()`
    accepts connections but never answers (a PACS that hangs), `up()` drops those and forwards again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._hanging = False
        self.up()

    def up(self) -> None:
        with self._lock:
            self._hanging = False
            self._close_connections()
            if self._listener is None:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", self.port))
                listener.listen(64)
                self._listener = listener
                threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                # shutdown first: a bare close() does not wake the thread blocked in accept(), which would
                # then take (and forward) one more connection
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            self._close_connections()

    def hang(self) -> None:
        with self._lock:
            self._hanging = True

    def _close_connections(self) -> None:
        for sock in list(self._sockets):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()  # linger 0: a reset, as a cable pulled mid-transfer
            except OSError:
                pass
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.add(client)
                if self._hanging:
                    continue  # accepted, never answered
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.add(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class RedisServer:
    """A redis-server of our own, no persistence (a restart loses every message, as the issue saw)."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.folder)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Pacs:
    """dcmtk storescp (unique file names: a second copy of an SR is a second file) behind a TcpProxy."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.scp_port = free_port()
        self.proc = subprocess.Popen(
            ["storescp", "-aet", "PACS", "-od", str(folder), "+uf", "+xa", str(self.scp_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.scp_port, proc=self.proc)
        self.proxy = TcpProxy(self.scp_port)

    @property
    def destination(self) -> str:
        return f"PACS@127.0.0.1:{self.proxy.port}"

    def reports_for(self, study_uid: str) -> list[str]:
        """SOP Instance UIDs of the SRs received for a study, one entry per file (so per receipt)."""
        found = []
        for path in self.folder.iterdir():
            if not path.is_file() or path.name.startswith("."):
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - a file storescp is still writing
                continue
            if ds.SOPClassUID in SR_CLASSES and ds.StudyInstanceUID == study_uid:
                found.append(str(ds.SOPInstanceUID))
        return found

    def stop(self) -> None:
        self.proxy.down()
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Worker:
    """A `btd worker` in a process group of its own, so SIGKILL takes its pool children too (a lost machine)."""

    def __init__(self, env: dict[str, str], log_path: Path, queues: str) -> None:
        self.log_path = log_path
        self.queues = queues
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "btd.cli", "worker", "--queues", queues],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def owns(self, pid: int) -> bool:
        """Is `pid` (a lease owner's) this worker or one of its pool processes?"""
        try:
            return os.getpgid(pid) == self.proc.pid
        except ProcessLookupError:
            return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # the whole group has already exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM to the worker's main process only, as a container's init forwards it: Celery's warm shutdown
        lets its pool processes finish and acknowledge. Why not the whole group: in one CI-like run (2026-12-04,
        a loaded machine) the group's SIGTERM reached a pool child 0.5 s after it finished a study, the parent
        logged WorkerLostError for the job (task_reject_on_worker_lost requeues such a message), and the Redis
        test's "no duplicate piled up" failed; not reproduced in two loaded reruns, but the race is real."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        if self.proc.poll() is None or self._group_alive():
            self.kill()

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False


# --------------------------------------------------------------------------------------------- studies


def fresh_study(folder: Path, n: int) -> tuple[str, list[Path]]:
    """The first `n` slices of the 20-slice CT with new Study/Series/SOP UIDs (their pixels untouched)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = []
    for source in sorted(SERIES.glob("CT.*"))[:n]:
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        target = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target, enforce_file_format=True)
        paths.append(target)
    return study_uid, paths


@dataclass
class Sent:
    """What storescu was told for each file: the SOP Instance UIDs answered 0x0000, and the others."""

    stored: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    returncode: int = 0
    output: str = ""


def parse_storescu(text: str, paths: Iterable[Path]) -> Sent:
    """storescu -v output: each "Sending file" is followed by its response, or by nothing if the
    association died; a file with no success response counts as refused."""
    sop_of = {str(p): str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    result, current = Sent(output=text), None
    for line in text.splitlines():
        if match := re.search(r"Sending file: (.+)$", line):
            current = sop_of[match.group(1).strip()]
        elif "Received Store Response" in line and current is not None:
            (result.stored if "(Success)" in line else result.refused).add(current)
            current = None
    result.refused |= set(sop_of.values()) - result.stored
    return result


def storescu_command(port: int, paths: Iterable[Path]) -> list[str]:
    return ["storescu", "-v", "-aet", "CHAOS", "-aec", "BTD", "-xv", "127.0.0.1", str(port), *map(str, paths)]


def storescu(port: int, paths: Iterable[Path], timeout: float = 120) -> Sent:
    """dcmtk storescu, verbose, with each file's answer."""
    paths = list(paths)
    env = dict(os.environ, TCP_NODELAY="1")
    done = subprocess.run(storescu_command(port, paths), env=env, capture_output=True, text=True, timeout=timeout)
    result = parse_storescu(done.stdout + done.stderr, paths)
    result.returncode = done.returncode
    return result


# --------------------------------------------------------------------------------------------- the truth


def study_row(settings: Settings, study_uid: str) -> Study | None:
    with session_scope(settings) as session:
        return session.scalar(select(Study).where(Study.study_uid == study_uid))


def state_of(settings: Settings, study_uid: str) -> str | None:
    row = study_row(settings, study_uid)
    return row.state if row else None


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - the database through a proxy may be away for a moment
            value = None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout:.0f} s")


def assert_stored_once_with_sha256(settings: Settings, sent: Sent) -> None:
    """Every instance answered 0x0000 has exactly one row (version 1) whose SHA-256 is the stored file's;
    an instance that was refused and never resent is nowhere."""
    with session_scope(settings) as session:
        rows = session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sent.stored | sent.refused)))
        by_sop: dict[str, list[Instance]] = {}
        for row in rows:
            by_sop.setdefault(row.sop_instance_uid, []).append(row)
    for sop in sent.stored:
        assert len(by_sop.get(sop, [])) == 1, f"{sop}: {len(by_sop.get(sop, []))} rows"
        (row,) = by_sop[sop]
        stored = (settings.spool_dir / row.path).read_bytes()
        assert row.version == 1 and hashlib.sha256(stored).hexdigest() == row.sha256 and row.size == len(stored)


def assert_refused_absent(settings: Settings, sops: set[str]) -> None:
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).where(Instance.sop_instance_uid.in_(sops))) == 0


def assert_delivered_exactly_once(settings: Settings, pacs: Pacs, study_uid: str) -> None:
    """DELIVERED: the current version's SR delivered once, each SR built delivered once, and the PACS holds
    exactly one copy of each. An earlier version may have no SR: a study reopened while that version was
    still scoring or waiting for its report (a resend that came after the quiet timer, e.g. once a killed
    gateway is back) has that version's work discarded, by design; it is then delivered as the next version."""
    with session_scope(settings) as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        assert study is not None and study.state == "DELIVERED", study and (study.state, study.error)
        delivered = session.scalar(
            select(func.count()).where(StudyEvent.study_uid == study_uid, StudyEvent.to_state == "DELIVERED")
        )
        reports = session.execute(
            select(Report.study_version, Report.sr_sop_instance_uid).where(Report.study_uid == study_uid)
        ).all()
    srs = [sr for _version, sr in reports]
    versions = sorted(version for version, _sr in reports)
    assert delivered == len(srs), (delivered, srs, study.version)
    assert versions and versions[-1] == study.version and set(versions) <= set(range(1, study.version + 1)), (
        versions,
        study.version,
    )
    received = pacs.reports_for(study_uid)
    assert sorted(received) == sorted(srs), (received, srs)


def events(settings: Settings, study_uid: str) -> list[tuple[str, str | None]]:
    with session_scope(settings) as session:
        rows = session.execute(
            select(StudyEvent.to_state, StudyEvent.detail)
            .where(StudyEvent.study_uid == study_uid)
            .order_by(StudyEvent.id)
        )
        return [tuple(r) for r in rows]


def progress(data_dir: Path, study_uid: str) -> dict[str, Any] | None:
    path = data_dir / "progress" / f"{study_uid}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------- the stack


class ChaosStack:
    """Everything running; the test reads the truth from the database directly (not through the proxy)."""

    def __init__(self, root: Path, database_url: str, model: Path) -> None:
        from sqlalchemy.engine import make_url

        for tool in ("redis-server", "storescp", "storescu"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is needed by the chaos suite")
        self.root = root
        self.data_dir = root / "data"
        self.redis = RedisServer(root / "redis").start()
        url = make_url(database_url)
        self.pg_proxy = TcpProxy(int(url.port or 5432))
        self.pacs = Pacs(root / "pacs")
        self.settings = Settings(data_dir=self.data_dir, database_url=database_url)  # the test's own view
        # Only what a site sets for its deployment, plus a short quiet time (the stability guess, not a
        # recovery setting); lease, re-dispatch, visibility timeout and retries are the shipped defaults.
        self.values: dict[str, Any] = {
            "database_url": url.set(port=self.pg_proxy.port).render_as_string(hide_password=False),
            "broker_url": self.redis.url,
            "queue_name": "chaos",
            "stable_seconds": 3,
            "model": str(model),
            "device": "cpu",
            "min_free_bytes": 0,
            "destinations": [self.pacs.destination],
        }
        self.gateway = GatewayProcess(self.data_dir, log_path=root / "gateway.log", **self.values)
        self.workers: dict[str, Worker] = {}
        self.measured: dict[str, float] = {}

    def start(self) -> ChaosStack:
        self.gateway.start(timeout=120)
        for role in ("scoring", "reports"):
            self.start_worker(role)
        return self

    def start_worker(self, role: str) -> Worker:
        env = gateway_env(self.data_dir, **self.values)
        n = sum(1 for name in os.listdir(self.root) if name.startswith(f"worker-{role}"))
        worker = Worker(env, self.root / f"worker-{role}-{n}.log", role)
        self.workers[role] = worker
        return worker

    def restart_gateway(self, **overrides: Any) -> None:
        self.gateway.stop()
        self.gateway = GatewayProcess(
            self.data_dir,
            log_path=self.root / "gateway.log",
            dicom_port=self.gateway.dicom_port,
            http_port=self.gateway.http_port,
            **{**self.values, **overrides},
        )
        self.gateway.start(timeout=120)

    def worker_holding(self, study_uid: str) -> Worker:
        row = study_row(self.settings, study_uid)
        assert row is not None and row.lease_owner, row
        pid = int(row.lease_owner.rsplit(":", 1)[1])
        (worker,) = [w for w in self.workers.values() if w.owns(pid)]
        return worker

    def wait_delivered(self, study_uid: str, timeout: float) -> float:
        """Seconds until the study is DELIVERED (fails fast on FAILED / FAILED_DELIVERY)."""
        start = time.monotonic()

        def delivered() -> bool:
            state = state_of(self.settings, study_uid)
            assert state not in ("FAILED", "FAILED_DELIVERY", "REJECTED"), (state, events(self.settings, study_uid))
            return state == "DELIVERED"

        wait_for(delivered, timeout, f"{study_uid} DELIVERED", interval=0.5)
        return time.monotonic() - start

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.gateway.stop()
        self.pacs.stop()
        self.pg_proxy.down()
        self.redis.stop()
