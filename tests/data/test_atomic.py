import errno
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from keras_livseg.data.atomic import atomic_path, atomic_write_json, atomic_write_text, make_once, one_maker, partial_path


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


# A process that holds the lock for `hold` seconds, noting when it got in (a file of its own, at
# once, so that the test knows it is inside) and when it left.
_MAKER = """
import pathlib, sys, time
from keras_livseg.data.atomic import one_maker
folder, log, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
with one_maker(folder, "the test folder"):
    entered = time.time()
    pathlib.Path(log + ".inside").touch()
    time.sleep(hold)
    left = time.time()
open(log, "w").write(f"{entered} {left}")
"""


def test_one_maker_lets_one_process_at_a_time_make_a_folder(tmp_path):
    pytest.importorskip("fcntl")  # POSIX only; elsewhere the block runs unguarded
    folder = tmp_path / "shards"
    first = subprocess.Popen([sys.executable, "-c", _MAKER, str(folder), str(tmp_path / "first"), "1.5"])
    try:
        deadline = time.time() + 120
        while not (tmp_path / "first.inside").exists() and time.time() < deadline:
            time.sleep(0.02)
        second = subprocess.run([sys.executable, "-c", _MAKER, str(folder), str(tmp_path / "second"), "0"], timeout=120)
        assert first.wait(timeout=120) == 0 and second.returncode == 0
    finally:
        first.kill()
    first_in, first_out = map(float, (tmp_path / "first").read_text().split())
    second_in, _ = map(float, (tmp_path / "second").read_text().split())
    assert second_in >= first_out > first_in
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".shards.lock"]


def test_one_maker_without_a_lock_on_the_file_system_warns_and_runs_the_block(tmp_path, monkeypatch, caplog):
    fcntl = pytest.importorskip("fcntl")

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with caplog.at_level(logging.WARNING, logger="keras_livseg.data.atomic"):
        with one_maker(tmp_path / "phantom", "the phantom"):
            ran.append(True)
    assert ran == [True]
    assert "no lock on this file system (No locks available); making the phantom unguarded" in caplog.text


def test_make_once_makes_what_is_missing_and_reuses_it_without_the_lock(tmp_path, monkeypatch):
    from keras_livseg.data import atomic

    made = []
    make = lambda: (made.append(1), atomic_write_text(tmp_path / "phantom" / "phantom.json", "{}"))  # noqa: E731
    assert make_once(tmp_path / "phantom", tmp_path / "phantom" / "phantom.json", "the phantom", make)

    def no_lock(folder, what):
        raise AssertionError("finished work was read under the lock")

    monkeypatch.setattr(atomic, "one_maker", no_lock)
    assert not make_once(tmp_path / "phantom", tmp_path / "phantom" / "phantom.json", "the phantom", make)
    assert made == [1]
