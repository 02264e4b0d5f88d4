"""Shared test helpers: where fixtures live."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def ct_series_dir() -> Path:
    """The 20-slice real chest CT series (JPEG 2000 lossless)."""
    return FIXTURES / "ct_series_20"
