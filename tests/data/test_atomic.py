import json
import os

import pytest

from keras_livseg.data.atomic import atomic_path, atomic_write_json, atomic_write_text, partial_path


def test_a_write_appears_whole_and_leaves_no_temporary_file(tmp_path):
    path = atomic_write_text(tmp_path / "deep" / "notes.txt", "whole\n")
    assert path.read_text() == "whole\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["notes.txt"]
    atomic_write_json(tmp_path / "b.json", {"z": 1, "a": [2.5]}, sort_keys=True)
    assert (tmp_path / "b.json").read_text() == '{\n "a": [\n  2.5\n ],\n "z": 1\n}\n'
    assert json.loads((tmp_path / "b.json").read_text()) == {"z": 1, "a": [2.5]}


def test_a_write_that_fails_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "state.json", "old")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"not json": object()})
    with pytest.raises(RuntimeError, match="killed"), atomic_path(path) as partial:
        partial.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_the_temporary_name_is_hidden_beside_the_file_and_keeps_its_ending(tmp_path):
    target = tmp_path / "best.keras"
    assert partial_path(target) == tmp_path / ".partial-best.keras"
    unique = partial_path(target, unique=True)
    assert unique.parent == tmp_path and unique.name.startswith(".") and unique.name.endswith(".keras")
    assert str(os.getpid()) in unique.name and unique != partial_path(target)
    # A temporary file left by a killed writer is written over, never read.
    partial_path(target).write_text("dead")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and not partial_path(target).exists()
