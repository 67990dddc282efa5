"""``python -m keras_livseg.phantom``: write synthetic abdominal CT cases in the LiTS layout.

Examples:
    python -m keras_livseg.phantom --out data/phantom --cases 12 --seed 0
    python -m keras_livseg.phantom --out data/phantom_small --cases 4 --size 128 --slices 16:24
    python -m keras_livseg.phantom --out bench/phantom512 --cases 2 --size 512 --slices 200:300
    python -m keras_livseg.phantom --out data/phantom_nii --cases 3 --no-gzip --overwrite
    python -m keras_livseg.phantom --out bench/lits_sized --lits-sized --workers 2

--lits-sized writes a set of LiTS's size: 131 volumes of 512x512 with LiTS's slice counts
(58,638 slices, 74 to 987 a volume; about 13 GB gzipped, 25 minutes on one core), made one
case at a time per worker, to try prepare and fit at full scale before the real data arrives.

Each case is volume-<i>.nii.gz (int16 HU) and segmentation-<i>.nii.gz (uint8: 0 background,
1 liver, 2 tumor) with the affine diag(-dx, -dy, dz) of DICOM-derived LiTS volumes;
phantom.json lists spacing and lesions. See keras_livseg.data.phantom for what is inside.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from keras_livseg import cli
from keras_livseg.data.phantom import DEFAULT_SIZE, DEFAULT_SLICES, LITS_VOLUMES, lits_slice_counts, write_phantom_dataset

COMMAND = "python -m keras_livseg.phantom"


def _slice_range(text: str) -> tuple[int, int]:
    """``MIN:MAX`` or a single ``N`` (exactly N slices)."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not 1 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return values[0], values[1]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser("phantom", "Write synthetic abdominal CT volumes with liver and tumor labels (LiTS layout).", __doc__, verbose_help="log every case")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--cases", type=int, default=None, help="number of cases (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the set (default 0)")
    parser.add_argument("--size", type=int, default=None, help=f"in-plane matrix size (default {DEFAULT_SIZE})")
    parser.add_argument(
        "--slices", type=_slice_range, default=None, metavar="MIN:MAX",
        help="slice count range, drawn per case (default %d:%d)" % DEFAULT_SLICES,
    )
    parser.add_argument(
        "--lits-sized", action="store_true",
        help=f"{LITS_VOLUMES} cases of 512x512 with LiTS's slice counts (58,638 slices; --size may change the matrix)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes making cases in parallel (default 1)")
    parser.add_argument(
        "--gzip", action=argparse.BooleanOptionalAction, default=True, help="write .nii.gz (default) or .nii"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing case files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, write the set, print a one-line summary; returns the exit status."""
    args = build_parser().parse_args(argv)
    cli.configure_logging(args.verbose)
    if not args.verbose:
        # Per-case lines only with -v; the summary below is the normal output.
        import logging

        logging.getLogger("keras_livseg.data.phantom").setLevel(logging.WARNING)

    def body() -> int:
        counts = None
        if args.lits_sized:
            for flag, value in (("--cases", args.cases), ("--slices", args.slices)):
                if value is not None:
                    raise ValueError(f"{flag} cannot be combined with --lits-sized (it sets {LITS_VOLUMES} cases "
                                     "and their slice counts); drop one of them")
            counts = lits_slice_counts(args.seed)
        cases = len(counts) if counts else (12 if args.cases is None else args.cases)
        size = args.size if args.size is not None else (512 if args.lits_sized else DEFAULT_SIZE)
        start = time.perf_counter()
        paths = write_phantom_dataset(
            args.out, cases=cases, seed=args.seed, size=size, slices=args.slices or DEFAULT_SLICES,
            slice_counts=counts, gzip=args.gzip, overwrite=args.overwrite,
            progress=sys.stderr.isatty() and not args.no_progress, workers=args.workers,
        )
        print(f"wrote {cases} phantom case(s) to {args.out} in {time.perf_counter() - start:.1f} s "
              f"({len(paths)} files)")
        return 0

    return cli.run(body, COMMAND)


if __name__ == "__main__":
    sys.exit(main())
