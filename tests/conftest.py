"""Shared pytest fixtures: paths to the real CT fixtures and small temp datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = PROJECT_ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The read-only real CT fixtures in ``../shared/data/real`` (skip when absent)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real CT fixtures not found at {REAL_DATA}; they live in ../shared/data/real")
    return REAL_DATA
