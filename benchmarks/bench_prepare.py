"""prepare's wall time and peak memory against merely loading the same volumes.

Goals (DESIGN.md): wall time <= 1.5x the load floor (decompress + read); peak RSS
per worker <= 2.5x one decompressed volume. Volumes: phantom CT of 512x512 and 200-300
slices, written once to the cache.

The floor is measured in a fresh process that reads every volume and its segmentation once,
one after another (what prepare must read at least), with nibabel and with prepare's own
reader (ISA-L's gzip, about twice as fast); the faster of the two is the floor. Each side
runs ``--repeats`` times (default 3), taking turns, and the medians are compared; prepare runs with its default workers (one per core) and with one worker.
Worker memory is the peak RSS of the worker processes (``RUSAGE_CHILDREN``), reported both
raw and above the worker's baseline after imports.

    python benchmarks/bench_prepare.py [--cases 4]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import phantom_volumes, table, write_json  # noqa: E402

_LOAD = """
import resource, sys, time, glob
from pathlib import Path
import nibabel as nib, numpy as np
from keras_livseg.data.volumes import read_array
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); nbytes = 0
for path in sorted(glob.glob(sys.argv[1] + '/volume-*.nii.gz') + glob.glob(sys.argv[1] + '/segmentation-*.nii.gz')):
    image = nib.load(path)
    array = np.asarray(image.dataobj) if sys.argv[2] == 'nibabel' else read_array(image, Path(path))
    nbytes = max(nbytes, array.nbytes)
print(time.perf_counter() - t, nbytes, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

_PREPARE = """
import resource, sys, time
from keras_livseg.data.prepare import PrepareOptions, prepare_dataset
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
prepare_dataset(PrepareOptions(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), progress=False, image_size=int(sys.argv[4])))
wall = time.perf_counter() - t
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(wall, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, child)
"""


def run(code: str, *args: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    return [float(v) for v in out.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="phantom volume rows and columns")
    parser.add_argument("--slices", type=int, nargs=2, default=(200, 300), metavar=("MIN", "MAX"))
    parser.add_argument("--image-size", type=int, default=256, help="prepare's model size")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, taking turns; medians compared")
    parser.add_argument("--quick", action="store_true", help="a test of the script: 2 tiny volumes")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: give 1 or more")
    if args.quick:
        args.cases, args.size, args.slices, args.image_size, args.repeats = 2, 64, (8, 10), 32, 1
    src = phantom_volumes(args.cases, size=args.size, slices=tuple(args.slices))
    run(_LOAD, str(src), "nibabel")  # warm the page cache so every side reads from memory
    # Every side runs --repeats times, taking turns, in fresh processes; medians are compared
    # (one run each moved the ratio by ~10 % on this shared machine).
    loads, reads, prepares = [], [], {0: [], 1: []}
    for _ in range(args.repeats):
        loads.append(run(_LOAD, str(src), "nibabel"))
        reads.append(run(_LOAD, str(src), "keras_livseg"))
        for workers in (0, 1):
            out = Path(tempfile.mkdtemp())
            try:
                prepares[workers].append(run(_PREPARE, str(src), str(out / "shards"), str(workers), str(args.image_size)))
            finally:
                shutil.rmtree(out, ignore_errors=True)
    load_s, read_s = float(np.median([r[0] for r in loads])), float(np.median([r[0] for r in reads]))
    volume_bytes, load_peak_kb = loads[0][1], max(r[3] for r in loads)
    # prepare's own reader (ISA-L's gzip) is faster than nibabel's: the floor is the faster of the two.
    floor_s = min(load_s, read_s)
    rows = [{"what": "nibabel load", "wall s": f"{load_s:.2f}", "x floor": f"{load_s / floor_s:.2f}",
             "peak RSS MB": f"{load_peak_kb / 1024:.0f}", "RSS / volume": f"{load_peak_kb * 1024 / volume_bytes:.2f}"},
            {"what": "keras_livseg read_array (ISA-L gzip)", "wall s": f"{read_s:.2f}", "x floor": f"{read_s / floor_s:.2f}",
             "peak RSS MB": "", "RSS / volume": ""}]
    results = {"cases": args.cases, "size": args.size, "slices": list(args.slices), "image_size": args.image_size,
               "volume_mb": volume_bytes / 1e6, "load_s": load_s, "read_s": read_s, "floor_s": floor_s,
               "load_peak_rss_mb": load_peak_kb / 1024, "load_rss_over_volume": load_peak_kb * 1024 / volume_bytes,
               "repeats": args.repeats, "load_runs_s": [r[0] for r in loads], "read_runs_s": [r[0] for r in reads]}
    for workers in (0, 1):
        wall = float(np.median([r[0] for r in prepares[workers]]))
        base_kb = min(r[1] for r in prepares[workers])
        worker_kb = max(r[3] if workers != 1 else r[2] for r in prepares[workers])
        label = "prepare, 1 worker (in process)" if workers == 1 else "prepare, default workers (2 here)"
        rows.append({
            "what": label,
            "wall s": f"{wall:.2f}",
            "x floor": f"{wall / floor_s:.2f}",
            "peak RSS MB": f"{worker_kb / 1024:.0f} per worker",
            "RSS / volume": f"{worker_kb * 1024 / volume_bytes:.2f} ({(worker_kb - base_kb) * 1024 / volume_bytes:.2f} above imports)",
        })
        results[f"prepare_workers_{workers or 'default'}"] = {
            "wall_s": wall, "x_floor": wall / floor_s, "worker_peak_rss_mb": worker_kb / 1024,
            "rss_over_volume": worker_kb * 1024 / volume_bytes,
            "rss_above_imports_over_volume": (worker_kb - base_kb) * 1024 / volume_bytes,
            "runs_s": [r[0] for r in prepares[workers]],
        }
    print(f"{args.cases} phantom volumes {args.size}x{args.size}x{args.slices[0]}-{args.slices[1]}, largest {volume_bytes / 1e6:.0f} MB decompressed (int16)\n")
    print(table(rows, ["what", "wall s", "x floor", "peak RSS MB", "RSS / volume"]))
    print(f"\ngoals: wall <= 1.5x floor; peak RSS per worker <= 2.5x one volume -> {write_json('prepare', results)}")


if __name__ == "__main__":
    main()
