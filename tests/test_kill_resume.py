"""Killed commands leave nothing half-written (benchmarks/kill_resume.py, a few kills each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_killed_prepare_and_export_lose_nothing(tmp_path):
    env = {**os.environ, "KERAS_LIVSEG_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kill_resume.py"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {row["command"]: row for row in json.loads((tmp_path / "kill_resume.json").read_text())["rows"]}
    assert set(rows) == {"prepare", "export"}
    assert rows["prepare"]["bytes_lost"] == 0 and rows["prepare"]["differing_files"] == []
    assert rows["prepare"]["kills"] + rows["prepare"]["finished_early"] == 2
    assert rows["export"]["kills"] >= 1 and rows["export"]["half_written_versions"] == []
    assert all(row["error"] is None for row in rows.values())
