"""What every ``python -m keras_livseg.<verb>`` command shares: the parser, logging, error exits.

Bad input must end in one clear line and a non-zero exit, never a traceback: library code
raises ``ValueError`` (``DataError`` is one) or ``OSError`` with the file and the fix, and
:func:`run` turns them into ``error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


#: TensorFlow's start-up lines that say nothing about the run. TensorFlow writes them while it
#: loads, before it reads TF_CPP_MIN_LOG_LEVEL (absl logs to stderr until InitializeLog), so no
#: setting hides them: :func:`quiet_tensorflow` imports it with stderr captured and replays the rest.
_TF_STARTUP_NOISE = re.compile(
    r"absl::InitializeLog|oneDNN custom operations are on|Could not find cuda drivers"
    r"|Unable to register cu(FFT|DNN|BLAS) factory|computation placer already registered|TF-TRT Warning"
    r"|This TensorFlow binary is optimized|rebuild TensorFlow with the appropriate compiler flags"
)


def make_parser(command: str, description: str, doc: str | None, verbose_help: str = "log more (DEBUG), "
                "TensorFlow's own start-up and device messages included") -> argparse.ArgumentParser:
    """The parser every command starts from: its name, description, examples and ``-v``.

    Args:
        command: the verb, e.g. ``"fit"`` (``prog`` becomes ``python -m keras_livseg.fit``).
        description: one sentence for ``--help``.
        doc: the command module's docstring; what follows its ``Examples:`` line is the epilog.
        verbose_help: the help of ``-v/--verbose``.
    """
    examples = (doc or "").split("Examples:", 1)
    parser = argparse.ArgumentParser(
        prog=f"python -m keras_livseg.{command}",
        description=description,
        epilog="Examples:" + examples[1] if len(examples) == 2 else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    return parser


def add_recipe_arguments(parser: argparse.ArgumentParser, *, name_help: str, set_help: str) -> None:
    """The arguments of the commands that train from a recipe (``fit``, ``compare``).

    ``--pipeline``, ``--data``, ``--epochs``, ``--steps-per-epoch``, ``--batch-size``, ``--name``,
    ``--runs-dir`` and the repeatable ``--set SECTION.KEY=VALUE``; ``name_help`` and ``set_help``
    say what the command makes of its name and overrides.
    """
    parser.add_argument("--pipeline", help="recipe TOML (default: pipelines/phantom_demo.toml)")
    parser.add_argument("--data", help="dataset folder or CSV (LiTS/MSD layout) instead of the phantom")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps-per-epoch", type=int, help="0 = one pass over the training slices")
    parser.add_argument("--batch-size", type=int, help="per replica")
    parser.add_argument("--name", help=name_help)
    parser.add_argument("--runs-dir", help="parent of run folders (default runs/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=set_help)


def _has_nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def _default_tf_level() -> None:
    """Warnings and errors with a GPU driver; errors too without one (see :func:`quiet_tensorflow`).

    (TensorFlow's oneDNN kernels are asked for by the package itself: ``keras_livseg/__init__.py``.)
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if _has_nvidia_driver() else "3")


def quiet_tensorflow(verbose: bool = False) -> None:
    """Set TensorFlow's log level and, unless ``verbose``, import it without its start-up noise.

    The one place that decides what TensorFlow prints, called before anything imports it:

    - ``verbose``: everything (``TF_CPP_MIN_LOG_LEVEL=0``);
    - otherwise warnings and errors (level 2), and on a machine without an NVIDIA driver errors
      too (level 3): there TensorFlow's errors are "failed call to cuInit" and oneDNN's
      "DT_HALF only on platforms with AVX-512", noise on every CPU run. A level the user set
      in the environment is kept.

    Lines TensorFlow writes while loading (before it reads the level) are captured and dropped
    when they are known noise (:data:`_TF_STARTUP_NOISE`); any other line is shown.
    """
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return
    _default_tf_level()
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not _TF_STARTUP_NOISE.search(line):
                    sys.stderr.write(line)


class _ZeroSpacingNote(logging.Filter):
    """Drops nibabel's note that it read a zero spacing as 1 (image_zooms refuses such a header)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be non-zero; setting 0 dims to 1" not in record.getMessage()


def configure_logging(verbose: bool = False, tensorflow: bool = False) -> None:
    """INFO (or DEBUG) messages to stderr, short format; with ``tensorflow``, load it quietly.

    TensorFlow's Python logger (``tensorflow``) shows warnings and errors only, unless ``verbose``.

    Args:
        verbose: DEBUG instead of INFO, and TensorFlow's own messages (see :func:`quiet_tensorflow`).
        tensorflow: the command will use TensorFlow: import it now, without its start-up noise.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname).1s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # TensorFlow's Python logger says INFO about its own machinery: on two workers, 51 lines in a
    # three-epoch run ("Collective all_reduce tensors: 1 all_reduces, ..." at every step). Its
    # warnings and errors still show; -v shows everything.
    logging.getLogger("tensorflow").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # nibabel reports the header fields it repairs on loading through a handler of its own, and
    # again through ours: once is enough. Its zero-spacing note ("pixdim[1,2,3] should be non-zero;
    # setting 0 dims to 1") is dropped unless -v: the stages refuse that header themselves, naming
    # the file. Its other repairs (an sform code reset, say) still show.
    nibabel_logger = logging.getLogger("nibabel.global")
    nibabel_logger.propagate = False
    if not verbose and not any(isinstance(f, _ZeroSpacingNote) for f in nibabel_logger.filters):
        nibabel_logger.addFilter(_ZeroSpacingNote())
    # highdicom narrates each DICOM-SEG it builds (nine INFO lines a file); its warnings still show.
    logging.getLogger("highdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if tensorflow:
        quiet_tensorflow(verbose)
    elif not verbose:
        _default_tf_level()


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
