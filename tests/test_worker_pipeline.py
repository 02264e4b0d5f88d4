"""The scoring task on a real SQLite database, real spool files and a real (tiny, random) BTD model: the
study is claimed, scored once, its results and maps stored; duplicates, expired leases, reopened studies,
missing files and a broken model each end in the state the state machine promises."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import torch
from sqlalchemy import func, select, update

from core.contracts import State, Task, progress_path
from core.db import migrate, repository
from core.db.schema import InstanceResult, Region, Report, SeriesResult, Study, StudyEvent
from core.db.session import dispose_engines, session_scope
from core.queue import backoff_seconds
from core.settings import Settings
from models import results as model_results
from worker import celery_app, pipeline, registry, tasks

CT_SMALL = Path(__file__).parent / "fixtures" / "pydicom" / "CT_small.dcm"
SUSPICIOUS_EVERYWHERE = -1e9  # a threshold every slice passes: exercises the "suspicious" path (maps, regions)


def make_tiny_model(path: Path, slice_threshold: float = SUSPICIOUS_EVERYWHERE) -> Path:
    """A random BTD model small enough to score 512x512 CT on a shared CPU in seconds per slice.

    Random weights are fine here: these tests check the plumbing around the model, not its science.
    A region threshold below any anomaly value makes a region appear on every slice whatever the anomaly
    statistics do, so regions flow to the db (and to the SR) too.
    """
    from models.checkpoint import save_model
    from models.diffusion import GaussianDiffusion
    from models.metadata import ModelMetadata
    from models.unet import Unet

    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2, 4, 8), channels=1), image_size=32)
    metadata = ModelMetadata(
        name="tiny-test",
        modality="CT",
        channels=1,
        patch_size=32,
        calibration={"slice_threshold": slice_threshold, "series_threshold": slice_threshold},
        anomaly={"region_threshold": -1e9},
    )
    save_model(diffusion, path, metadata)
    return path


def uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    torch.set_num_threads(1)
    data_dir = tmp_path_factory.mktemp("worker")
    model = make_tiny_model(data_dir / "tiny.pt")
    settings = Settings(data_dir=data_dir, model=str(model), device="cpu", visibility_timeout=60)
    migrate.upgrade(settings)
    yield SimpleNamespace(settings=settings, data_dir=data_dir)
    dispose_engines()


def receive(settings: Settings, study_uid: str, source: Path = CT_SMALL, sop_uid: str | None = None) -> str:
    """Store a copy of a real DICOM file in the spool under new UIDs and record it, as the listener does."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid + ".1"
    ds.SOPInstanceUID = sop_uid or uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    import hashlib
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    received = repository.ReceivedInstance(
        study_uid=study_uid,
        series_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax=ds.file_meta.TransferSyntaxUID,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        modality=ds.Modality,
    )

    def store(version: int) -> str:
        rel = f"{study_uid}/{ds.SOPInstanceUID}.v{version}.dcm"
        (settings.spool_dir / study_uid).mkdir(parents=True, exist_ok=True)
        (settings.spool_dir / rel).write_bytes(data)
        return rel

    with session_scope(settings) as session:
        repository.record_instance(session, received, stable_seconds=30, store=store)
    return ds.SOPInstanceUID


def queue(settings: Settings, study_uid: str) -> None:
    with session_scope(settings) as session:
        assert repository.transition(session, study_uid, State.RECEIVING, State.STABLE, "quiet")
        assert repository.transition(
            session, study_uid, State.STABLE, State.QUEUED, "queued", queued_at=datetime.now(UTC)
        )


def study_row(settings: Settings, study_uid: str) -> Study:
    with session_scope(settings) as session:
        study = repository.get_study(session, study_uid)
        assert study is not None
        return study


def count(settings: Settings, model: type, *where) -> int:
    with session_scope(settings) as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def scored_events(settings: Settings, study_uid: str) -> int:
    return count(settings, StudyEvent, StudyEvent.study_uid == study_uid, StudyEvent.to_state == State.SCORED)


def _series(verdict: str, score: float | None) -> model_results.SeriesResult:
    """A models.SeriesResult as the detector returns it; a `review` series holds its flagged slice."""
    flagged = model_results.InstanceResult(
        None, "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", None, 8, 8, score, model_results.SUSPICIOUS
    )
    instances = [flagged] if verdict == model_results.REVIEW else []
    return model_results.SeriesResult("1.2.3", "1.2.3.4", "CT", verdict, score, None, instances, len(instances), "m")


def test_study_verdict_is_the_worst_series_and_the_max_score() -> None:
    verdict = pipeline.study_verdict
    assert verdict([]) == ("not_assessed", None)
    assert verdict([_series("not_assessed", None)]) == ("not_assessed", None)
    assert verdict([_series("no_evidence", 2.0), _series("not_assessed", None)]) == ("no_evidence", 2.0)
    assert verdict([_series("no_evidence", 9.0), _series("suspicious", 5.0)]) == ("suspicious", 9.0)
    assert verdict([_series("no_evidence", 1.0), _series("review", 0.5)]) == ("review", 1.0)
    assert verdict([_series("review", 1.0), _series("suspicious", 2.0)]) == ("suspicious", 2.0)
    # a NaN score (a series that could not be scored numerically) never becomes the study's score
    assert verdict([_series("no_evidence", float("nan")), _series("no_evidence", 0.3)]) == ("no_evidence", 0.3)
    assert verdict([_series("no_evidence", 0.3), _series("no_evidence", float("nan"))]) == ("no_evidence", 0.3)


def test_celery_app_is_configured_for_long_jobs_that_must_not_be_lost() -> None:
    conf = celery_app.celery_config(Settings(broker_url="redis://127.0.0.1:6379/0", queue_name="q-test"))
    assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    options = conf["broker_transport_options"]
    assert options["visibility_timeout"] == 7200 and options["unacked_restore_interval"] == 60
    assert options["unacked_key"] == "q-test.unacked"  # not shared with other deployments on the same Redis
    assert conf["task_default_queue"] == "q-test" and conf["task_serializer"] == "json"
    assert {Task.SCORE_STUDY, Task.BUILD_REPORT, Task.DELIVER_REPORT} <= set(celery_app.app.tasks)
    assert set(registry.in_process_tasks(Settings())) == {task.value for task in Task}
    delays = [backoff_seconds(Settings().score_backoff_seconds, n) for n in range(3)]
    assert delays[1] == 2 * delays[0] and delays[2] == 4 * delays[0]


def test_scores_a_study_once_and_stores_everything(env: SimpleNamespace) -> None:
    settings = env.settings
    study_uid = uid()
    sops = [receive(settings, study_uid) for _ in range(2)]
    queue(settings, study_uid)

    outcome = tasks.run_score_study(study_uid, settings, owner="w1", dispatch_next=False)
    assert outcome.kind == tasks.SCORED, outcome

    study = study_row(settings, study_uid)
    assert study.verdict == "suspicious" and study.score is not None and study.attempts == 1
    assert study.lease_owner is None and study.error is None
    assert scored_events(settings, study_uid) == 1
    with session_scope(settings) as session:
        (series,) = session.scalars(select(SeriesResult).where(SeriesResult.study_uid == study_uid)).all()
        assert series.study_version == 1 and series.n_instances == 2 and series.n_assessed == 2
        assert series.model_name == "tiny-test" and len(series.model_sha256 or "") == 64
        results = session.scalars(select(InstanceResult).where(InstanceResult.series_result_id == series.id)).all()
        assert sorted(r.sop_instance_uid for r in results) == sorted(sops)
        n_regions = session.scalar(
            select(func.count()).select_from(Region).where(Region.instance_result_id.in_([r.id for r in results]))
        )
    assert n_regions and n_regions > 0
    for r in results:
        assert r.verdict == "suspicious"
        assert r.map_path == f"maps/{study_uid}/{r.sop_instance_uid}.npy"
        residual = np.load(env.data_dir / r.map_path)
        assert residual.dtype == np.float16 and residual.shape == (128, 128)
    assert not progress_path(settings.data_dir, study_uid).exists()  # cleared when done

    # A duplicate delivery of the same message does nothing.
    again = tasks.run_score_study(study_uid, settings, owner="w2", dispatch_next=False)
    assert again.kind == tasks.SKIPPED
    assert scored_events(settings, study_uid) == 1
    assert count(settings, SeriesResult, SeriesResult.study_uid == study_uid) == 1


def test_live_lease_is_respected_and_an_expired_one_taken_over(env: SimpleNamespace) -> None:
    settings = env.settings
    study_uid = uid()
    receive(settings, study_uid)
    queue(settings, study_uid)
    with session_scope(settings) as session:
        claim = tasks.claim_study(session, study_uid, "dead-worker", settings)
    assert isinstance(claim, tasks.Claim) and claim.attempts == 1

    busy = tasks.run_score_study(study_uid, settings, owner="w2", dispatch_next=False)
    assert busy.kind == tasks.BUSY and busy.retry_in and busy.retry_in > 0
    assert study_row(settings, study_uid).lease_owner == "dead-worker"

    # The dead worker's lease runs out (its worker was SIGKILLed); the re-delivered message takes over.
    with session_scope(settings) as session:
        session.execute(
            update(Study)
            .where(Study.study_uid == study_uid)
            .values(lease_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    outcome = tasks.run_score_study(study_uid, settings, owner="w2", dispatch_next=False)
    assert outcome.kind == tasks.SCORED
    study = study_row(settings, study_uid)
    assert study.state == State.SCORED and study.attempts == 2
    assert scored_events(settings, study_uid) == 1
    assert count(settings, SeriesResult, SeriesResult.study_uid == study_uid) == 1
    with session_scope(settings) as session:
        details = session.scalars(select(StudyEvent.detail).where(StudyEvent.study_uid == study_uid)).all()
    assert any("expired; taken over by w2" in (d or "") for d in details)


def test_results_of_a_study_reopened_while_scoring_are_discarded(env: SimpleNamespace) -> None:
    settings = env.settings
    study_uid = uid()
    receive(settings, study_uid)
    queue(settings, study_uid)
    with session_scope(settings) as session:
        claim = tasks.claim_study(session, study_uid, "w1", settings)
    assert isinstance(claim, tasks.Claim)
    receive(settings, study_uid)  # a late instance: SCORING -> RECEIVING, version 2

    outcome = tasks._score_claimed(settings, claim)
    assert outcome.kind == tasks.DISCARDED
    study = study_row(settings, study_uid)
    assert study.state == State.RECEIVING and study.version == 2 and study.verdict is None
    assert count(settings, SeriesResult, SeriesResult.study_uid == study_uid) == 0


def test_missing_spool_file_fails_the_study_with_a_clear_error(env: SimpleNamespace) -> None:
    settings = env.settings
    study_uid = uid()
    receive(settings, study_uid)
    queue(settings, study_uid)
    shutil.rmtree(settings.spool_dir / study_uid)

    outcome = tasks.run_score_study(study_uid, settings, owner="w1", dispatch_next=False)
    assert outcome.kind == tasks.FAILED
    study = study_row(settings, study_uid)
    assert study.state == State.FAILED and study.attempts == 1
    assert "spool files missing: 1 of 1" in (study.error or "")


def test_altered_spool_file_fails_the_study(env: SimpleNamespace) -> None:
    settings = env.settings
    study_uid = uid()
    receive(settings, study_uid)
    queue(settings, study_uid)
    (spooled,) = (settings.spool_dir / study_uid).iterdir()
    spooled.write_bytes(spooled.read_bytes()[:-2] + b"\x00\x01")

    assert tasks.run_score_study(study_uid, settings, owner="w1").kind == tasks.FAILED
    assert "SHA-256 differs" in (study_row(settings, study_uid).error or "")


def test_transient_error_is_retried_then_fails_with_attempt_count(env: SimpleNamespace, tmp_path: Path) -> None:
    broken_model = tmp_path / "broken.pt"
    broken_model.write_bytes(b"this is not a checkpoint")
    settings = env.settings.model_copy(update={"model": str(broken_model)})
    study_uid = uid()
    receive(settings, study_uid)
    queue(settings, study_uid)

    first = tasks.run_score_study(study_uid, settings, final_attempt=False, owner="w1", dispatch_next=False)
    assert first.kind == tasks.RETRY
    study = study_row(settings, study_uid)
    assert study.state == State.QUEUED and study.error and study.lease_owner is None

    last = tasks.run_score_study(study_uid, settings, final_attempt=True, owner="w1", dispatch_next=False)
    assert last.kind == tasks.FAILED
    study = study_row(settings, study_uid)
    assert study.state == State.FAILED and study.attempts == 2 and "attempt 2" in (study.error or "")


def test_unknown_study_is_skipped(env: SimpleNamespace) -> None:
    assert tasks.run_score_study(uid(), env.settings).kind == tasks.SKIPPED


def test_lease_keeper_renews_a_live_claim_and_notices_when_it_is_lost(env: SimpleNamespace) -> None:
    """A live worker must never look dead however slow its slices are; a lost claim must stop the work."""
    from helpers_gateway import wait_until

    settings = env.settings.model_copy(update={"visibility_timeout": 3})  # lease 1.5 s, renewed every 0.5 s
    study_uid = uid()
    receive(settings, study_uid)
    queue(settings, study_uid)
    with session_scope(settings) as session:
        claim = tasks.claim_study(session, study_uid, "slow-worker", settings)
    assert isinstance(claim, tasks.Claim)
    first_until = study_row(settings, study_uid).lease_until
    keeper = tasks.LeaseKeeper(settings, claim).start()
    try:
        wait_until(lambda: study_row(settings, study_uid).lease_until > first_until, timeout=20, what="renewal")
        assert not keeper.lost
        receive(settings, study_uid)  # reopened: the claim is no longer ours
        wait_until(lambda: keeper.lost, timeout=20, what="lost lease noticed")
    finally:
        keeper.stop()
    assert study_row(settings, study_uid).state == State.RECEIVING


def test_celery_task_retries_with_backoff_then_fails(env: SimpleNamespace, tmp_path: Path) -> None:
    """The Celery entry point itself (run eagerly: Celery's own local executor, retries without waiting)."""
    broken_model = tmp_path / "broken.pt"
    broken_model.write_bytes(b"this is not a checkpoint")
    settings = env.settings.model_copy(update={"model": str(broken_model), "device": "cpu"})
    celery_app.configure(settings)
    study_uid = uid()
    receive(settings, study_uid)
    queue(settings, study_uid)
    tasks.score_study_task.app.conf.task_always_eager = True
    try:
        tasks.score_study_task.apply(args=(study_uid,))
    finally:
        tasks.score_study_task.app.conf.task_always_eager = False

    study = study_row(env.settings, study_uid)
    max_retries = settings.score_retries
    assert study.state == State.FAILED and study.attempts == max_retries + 1
    with session_scope(env.settings) as session:
        details = session.scalars(select(StudyEvent.detail).where(StudyEvent.study_uid == study_uid)).all()
    assert sum(1 for d in details if (d or "").startswith("retry after error")) == max_retries
    assert f"attempt {max_retries + 1}" in (study.error or "")


def test_a_study_that_keeps_killing_its_workers_ends_failed(env: SimpleNamespace) -> None:
    """Every take-over counts an attempt; when they are used up the study is FAILED instead of looping."""
    settings = env.settings
    study_uid = uid()
    receive(settings, study_uid)
    queue(settings, study_uid)
    with session_scope(settings) as session:
        assert isinstance(tasks.claim_study(session, study_uid, "doomed-worker", settings), tasks.Claim)
    limit = settings.score_retries + 1
    with session_scope(settings) as session:  # its workers died `limit` times; the last lease ran out
        session.execute(
            update(Study)
            .where(Study.study_uid == study_uid)
            .values(attempts=limit, lease_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    outcome = tasks.run_score_study(study_uid, settings, owner="w9", dispatch_next=False)
    assert outcome.kind == tasks.FAILED
    study = study_row(settings, study_uid)
    assert study.state == State.FAILED and study.lease_owner is None
    assert f"worker lost while scoring, {limit} times" in (study.error or "")
    assert count(settings, SeriesResult, SeriesResult.study_uid == study_uid) == 0


def test_scoring_and_the_report_read_the_same_instances_without_btds_own_documents(env: SimpleNamespace) -> None:
    """One reading of "the study's instances" (repository.latest_instances) for both steps: the latest version
    of each SOP instance, and never btd's own SR routed back by the PACS (it is no evidence about the images,
    and an SR must not cite its predecessor as a source). Before, scoring read the routed-back SR too."""
    settings = env.settings
    study_uid = uid()
    image = receive(settings, study_uid)
    routed_back_sr = receive(settings, study_uid)  # stands for our own SR forwarded back into the study
    with session_scope(settings) as session:
        session.add(
            Report(
                study_uid=study_uid,
                study_version=1,
                sr_sop_instance_uid=routed_back_sr,
                sr_series_uid=study_uid + ".99",
                sr_path="reports/x.dcm",
                created_at=datetime.now(UTC),
            )
        )
    with session_scope(settings) as session:
        scored = [f.sop_instance_uid for s in tasks.load_series_inputs(session, settings, study_uid) for f in s.files]
        reported = [row.sop_instance_uid for row in repository.latest_instances(session, study_uid)]
    assert scored == reported == [image]


def test_a_study_with_an_instance_replaced_under_its_uid_is_never_a_silent_pass(
    env: SimpleNamespace, tmp_path: Path
) -> None:
    """Issue 14: the model finds nothing, but one instance came again with different bytes under its UID. The
    verdict is raised to review with the reason in the study's events, and the SR's findings name the instance."""
    from worker.reports.findings import ReplacedInstance, load_findings
    from worker.reports.sr import build_sr

    quiet = make_tiny_model(tmp_path / "quiet.pt", slice_threshold=1e9)  # no slice is ever flagged
    settings = env.settings.model_copy(update={"model": str(quiet)})
    study_uid = uid()
    kept = receive(settings, study_uid)
    replaced = receive(settings, study_uid)
    altered = pydicom.dcmread(CT_SMALL)
    altered.ImageComments = "changed after the first send"
    altered_path = tmp_path / "altered.dcm"
    altered.save_as(altered_path)
    assert receive(settings, study_uid, source=altered_path, sop_uid=replaced) == replaced  # version 2
    queue(settings, study_uid)

    outcome = tasks.run_score_study(study_uid, settings, owner="w1", dispatch_next=False)
    assert outcome.kind == tasks.SCORED
    study = study_row(settings, study_uid)
    assert study.verdict == "review"
    with session_scope(settings) as session:
        series = session.scalars(select(SeriesResult).where(SeriesResult.study_uid == study_uid)).one()
        assert series.verdict == "no_evidence"  # what the model said of the pixels
        detail = session.scalars(
            select(StudyEvent.detail).where(StudyEvent.study_uid == study_uid, StudyEvent.to_state == State.SCORED)
        ).one()
        assert "raised from no_evidence" in detail and "1 instance(s) replaced" in detail
        findings = load_findings(session, study_uid)
        paths = [settings.spool_dir / row.path for row in repository.latest_instances(session, study_uid)]
    assert findings.verdict == "review" and findings.replaced_instances == [ReplacedInstance(replaced, 2)]
    assert kept not in [r.sop_instance_uid for r in findings.replaced_instances]
    images = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    texts = [item.TextValue for item in _walk(build_sr(images, findings).ContentSequence) if "TextValue" in item]
    stated = f"Instance {replaced} was replaced by different bytes under the same UID (version 2)"
    assert any(stated in text for text in texts)


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def test_a_scoring_process_uses_the_threads_it_is_given(env: SimpleNamespace, tmp_path: Path) -> None:
    """BTD_TORCH_THREADS: a worker sharing its cores takes only its share (none given: torch's default)."""
    from pydantic import ValidationError

    other_model = shutil.copy(env.settings.model, tmp_path / "tiny-copy.pt")  # a new key: loaded afresh
    shutil.copy(Path(env.settings.model).with_suffix(".json"), tmp_path / "tiny-copy.json")
    torch.set_num_threads(2)
    try:
        pipeline.get_detector(env.settings.model_copy(update={"model": str(other_model), "torch_threads": 1}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
    with pytest.raises(ValidationError):
        Settings(torch_threads=0)


def test_a_worker_scoring_studies_on_threads_gives_each_thread_its_own_lease(env: SimpleNamespace) -> None:
    """BTD_STUDIES_IN_PARALLEL > 1: a lease's holder may take its own lease again, so a duplicate message on a
    sibling thread of the same process must find the study busy, not score it a second time."""
    import threading

    from worker.lease import worker_id

    settings = env.settings.model_copy(update={"studies_in_parallel": 2})
    study_uid = uid()
    receive(settings, study_uid)
    queue(settings, study_uid)
    owners: list[str] = []
    sibling = threading.Thread(target=lambda: owners.append(worker_id(per_thread=True)))
    sibling.start()
    sibling.join()
    with session_scope(settings) as session:
        claim = tasks.claim_study(session, study_uid, owners[0], settings)
    assert isinstance(claim, tasks.Claim)
    assert worker_id(per_thread=True) != owners[0] and worker_id(per_thread=True).startswith(worker_id() + "/")
    busy = tasks.run_score_study(study_uid, settings, dispatch_next=False)  # this thread: the process's other one
    assert busy.kind == tasks.BUSY
    assert study_row(settings, study_uid).lease_owner == owners[0]
    assert scored_events(settings, study_uid) == 0


def test_the_worker_command_line_follows_studies_in_parallel(env: SimpleNamespace) -> None:
    from pydantic import ValidationError

    from core.contracts import QueueRole
    from worker.main import worker_argv

    roles = [QueueRole.SCORING]
    one = worker_argv(env.settings, roles)
    assert one[one.index("--pool") + 1] == "prefork" and one[one.index("--concurrency") + 1] == "1"
    three = worker_argv(env.settings.model_copy(update={"worker_processes": 3}), roles)
    assert three[three.index("--pool") + 1] == "prefork" and three[three.index("--concurrency") + 1] == "3"
    two = worker_argv(env.settings.model_copy(update={"studies_in_parallel": 2}), roles, ["-n", "w@host"])
    assert two[two.index("--pool") + 1] == "threads" and two[two.index("--concurrency") + 1] == "2"
    assert two[two.index("--prefetch-multiplier") + 1] == "1" and two[-2:] == ["-n", "w@host"]
    with pytest.raises(ValidationError):
        Settings(studies_in_parallel=0)
    with pytest.raises(ValidationError, match="choose one"):
        Settings(worker_processes=2, studies_in_parallel=2)


def test_worker_processes_take_their_share_of_the_cores_unless_torch_threads_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """N scoring processes that each took every core for torch would spin against each other."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    for name in ("BTD_TORCH_THREADS", "BTD_WORKER_PROCESSES", "BTD_STUDIES_IN_PARALLEL"):
        monkeypatch.delenv(name, raising=False)  # the figures below are the settings given here, not the host's
    assert Settings().scoring_torch_threads is None  # one process: torch's default, every core
    assert Settings(worker_processes=4).scoring_torch_threads == 4
    assert Settings(worker_processes=32).scoring_torch_threads == 1
    assert Settings(worker_processes=4, torch_threads=2).scoring_torch_threads == 2
    assert Settings(torch_threads=3).scoring_torch_threads == 3
