"""Ingest benchmark: C-STORE of N uncompressed 512x512 CT instances over loopback.

Why this exists: a PACS pushes whole studies at once, and the gateway must take them at least as fast as
the PACS itself (Orthanc) does, while writing every instance durably. This script measures instances/s
and MB/s for three receivers on the same machine and the same file system:

- btd's own listener (`btd serve`, SQLite in a temp data dir; the quiet timer is set long so no scoring
  runs while we measure),
- dcmtk `storescp` (writes files, no fsync: an upper bound for "receive and write"),
- Orthanc (Debian package, default `SyncStorageArea: true`, so it fsyncs like btd),

each sent to by dcmtk `storescu` with `TCP_NODELAY=1` in its environment (without it, dcmtk waits on the
40 ms delayed ACK of loopback per message), plus btd's own sender (`btd send`) into btd's listener and into
storescp, to check that it does not fall into the same trap. The "storescu x4" and "storescu x8" senders
send the same instances over 4 or 8 concurrent associations (every 4th or 8th file each), as a PACS with
parallel outgoing associations does. One extra row sends into storescp without `TCP_NODELAY` to show the trap itself.

The instances are the pixels of tests/fixtures/ct_series_20 (real chest CT, Apache-2.0,
TotalSegmentator), decoded and re-encoded as Explicit VR Little Endian with new UIDs, cycled to N.

Usage: .venv/bin/python benchmarks/ingest.py [--n 128] [--repeats 3] [--json out.json] [--markdown]
       [--only KEY ...] [--senders NAME ...] [--baseline DIR]
       (DIR: `git archive <commit> core service migrations btd | tar -x -C DIR`)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parent.parent
FIXTURE_SERIES = REPO / "tests" / "fixtures" / "ct_series_20"
VENV_BIN = Path(sys.executable).parent
RECEIVER_AET = "BENCH_SCP"
SENDER_AET = "BENCH_SCU"


# ---------------------------------------------------------------------------------------------- inputs


def make_instances(out_dir: Path, n: int, source: Path = FIXTURE_SERIES) -> list[Path]:
    """Write N uncompressed CT instances with fresh UIDs (one study, one series) and return their paths."""
    sources = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("LICENSE"))
    decoded = []
    for path in sources:
        ds = pydicom.dcmread(path)
        ds.decompress()  # JPEG 2000 lossless -> native pixels
        decoded.append(ds)
    study_uid, series_uid = generate_uid(), generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = decoded[i % len(decoded)]
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.InstanceNumber = i + 1
        path = out_dir / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_echo(port: int, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    """Wait until the receiver answers C-ECHO (the listener is really up, not only the socket)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"receiver exited early with code {process.returncode}")
        done = subprocess.run(
            ["echoscu", "-aet", SENDER_AET, "-aec", RECEIVER_AET, "127.0.0.1", str(port)],
            capture_output=True,
            env=dcmtk_env(nodelay=True),
        )
        if done.returncode == 0:
            return
        time.sleep(0.3)
    raise TimeoutError(f"no C-ECHO answer on port {port} after {timeout} s")


def dcmtk_env(nodelay: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and of its live child processes (btd's
    receiving processes) so far, from /proc: a measure that a busy shared machine distorts far less than
    wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for child in child_pids(pid):
        with contextlib.suppress(OSError):
            own += cpu_seconds(child)
    return own


def child_pids(pid: int) -> list[int]:
    """The live child processes of `pid` (each thread lists those it started)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def load_average() -> float:
    return os.getloadavg()[0]


def machine_ticks() -> tuple[int, int]:
    """(idle + iowait, all) CPU ticks of the whole machine so far, from /proc/stat.

    Why: a receiver limited by a serial stage (a lock, one transaction at a time) leaves cores idle while
    its rate stalls; one limited by CPU does not. The idle share during a send tells the two apart."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def idle_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share (0-1) of the machine's CPU time that was idle or waiting for I/O between two `machine_ticks`."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else float("nan")


def files_under(root: Path, min_size: int) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file() and p.stat().st_size >= min_size)


# ---------------------------------------------------------------------------------------------- receivers


@dataclass
class Receiver:
    """A running C-STORE SCP on loopback, writing under `root`; `count()` says how many instances it holds."""

    name: str
    port: int
    process: subprocess.Popen
    count: Callable[[], int]


@contextlib.contextmanager
def storescp(root: Path, nodelay: bool = True) -> Iterator[Receiver]:
    out = root / "storescp"
    out.mkdir()
    port = free_port()
    log = open(root / "storescp.log", "wb")  # noqa: SIM115 - closed below, after the process ends
    proc = subprocess.Popen(
        ["storescp", "-aet", RECEIVER_AET, "--output-directory", str(out), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dcmtk_env(nodelay=nodelay),
    )
    try:
        wait_for_echo(port, process=proc)
        yield Receiver("dcmtk storescp", port, proc, lambda: files_under(out, 100_000))
    finally:
        stop(proc)
        log.close()


@contextlib.contextmanager
def orthanc(root: Path, nodelay: bool = True) -> Iterator[Receiver]:
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "btd-bench",
        "StorageDirectory": str(root / "orthanc-storage"),
        "IndexDirectory": str(root / "orthanc-index"),
        "DicomAet": RECEIVER_AET,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "StorageCompression": False,
        "SyncStorageArea": True,
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = open(root / "orthanc.log", "wb")  # noqa: SIM115 - closed below, after the process ends
    # Orthanc's DICOM layer is dcmtk: it needs TCP_NODELAY=1 too, or each answer waits for a delayed ACK.
    proc = subprocess.Popen(
        ["Orthanc", str(config_path)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env(nodelay=nodelay)
    )

    def count() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/statistics", timeout=10) as response:
            return int(json.load(response)["CountInstances"])

    try:
        wait_for_echo(dicom_port, process=proc)
        yield Receiver("Orthanc " + orthanc_version(), dicom_port, proc, count)
    finally:
        stop(proc)
        log.close()


def orthanc_version() -> str:
    done = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True)
    return done.stdout.split()[1] if done.returncode == 0 and len(done.stdout.split()) > 1 else "?"


# Set by --postgres: a server URL (no database name) under which each btd-pg run gets a fresh database.
POSTGRES_SERVER: str | None = None


@contextlib.contextmanager
def scratch_postgres_database() -> Iterator[str]:
    """A new, empty database on POSTGRES_SERVER for one run (the same UIDs are resent every run)."""
    import sqlalchemy

    assert POSTGRES_SERVER, "--postgres is required for btd-pg"
    name = f"btd_ingest_{os.getpid()}_{time.monotonic_ns()}"
    admin = sqlalchemy.create_engine(f"{POSTGRES_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextlib.contextmanager
def btd_serve_postgres(root: Path, nodelay: bool = True) -> Iterator[Receiver]:
    """`btd serve` on PostgreSQL with one process serving DICOM (BTD_DICOM_PROCESSES=1; the shipped default on
    PostgreSQL is two, row btd-pg-2); the broker is not needed for ingest."""
    with scratch_postgres_database() as url, btd_serve(root, nodelay, database_url=url) as receiver:
        yield receiver


@contextlib.contextmanager
def btd_serve_postgres_processes(root: Path, nodelay: bool = True) -> Iterator[Receiver]:
    """`btd serve` on PostgreSQL with BTD_DICOM_PROCESSES=2: the gateway's listener and one receiving
    process accept on the same port (service/dicom/receivers.py)."""
    with scratch_postgres_database() as url, btd_serve(root, nodelay, database_url=url, processes=2) as receiver:
        yield receiver


def wait_for_processes(parent: int, count: int, timeout: float) -> None:
    """Wait until `count` receiving processes of `parent` say they serve (their start-up takes seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        serving = 0
        for child in child_pids(parent):
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes()
            except OSError:
                continue
            if b"BTD_RECEIVER_NAME=" in environ:
                serving += 1
        if serving >= count:
            time.sleep(5.0)  # imports and the first database connection, after the process exists
            return
        time.sleep(0.2)
    raise TimeoutError(f"{count} receiving processes not started after {timeout} s")


@contextlib.contextmanager
def btd_serve(
    root: Path, nodelay: bool = True, database_url: str | None = None, processes: int = 1
) -> Iterator[Receiver]:
    """`btd serve` as a site runs it, with its own data dir and SQLite (or `database_url`); no broker.
    `processes`: BTD_DICOM_PROCESSES (receiving processes sharing the port; PostgreSQL only)."""
    data_dir = root / "btd-data"
    data_dir.mkdir()
    port = free_port()
    env = {k: v for k, v in dcmtk_env(nodelay).items() if not k.startswith("BTD_")}  # pynetdicom ignores it
    env.update(
        {
            "BTD_DATA_DIR": str(data_dir),
            "BTD_DICOM_HOST": "127.0.0.1",
            "BTD_DICOM_PORT": str(port),
            "BTD_HTTP_HOST": "127.0.0.1",
            "BTD_HTTP_PORT": str(free_port()),
            "BTD_AE_TITLE": RECEIVER_AET,
            "BTD_STABLE_SECONDS": "3600",  # no scoring while we measure ingest
            "BTD_MIN_FREE_BYTES": "0",
            "BTD_LOG_LEVEL": "WARNING",
        }
    )
    if database_url:
        env["BTD_DATABASE_URL"] = database_url
    env["BTD_DICOM_PROCESSES"] = str(processes)  # always: unset, PostgreSQL would get its automatic 2
    log = open(root / "btd.log", "wb")  # noqa: SIM115 - closed below, after the process ends
    proc = subprocess.Popen([str(VENV_BIN / "btd"), "serve"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_echo(port, timeout=180, process=proc)
        name = "btd serve (PostgreSQL)" if database_url else "btd serve"
        if processes > 1:
            name += f", {processes} receiving processes"
            wait_for_processes(proc.pid, processes - 1, timeout=120)
        yield Receiver(name, port, proc, lambda: files_under(data_dir / "spool", 100_000))
    finally:
        stop(proc)
        log.close()


# The listener alone, in its own process: what `btd serve` costs beyond it (API, monitor) shows as the
# difference between the two btd rows.
LISTENER_ONLY = """
import signal, threading
from service.dicom.listener import start_listener
try:
    from core.db.migrate import upgrade
    from core.settings import Settings
except ImportError:  # a baseline tree from before the foundation package (core/) existed
    from service.db.migrate import upgrade
    from service.settings import Settings
settings = Settings()
upgrade(settings)
server = start_listener(settings)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
server.shutdown()
"""


# Set by --baseline: another checkout of btd (e.g. `git archive <commit> core service migrations | tar -x -C DIR`)
# whose listener runs as an extra receiver, so a change is measured against its parent under the same load.
BASELINE_TREE: Path | None = None


@contextlib.contextmanager
def btd_listener(root: Path, nodelay: bool = True, tree: Path = REPO, label: str = "") -> Iterator[Receiver]:
    """service.dicom.listener.start_listener in a process of its own (SQLite, same data dir layout), from
    the source tree `tree` (this checkout unless --baseline names another)."""
    data_dir = root / "btd-data"
    data_dir.mkdir()
    port = free_port()
    env = {k: v for k, v in dcmtk_env(nodelay).items() if not k.startswith("BTD_")}
    env.update(
        {
            "BTD_DATA_DIR": str(data_dir),
            "BTD_DICOM_HOST": "127.0.0.1",
            "BTD_DICOM_PORT": str(port),
            "BTD_AE_TITLE": RECEIVER_AET,
            "BTD_MIN_FREE_BYTES": "0",
            "BTD_LOG_LEVEL": "WARNING",
        }
    )
    log = open(root / "btd-listener.log", "wb")  # noqa: SIM115 - closed below, after the process ends
    env["PYTHONPATH"] = str(tree)  # ahead of the editable install of this checkout
    proc = subprocess.Popen(
        [sys.executable, "-c", LISTENER_ONLY], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tree
    )
    try:
        wait_for_echo(port, timeout=120, process=proc)
        name = f"btd listener (start_listener){label}"
        yield Receiver(name, port, proc, lambda: files_under(data_dir / "spool", 100_000))
    finally:
        stop(proc)
        log.close()


def btd_listener_baseline(root: Path, nodelay: bool = True) -> contextlib.AbstractContextManager[Receiver]:
    assert BASELINE_TREE, "--baseline is required for btd-listener-baseline"
    return btd_listener(root, nodelay, tree=BASELINE_TREE, label=f", baseline {BASELINE_TREE.name}")


RECEIVERS: dict[str, Callable[[Path, bool], contextlib.AbstractContextManager[Receiver]]] = {
    "btd-listener": btd_listener,
    "btd-listener-baseline": btd_listener_baseline,
    "btd": btd_serve,
    "btd-pg": btd_serve_postgres,
    "btd-pg-2": btd_serve_postgres_processes,
    "storescp": storescp,
    "orthanc": orthanc,
}


# ---------------------------------------------------------------------------------------------- senders


def send_storescu(files: list[Path], port: int, nodelay: bool = True) -> subprocess.CompletedProcess:
    """dcmtk storescu, one association, all files; proposes only Explicit VR LE (what the files are)."""
    return subprocess.run(
        ["storescu", "-xe", "-aet", SENDER_AET, "-aec", RECEIVER_AET, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        env=dcmtk_env(nodelay=nodelay),
    )


PARALLEL_ASSOCIATIONS = (4, 8)


def send_storescu_parallel(
    files: list[Path], port: int, nodelay: bool = True, associations: int = 4
) -> subprocess.CompletedProcess:
    """The same instances over `associations` concurrent associations (one storescu each, every k-th file),
    as a PACS with several outgoing associations sends a study; finished when the last of them is."""
    chunks = [files[k::associations] for k in range(associations)]
    procs = [
        subprocess.Popen(
            # One calling AE title for all, as a PACS's associations have: since 2026-12-04 (d73eef0) the listener
            # negotiates each distinct request once, and the warm-up's request is the same as these.
            ["storescu", "-xe", "-aet", SENDER_AET, "-aec", RECEIVER_AET, "127.0.0.1", str(port)]
            + [str(f) for f in chunk],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dcmtk_env(nodelay=nodelay),
        )
        for k, chunk in enumerate(chunks)
        if chunk
    ]
    outputs = [proc.communicate() for proc in procs]
    return subprocess.CompletedProcess(
        args=["storescu"] * len(procs),
        returncode=max(proc.returncode for proc in procs),
        stdout=b"".join(out for out, _ in outputs),
        stderr=b"".join(err for _, err in outputs),
    )


def send_btd(files: list[Path], port: int, nodelay: bool = True, associations: int = 1) -> subprocess.CompletedProcess:
    """btd's own C-STORE SCU, exactly as an operator runs it (`btd send`, timed from the command's start to its
    exit, interpreter start-up included); TCP_NODELAY is not set for it."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    return subprocess.run(
        [str(VENV_BIN / "btd"), "send", "--host", "127.0.0.1", "--port", str(port), "--aet", RECEIVER_AET]
        + ["--associations", str(associations)]
        + [str(f) for f in files],
        capture_output=True,
        env=env,
    )


# core.dicom.sender.send_files timed inside its process: the transfer without interpreter start-up.
SEND_FILES_TIMED = """
import json, sys, time
from core.dicom.sender import send_files
port, aet, files = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
start = time.perf_counter()
results = send_files(files, "127.0.0.1", port, aet, calling_aet="BENCH_SCU")
elapsed = time.perf_counter() - start
failed = [r for r in results if not r.ok]
errors = sorted({f"{r.status} {r.error}" for r in failed})
print(json.dumps({"elapsed": elapsed, "failed": len(failed), "errors": errors}))
sys.exit(1 if failed else 0)
"""


def send_files_inprocess(
    files: list[Path], port: int, nodelay: bool = True, tree: Path | None = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)  # ahead of the editable install of this checkout
    return subprocess.run(
        [sys.executable, "-c", SEND_FILES_TIMED, str(port), RECEIVER_AET, *map(str, files)],
        capture_output=True,
        env=env,
        cwd=tree or REPO,
    )


def send_btd_baseline(files: list[Path], port: int, nodelay: bool = True) -> subprocess.CompletedProcess:
    """`btd send` of the --baseline tree (it must hold btd/ too), started the same way as `btd send`."""
    assert BASELINE_TREE, "--baseline is required"
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    env["PYTHONPATH"] = str(BASELINE_TREE)
    return subprocess.run(
        [sys.executable, "-m", "btd.cli", "send", "--host", "127.0.0.1", "--port", str(port), "--aet", RECEIVER_AET]
        + [str(f) for f in files],
        capture_output=True,
        env=env,
        cwd=BASELINE_TREE,
    )


def send_files_baseline(files: list[Path], port: int, nodelay: bool = True) -> subprocess.CompletedProcess:
    assert BASELINE_TREE, "--baseline is required"
    return send_files_inprocess(files, port, nodelay, tree=BASELINE_TREE)


SENDERS: dict[str, Callable[..., subprocess.CompletedProcess]] = {
    "storescu": send_storescu,
    **{
        f"storescu x{k}": functools.partial(send_storescu_parallel, associations=k)
        for k in PARALLEL_ASSOCIATIONS
    },
    "btd send": send_btd,
    **{f"btd send x{k}": functools.partial(send_btd, associations=k) for k in PARALLEL_ASSOCIATIONS},
    "send_files": send_files_inprocess,
    "btd send, baseline": send_btd_baseline,
    "send_files, baseline": send_files_baseline,
}


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Result:
    receiver: str
    sender: str
    tcp_nodelay: bool  # TCP_NODELAY=1 in the environment of the sender and the receiver (dcmtk reads it)
    n: int
    megabytes: float
    seconds: list[float] = field(default_factory=list)
    receiver_cpu_s: list[float] = field(default_factory=list)  # CPU time the receiver spent on the send
    load: list[float] = field(default_factory=list)  # 1-minute load average when the send started
    idle: list[float] = field(default_factory=list)  # share of the machine idle or in iowait during the send
    stored: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def cpu_ms_per_instance(self) -> float:
        return 1000 * statistics.median(self.receiver_cpu_s) / self.n if self.receiver_cpu_s else float("nan")

    @property
    def instances_per_s(self) -> float:
        return self.n / self.median_s if self.seconds else float("nan")

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.median_s if self.seconds else float("nan")

    def to_dict(self) -> dict:
        return asdict(self) | {
            "median_s": self.median_s,
            "instances_per_s": self.instances_per_s,
            "mb_per_s": self.mb_per_s,
            "receiver_cpu_ms_per_instance": self.cpu_ms_per_instance,
        }


def warm_up(files: list[Path], port: int) -> None:
    """Send `files` over two associations in turn before anything is timed: a gateway with a receiving process
    hands them one each, so a timed send never meets a process that has not served yet (its connection,
    statements and staging thread are made on its first instances)."""
    for _ in range(2):
        warm = send_storescu(files, port)
        if warm.returncode != 0:
            raise RuntimeError(f"warm-up send failed: {warm.stderr.decode(errors='replace')[-500:]}")


def run_once(result: Result, receiver_key: str, files: list[Path], warmup: list[Path], base: Path) -> None:
    """One timed send into a fresh receiver (fresh storage), warmed first (`warm_up`); adds to `result`."""
    if result.error:
        return
    root = Path(tempfile.mkdtemp(prefix=f"ingest-{receiver_key}-", dir=base))
    try:
        with RECEIVERS[receiver_key](root, result.tcp_nodelay) as receiver:
            result.receiver = receiver.name
            warm_up(warmup, receiver.port)
            before = receiver.count()
            result.load.append(load_average())
            cpu_before = cpu_seconds(receiver.process.pid)
            ticks_before = machine_ticks()
            start = time.perf_counter()
            done = SENDERS[result.sender](files, receiver.port, nodelay=result.tcp_nodelay)
            elapsed = time.perf_counter() - start
            idle = idle_share(ticks_before, machine_ticks())
            cpu = cpu_seconds(receiver.process.pid) - cpu_before
            if done.returncode != 0:
                failures = [
                    line
                    for line in done.stdout.decode(errors="replace").splitlines()
                    if "FAIL" in line or "failed" in line
                ]
                detail = "; ".join(failures[:3]) or done.stderr.decode(errors="replace")[-800:]
                raise RuntimeError(f"{result.sender} exited {done.returncode}: {detail[:800]}")
            if result.sender.startswith("send_files"):  # timed inside the sender's process
                elapsed = float(json.loads(done.stdout.decode().strip().splitlines()[-1])["elapsed"])
            result.stored.append(wait_for_count(receiver, before + len(files)) - before)
            result.seconds.append(elapsed)
            result.receiver_cpu_s.append(cpu)
            result.idle.append(idle)
    except Exception as exc:  # a receiver that cannot run is reported, the others still are measured
        result.error = f"{type(exc).__name__}: {exc}"
        result.receiver = result.receiver or receiver_key
    finally:
        shutil.rmtree(root, ignore_errors=True)


def wait_for_count(receiver: Receiver, expected: int, timeout: float = 10.0) -> int:
    """The sender has its answers, so everything is stored; this only tolerates a lagging index (Orthanc)."""
    deadline = time.monotonic() + timeout
    count = receiver.count()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        count = receiver.count()
    return count


CASES: list[tuple[str, str, bool]] = [
    ("storescp", "storescu", True),
    ("orthanc", "storescu", True),
    ("btd-listener-baseline", "storescu", True),  # only with --baseline
    ("btd-listener", "storescu", True),
    ("btd", "storescu", True),
    ("btd-pg", "storescu", True),  # only with --postgres
    ("btd-pg-2", "storescu", True),  # only with --postgres
    # A study over 4 and 8 concurrent associations (PACS with parallel sends).
    *(
        (receiver, f"storescu x{k}", True)
        for k in PARALLEL_ASSOCIATIONS
        for receiver in ("orthanc", "btd-listener-baseline", "btd-listener", "btd", "btd-pg", "btd-pg-2")
    ),
    ("btd", "btd send, baseline", True),  # only with --baseline (a tree with btd/ as well)
    ("btd", "btd send", True),
    *(("btd", f"btd send x{k}", True) for k in PARALLEL_ASSOCIATIONS),
    ("btd", "send_files, baseline", True),  # only with --baseline
    ("btd", "send_files", True),
    ("storescp", "btd send", True),
    ("storescp", "send_files", True),
    ("orthanc", "send_files", True),
    # The delayed-ACK trap, for reference: TCP_NODELAY unset for both dcmtk ends.
    ("storescp", "storescu", False),
    ("orthanc", "storescu", False),
]


# ---------------------------------------------------------------------------------------------- report


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    system = f"{platform.system()} {platform.release()}"
    return f"{model}, {os.cpu_count()} cores, {system}, Python {platform.python_version()}"


def markdown(results: list[Result], meta: dict) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; N = {meta['n']} instances, "
        f"{meta['megabytes']:.1f} MB, {meta['repeats']} repeats (median shown), storage under {meta['base']}.",
        "",
        "| receiver | sender | TCP_NODELAY | median s | instances/s | MB/s | receiver CPU ms/instance | "
        "all runs (s) | load avg | machine idle % | stored |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        nodelay = "1" if r.tcp_nodelay else "unset"
        if r.error:
            error = " ".join(r.error.split()).replace("|", "/")[:160]
            lines.append(f"| {r.receiver} | {r.sender} | {nodelay} | — | — | — | — | error: {error} | — | — | — |")
            continue
        runs = ", ".join(f"{s:.2f}" for s in r.seconds)
        loads = ", ".join(f"{x:.1f}" for x in r.load)
        idle = ", ".join(f"{100 * x:.0f}" for x in r.idle)
        lines.append(
            f"| {r.receiver} | {r.sender} | {nodelay} | {r.median_s:.2f} | {r.instances_per_s:.0f} | "
            f"{r.mb_per_s:.0f} | {r.cpu_ms_per_instance:.1f} | {runs} | {loads} | {idle} | {min(r.stored)}/{r.n} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128, help="instances per send (default 128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base", type=Path, default=Path(tempfile.gettempdir()), help="file system for all")
    parser.add_argument(
        "--only",
        nargs="*",
        help="receiver keys to run: btd btd-listener btd-listener-baseline btd-pg btd-pg-2 storescp orthanc",
    )
    parser.add_argument("--senders", nargs="*", help="sender names to run (e.g. storescu 'storescu x4' 'btd send')")
    parser.add_argument("--skip-unset", action="store_true", help="leave out the rows without TCP_NODELAY (slow)")
    parser.add_argument(
        "--postgres",
        help="PostgreSQL server URL without a database, e.g. postgresql+psycopg2://postgres@127.0.0.1:5432; "
        "adds a `btd serve` row on PostgreSQL (a scratch database per run)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another btd source tree (core/, service/ and migrations/ of an older commit); adds a row for its "
        "listener (with btd-listener), run round-robin with the others: a change against its parent, same load",
    )
    parser.add_argument("--json", type=Path, help="write raw results here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    global POSTGRES_SERVER, BASELINE_TREE
    POSTGRES_SERVER = args.postgres.rstrip("/") if args.postgres else None
    BASELINE_TREE = args.baseline.resolve() if args.baseline else None

    with tempfile.TemporaryDirectory(prefix="ingest-src-", dir=args.base) as src:
        files = make_instances(Path(src) / "series", args.n)
        warmup = make_instances(Path(src) / "warmup", 1)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        cases = [
            c
            for c in CASES
            if (not args.only or c[0] in args.only or (c[0] == "btd-listener-baseline" and "btd-listener" in args.only))
            and (c[0] not in ("btd-pg", "btd-pg-2") or POSTGRES_SERVER)
            and (c[0] != "btd-listener-baseline" or BASELINE_TREE)
            and (not c[1].endswith(", baseline") or BASELINE_TREE)
            and (not args.senders or c[1] in args.senders or c[1].removesuffix(", baseline") in args.senders)
            and (c[2] or not args.skip_unset)
        ]
        results = [Result(key, sender, nodelay, len(files), megabytes) for key, sender, nodelay in cases]
        # Round-robin over the cases, so that the load of a shared machine falls on all of them alike.
        for repeat in range(args.repeats):
            for (receiver_key, _, _), result in zip(cases, results, strict=True):
                run_once(result, receiver_key, files, warmup, args.base)
                last = f"{result.seconds[-1]:.2f} s" if result.seconds and not result.error else result.error
                print(f"[{repeat + 1}/{args.repeats}] {result.receiver} <- {result.sender}: {last}", file=sys.stderr)
        meta = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "n": args.n,
            "megabytes": megabytes,
            "repeats": args.repeats,
            "base": str(args.base),
        }
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": [r.to_dict() for r in results]}, indent=2))
    print(markdown(results, meta) if args.markdown else json.dumps([r.to_dict() for r in results], indent=2))
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
