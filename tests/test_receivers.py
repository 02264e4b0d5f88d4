"""BTD_DICOM_PROCESSES: receiving processes beside the gateway's listener, on one port, on PostgreSQL.

Real `btd serve` processes, real PostgreSQL, real associations from btd's sender and from dcmtk's storescu.
What must hold: every instance answered 0x0000 is stored once (row and file), whichever process took its
association; a receiving process that dies is replaced and the port keeps serving; the gateway's stop
stops every receiving process; the counters of every process reach `/metrics`; SQLite refuses the setting.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from helpers_gateway import GatewayProcess, postgres_database, wait_until
from sqlalchemy import func, select

from core.db.schema import Instance
from core.db.session import dispose_engines, session_scope
from core.dicom import scu, sender
from core.settings import Settings

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SERIES = Path(__file__).parent / "fixtures" / "ct_series_20"


def _receiving_processes(gateway: GatewayProcess) -> list[int]:
    """The gateway's child processes that are receiving processes (by their environment)."""
    assert gateway.proc is not None
    pid = gateway.proc.pid
    found = []
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():  # a child started by a thread is listed under that thread
        with contextlib.suppress(OSError):
            children += (task / "children").read_text().split()
    for child in children:
        try:
            if b"BTD_RECEIVER_NAME=" in Path(f"/proc/{child}/environ").read_bytes():
                found.append(int(child))
        except OSError:
            continue
    return found


def _serving(gateway: GatewayProcess, pid: int) -> bool:
    return f'"event": "receiver.serving", "receiver": "receiver-1", "pid": {pid}' in gateway.log_text()


def _stored(settings: Settings) -> int:
    with session_scope(settings) as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def _accepted_by_receivers(gateway: GatewayProcess) -> float:
    """Associations the receiving processes accepted, as `/metrics` shows them (label worker=receiver-N)."""
    text = httpx.get(f"http://127.0.0.1:{gateway.http_port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("btd_associations_total{") and 'worker="receiver-' in line and 'outcome="accepted"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_processes_on_one_port_store_everything_once_and_survive_a_dead_receiver(tmp_path: Path) -> None:
    with postgres_database() as url:
        data_dir = tmp_path / "gw"
        gateway = GatewayProcess(
            data_dir, database_url=url, dicom_processes=2, stable_seconds=3600, min_free_bytes=0, log_level="INFO"
        )
        settings = Settings(data_dir=data_dir, database_url=url)
        try:
            gateway.start(timeout=120)
            [receiver] = wait_until(lambda: _receiving_processes(gateway), timeout=60, what="a receiving process")
            wait_until(lambda: _serving(gateway, receiver), timeout=60, what="the receiving process serving")

            # Many short associations, four at a time: the gateway hands some to the receiving process.
            files = sorted(SERIES.glob("CT.*"))
            for _round in range(6):
                results = sender.send_files(files, "127.0.0.1", gateway.dicom_port, "BTD", "RX", associations=4)
                assert len(results) == 20 and all(r.ok for r in results), [r.status for r in results if not r.ok]
            assert _stored(settings) == 20  # the 100 resends were recognised as duplicates, whoever took them
            wait_until(lambda: _accepted_by_receivers(gateway) > 0, timeout=30, what="receiver-1 in /metrics")

            # A receiving process killed outright is replaced; the port serves meanwhile and after. (An
            # association handed over in the instant of the kill dies with it: the peer sends again.)
            os.kill(receiver, signal.SIGKILL)
            wait_until(lambda: '"event": "receiver.exited"' in gateway.log_text(), timeout=30, what="exit seen")
            results = sender.send_files(files[:4], "127.0.0.1", gateway.dicom_port, "BTD", "RX2")
            assert all(r.ok for r in results)
            [replacement] = wait_until(
                lambda: [p for p in _receiving_processes(gateway) if p != receiver], timeout=60, what="a replacement"
            )
            wait_until(lambda: _serving(gateway, replacement), timeout=60, what="the replacement serving")
            if shutil.which("storescu"):  # dcmtk's sender too, over 4 associations at once (-xv: JPEG 2000)
                procs = [
                    subprocess.Popen(
                        ["storescu", "-xv", "-aec", "BTD", "-aet", f"DCMTK{k}", "127.0.0.1", str(gateway.dicom_port)]
                        + [str(f) for f in files[k::4]],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                    )
                    for k in range(4)
                ]
                outputs = [proc.communicate(timeout=120) for proc in procs]
                assert all(p.returncode == 0 for p in procs), [err[-500:] for _out, err in outputs]
            assert _stored(settings) == 20

            # Killed again soon after its start: a crash loop, so the next start waits twice as long (2 s).
            os.kill(replacement, signal.SIGKILL)
            [third] = wait_until(
                lambda: [p for p in _receiving_processes(gateway) if p not in (receiver, replacement)],
                timeout=60,
                what="a second replacement",
            )
            wait_until(lambda: _serving(gateway, third), timeout=60, what="the second replacement serving")
            exited = [_log_time(line) for line in gateway.log_text().splitlines() if '"receiver.exited"' in line]
            started = [_log_time(line) for line in gateway.log_text().splitlines() if '"receiver.started"' in line]
            assert len(exited) == 2 and len(started) == 3
            assert started[1] - exited[0] >= 1.0 and started[2] - exited[1] >= 2.0

            assert gateway.stop(timeout=60) == 0, gateway.log_text()[-2000:]
            assert _receiving_processes_alive(third) is False
            assert '"event": "receivers.stopped", "count": 1, "restarts": 2, "handed_over": ' in gateway.log_text()
            spool_files = [p for p in (data_dir / "spool").rglob("*.dcm") if "incoming" not in p.parts]
            assert len(spool_files) == 20
        finally:
            gateway.stop(timeout=60)
            dispose_engines()


def _accepted(gateway: GatewayProcess) -> tuple[float, float]:
    """(the gateway's own, the receiving processes') accepted associations, from `/metrics`."""
    text = httpx.get(f"http://127.0.0.1:{gateway.http_port}/metrics", timeout=10).text
    own = theirs = 0.0
    for line in text.splitlines():
        if line.startswith("btd_associations_total{") and 'outcome="accepted"' in line:
            if 'worker="receiver-' in line:
                theirs += float(line.rsplit(" ", 1)[1])
            elif "worker=" not in line:
                own += float(line.rsplit(" ", 1)[1])
    return own, theirs


def test_associations_open_together_are_spread_over_the_processes(tmp_path: Path) -> None:
    """Four associations held open at once: two with the gateway, two with the receiving process (the
    least busy process takes the next one), not wherever the kernel woke first."""
    with postgres_database() as url:
        gateway = GatewayProcess(tmp_path / "gw", database_url=url, dicom_processes=2, stable_seconds=3600)
        held: list[scu.Association] = []
        try:
            gateway.start(timeout=120)
            [receiver] = wait_until(lambda: _receiving_processes(gateway), timeout=60, what="a receiving process")
            wait_until(lambda: _serving(gateway, receiver), timeout=60, what="the receiving process serving")
            for k in range(4):
                held.append(
                    scu.Association.request(
                        "127.0.0.1", gateway.dicom_port, "BTD", f"HOLD{k}", [(CT_IMAGE, "1.2.840.10008.1.2.1")]
                    )
                )
            assert wait_until(lambda: _accepted(gateway) == (2.0, 2.0), timeout=30, what="a 2 + 2 split")
        finally:
            for association in held:
                association.release()
            gateway.stop(timeout=60)
            dispose_engines()


def _log_time(line: str) -> float:
    return datetime.fromisoformat(json.loads(line)["ts"]).timestamp()


def _receiving_processes_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_receiving_process_stops_when_its_gateway_disappears(tmp_path: Path) -> None:
    """SIGKILL of the gateway leaves no receiving process serving a port nobody watches (the socket pair
    closes)."""
    with postgres_database() as url:
        gateway = GatewayProcess(tmp_path / "gw", database_url=url, dicom_processes=2, stable_seconds=3600)
        try:
            gateway.start(timeout=120)
            [receiver] = wait_until(lambda: _receiving_processes(gateway), timeout=60, what="a receiving process")
            wait_until(lambda: _serving(gateway, receiver), timeout=60, what="the receiving process serving")
            assert gateway.proc is not None
            gateway.proc.kill()
            gateway.proc.wait(timeout=10)
            wait_until(lambda: not _receiving_processes_alive(receiver), timeout=60, what="the receiver gone")
            assert '"event": "receiver.stopped"' in gateway.log_text()
        finally:
            gateway.stop(timeout=60)
            dispose_engines()


def test_sqlite_refuses_several_receiving_processes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BTD_DICOM_PROCESSES > 1 needs a database server"):
        Settings(data_dir=tmp_path, dicom_processes=2)
    assert Settings(data_dir=tmp_path, dicom_processes=1).dicom_processes == 1


def test_default_two_processes_on_postgresql_one_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset (0), the number follows the database and the cores the process may use: SQLite takes one writer,
    and a single core gains nothing from a second interpreter."""
    server_url = "postgresql+psycopg2://btd@127.0.0.1:5432/btd"
    monkeypatch.setattr("core.settings._usable_cores", lambda: 2)
    assert Settings(data_dir=tmp_path).dicom_processes == 1
    assert Settings(data_dir=tmp_path, database_url=server_url).dicom_processes == 2
    assert Settings(data_dir=tmp_path, database_url=server_url, dicom_processes=1).dicom_processes == 1
    assert Settings(data_dir=tmp_path, database_url=server_url, dicom_processes=3).dicom_processes == 3
    monkeypatch.setattr("core.settings._usable_cores", lambda: 1)
    assert Settings(data_dir=tmp_path, database_url=server_url).dicom_processes == 1
