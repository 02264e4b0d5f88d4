"""`btd serve`: the whole gateway in one process (receiving processes beside it on PostgreSQL: BTD_DICOM_PROCESSES).

Before anything starts, the settings are checked for an HTTP API that would show patient images beyond
this machine without authentication (service/api/auth.py `exposure_problem`): `btd serve` exits with the
reason instead. Then, in order: migrate the database (so a fresh install works with one command), the in-process task
executor (only without a broker: it runs the task table the composition root hands over, so the gateway
never imports worker code), the REST API application (built, not yet serving), the DICOM listener (with
BTD_DICOM_PROCESSES > 1 also the receiving processes that share its port: service/dicom/receivers.py),
the stability monitor (which may dispatch at once), then the REST API in the foreground (uvicorn).
SIGTERM or SIGINT stops uvicorn gracefully; then the listener and every receiving process stop accepting
(an instance in flight finishes its handler and is answered first), the monitor and the executor stop (a
task still running after the timeout is abandoned: its study stays SCORING under a lease that the next
start picks up), and the database pools close.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any

from core import queue
from core.db import migrate
from core.db.session import dispose_engines
from core.observability.logs import configure_logging, log_event
from core.queue import TaskFunction
from core.settings import Settings

log = logging.getLogger("btd.server")


class _StopSignals:
    """SIGTERM/SIGINT at any moment mean "shut down cleanly". While uvicorn runs it handles them itself
    and, once stopped, re-raises the signal to the handler that was there before: ours, which only
    records it (the default SIGTERM action would kill the process before the listener and the monitor
    are stopped). A signal during start-up is remembered, and uvicorn is then told to exit or not run."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.server: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        self.requested.set()
        if self.server is not None:
            self.server.should_exit = True


def serve(settings: Settings, in_process_tasks: Mapping[str, TaskFunction] | None = None) -> int:
    """Run the gateway until SIGTERM/SIGINT. Without a broker, `in_process_tasks` (task name -> function)
    is what the in-process executor runs; with a broker it is not needed (Celery workers run the tasks)."""
    if not settings.broker_url and in_process_tasks is None:
        raise ValueError("no broker (BTD_BROKER_URL) and no in-process tasks: nothing would ever score a study")
    from service.api.auth import exposure_problem

    problem = exposure_problem(settings)
    if problem:
        raise SystemExit(f"btd serve: {problem}")
    stop = _StopSignals()
    stop.install()
    configure_logging(settings.log_level)
    migrate.upgrade(settings)
    log_event(log, "database.migrated")
    log_event(
        log,
        "api.access",
        http_host=settings.http_host,
        https=settings.http_tls_cert is not None,
        authentication=settings.auth_configured,
    )

    from service.dicom.listener import start_listener
    from service.dicom.receivers import ReceiverProcesses
    from service.stability import StabilityMonitor

    tasks = dict(in_process_tasks or {})
    executor = queue.start_executor(tasks.get) if not settings.broker_url else None
    listener: Any = None
    receivers: ReceiverProcesses | None = None
    monitor: StabilityMonitor | None = None
    try:
        # The API is imported and built before the listener starts: importing it (FastAPI, the dashboard's
        # plotting) takes seconds of CPU, which otherwise competed for the GIL with the first instances a
        # PACS sent (measured: the first study into a fresh `btd serve` came in ~25 % slower).
        import uvicorn

        from service.api.app import create_app

        config = uvicorn.Config(
            create_app(settings),
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,  # keep our JSON logging
            access_log=False,
            lifespan="on",
            # HTTPS served by the gateway itself when given a certificate (else plain HTTP, e.g. behind a
            # reverse proxy that terminates TLS: docs/deploy.md).
            ssl_certfile=str(settings.http_tls_cert) if settings.http_tls_cert else None,
            ssl_keyfile=str(settings.http_tls_key) if settings.http_tls_key else None,
        )
        listener = start_listener(settings)
        if settings.dicom_processes > 1:
            receivers = ReceiverProcesses(settings, settings.dicom_processes - 1, listener.association_count).start()
            listener.dispatch = receivers.dispatch
        monitor = StabilityMonitor(settings).start()
        stop.server = uvicorn.Server(config)
        if not stop.requested.is_set():
            stop.server.run()
    finally:
        log_event(log, "gateway.stopping")
        if receivers is not None:
            receivers.stop_accepting()  # all processes stop together, not one after the other's 30 s
        if listener is not None:
            listener.shutdown()
        if receivers is not None:
            receivers.shutdown()
        if monitor is not None:
            monitor.stop()
        abandoned = executor is not None and not queue.stop_executor(timeout=5.0)
        dispose_engines()
        log_event(log, "gateway.stopped", abandoned_task=abandoned)
    if abandoned:
        # A scoring job is still inside torch. Letting the interpreter tear down under it aborts the process
        # natively ("terminate called without an active exception"); its study keeps its lease in the db and
        # is taken over at the next start, so leave at once, cleanly, after flushing the logs.
        logging.shutdown()
        os._exit(0)
    return 0
