"""What every ``python -m keras_livseg.<verb>`` command shares: logging set-up and error exits.

Bad input must end in one clear line and a non-zero exit, never a traceback: library code
raises ``ValueError`` (``DataError`` is one) or ``OSError`` with the file and the fix, and
:func:`run` turns them into ``error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def configure_logging(verbose: bool = False) -> None:
    """INFO (or DEBUG) messages to stderr, short format; quiet TensorFlow's C++ logs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname).1s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(body: Callable[[], int | None], command: str) -> int:
    """Run a command body, mapping user errors to one line and exit status 2."""
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
