"""The benchmarks' shared helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_volumes_are_made_in_a_child_process(tmp_path):
    # A benchmark that made its volumes itself would pass its peak RSS on to every process it then
    # measures (ru_maxrss across vfork and exec): the phantom module must never load in the caller.
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import _common; "
            "folder = _common.phantom_volumes(2, size=32, slices=(4, 6)); "
            "print(folder, 'keras_livseg.data.phantom' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KERAS_LIVSEG_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    folder, loaded = done.stdout.split()
    assert loaded == "False"
    assert Path(folder) == tmp_path / "bench-phantom-2x32-4-6-s7"
    volumes = sorted(Path(folder).glob("volume-*.nii.gz"))
    assert len(volumes) == 2
    shapes = [nib.load(v).shape for v in volumes]
    assert all(shape[:2] == (32, 32) and 4 <= shape[2] <= 6 for shape in shapes)
