"""The test harness itself: each pytest-xdist worker gets its share of the cores (tests/harness.py)."""

from __future__ import annotations

import os

import pytest
from harness import share_the_cores

THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


@pytest.fixture
def bare_environment(monkeypatch):
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    return monkeypatch


@pytest.mark.parametrize("workers, threads", [("2", "8"), ("3", "5"), ("32", "1")])
def test_each_worker_gets_its_share_of_the_cores(bare_environment, workers, threads):
    bare_environment.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
    assert share_the_cores() == {name: threads for name in THREAD_VARIABLES}
    assert all(os.environ[name] == threads for name in THREAD_VARIABLES)


def test_one_process_and_a_users_own_setting_are_left_alone(bare_environment):
    bare_environment.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert share_the_cores() == {} and not any(name in os.environ for name in THREAD_VARIABLES)
    bare_environment.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    bare_environment.setenv("OMP_NUM_THREADS", "4")
    assert share_the_cores() == {"TF_NUM_INTRAOP_THREADS": "8", "TF_NUM_INTEROP_THREADS": "8"}
    assert os.environ["OMP_NUM_THREADS"] == "4"
