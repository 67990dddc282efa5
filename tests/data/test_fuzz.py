"""A fast subset of benchmarks/fuzz_inputs.py: broken files end in a result or one clear line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fuzz_inputs  # noqa: E402

PREPARE = {
    "pixdim negative": "result",  # a flip, read from the affine
    "sform singular, no qform": "refusal",
    "4D volume": "refusal",
    "huge dims, tiny data": "refusal",
    "dim[0] eight": "refusal",
    "datatype complex64": "refusal",
    "datatype float64 with NaN": "refusal",
    "labels out of range": "refusal",
    "labels other affine": "refusal",
    "vox_offset beyond the file": "refusal",
    "gzip stream cut short": "refusal",
    "truncated at byte 353": "refusal",
}
PREDICT = {
    "pixdim negative": "result",
    "huge dims, tiny data": "refusal",  # was a MemoryError: the header is now checked before any read
    "datatype complex64": "refusal",
    "truncated at byte 100": "refusal",
    "negative dim": "refusal",  # was an OverflowError traceback from the memory map
}


@pytest.mark.slow
@pytest.mark.parametrize("command, expected", [("prepare", PREPARE), ("predict", PREDICT)])
def test_broken_inputs_end_in_a_result_or_one_line(tmp_path, command, expected):
    rows = fuzz_inputs.run(list(expected), [command], tmp_path, progress=False)
    outcomes = {row["input"]: row["outcome"] for row in rows}
    assert outcomes == expected, [(r["input"], r["outcome"], r["message"]) for r in rows if r["outcome"] != expected[r["input"]]]
    for row in rows:
        if row["outcome"] == "refusal":
            assert row["message"].startswith(f"{command}: error: ") and "case-" in row["message"]  # names the file


def test_every_mutation_builds_a_case(tmp_path):
    for index, (name, mutation) in enumerate(fuzz_inputs.mutations().items()):
        folder = fuzz_inputs.make_case(tmp_path / f"c{index}", mutation)
        assert any(folder.glob("volume-0.nii*")), name


@pytest.mark.slow
def test_broken_dicom_series_end_in_one_line(real_data_dir, tmp_path):
    names = ["DICOM: two series mixed", "DICOM: pixel data cut short", "DICOM: a file emptied"]
    rows = fuzz_inputs.run(names, ["predict"], tmp_path, progress=False)
    assert [(row["input"], row["outcome"]) for row in rows] == [(name, "refusal") for name in names], rows
    assert all(row["message"].startswith("predict: error: ") for row in rows)
