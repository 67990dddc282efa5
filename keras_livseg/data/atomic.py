"""Files that appear whole or not at all.

Every file another step reads (manifests, run records, checkpoints, reports, predictions) is
written under a temporary name in its own folder and then renamed over the final name. A rename
within one file system is atomic: a reader, or a run resumed after a kill, sees the old file or
the new one, never half of one.

The temporary name is ``.partial-<name>``: hidden, in the same folder (so the rename never
crosses file systems), and ending like the final name, because Keras and matplotlib choose the
format from the ending. Writers that may run at once for one file (worker processes sharing a
cache) ask for a ``unique`` name, which adds the process id.

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
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["partial_path", "atomic_path", "atomic_write_text", "atomic_write_json"]


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
