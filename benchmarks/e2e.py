"""End-to-end latency: from the last instance of a study received to its report delivered.

Why this exists: radiology IT wants to know how long after the scanner (or PACS) finishes sending a study
the BTD verdict is back in the PACS. This runs the real product: dcmtk `storescu` (TCP_NODELAY=1) sends a
CT study into `btd serve`; the study goes through the quiet timer, the queue, scoring, the SR and its
C-STORE to a dcmtk `storescp` standing in for the PACS. Two deployments:

- embedded: `btd serve` alone (SQLite, tasks in its own thread, no broker);
- celery: `btd serve` + one `btd worker` (Postgres database, Redis broker, a queue name of its own).

Every time comes from the database (the single source of truth): the last `instances.received_at` of
the study and the `study_events` of each state it then entered (STABLE, QUEUED, SCORING, SCORED,
REPORTED, DELIVERED), so the phases (quiet timer, queue wait, scoring, report, delivery) add up.

Studies: the 20-slice CT of tests/fixtures/ct_series_20 (Apache-2.0, TotalSegmentator; a slab at the lungs' base,
where about two thirds of the slices hold no lung and cost the default CT model no U-Net pass) with fresh UIDs,
and a 100-slice study made of that series 5 times (fresh UIDs, each copy shifted along the slice normal so the
series stays one geometrically consistent stack). `--source DIR` makes the study of another series instead
(e.g. a chest series from ../shared/data whose slices hold lung, so that nearly every slice runs the U-Net).

The model: `--model PATH` (a real BTD model), else a tiny random one (dim 8; see make_tiny_model), which
exercises the whole path at a fraction of the published model's cost; the report says which was used.

A large study: `--sizes 2000 --associations 4 --sender btd` sends 2,000 instances over 4 concurrent
associations with `btd send` (its progress bar on this script's stderr), and the script prints the study's
progress (state, slices scored) while it waits. The peak resident memory of every process (the sender,
`btd serve`, the Celery worker and its pool children, the PACS) is sampled every 0.5 s from /proc, so a
process that held a whole study in memory would show it. `--not-assessed` relabels the study's modality
"MR", which the CT model declines slice by slice (each slice is still read and decoded, then judged "not
assessed: model judges CT"): the run then measures everything but the model's arithmetic (ingest, quiet
timer, hand-over, reading 2,000 slices, 2,000 result rows, an SR citing 2,000 instances, delivery), for a
study whose real scoring would take hours on this CPU.

Usage: .venv/bin/python benchmarks/e2e.py [--sizes 20 100] [--modes embedded celery] [--model PATH]
       [--stable-seconds 2] [--associations N] [--sender storescu|btd] [--not-assessed]
       [--markdown docs/bench/e2e.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FIXTURE_SERIES = REPO / "tests" / "fixtures" / "ct_series_20"
PYTHON = sys.executable
PACS_AET = "E2EPACS"
POSTGRES_ADMIN_URL = os.environ.get(
    "BTD_BENCH_POSTGRES_ADMIN_URL", "postgresql+psycopg2://root@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("BTD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PHASES = ("STABLE", "QUEUED", "SCORING", "SCORED", "REPORTED", "DELIVERED")
DONE_STATES = ("DELIVERED", "FAILED_DELIVERY", "FAILED", "REJECTED")


# ---------------------------------------------------------------------------------------------- inputs


def make_study(out_dir: Path, n_slices: int, source: Path = FIXTURE_SERIES, modality: str | None = None) -> Path:
    """Write one CT study of `n_slices` with fresh UIDs, the source series' slices cycled as often as needed;
    return its folder. `modality`: written into every instance instead of CT (e.g. "MR": a study the CT
    model declines)."""
    files = [p for p in source.iterdir() if p.is_file() and (p.name.startswith("CT.") or p.suffix.lower() == ".dcm")]
    if not files:
        raise ValueError(f"{source}: no CT.* or *.dcm files to make a study of")
    heads = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in files}
    sources = sorted(heads, key=lambda p: float(heads[p].ImagePositionPatient[2]))
    z = [float(heads[p].ImagePositionPatient[2]) for p in sources]
    step = (z[-1] - z[0]) / (len(z) - 1) if len(z) > 1 else 3.0
    span = step * len(z)
    copies = -(-n_slices // len(sources))
    study_uid, series_uid = generate_uid(), generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    number = 0
    for copy in range(copies):
        for path in sources:
            if number == n_slices:
                break
            number += 1
            clone = pydicom.dcmread(path)  # the pixel data stays as sent (JPEG 2000), only the header changes
            sop = generate_uid()
            clone.StudyInstanceUID, clone.SeriesInstanceUID, clone.SOPInstanceUID = study_uid, series_uid, sop
            clone.file_meta.MediaStorageSOPInstanceUID = sop
            position = [float(v) for v in clone.ImagePositionPatient]
            position[2] += copy * span
            clone.ImagePositionPatient = position
            if "SliceLocation" in clone:
                clone.SliceLocation = float(clone.SliceLocation) + copy * span
            clone.InstanceNumber = number
            if modality:
                clone.Modality = modality
            clone.save_as(out_dir / f"CT{number:04d}.dcm", enforce_file_format=True)
    return out_dir


def make_tiny_model(path: Path) -> Path:
    """A tiny random BTD model (dim 8, four levels, 64 px patches) calibrated so that it always flags,
    so every run builds an SR with regions and delivers it (the longest path through the product)."""
    import torch

    from models.checkpoint import save_model
    from models.diffusion import GaussianDiffusion
    from models.metadata import ModelMetadata
    from models.unet import Unet

    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2, 4, 8), channels=1), image_size=64)
    metadata = ModelMetadata(
        name="e2e-tiny-random",
        modality="CT",
        channels=1,
        patch_size=64,
        calibration={"slice_threshold": -1.0e9, "series_threshold": -1.0e9},
        anomaly={"energy_mean": -12.0, "energy_std": 1.0, "region_threshold": 3.0},
    )
    save_model(diffusion, path, metadata)
    return path


# ---------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {port}")


def stop(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"btd_e2e_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def btd_env(settings: dict[str, str], threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTD_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # torch's intra-op threads: on a small shared CPU more threads than free cores spin against each other.
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.update({f"BTD_{k.upper()}": v for k, v in settings.items()})
    return env


# ---------------------------------------------------------------------------------------------- one run


@dataclass
class Run:
    mode: str
    slices: int
    state: str = ""
    send_seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # state -> seconds after the last instance received
    to_scored: float | None = None
    to_delivered: float | None = None
    scoring_seconds_per_slice: float | None = None
    associations: int = 1
    sender: str = "storescu"
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # role -> peak resident MB over the run
    verdict: str | None = None  # the study's verdict as recorded: a latency figure says what it delivered
    error: str | None = None


def study_timeline(
    database_url: str, study_uid: str
) -> tuple[str, str | None, datetime | None, dict[str, datetime]]:
    """The study's state, its verdict, its last instance's receipt time and the first time it entered each
    phase after."""
    from sqlalchemy import func, select

    from core.db.schema import Instance, Study, StudyEvent
    from core.db.session import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(Study.state, Study.verdict).where(Study.study_uid == study_uid)).first()
            state, verdict = (row.state, row.verdict) if row is not None else ("", None)
            last = conn.execute(
                select(func.max(Instance.received_at)).where(Instance.study_uid == study_uid)
            ).scalar_one_or_none()
            events = conn.execute(
                select(StudyEvent.to_state, StudyEvent.at)
                .where(StudyEvent.study_uid == study_uid)
                .order_by(StudyEvent.at, StudyEvent.id)
            ).all()
    finally:
        engine.dispose()
    if last is not None and last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    first: dict[str, datetime] = {}
    for to_state, at in events:
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        if last is not None and at >= last and to_state not in first:
            first[to_state] = at
    return state, verdict, last, first


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (Celery's pool processes, storescu's helpers), from /proc."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in task.read_text().split()]
                found.extend(kids)
                pending.extend(kids)
    return found


def _rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class MemorySampler:
    """Samples the resident memory of named processes and their descendants every `interval` seconds and
    keeps each role's peak (the largest single process of that role)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.roles: dict[str, subprocess.Popen] = {}
        self.peak_kb: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, role: str, proc: subprocess.Popen) -> None:
        self.roles[role] = proc

    def sample(self) -> None:
        for role, proc in list(self.roles.items()):
            if proc.poll() is not None:
                continue
            for pid in (proc.pid, *_children(proc.pid)):
                self.peak_kb[role] = max(self.peak_kb.get(role, 0), _rss_kb(pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def peaks_mb(self) -> dict[str, float]:
        return {role: round(kb / 1024, 1) for role, kb in sorted(self.peak_kb.items())}


def send_study(files: list[str], port: int, associations: int, sender: str, memory: MemorySampler) -> None:
    """Send the study over `associations` concurrent associations (every N-th file each), with dcmtk storescu
    (one process per association) or `btd send --associations N` (its progress bar on our stderr)."""
    if sender == "btd":
        command = [PYTHON, "-m", "btd.cli", "send", "--port", str(port), "--aet", "BTD", "--calling-aet", "E2ESCU"]
        command += ["--associations", str(associations), "--quiet", "--progress", *files]
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
        memory.watch("sender (btd send)", proc)
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"btd send failed: {out[-500:]}")
        return
    procs = []
    for k in range(associations):
        chunk = files[k::associations]
        if chunk:
            procs.append(
                subprocess.Popen(
                    ["storescu", "-aet", f"E2ESCU{k}", "-aec", "BTD", "-xv", "127.0.0.1", str(port), *chunk],
                    env=dict(os.environ, TCP_NODELAY="1"),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            memory.watch(f"sender (storescu {k})" if associations > 1 else "sender (storescu)", procs[-1])
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err[-500:]}")


def report_progress(data_dir: Path, study_uid: str, state: str, started: float) -> None:
    """One line on stderr: the study's state and, while it is scored, slices done of total."""
    from core.contracts import progress_path

    detail = ""
    with contextlib.suppress(OSError, ValueError, KeyError):
        progress = json.loads(progress_path(data_dir, study_uid).read_text())
        detail = f", scored {progress['done']}/{progress['total']}"
    print(f"[e2e {time.monotonic() - started:7.1f} s] {state or '-'}{detail}", file=sys.stderr, flush=True)


def run_once(
    mode: str,
    n_slices: int,
    model: Path,
    stable_seconds: float,
    work: Path,
    timeout: float,
    threads: int,
    associations: int = 1,
    sender: str = "storescu",
    modality: str | None = None,
    source: Path = FIXTURE_SERIES,
) -> Run:
    result = Run(mode=mode, slices=n_slices, associations=associations, sender=sender)
    study_dir = make_study(work / f"study-{n_slices}", n_slices, source, modality=modality)
    study_uid = str(pydicom.dcmread(next(study_dir.iterdir()), stop_before_pixels=True).StudyInstanceUID)
    data_dir = work / f"data-{mode}-{n_slices}"
    pacs_port, dicom_port, http_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    memory = MemorySampler()
    with contextlib.ExitStack() as stack, memory:
        database_url = f"sqlite:///{data_dir / 'btd.sqlite3'}"
        settings = {
            "data_dir": str(data_dir),
            "dicom_host": "127.0.0.1",
            "dicom_port": str(dicom_port),
            "http_host": "127.0.0.1",
            "http_port": str(http_port),
            "stable_seconds": str(stable_seconds),
            "monitor_interval": "0.5",
            "model": str(model),
            "device": "cpu",
            "min_free_bytes": "0",
            "destinations": f"{PACS_AET}@127.0.0.1:{pacs_port}",
            "log_level": "WARNING",
        }
        if mode == "celery":
            database_url = stack.enter_context(postgres_database())
            settings.update(broker_url=REDIS_URL, queue_name=f"btd-e2e-{uuid.uuid4().hex[:8]}")
        settings["database_url"] = database_url
        env = btd_env(settings, threads)
        data_dir.mkdir(parents=True, exist_ok=True)
        logs = open(work / f"{mode}-{n_slices}.log", "ab")  # noqa: SIM115 - children write to it
        stack.callback(logs.close)
        pacs = subprocess.Popen(
            ["storescp", "-aet", PACS_AET, "-od", str(work / "pacs"), str(pacs_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        (work / "pacs").mkdir(exist_ok=True)
        procs.append(pacs)
        memory.watch("PACS (storescp)", pacs)
        gateway = subprocess.Popen(
            [PYTHON, "-m", "btd.cli", "serve"], cwd=REPO, env=env, stdout=logs, stderr=subprocess.STDOUT
        )
        procs.append(gateway)
        memory.watch("btd serve", gateway)
        try:
            wait_for_port(pacs_port, pacs)
            wait_for_port(dicom_port, gateway)
            if mode == "celery":
                worker = subprocess.Popen(
                    [PYTHON, "-m", "btd.cli", "worker"], cwd=REPO, env=env, stdout=logs, stderr=subprocess.STDOUT
                )
                procs.append(worker)
                memory.watch("btd worker (Celery, with its pool)", worker)
                time.sleep(5)  # let the worker connect and load; the model itself loads on its first task
            started = time.monotonic()
            send_study(sorted(map(str, study_dir.iterdir())), dicom_port, associations, sender, memory)
            result.send_seconds = time.monotonic() - started
            deadline = time.monotonic() + timeout
            shown, last_shown = "", 0.0
            while time.monotonic() < deadline:
                state, _, _, _ = study_timeline(database_url, study_uid)
                if state != shown or time.monotonic() - last_shown > 15:
                    report_progress(data_dir, study_uid, state, started)
                    shown, last_shown = state, time.monotonic()
                if state in DONE_STATES:
                    break
                if any(p.poll() is not None for p in procs[1:]):
                    raise RuntimeError("a btd process exited during the run")
                time.sleep(1.0)
            state, verdict, last, first = study_timeline(database_url, study_uid)
            result.state, result.verdict = state, verdict
            if last is not None:
                result.phases = {s: round((first[s] - last).total_seconds(), 2) for s in PHASES if s in first}
                result.to_scored = result.phases.get("SCORED")
                result.to_delivered = result.phases.get("DELIVERED")
                if "SCORING" in first and "SCORED" in first:
                    result.scoring_seconds_per_slice = round(
                        (first["SCORED"] - first["SCORING"]).total_seconds() / n_slices, 3
                    )
            if state not in ("DELIVERED",):
                result.error = f"ended in {state or 'no state'} (see {mode}-{n_slices}.log)"
        except Exception as exc:  # one failed run is reported, the others still run
            result.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            memory.sample()
            result.peak_rss_mb = memory.peaks_mb()
            for proc in reversed(procs):
                stop(proc)
    return result


# ---------------------------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "load_average": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }


def markdown(runs: list[Run], info: dict[str, str], model_text: str, stable_seconds: float, threads: int) -> str:
    lines = [
        "# End-to-end latency: last instance received -> report delivered",
        "",
        f"Measured {info['date']} with `benchmarks/e2e.py` on {info['cpu']} (load average at start "
        f"{info['load_average']}: the machine is shared with other jobs), Python {info['python']}, "
        f"torch {info['torch']} CPU, OMP_NUM_THREADS={threads} in the btd processes. Model: {model_text}. "
        f"Quiet timer (BTD_STABLE_SECONDS) {stable_seconds:g} s, stability monitor every 0.5 s.",
        "",
        "Seconds after the study's last instance was received (database times). `delivered` is the end",
        "point asked for: the SR stored into a dcmtk storescp standing in for the PACS.",
        "",
        "| mode | slices | sent with | send (s) | stable | queued | scoring starts | scored | reported | delivered "
        "| scoring s/slice | end state | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        cells = [run.phases.get(s) for s in PHASES]
        shown = ["—" if v is None else f"{v:.1f}" for v in cells]
        per_slice = "—" if run.scoring_seconds_per_slice is None else f"{run.scoring_seconds_per_slice:.2f}"
        sent_with = f"{'btd send' if run.sender == 'btd' else 'storescu'} x{run.associations}"
        lines.append(
            f"| {run.mode} | {run.slices} | {sent_with} | {run.send_seconds:.1f} | "
            + " | ".join(shown)
            + f" | {per_slice} | {run.state or '—'}{' (' + run.error + ')' if run.error else ''}"
            + f" | {run.verdict or '—'} |"
        )
    lines += ["", "Peak resident memory per process (MB, sampled every 0.5 s from /proc):", ""]
    for run in runs:
        peaks = ", ".join(f"{role} {mb:.0f}" for role, mb in run.peak_rss_mb.items()) or "—"
        lines.append(f"- {run.mode}, {run.slices} slices: {peaks}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--modes", nargs="+", default=["embedded", "celery"], choices=["embedded", "celery"])
    parser.add_argument("--model", type=Path, default=None, help="a BTD model; default: a tiny random one")
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="per run, after sending")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the btd processes")
    parser.add_argument("--associations", type=int, default=1, help="concurrent associations sending the study")
    parser.add_argument("--sender", choices=["storescu", "btd"], default="storescu")
    parser.add_argument(
        "--not-assessed", action="store_true", help="modality MR: the CT model declines every slice (all but scoring)"
    )
    parser.add_argument(
        "--source", type=Path, default=FIXTURE_SERIES,
        help="the series the study is made of, cycled with fresh UIDs (its CT.* or *.dcm files); default the "
        "20-slice fixture, two thirds of whose slices hold no lung (no U-Net pass for them with the default model)",
    )
    args = parser.parse_args(argv)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="btd-e2e-") as tmp:
        work = Path(tmp)
        if args.model is None:
            model = make_tiny_model(work / "e2e-tiny.pt")
            model_text = (
                "a tiny random BTD model (U-Net dim 8, dim_mults 1-2-4-8, 64 px tiles, calibrated to flag "
                "every slice so that every run builds and delivers an SR with regions), not the published "
                "weights: scoring time here is a floor, not the production figure"
            )
        else:
            model = args.model
            model_text = f"`{model.name}`"
        if args.not_assessed:
            model_text += (
                "; the study's modality relabelled MR, so the CT model declines every slice after reading and "
                "decoding it (verdict not assessed): these runs time everything but the model's arithmetic"
            )
        if args.source.resolve() != FIXTURE_SERIES.resolve():
            model_text += f"; the study made of the series in `{args.source.name}`, cycled with fresh UIDs"
        runs = []
        for n_slices in args.sizes:
            for mode in args.modes:
                run = run_once(
                    mode,
                    n_slices,
                    model,
                    args.stable_seconds,
                    work,
                    args.timeout,
                    args.threads,
                    args.associations,
                    args.sender,
                    "MR" if args.not_assessed else None,
                    args.source,
                )
                print(json.dumps(asdict(run)), flush=True)
                runs.append(run)
                if args.markdown:  # after every run, so a long benchmark cut short still leaves its rows
                    args.markdown.parent.mkdir(parents=True, exist_ok=True)
                    args.markdown.write_text(markdown(runs, info, model_text, args.stable_seconds, args.threads))
        if os.environ.get("BTD_E2E_KEEP"):
            shutil.copytree(work, REPO / "artifacts" / "e2e", dirs_exist_ok=True)
    print(markdown(runs, info, model_text, args.stable_seconds, args.threads))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "runs": [asdict(r) for r in runs]}, indent=2))
    return 0 if all(r.error is None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
