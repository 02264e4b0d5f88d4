"""Settings read from the environment with the BTD_ prefix (names are a contract, docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("BTD_AE_TITLE", "BTD_DICOM_PORT", "BTD_HTTP_PORT", "BTD_STABLE_SECONDS", "BTD_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BTD_DATA_DIR", str(tmp_path))
    s = Settings()
    assert (s.ae_title, s.dicom_port, s.http_port, s.stable_seconds, s.queue_name) == ("BTD", 11112, 8000, 30, "btd")
    assert s.database_url == f"sqlite:///{tmp_path.resolve()}/btd.sqlite3"
    assert s.broker_url is None and s.model is None and s.api_token is None
    assert s.allowed_aets == [] and s.allowed_ips == [] and s.destinations == []


def test_lists_are_comma_separated_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BTD_ALLOWED_AETS", "PACS1, PACS2,,")
    monkeypatch.setenv("BTD_ALLOWED_IPS", "127.0.0.1")
    monkeypatch.setenv("BTD_DESTINATIONS", "ORTHANC@127.0.0.1:4242,PACS@10.0.0.2:104")
    s = Settings()
    assert s.allowed_aets == ["PACS1", "PACS2"]
    assert s.allowed_ips == ["127.0.0.1"]
    assert s.destinations == ["ORTHANC@127.0.0.1:4242", "PACS@10.0.0.2:104"]


def test_every_contract_name_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    values = {
        "AE_TITLE": "GATE",
        "DICOM_HOST": "127.0.0.2",
        "DICOM_PORT": "4104",
        "HTTP_HOST": "0.0.0.0",
        "HTTP_PORT": "9000",
        "DATA_DIR": str(tmp_path),
        "DATABASE_URL": "postgresql+psycopg2://root@127.0.0.1/btd",
        "BROKER_URL": "redis://127.0.0.1:6379/0",
        "STABLE_SECONDS": "2.5",
        "MODEL": "/models/ct.pt",
        "MIN_FREE_BYTES": "123",
        "API_TOKEN": "secret",
        "QUEUE_NAME": "q",
        "VISIBILITY_TIMEOUT": "99",
        "MONITOR_INTERVAL": "0.2",
        "EXPOSE_PATIENT_IDS": "true",
        "DEVICE": "cpu",
        "KOS_ENABLED": "1",
        "DELIVERY_RETRIES": "2",
        "DELIVERY_BACKOFF_SECONDS": "1.5",
        "LOG_LEVEL": "DEBUG",
    }
    for key, value in values.items():
        monkeypatch.setenv(f"BTD_{key}", value)
    s = Settings()
    assert s.ae_title == "GATE" and s.dicom_host == "127.0.0.2" and s.dicom_port == 4104
    assert s.http_host == "0.0.0.0" and s.http_port == 9000 and s.data_dir == tmp_path
    assert s.database_url == values["DATABASE_URL"] and s.broker_url == values["BROKER_URL"]
    assert s.stable_seconds == 2.5 and s.model == "/models/ct.pt" and s.min_free_bytes == 123
    assert s.api_token == "secret" and s.queue_name == "q" and s.visibility_timeout == 99
    assert s.monitor_interval == 0.2 and s.expose_patient_ids is True and s.device == "cpu"
    assert s.kos_enabled is True and s.delivery_retries == 2 and s.delivery_backoff_seconds == 1.5
    assert s.log_level == "DEBUG"
