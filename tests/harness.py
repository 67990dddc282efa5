"""Set-up of the test processes themselves, read by tests/conftest.py before anything imports TensorFlow."""

from __future__ import annotations

import os


def share_the_cores() -> dict[str, str]:
    """Under pytest-xdist, each worker's thread counts: its share of the cores, at least one.

    TensorFlow, oneDNN, OpenMP (PyTorch, BLAS) each start a thread per core in every process, so
    two workers on two cores ran four busy threads that took the cores from each other: a tiny
    fit took 58 s in the suite and 8 s alone, and two test files ran 17 % faster side by side with
    one thread each. The environment is read once, when each library starts, and the worker's
    child processes inherit it. Set a variable yourself to override it; ``-n 0`` changes nothing.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers < 2:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(1, cores // workers))
    chosen = {name: threads for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
              if name not in os.environ}
    os.environ.update(chosen)
    return chosen
