"""Receiving processes: more than one process serving DICOM associations on one port (PostgreSQL only).

Why: one listener process serves every association on threads that share one interpreter lock. With four or
eight associations sending at once, that lock, not the cores or the disk, limits the rate (the machine stayed
~25 % idle: docs/bench/ingest.md). `BTD_DICOM_PROCESSES=N` makes `btd serve` start N-1 receiving processes
beside its own listener (unset: 2 on PostgreSQL with two usable cores, core/settings.py). The gateway still
accepts every connection on the port; it serves it itself or hands it (the socket's descriptor, over a Unix
socket pair) to the receiving process with the fewest associations, so four associations from a PACS spread 2
+ 2 instead of wherever the kernel wakes first (measured: a shared listening socket gave 1 + 3 and 3 + 5
splits). A receiving process is a complete listener (`start_listener(listen=False)`): it spools, records and
answers its instances exactly as the gateway's own does, with its own group commit and database connection.
Hence PostgreSQL: SQLite has one writer at a time, and processes queueing for its lock would sleep in its busy
handler instead of sharing a commit (core/settings.py refuses the combination).

What the gateway keeps doing for all of them: the REST API and the stability monitor (they read what every
process committed), and the metrics: each receiving process sends its btd_ counters every few seconds on
its stdout, and `/metrics` shows them with a `worker="receiver-<n>"` label, as it shows Celery workers'
(core/observability/fleet.py).

Lifecycle: a receiving process that dies (a crash, the OOM killer) is started again after a second (the
wait doubles, up to a minute, while it keeps dying soon after its start); its
associations are aborted, and an instance it had not answered is resent by the peer (nothing acknowledged
is not durable); meanwhile, and whenever a hand-over fails, the gateway serves the connection itself. The
gateway's shutdown stops every process the way it stops its own listener: no new association, the
instances in flight answered, then exit. A receiving process whose gateway disappears (the socket pair
closes) shuts itself down the same way.

Each process allows 64 associations at once (the listener's limit), so the port takes 64 x N.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from core.observability.fleet import Heartbeat, own_metrics
from core.observability.logs import configure_logging, log_event
from core.settings import Settings

log = logging.getLogger("btd.listener")

METRICS_SECONDS = 5.0  # how often a receiving process sends its counters to the gateway
RESTART_DELAY_SECONDS = 1.0  # wait before starting a receiving process that died again
# A process that dies again within STEADY_SECONDS of its start doubles the wait, up to MAX_RESTART_DELAY_SECONDS:
# one that cannot start (a broken setting, a missing library) must not cost the machine a start-up a second.
MAX_RESTART_DELAY_SECONDS = 60.0
STEADY_SECONDS = 60.0
_CHANNEL_FD_ENV = "BTD_RECEIVER_CHANNEL_FD"
_NAME_ENV = "BTD_RECEIVER_NAME"
_ENDED = b"ended"  # a receiving process tells the gateway that one of its associations ended

_running: list[ReceiverProcesses] = []  # those of this process's gateway, for `/metrics`
_running_lock = threading.Lock()


def receiver_metrics() -> list[Heartbeat]:
    """The latest btd_ counters of every receiving process this gateway runs (empty with one process)."""
    with _running_lock:
        running = list(_running)
    return [beat for receivers in running for beat in receivers.metrics()]


@dataclass(eq=False)
class _Receiver:
    """One receiving process as the gateway sees it."""

    name: str
    process: subprocess.Popen[bytes]
    channel: socket.socket  # the gateway's end of the socket pair: connections out, "ended" back
    active: int = 0  # associations handed over and not yet ended
    metrics: Heartbeat | None = None
    alive: bool = True
    started: float = field(default_factory=time.monotonic)
    restart_delay: float = RESTART_DELAY_SECONDS  # the wait after this one dies


class ReceiverProcesses:
    """Starts, feeds, watches and stops the extra receiving processes of one gateway.

    `dispatch` is the gateway listener's hook (DicomServer.dispatch): called on its accept thread for each
    new connection, it returns False to let the gateway serve it, True once a receiving process has it."""

    def __init__(self, settings: Settings, count: int, own_associations: Any) -> None:
        self.settings = settings
        self.count = count
        self.own_associations = own_associations  # () -> the gateway listener's association count
        self._receivers: dict[str, _Receiver] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._turn = itertools.count()
        self._threads: list[threading.Thread] = []
        self._watcher = threading.Thread(target=self._watch, name="btd-receivers", daemon=True)
        self.restarts = 0
        self.handed_over = 0

    def start(self) -> ReceiverProcesses:
        for index in range(1, self.count + 1):
            self._spawn(f"receiver-{index}")
        self._watcher.start()
        with _running_lock:
            _running.append(self)
        return self

    def pids(self) -> list[int]:
        with self._lock:
            return [receiver.process.pid for receiver in self._receivers.values()]

    def metrics(self) -> list[Heartbeat]:
        """The latest counters of every live receiving process (for `/metrics`)."""
        with self._lock:
            return [r.metrics for r in self._receivers.values() if r.metrics is not None and r.alive]

    # -------------------------------------------------------------------------------- hand-over

    def dispatch(self, connection: socket.socket, address: Any) -> bool:
        """Hand `connection` to the least busy process; False: the gateway's own listener serves it.

        Ties go round: four associations arriving together spread evenly. A hand-over that fails (the
        process just died) leaves the connection with the gateway, never lost."""
        if self._stopping.is_set():
            return False
        with self._lock:
            candidates: list[tuple[int, int, _Receiver | None]] = [(self.own_associations(), 0, None)]
            candidates += [(r.active, i + 1, r) for i, r in enumerate(self._receivers.values()) if r.alive]
            turn = next(self._turn) % len(candidates)
            _, _, chosen = min(candidates, key=lambda c: (c[0], (c[1] - turn) % len(candidates)))
            if chosen is None:
                return False
            try:
                socket.send_fds(chosen.channel, [json.dumps(list(address)[:2]).encode()], [connection.fileno()])
            except OSError as exc:
                chosen.alive = False
                log_event(log, "receiver.handover_failed", logging.WARNING, receiver=chosen.name, error=str(exc))
                return False
            chosen.active += 1
            self.handed_over += 1
        connection.close()  # the receiving process holds its own descriptor of the connection now
        return True

    # -------------------------------------------------------------------------------- processes

    def _spawn(self, name: str, restart_delay: float = RESTART_DELAY_SECONDS) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            env = dict(os.environ, **{_CHANNEL_FD_ENV: str(theirs.fileno()), _NAME_ENV: name})
            process = subprocess.Popen(
                [sys.executable, "-m", "service.dicom.receivers"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        finally:
            theirs.close()
        assert process.stdin is not None and process.stdout is not None
        # The settings travel whole, on stdin (a gateway built from code has settings the environment lacks).
        process.stdin.write(self.settings.model_dump_json().encode() + b"\n")
        process.stdin.close()
        receiver = _Receiver(name, process, ours, restart_delay=restart_delay)
        with self._lock:
            self._receivers[name] = receiver
        self._threads = [thread for thread in self._threads if thread.is_alive()]  # a dead process's readers
        for target, what in ((self._read_metrics, "metrics"), (self._read_ended, "ended")):
            thread = threading.Thread(target=target, args=(receiver,), name=f"btd-{name}-{what}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log_event(log, "receiver.started", receiver=name, pid=process.pid)

    def _read_metrics(self, receiver: _Receiver) -> None:
        """Keep the latest counters a receiving process sent (one JSON line each time)."""
        assert receiver.process.stdout is not None
        for line in receiver.process.stdout:
            try:
                beat = Heartbeat(receiver.name, ("dicom",), time.time(), str(json.loads(line)["metrics"]))
            except (ValueError, KeyError, TypeError):
                continue
            with self._lock:
                receiver.metrics = beat

    def _read_ended(self, receiver: _Receiver) -> None:
        """Count the associations a receiving process finished; its end of the pair closing means it died."""
        while True:
            try:
                message = receiver.channel.recv(64)
            except OSError:
                message = b""
            if not message:
                with self._lock:
                    receiver.alive = False
                return
            if message == _ENDED:
                with self._lock:
                    receiver.active = max(0, receiver.active - 1)

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                dead = [r for r in self._receivers.values() if r.process.poll() is not None]
            for receiver in dead:
                if self._stopping.is_set():
                    return
                log_event(
                    log,
                    "receiver.exited",
                    logging.ERROR,
                    receiver=receiver.name,
                    pid=receiver.process.pid,
                    returncode=receiver.process.returncode,
                )
                with self._lock:
                    receiver.alive = False
                    self._receivers.pop(receiver.name, None)
                self._close(receiver)
                delay = receiver.restart_delay
                if time.monotonic() - receiver.started >= STEADY_SECONDS:
                    delay = RESTART_DELAY_SECONDS  # it ran steadily: a fresh failure, not a crash loop
                if self._stopping.wait(delay):
                    return
                self.restarts += 1
                self._spawn(receiver.name, restart_delay=min(MAX_RESTART_DELAY_SECONDS, 2 * delay))

    def stop_accepting(self) -> None:
        """Tell every receiving process to stop (SIGTERM: no new association, the instances in flight
        answered) without waiting; from now on the gateway hands nothing over and restarts nothing."""
        self._stopping.set()
        if self._watcher.is_alive() and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        with self._lock:
            receivers = list(self._receivers.values())
        for receiver in receivers:
            if receiver.process.poll() is None:
                receiver.process.send_signal(signal.SIGTERM)
        with _running_lock:
            if self in _running:
                _running.remove(self)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop every receiving process: each answers what it holds and exits; one still running after
        `timeout` seconds is killed (its unanswered instances are resent by their peers)."""
        self.stop_accepting()
        with self._lock:
            receivers = list(self._receivers.values())
        deadline = time.monotonic() + timeout
        for receiver in receivers:
            try:
                receiver.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log_event(log, "receiver.killed", logging.ERROR, receiver=receiver.name, pid=receiver.process.pid)
                receiver.process.kill()
                receiver.process.wait()
            self._close(receiver)
        for thread in self._threads:
            thread.join(timeout=5)
        log_event(log, "receivers.stopped", count=len(receivers), restarts=self.restarts, handed_over=self.handed_over)

    @staticmethod
    def _close(receiver: _Receiver) -> None:
        with contextlib.suppress(OSError):
            receiver.channel.shutdown(socket.SHUT_RDWR)  # wakes its reader thread
        with contextlib.suppress(OSError):
            receiver.channel.close()
        if receiver.process.stdout is not None:
            with contextlib.suppress(OSError):
                receiver.process.stdout.close()


# ------------------------------------------------------------------------------- the receiving process


def _send_metrics(out: IO[bytes]) -> None:
    """One JSON line of this process's btd_ counters to the gateway (only the main thread writes stdout)."""
    out.write(json.dumps({"metrics": own_metrics()}).encode() + b"\n")
    out.flush()


def _serve_handed_over(channel: socket.socket, server: Any, stop: threading.Event) -> None:
    """Take each connection the gateway hands over and serve it; tell the gateway when it ends. The pair
    closing (the gateway stopped or died) stops this process."""
    channel_lock = threading.Lock()

    def serve(sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            server.serve_connection(sock, address)
        finally:
            with channel_lock, contextlib.suppress(OSError):
                channel.send(_ENDED)

    while not stop.is_set():
        try:
            message, fds, _flags, _address = socket.recv_fds(channel, 4096, 1)
        except OSError:
            break
        if not message and not fds:
            break  # the gateway's end closed
        for fd in fds[1:]:
            os.close(fd)
        if not fds:
            continue
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(True)
        host, port = json.loads(message)
        threading.Thread(target=serve, args=(sock, (str(host), int(port))), name="btd-association", daemon=True).start()
    stop.set()


def main() -> int:
    """A receiving process: the settings arrive on stdin, the socket pair as an inherited descriptor."""
    settings = Settings.model_validate_json(sys.stdin.buffer.readline())
    configure_logging(settings.log_level)
    name = os.environ.get(_NAME_ENV, "receiver")
    channel = socket.socket(fileno=int(os.environ[_CHANNEL_FD_ENV]))

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    from core.db.session import dispose_engines
    from service.dicom.listener import start_listener

    out = sys.stdout.buffer
    server = start_listener(settings, listen=False)
    threading.Thread(target=_serve_handed_over, args=(channel, server, stop), name="btd-handover", daemon=True).start()
    log_event(log, "receiver.serving", receiver=name, pid=os.getpid())
    try:
        while not stop.wait(METRICS_SECONDS):
            try:
                _send_metrics(out)
            except (ValueError, OSError):  # the gateway is gone
                break
    finally:
        server.shutdown()
        dispose_engines()
        with contextlib.suppress(ValueError, OSError):  # the gateway may be gone
            _send_metrics(out)  # the last counts, instances answered during the shutdown included
        log_event(log, "receiver.stopped", receiver=name, pid=os.getpid())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
