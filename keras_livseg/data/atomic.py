"""Files that appear whole or not at all.

Every file another step reads (manifests, run records, checkpoints, reports, predictions) is
written under a temporary name in its own folder and then renamed over the final name. A rename
within one file system is atomic: a reader, or a run resumed after a kill, sees the old file or
the new one, never half of one.

The temporary name is ``.partial-<name>``: hidden, in the same folder (so the rename never
crosses file systems), and ending like the final name, because Keras and matplotlib choose the
format from the ending. Writers that may run at once for one file (worker processes sharing a
cache) ask for a ``unique`` name, which adds the process id. Processes that would make the same
folder of many files (two runs of one recipe started together on an empty cache) take turns
through :func:`one_maker`; :func:`make_once` is the usual check, lock, check again, make.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_json(folder / "state.json", {"epoch": 3}).read_text()
    '{\\n "epoch": 3\\n}\\n'
    >>> with atomic_path(folder / "notes.txt") as partial:
    ...     _ = partial.write_text("whole")
    >>> sorted(p.name for p in folder.iterdir())
    ['notes.txt', 'state.json']
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["partial_path", "atomic_path", "atomic_write_text", "atomic_write_json", "one_maker", "make_once"]

logger = logging.getLogger(__name__)


def partial_path(path: str | os.PathLike, *, unique: bool = False) -> Path:
    """The temporary name :func:`atomic_path` writes ``path`` under, beside it."""
    path = Path(path)
    prefix = f".partial-{os.getpid()}-" if unique else ".partial-"
    return path.with_name(prefix + path.name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, unique: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path``, on error deleted.

    The folder is created if needed. A temporary file left by a killed process is written over
    by the next write (unless ``unique``) and is never read: only the final name is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path, unique=unique)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, *, unique: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path, unique=unique) as partial:
        partial.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, payload: Any, *, sort_keys: bool = False,
                      default: Callable[[Any], Any] | None = None, unique: bool = False) -> Path:
    """Write ``payload`` as JSON (indent 1, a final newline) to ``path`` atomically; returns ``path``."""
    text = json.dumps(payload, indent=1, sort_keys=sort_keys, default=default) + "\n"
    return atomic_write_text(path, text, unique=unique)


@contextlib.contextmanager
def one_maker(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Run the block in one process at a time for ``folder``: a lock on ``.<folder name>.lock`` beside it.

    A cached folder is made by whichever run first finds it missing. Two runs started together
    would both make it, writing the same temporary files (one of them then fails) or, for the
    phantom, files with other times and so other cache keys downstream. Inside this block the
    second run waits until the first is done, then finds the finished folder and reuses it.
    The lock is the operating system's (POSIX ``flock``): it ends with the process that holds
    it (or closes the file), so a killed run never leaves the folder locked. The lock file stays
    (it is empty). It guards processes on one machine; where there is no ``flock`` (Windows, some
    network file systems) the block runs unguarded.

    Args:
        folder: the folder the block makes.
        what: its name in the log line of a process that waits, e.g. ``"the shards"``.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp()) / "shards"
        >>> with one_maker(folder, "the shards"):
        ...     folder.mkdir()
        >>> sorted(p.name for p in folder.parent.iterdir())
        ['.shards.lock', 'shards']
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = Path(folder)
    lock = folder.with_name(f".{folder.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process making %s in %s", what, folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # a network file system without flock (ENOLCK, EOPNOTSUPP)
            logger.warning("%s: no lock on this file system (%s); making %s unguarded: start runs that share "
                           "this cache one after the other", lock, error.strerror or error, what)
        yield


def make_once(folder: str | os.PathLike, finished: str | os.PathLike, what: str, make: Callable[[], object]) -> bool:
    """Call ``make()`` unless ``finished`` (the file written last) exists, one process at a time.

    Finished work is seen without the lock, so a read-only cache works; a process that waited
    for :func:`one_maker` looks again and finds the other's work. Returns whether it called ``make``.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp()) / "phantom"
        >>> make = lambda: (folder.mkdir(), (folder / "phantom.json").write_text("{}"))
        >>> make_once(folder, folder / "phantom.json", "the phantom", make), make_once(folder, folder / "phantom.json", "the phantom", make)
        (True, False)
    """
    if Path(finished).exists():
        return False
    with one_maker(folder, what):
        if Path(finished).exists():  # made by another process while this one waited
            return False
        make()
        return True
