"""The container image, built and run for real with podman: deploy/image-check end to end.

Why a script and a test: a site (or an engineer) runs `deploy/image-check` by hand; the suite runs the same
script so that a change to the Dockerfile, a new system dependency, a path or the compose file's commands
and health checks cannot break the deployment unseen. The script builds the project's Dockerfile unchanged
(build arguments only), runs the gateway and a worker read-only as uid 10001 against this machine's
PostgreSQL and Redis, sends a real CT series with storescu and waits for the SR at a storescp PACS; it
exits 1 with the containers' last log lines when anything fails. These tests read its JSON report.

Needs podman, runc and debootstrap (installed by .ci/run) and runs as root (debootstrap, rootful podman);
skipped where podman is missing. The Debian base is cached under /var/cache/btd-image, podman keeps the
image's layers, so a run after the first takes about a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "image-check"
CPU_IMAGE_LIMIT = 1.2e9  # bytes; the CPU image's budget (docs/deploy.md)

pytestmark = [
    pytest.mark.container,
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (.ci/run installs it)"),
]


def image_check(*args: str, report: Path) -> subprocess.CompletedProcess:
    if os.geteuid() != 0:
        pytest.skip("deploy/image-check needs root (debootstrap, rootful podman)")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--report", str(report), *args],
        capture_output=True,
        text=True,
        timeout=1700,
    )


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One full run of the script (build, run, SR delivered); its report."""
    report = tmp_path_factory.mktemp("image") / "report.json"
    done = image_check(report=report)
    output = (done.stdout + done.stderr)[-8000:]
    assert done.returncode == 0, f"deploy/image-check failed:\n{output}"
    result = json.loads(report.read_text())
    result["output"] = output
    return result


def test_a_real_ct_series_goes_in_and_its_sr_reaches_the_pacs(checked: dict) -> None:
    assert checked["instances_sent"] >= 10
    assert checked["study"]["state"] == "DELIVERED"
    assert checked["study"]["n_instances"] == checked["instances_sent"]
    assert checked["study"]["verdict"]
    assert checked["seconds_to_first_sr"] > 0
    assert any(not line.endswith(" 0.0") for line in checked["metrics_received"])


def test_the_image_and_compose_health_checks_pass_inside_the_containers(checked: dict) -> None:
    assert checked["health_checks"] == {
        "image HEALTHCHECK (gateway)": 0,
        "compose healthcheck (gateway)": 0,
        "compose healthcheck (worker)": 0,
    }


def test_nothing_runs_as_root_and_data_belongs_to_the_image_user(checked: dict) -> None:
    for role, users in checked["process_users"].items():
        assert users and all("root" not in user.split() for user in users), role
    assert set(checked["data_owners"]) == {"10001:10001"}
    assert checked["data"]["spool_files"] >= checked["instances_sent"]
    assert checked["data"]["report_files"] >= 1
    assert checked["exit_codes"] == {"gateway": 0, "worker": 0}


def test_the_cpu_image_stays_within_its_size_budget(checked: dict) -> None:
    assert checked["image_size_bytes"] <= CPU_IMAGE_LIMIT, checked["largest_paths"]


def test_a_container_that_exits_fails_the_check_with_its_last_log_lines(checked: dict, tmp_path: Path) -> None:
    """Bad input: the gateway's database is unreachable, so `btd serve` exits while migrating. The image is
    the one built above (--no-build): the failure must come from the run, not from a build."""
    done = image_check(
        "--no-build",
        "--image",
        checked["image"],
        "--set",
        "gateway:BTD_DATABASE_URL=postgresql+psycopg2://btd@127.0.0.1:1/nowhere",
        "--health-timeout",
        "60",
        report=tmp_path / "report.json",
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-4000:]
    assert "the gateway container exited" in output
    assert "last 60 log lines of the gateway container" in output
    assert "127.0.0.1" in output and "port 1" in output.lower(), output[-4000:]
    assert "failure" in json.loads((tmp_path / "report.json").read_text())
