"""Fixtures of the data-stage tests."""

from pathlib import Path

import pytest

from data_helpers import write_case


@pytest.fixture
def lits_dir(tmp_path: Path) -> Path:
    """Six tiny LiTS cases, two without tumor."""
    src = tmp_path / "lits"
    for i in range(6):
        write_case(src, str(i), seed=i, tumor=i % 3 != 2)
    return src
