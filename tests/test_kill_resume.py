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
    # Kill times are drawn against one uninterrupted run: under load a kill may come after the end.
    # Every attempt is killed or finishes; a failed export is an error (asserted below).
    assert rows["export"]["kills"] + rows["export"]["finished_early"] == 2
    assert rows["export"]["half_written_versions"] == [] and rows["export"]["bytes_lost"] == 0
    assert all(row["error"] is None for row in rows.values())


@pytest.mark.slow
def test_the_fit_that_kill_resume_kills_runs_to_the_end(tmp_path):
    # --quick leaves fit out (it takes minutes): its uninterrupted reference run must still work
    # with the default recipe of the day, or the full benchmark fails before its first kill.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kill_resume import FIT_ARGS

    done = subprocess.run([sys.executable, "-m", "keras_livseg.fit", *FIT_ARGS, "--epochs", "1",
                           "--runs-dir", str(tmp_path / "runs"), "--name", "reference"],
                          env={**os.environ, "KERAS_LIVSEG_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    history = (tmp_path / "runs" / "reference" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and history[1].startswith("0,")
    assert (tmp_path / "runs" / "reference" / "complete.json").is_file()
