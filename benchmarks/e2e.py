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

Studies: the 20-slice chest CT of tests/fixtures/ct_series_20 (Apache-2.0, TotalSegmentator) with fresh
UIDs, and a 100-slice study made of that series 5 times (fresh UIDs, each copy shifted along the slice
normal so the series stays one geometrically consistent stack).

The model: `--model PATH` (a real BTD model), else a tiny random one (dim 8; see make_tiny_model), which
exercises the whole path at a fraction of the published model's cost; the report says which was used.

Usage: .venv/bin/python benchmarks/e2e.py [--sizes 20 100] [--modes embedded celery] [--model PATH]
       [--stable-seconds 2] [--markdown docs/bench/e2e.md]
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
POSTGRES_ADMIN_URL = os.environ.get("BTD_BENCH_POSTGRES_ADMIN_URL", "postgresql+psycopg2://root@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BTD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PHASES = ("STABLE", "QUEUED", "SCORING", "SCORED", "REPORTED", "DELIVERED")
DONE_STATES = ("DELIVERED", "FAILED_DELIVERY", "FAILED", "REJECTED")


# ---------------------------------------------------------------------------------------------- inputs


def make_study(out_dir: Path, n_slices: int, source: Path = FIXTURE_SERIES) -> Path:
    """Write one CT study of `n_slices` (a multiple of the source's 20) with fresh UIDs; return its folder."""
    heads = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in source.glob("CT.*")}
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
    error: str | None = None


def study_timeline(database_url: str, study_uid: str) -> tuple[str, datetime | None, dict[str, datetime]]:
    """The study's state, its last instance's receipt time and the first time it entered each phase after."""
    from sqlalchemy import func, select

    from core.db.schema import Instance, Study, StudyEvent
    from core.db.session import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            state = conn.execute(select(Study.state).where(Study.study_uid == study_uid)).scalar_one_or_none() or ""
            last = conn.execute(
                select(func.max(Instance.received_at)).where(Instance.study_uid == study_uid)
            ).scalar_one_or_none()
            events = conn.execute(
                select(StudyEvent.to_state, StudyEvent.at).where(StudyEvent.study_uid == study_uid)
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
    return state, last, first


def run_once(
    mode: str, n_slices: int, model: Path, stable_seconds: float, work: Path, timeout: float, threads: int
) -> Run:
    result = Run(mode=mode, slices=n_slices)
    study_dir = make_study(work / f"study-{n_slices}", n_slices)
    study_uid = str(pydicom.dcmread(next(study_dir.iterdir()), stop_before_pixels=True).StudyInstanceUID)
    data_dir = work / f"data-{mode}-{n_slices}"
    pacs_port, dicom_port, http_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
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
        pacs = subprocess.Popen(["storescp", "-aet", PACS_AET, "-od", str(work / "pacs"), str(pacs_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (work / "pacs").mkdir(exist_ok=True)
        procs.append(pacs)
        gateway = subprocess.Popen([PYTHON, "-m", "btd.cli", "serve"], cwd=REPO, env=env, stdout=logs,
                                   stderr=subprocess.STDOUT)
        procs.append(gateway)
        try:
            wait_for_port(pacs_port, pacs)
            wait_for_port(dicom_port, gateway)
            if mode == "celery":
                worker = subprocess.Popen([PYTHON, "-m", "btd.cli", "worker"], cwd=REPO, env=env, stdout=logs,
                                          stderr=subprocess.STDOUT)
                procs.append(worker)
                time.sleep(5)  # let the worker connect and load; the model itself loads on its first task
            started = time.monotonic()
            sent = subprocess.run(
                ["storescu", "-aet", "E2ESCU", "-aec", "BTD", "-xv", "127.0.0.1", str(dicom_port),
                 *sorted(map(str, study_dir.iterdir()))],
                env=dict(os.environ, TCP_NODELAY="1"), capture_output=True, text=True, timeout=300,
            )
            result.send_seconds = time.monotonic() - started
            if sent.returncode != 0:
                raise RuntimeError(f"storescu failed: {sent.stderr[-500:]}")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                state, _, _ = study_timeline(database_url, study_uid)
                if state in DONE_STATES:
                    break
                if any(p.poll() is not None for p in procs[1:]):
                    raise RuntimeError("a btd process exited during the run")
                time.sleep(1.0)
            state, last, first = study_timeline(database_url, study_uid)
            result.state = state
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
        "| mode | slices | send (s) | stable | queued | scoring starts | scored | reported | delivered "
        "| scoring s/slice | end state |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        cells = [run.phases.get(s) for s in PHASES]
        shown = ["—" if v is None else f"{v:.1f}" for v in cells]
        per_slice = "—" if run.scoring_seconds_per_slice is None else f"{run.scoring_seconds_per_slice:.2f}"
        lines.append(
            f"| {run.mode} | {run.slices} | {run.send_seconds:.1f} | " + " | ".join(shown)
            + f" | {per_slice} | {run.state or '—'}{' (' + run.error + ')' if run.error else ''} |"
        )
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
    args = parser.parse_args(argv)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="btd-e2e-") as tmp:
        work = Path(tmp)
        if args.model is None:
            model = make_tiny_model(work / "e2e-tiny.pt")
            model_text = ("a tiny random BTD model (U-Net dim 8, dim_mults 1-2-4-8, 64 px tiles, calibrated to flag "
                          "every slice so that every run builds and delivers an SR with regions), not the published "
                          "weights: scoring time here is a floor, not the production figure")
        else:
            model = args.model
            model_text = f"`{model.name}`"
        runs = []
        for n_slices in args.sizes:
            for mode in args.modes:
                run = run_once(mode, n_slices, model, args.stable_seconds, work, args.timeout, args.threads)
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
