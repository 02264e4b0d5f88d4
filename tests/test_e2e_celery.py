"""End to end, distributed mode: `btd serve` on a throw-away Postgres database with a Redis broker (a
queue name of its own per run) and real `btd worker` (Celery) subprocesses.

The 20-slice CT goes in with storescu; the first worker is SIGKILLed (its whole process group, as when
a machine dies) while it scores. Redis re-delivers the unacknowledged message after the visibility
timeout (10 s here) to a second worker, which takes the study over once the dead worker's lease ran out:
the study is scored exactly once (one result set for the version, one SCORED event). A second, small
study then goes the ordinary way through the surviving worker."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import pydicom
import pytest
from helpers_gateway import PYTHON, REPO_ROOT, GatewayProcess, gateway_env, postgres_database, wait_until
from sqlalchemy import func, select
from test_e2e_embedded import (
    assert_scored_result,
    assert_stored_with_sha256,
    send_series,
    series_study_uid,
    wait_for_verdict,
)

from core.db.schema import InstanceResult, SeriesResult
from core.db.session import dispose_engines, session_scope
from core.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(600)]

REDIS_URL = os.environ.get("BTD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
VISIBILITY_TIMEOUT = 10
CT_SMALL = Path(__file__).parent / "fixtures" / "pydicom" / "CT_small.dcm"


def redis_available() -> bool:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.ping()
        client.close()
        return True
    except redis.RedisError:
        return False


class Worker:
    """A `btd worker` subprocess in a process group of its own, so it can be killed like a lost machine."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "btd.cli", "worker"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    if not redis_available():
        pytest.skip(f"no Redis at {REDIS_URL}")
    from test_worker_pipeline import make_tiny_model

    root = tmp_path_factory.mktemp("e2e-celery")
    data_dir = root / "data"
    queue_name = f"btd-e2e-{uuid.uuid4().hex[:10]}"
    model = make_tiny_model(root / "tiny.pt")
    with postgres_database("btd_e2e") as url:
        values = {
            "database_url": url,
            "broker_url": REDIS_URL,
            "queue_name": queue_name,
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "stable_seconds": 2,
            "model": str(model),
            "device": "cpu",
            "min_free_bytes": 0,
            "monitor_interval": 0.5,
        }
        gateway = GatewayProcess(data_dir, **values).start()
        ns = SimpleNamespace(
            root=root,
            data_dir=data_dir,
            gateway=gateway,
            settings=Settings(data_dir=data_dir, database_url=url),
            worker_env=gateway_env(data_dir, **values),
            workers=[],
            queue_name=queue_name,
        )
        try:
            yield ns
        finally:
            for worker in ns.workers:
                worker.stop()
            gateway.stop()
            dispose_engines()
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            client.delete(queue_name, *(f"{queue_name}.{k}" for k in ("unacked", "unacked_index", "unacked_mutex")))
            client.close()


def start_worker(stack: SimpleNamespace, name: str) -> Worker:
    worker = Worker(stack.worker_env, stack.root / f"worker-{name}.log")
    stack.workers.append(worker)
    return worker


def study_json(stack: SimpleNamespace, study_uid: str) -> dict | None:
    """The study over REST, or None while unknown (or while a starved shared CPU keeps the API slow)."""
    try:
        resp = httpx.get(f"http://127.0.0.1:{stack.gateway.http_port}/api/studies/{study_uid}", timeout=30)
    except httpx.TimeoutException:
        return None
    return resp.json() if resp.status_code == 200 else None


def test_worker_killed_while_scoring_is_recovered_and_scored_exactly_once(stack: SimpleNamespace) -> None:
    study_uid = series_study_uid()
    first = start_worker(stack, "a")
    send_series(stack.gateway.dicom_port)
    assert_stored_with_sha256(stack.settings, study_uid)

    def scoring_under_way() -> dict | None:
        assert first.proc.poll() is None, first.log_text()[-3000:]
        body = study_json(stack, study_uid)
        # The progress record appears once the model is loaded and the slices are being scored.
        return body if body and body["state"] == "SCORING" and body["progress"] else None

    during = wait_until(scoring_under_way, timeout=300, interval=0.5, what="first worker scoring")
    assert during["progress"]["total"] == 20 and during["progress"]["done"] < 20 and during["lease_owner"]
    dead_owner = during["lease_owner"]
    first.kill()
    killed_at = datetime.now(UTC)

    start_worker(stack, "b")
    body = wait_for_verdict(stack.gateway.http_port, study_uid, timeout=480, gateway=stack.gateway)

    assert_scored_result(body, stack.data_dir)
    assert body["attempts"] == 2  # the killed attempt and the one that finished
    details = [e["detail"] or "" for e in body["history"]]
    takeovers = [e for e in body["history"] if f"lease of {dead_owner} expired; taken over" in (e["detail"] or "")]
    assert len(takeovers) == 1, details
    (scored,) = [e for e in body["history"] if e["to_state"] == "SCORED"]
    # Not asserted (timing depends on the machine); printed for docs/benchmarks (pytest -s).
    recovered = (datetime.fromisoformat(takeovers[0]["at"]) - killed_at).total_seconds()
    done = (datetime.fromisoformat(scored["at"]) - killed_at).total_seconds()
    print(f"\nSIGKILL -> taken over: {recovered:.1f} s; -> SCORED: {done:.1f} s")
    with session_scope(stack.settings) as session:
        series_ids = session.scalars(
            select(SeriesResult.id).where(SeriesResult.study_uid == study_uid, SeriesResult.study_version == 1)
        ).all()
        assert len(series_ids) == 1  # one result set for the version
        n_instances = session.scalar(
            select(func.count()).select_from(InstanceResult).where(InstanceResult.series_result_id.in_(series_ids))
        )
    assert n_instances == 20


def test_celery_worker_scores_a_new_study_the_ordinary_way(stack: SimpleNamespace, tmp_path: Path) -> None:
    if not any(w.proc.poll() is None for w in stack.workers):
        start_worker(stack, "c")
    ds = pydicom.dcmread(CT_SMALL)
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "ct_small.dcm"
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run(
        ["storescu", "-aec", "BTD", "127.0.0.1", str(stack.gateway.dicom_port), str(path)],
        env=dict(os.environ, TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr

    body = wait_for_verdict(stack.gateway.http_port, ds.StudyInstanceUID, timeout=240, gateway=stack.gateway)
    assert body["attempts"] == 1 and body["verdict"] == "suspicious"
    assert [e["to_state"] for e in body["history"]][:5] == ["RECEIVING", "STABLE", "QUEUED", "SCORING", "SCORED"]
    (series,) = body["series"]
    assert series["n_instances"] == 1 and series["instances"][0]["sop_instance_uid"] == ds.SOPInstanceUID

    stats = httpx.get(f"http://127.0.0.1:{stack.gateway.http_port}/api/stats", timeout=10).json()
    assert stats["queue_mode"] == "celery" and stats["by_verdict"]["suspicious"] == 2
    ready = httpx.get(f"http://127.0.0.1:{stack.gateway.http_port}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["checks"]["broker"]["ok"] is True


def send_two_studies(stack: SimpleNamespace, tmp_path: Path) -> list[str]:
    """Two studies of the 20-slice fixture series sent over one association: both go quiet within a second of
    each other, and each takes seconds to score, so a worker holding two messages scores them at once."""
    from test_e2e_embedded import series_files

    studies, paths = [], []
    for k in range(2):
        study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        studies.append(study_uid)
        for n, source in enumerate(series_files()):
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            paths.append(tmp_path / f"{k}-{n:02d}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
    done = subprocess.run(
        ["storescu", "-aec", "BTD", "-xv", "127.0.0.1", str(stack.gateway.dicom_port), *map(str, paths)],
        env=dict(os.environ, TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return studies


def scored_at_once_each_exactly_once(stack: SimpleNamespace, studies: list[str], worker: Worker) -> set[str]:
    """Both studies scored once each (one claim, one SCORED, one attempt, every slice assessed), their scoring
    overlapping in time, /readyz green; returns the lease holders that claimed them."""
    bodies = [
        wait_for_verdict(stack.gateway.http_port, uid, timeout=480, gateway=stack.gateway) for uid in studies
    ]
    assert worker.proc.poll() is None, worker.log_text()[-3000:]
    claimed, scored, owners = [], [], set()
    for body in bodies:
        assert body["attempts"] == 1 and body["verdict"] == "suspicious"
        states = [e["to_state"] for e in body["history"]]
        assert states.count("SCORING") == 1 and states.count("SCORED") == 1
        (claim,) = [e for e in body["history"] if e["to_state"] == "SCORING"]
        (finish,) = [e for e in body["history"] if e["to_state"] == "SCORED"]
        claimed.append(datetime.fromisoformat(claim["at"]))
        scored.append(datetime.fromisoformat(finish["at"]))
        owners.add(claim["detail"].removeprefix("claimed by "))
        (series,) = body["series"]
        assert series["n_instances"] == 20 and series["n_assessed"] == 20
    assert max(claimed) < min(scored), (claimed, scored)  # both were scoring at the same time
    ready = httpx.get(f"http://127.0.0.1:{stack.gateway.http_port}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    return owners


def test_a_worker_with_studies_in_parallel_scores_two_studies_at_once_each_exactly_once(
    stack: SimpleNamespace, tmp_path: Path
) -> None:
    """BTD_STUDIES_IN_PARALLEL=2: one `btd worker` process runs Celery's thread pool and two studies are
    scoring at the same time, each under its own thread's lease, each scored once, and the worker's heartbeat
    (published from its own process, where the tasks run) keeps /readyz green (the worker holds both messages
    at once: two threads, prefetch 1 each)."""
    for worker in stack.workers:  # only the threaded worker may take these studies
        worker.stop()
    worker = Worker(dict(stack.worker_env, BTD_STUDIES_IN_PARALLEL="2"), stack.root / "worker-threads.log")
    stack.workers.append(worker)
    owners = scored_at_once_each_exactly_once(stack, send_two_studies(stack, tmp_path), worker)
    assert len(owners) == 2 and all("/" in owner for owner in owners)  # one lease holder per thread
    assert len({owner.split("/")[0] for owner in owners}) == 1  # of one process


def test_a_worker_with_two_processes_scores_two_studies_at_once_in_two_processes(
    stack: SimpleNamespace, tmp_path: Path
) -> None:
    """BTD_WORKER_PROCESSES=2 (for a GPU host: docs/bench/gpu.md): one `btd worker` runs two prefork pool
    processes, each loading its own model on its first study; the two studies score at the same time, each
    under its own process's lease, each once, and /readyz stays green (each pool process publishes its
    heartbeat)."""
    for worker in stack.workers:  # only the two-process worker may take these studies
        worker.stop()
    worker = Worker(dict(stack.worker_env, BTD_WORKER_PROCESSES="2"), stack.root / "worker-processes.log")
    stack.workers.append(worker)
    owners = scored_at_once_each_exactly_once(stack, send_two_studies(stack, tmp_path), worker)
    assert len(owners) == 2 and not any("/" in owner for owner in owners)  # a lease holder per process
    assert len({owner.rsplit(":", 1)[-1] for owner in owners}) == 2  # two process ids
