"""The chaos suite (marker `chaos`; alone: `pytest -m chaos`): real processes on loopback — `btd serve`,
two `btd worker` processes (one per queue), PostgreSQL through a proxy, a Redis of its own, dcmtk storescu
as the modality and storescp as the PACS — and one fault at a time, with the shipped defaults for every
recovery setting (lease, re-dispatch deadline, visibility timeout, retries; only the quiet time is short).

Each scenario asserts that every instance answered 0x0000 is stored once with its SHA-256, that every
study reaches DELIVERED once per study version with exactly one SR per version at the PACS, and that it
does so within RECOVERY_BOUND seconds of the fault. The measured times are printed (`pytest -s`) and kept
in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from chaos_stack import (
    ChaosStack,
    Sent,
    assert_delivered_exactly_once,
    assert_refused_absent,
    assert_stored_once_with_sha256,
    fresh_study,
    parse_storescu,
    progress,
    state_of,
    storescu,
    storescu_command,
    study_row,
    wait_for,
)
from helpers_gateway import postgres_database
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from core.db.schema import DeliveryAttempt, Report
from core.db.session import dispose_engines, session_scope

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(900)]

# The longest a study may take to be DELIVERED after a fault ends: a lease (60 s) or a re-dispatch deadline
# (60 s) plus a delivery backoff (30 s), with room for a starved shared CPU.
RECOVERY_BOUND = 300.0
OUTAGE_SECONDS = 30.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosStack]:
    from test_e2e_celery import redis_available
    from test_worker_pipeline import make_tiny_model

    if not redis_available():
        pytest.skip("no Redis (the chaos suite starts its own, but the shared one marks a machine set up)")
    root = tmp_path_factory.mktemp("chaos")
    model = make_tiny_model(root / "tiny.pt")
    with postgres_database("btd_chaos") as url:
        stack = ChaosStack(root, url, model).start()
        try:
            yield stack
        finally:
            stack.stop()
            dispose_engines()
            print("\nchaos recovery times (s):", json.dumps(stack.measured, indent=1))
            (root / "measured.json").write_text(json.dumps(stack.measured, indent=1))


def send(stack: ChaosStack, name: str, n: int) -> tuple[str, Sent]:
    study_uid, paths = fresh_study(stack.root / "studies" / name, n)
    sent = storescu(stack.gateway.dicom_port, paths)
    assert sent.returncode == 0 and len(sent.stored) == n, sent.output[-2000:]
    return study_uid, sent


def scoring_under_way(stack: ChaosStack, study_uid: str) -> bool:
    row = study_row(stack.settings, study_uid)
    done = progress(stack.data_dir, study_uid)
    return bool(row and row.state == "SCORING" and row.lease_owner and done and done["done"] < done["total"])


def delivering(stack: ChaosStack, study_uid: str) -> bool:
    row = study_row(stack.settings, study_uid)
    return bool(row and row.state == "REPORTED" and row.lease_owner)


def finish(stack: ChaosStack, name: str, study_uid: str, since: float, sent: Sent | None = None) -> None:
    remaining = RECOVERY_BOUND - (time.monotonic() - since)
    stack.wait_delivered(study_uid, timeout=max(remaining, 1.0))
    stack.measured[name] = round(time.monotonic() - since, 1)
    if sent is not None:
        assert_stored_once_with_sha256(stack.settings, sent)
    assert_delivered_exactly_once(stack.settings, stack.pacs, study_uid)


def test_undisturbed_study_is_delivered_once(stack: ChaosStack) -> None:
    """The baseline (and the workers' first model load)."""
    start = time.monotonic()
    study_uid, sent = send(stack, "baseline", 4)
    finish(stack, "baseline: received -> DELIVERED", study_uid, start, sent)


def test_workers_sigkilled_mid_delivery_and_mid_scoring_are_taken_over(stack: ChaosStack) -> None:
    stack.pacs.proxy.hang()  # the PACS accepts and never answers: the delivery is caught in flight
    delivered_uid, sent_d = send(stack, "kill-delivery", 4)
    wait_for(lambda: delivering(stack, delivered_uid), 180, "delivery in flight")
    reports = stack.worker_holding(delivered_uid)
    reports.kill()
    killed_delivery = time.monotonic()
    stack.start_worker("reports")
    stack.pacs.proxy.up()

    scored_uid, sent_s = send(stack, "kill-scoring", 10)
    wait_for(lambda: scoring_under_way(stack, scored_uid), 180, "scoring under way")
    scoring = stack.worker_holding(scored_uid)
    scoring.kill()
    killed_scoring = time.monotonic()
    stack.start_worker("scoring")

    finish(stack, "worker SIGKILL mid-delivery -> DELIVERED", delivered_uid, killed_delivery, sent_d)
    finish(stack, "worker SIGKILL mid-scoring -> DELIVERED", scored_uid, killed_scoring, sent_s)
    study = study_row(stack.settings, scored_uid)
    assert study is not None and study.attempts == 2  # the killed claim and the take-over


def test_redis_stopped_with_one_study_queued_and_one_awaiting_its_report(stack: ChaosStack) -> None:
    """Redis keeps nothing across a restart here: both messages are lost, the database is the truth."""
    import redis

    stack.workers["reports"].stop()
    report_uid, sent_r = send(stack, "redis-report", 4)
    wait_for(lambda: state_of(stack.settings, report_uid) == "SCORED", 180, "scored, report message waiting")
    stack.workers["scoring"].stop()
    queued_uid, sent_q = send(stack, "redis-queued", 4)
    wait_for(lambda: state_of(stack.settings, queued_uid) == "QUEUED", 60, "queued, message waiting")
    client = redis.Redis.from_url(stack.redis.url)
    assert client.llen("chaos") == 1 and client.llen("chaos.reports") == 1  # no duplicate piled up
    client.close()

    stack.redis.stop()
    time.sleep(OUTAGE_SECONDS)
    stack.redis.start()
    back = time.monotonic()
    stack.start_worker("scoring")
    stack.start_worker("reports")
    finish(stack, "Redis down 30 s at QUEUED: Redis back -> DELIVERED", queued_uid, back, sent_q)
    finish(stack, "Redis down 30 s at SCORED: Redis back -> DELIVERED", report_uid, back, sent_r)
    redispatched = [line for line in stack.gateway.log_text().splitlines() if "study.redispatched" in line]
    assert any(queued_uid in line for line in redispatched) and any(report_uid in line for line in redispatched)


def test_redis_stopped_while_scoring_and_while_delivering(stack: ChaosStack) -> None:
    stack.pacs.proxy.hang()
    delivered_uid, sent_d = send(stack, "redis-delivery", 4)
    wait_for(lambda: delivering(stack, delivered_uid), 180, "delivery in flight")
    scored_uid, sent_s = send(stack, "redis-scoring", 10)
    wait_for(lambda: scoring_under_way(stack, scored_uid), 180, "scoring under way")

    stack.redis.stop()
    stopped = time.monotonic()
    time.sleep(5)
    stack.pacs.proxy.up()  # the hung association is reset; the PACS answers again
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
    stack.redis.start()
    back = time.monotonic()
    finish(stack, "Redis down 30 s mid-scoring: Redis back -> DELIVERED", scored_uid, back, sent_s)
    finish(stack, "Redis down 30 s mid-delivery: Redis back -> DELIVERED", delivered_uid, back, sent_d)


def test_postgres_unreachable_mid_receive_and_mid_scoring(stack: ChaosStack) -> None:
    scored_uid, sent_s = send(stack, "pg-scoring", 10)
    wait_for(lambda: scoring_under_way(stack, scored_uid), 180, "scoring under way")
    received_uid, paths = fresh_study(stack.root / "studies" / "pg-receive", 8)
    first = storescu(stack.gateway.dicom_port, paths[:4])
    assert len(first.stored) == 4, first.output[-2000:]

    stack.pg_proxy.down()
    cut = time.monotonic()
    refused = storescu(stack.gateway.dicom_port, paths[4:])
    assert refused.stored == set() and len(refused.refused) == 4  # 0xA700: nothing acknowledged
    assert "OutOfResources" in refused.output
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - cut)))
    stack.pg_proxy.up()
    back = time.monotonic()
    assert_refused_absent(stack.settings, refused.refused)
    again = storescu(stack.gateway.dicom_port, paths[4:])
    assert again.stored == refused.refused, again.output[-2000:]

    finish(stack, "PostgreSQL down 30 s mid-scoring: back -> DELIVERED", scored_uid, back, sent_s)
    finish(stack, "PostgreSQL down 30 s mid-receive: back -> DELIVERED", received_uid, back,
           Sent(stored=first.stored | again.stored))


def test_gateway_sigkilled_mid_receive(stack: ChaosStack) -> None:
    study_uid, paths = fresh_study(stack.root / "studies" / "serve-kill", 20)
    log = stack.root / "serve-kill-storescu.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(storescu_command(stack.gateway.dicom_port, paths), stdout=out, stderr=subprocess.STDOUT)

        def some_stored() -> bool:
            row = study_row(stack.settings, study_uid)
            return bool(row and row.n_instances >= 3)

        wait_for(some_stored, 60, "first instances stored", interval=0.02)
        assert stack.gateway.proc is not None
        stack.gateway.proc.kill()  # SIGKILL
        stack.gateway.proc.wait(timeout=30)
        killed = time.monotonic()
        proc.wait(timeout=60)
    partial = parse_storescu(log.read_text(), paths)
    assert_stored_once_with_sha256(stack.settings, partial)

    stack.restart_gateway()
    resent = storescu(stack.gateway.dicom_port, paths)
    assert len(resent.stored) == 20, resent.output[-2000:]
    print(f"\nserve SIGKILL: {len(partial.stored)} of 20 acknowledged before the kill")
    finish(stack, "btd serve SIGKILL mid-receive -> DELIVERED", study_uid, killed, resent)


def test_disk_at_the_watermark_then_lowered(stack: ChaosStack) -> None:
    stack.restart_gateway(min_free_bytes=2**62)  # above any disk's free space
    ready = httpx.get(f"http://127.0.0.1:{stack.gateway.http_port}/readyz", timeout=30)
    assert ready.status_code == 503 and "spool" in ready.json()["failed"]
    study_uid, paths = fresh_study(stack.root / "studies" / "disk", 4)
    refused = storescu(stack.gateway.dicom_port, paths)
    assert refused.stored == set() and "OutOfResources" in refused.output
    assert_refused_absent(stack.settings, refused.refused)

    stack.restart_gateway()  # the watermark lowered (the shipped value here: 0, as for the whole stack)
    lowered = time.monotonic()
    sent = storescu(stack.gateway.dicom_port, paths)
    assert len(sent.stored) == 4
    finish(stack, "disk at the watermark, then lowered: restart -> DELIVERED", study_uid, lowered, sent)


def test_pacs_down_during_delivery_then_back(stack: ChaosStack) -> None:
    stack.pacs.proxy.down()
    study_uid, sent = send(stack, "pacs-down", 4)

    def failed_attempt() -> bool:
        with session_scope(stack.settings) as session:
            report = session.scalar(select(Report.id).where(Report.study_uid == study_uid))
            return bool(report) and bool(
                session.scalar(select(DeliveryAttempt.id).where(DeliveryAttempt.report_id == report))
            )

    wait_for(failed_attempt, 180, "a failed delivery attempt")
    time.sleep(10)
    stack.pacs.proxy.up()
    finish(stack, "PACS down during delivery: PACS back -> DELIVERED", study_uid, time.monotonic(), sent)


def test_after_the_chaos_the_gateway_is_ready_and_shows_the_workers_metrics(stack: ChaosStack) -> None:
    base = f"http://127.0.0.1:{stack.gateway.http_port}"
    wait_for(lambda: httpx.get(f"{base}/readyz", timeout=30).status_code == 200, 120, "ready")
    text = httpx.get(f"{base}/metrics", timeout=30).text
    found = {(s.name, tuple(sorted(s.labels))) for f in text_string_to_metric_families(text) for s in f.samples}
    assert ("btd_task_outcomes_total", ("outcome", "task", "worker")) in found
    stuck = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "btd_studies_stuck"]
    assert stuck and not any(stuck)
