"""Shared pytest fixtures: paths to the real CT fixtures and small temp datasets."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras_livseg  # noqa: E402,F401  before any test imports TensorFlow: the package's oneDNN default
from keras_livseg.training.multi_worker import free_loopback_port  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = PROJECT_ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The read-only real CT fixtures in ``../shared/data/real`` (skip when absent)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real CT fixtures not found at {REAL_DATA}; they live in ../shared/data/real")
    return REAL_DATA


@pytest.fixture
def strip_spacing() -> Callable[[Path], Path]:
    """Rewrite a NIfTI file as an export that lost its spacing: ``pixdim`` 0, no sform or qform.

    nibabel reads such a header as 1 mm voxels (it logs "setting 0 dims to 1"); the returned
    function checks that the file really holds the zeros.
    """
    import nibabel as nib
    import numpy as np

    def strip(path: Path) -> Path:
        stripped = nib.Nifti1Image(np.asanyarray(nib.load(str(path)).dataobj), None)
        stripped.header.set_sform(None, code=0)
        stripped.header.set_qform(None, code=0)
        stripped.header["pixdim"][1:4] = 0.0  # after the constructor, which would fill them in
        nib.save(stripped, str(path))
        with nib.openers.ImageOpener(str(path)) as stream:
            raw = nib.Nifti1Header.from_fileobj(stream, check=False)
        assert list(raw["pixdim"][1:4]) == [0.0, 0.0, 0.0] and raw["sform_code"] == raw["qform_code"] == 0
        return path

    return strip


#: XLA flags for a child process on the JAX backend in a test: compile fast rather than run fast.
#: A test's tensors are tiny, so compiling is nearly all of its time, and under JAX even building a
#: model compiles every initializer op by op: a 7,407-parameter U-Net took 23 s to build with
#: LLVM's default optimisation and 3.7 s with these (the HLO passes, and so the results, are the same).
JAX_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture
def jax_env() -> dict[str, str]:
    """The environment for a child process on the JAX backend (CPU, fast compiles, the project importable)."""
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": JAX_FAST_COMPILE,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def start_server(tmp_path):
    """Start a server process on a free loopback port and stop it after the test.

    ``start_server(command, ready, timeout=60)``: ``command(port)`` gives the argv, ``ready(port)``
    returns True once the server answers (it may raise ``OSError`` until then). Returns
    ``(process, port)``. A port can be taken by another process between the probe and the
    server's bind; when the server exits before it is ready, it is started again on another port
    (three tries), so a busy machine does not fail the test. Its output goes to a log file whose
    tail is shown when it never becomes ready.
    """
    started: list[subprocess.Popen] = []

    def start(command: Callable[[int], list[str]], ready: Callable[[int], bool], timeout: float = 60.0):
        log_path = tmp_path / f"server-{len(started)}.log"
        for _ in range(3):
            port = free_loopback_port()
            with log_path.open("wb") as log:
                process = subprocess.Popen(command(port), stdout=log, stderr=subprocess.STDOUT)
            started.append(process)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if ready(port):
                        return process, port
                except OSError:
                    pass
                time.sleep(0.5)
            if process.poll() is None:
                break  # alive but never ready: a real failure, not a port race
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.is_file() else ""
        pytest.fail(f"server {command(0)[0]} did not become ready within {timeout:.0f} s:\n{tail}")

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
