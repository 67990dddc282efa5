"""How long the demo's phantom takes to make, with the worker processes' BLAS threads limited or not.

``fit`` makes the demo's phantom (192 cases, 128 px, 32-48 slices) in one process per core
on a new machine: part of the first run's wall time. Each case's smooth random fields are
small matrix products; by default every worker's OpenBLAS also starts a thread per core, so
on 2 cores two workers run four BLAS threads that wait on each other.
``write_phantom_dataset`` now gives each worker one BLAS thread. This script makes the same
cases both ways, alternating, in one run, and reports the ratio. It also times the part of
the work that deflates the files: the phantom writes them with zlib (``reproducible=True``,
the same bytes in any process) rather than ISA-L, and the second table says what that costs::

    python benchmarks/bench_phantom.py [--cases 48] [--repeats 2]

Prints a table and writes ``benchmarks/results/phantom_speed.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
VARIANTS = {
    "one BLAS thread per worker (write_phantom_dataset's default)": {},
    "a BLAS thread per core in every worker (before)": {name: str(os.cpu_count() or 1) for name in THREADS},
}


def time_variant(cases: int, workers: int, size: int, slices: tuple[int, int], env: dict[str, str]) -> float:
    """Seconds to write ``cases`` phantom cases in a fresh process (imports not counted)."""
    code = (
        "import sys, time, tempfile\n"
        "from keras_livseg.data.phantom import write_phantom_dataset\n"
        "with tempfile.TemporaryDirectory() as out:\n"
        "    start = time.perf_counter()\n"
        f"    write_phantom_dataset(out, {cases}, 0, size={size}, slices={slices}, workers={workers}, progress=False)\n"
        "    print(time.perf_counter() - start)\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in THREADS}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
                          check=True)
    return float(done.stdout.strip().splitlines()[-1])


def time_deflate(cases: int, size: int, slices: tuple[int, int], repeats: int) -> list[dict]:
    """Seconds to write the same ``cases`` (volume and labels each) with zlib and with ISA-L, in
    this process, one core; the two take turns and the best of ``repeats`` rounds is kept."""
    from keras_livseg.data.phantom import _nifti, iter_phantom_cases
    from keras_livseg.data.volumes import write_nifti

    images = [_nifti(array, case.affine) for _, case in iter_phantom_cases(cases, 0, size=size, slices=slices)
              for array in (case.volume_hu, case.labels)]
    best = {"zlib (reproducible=True, the phantom's)": float("inf"), "ISA-L (before)": float("inf")}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeats):
            for label in best:
                start = time.perf_counter()
                for i, image in enumerate(images):
                    write_nifti(image, Path(out) / f"{i}.nii.gz", reproducible=label.startswith("zlib"))
                best[label] = min(best[label], time.perf_counter() - start)
    return [{"deflate": label, "seconds": value, "s_per_case": value / cases}
            for label, value in best.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slices", type=int, nargs=2, default=[32, 48])
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the variants alternate within each")
    parser.add_argument("--name", default="phantom_speed", help="JSON name under benchmarks/results")
    args = parser.parse_args(argv)
    seconds: dict[str, list[float]] = {label: [] for label in VARIANTS}
    for round_ in range(args.repeats):
        for label, env in VARIANTS.items():
            seconds[label].append(time_variant(args.cases, args.workers, args.size, tuple(args.slices), env))
            print(f"round {round_ + 1}/{args.repeats}: {label}: {seconds[label][-1]:.1f} s", flush=True)
    base = statistics.median(seconds[next(iter(VARIANTS))])
    rows = [{"variant": label, "median_s": statistics.median(values), "s_per_case": statistics.median(values) / args.cases,
             "runs_s": values, "time_vs_default": statistics.median(values) / base} for label, values in seconds.items()]
    print(table([{**r, "median_s": f"{r['median_s']:.1f}", "s_per_case": f"{r['s_per_case']:.3f}",
                  "runs_s": ", ".join(f"{v:.1f}" for v in r["runs_s"]), "time_vs_default": f"{r['time_vs_default']:.2f}"}
                 for r in rows], ["variant", "median_s", "s_per_case", "runs_s", "time_vs_default"]))
    deflate = time_deflate(args.cases, args.size, tuple(args.slices), args.repeats)
    for r in deflate:  # of the default's wall time above, where the workers deflate at once
        r["share_of_default_total"] = r["seconds"] / args.workers / base
    print(table([{**r, "seconds": f"{r['seconds']:.2f}", "s_per_case": f"{r['s_per_case']:.4f}",
                  "share_of_default_total": f"{r['share_of_default_total']:.2f}"}
                 for r in deflate], ["deflate", "seconds", "s_per_case", "share_of_default_total"]))
    config = {"cases": args.cases, "workers": args.workers, "size": args.size, "slices": args.slices,
              "repeats": args.repeats}
    print(f"wrote {write_json(args.name, {'config': config, 'rows': rows, 'deflate': deflate})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
