"""prepare at LiTS's scale: a LiTS-sized phantom, local and Beam engines, 1 and 2 workers.

The set is ``python -m keras_livseg.phantom --lits-sized``: 131 volumes of 512x512 with
LiTS's slice counts (58,638 slices, 74 to 987 a volume; :func:`lits_slice_counts`), generated
streaming (one case per generation worker in memory) into the benchmark cache and reused.
Each engine and worker count then prepares the whole set to 256 px shards in a fresh
process: wall time, slices/s, peak RSS per worker (against the largest volume's int16 bytes:
memory is bounded by one volume, not by the set), and every output file's SHA-256, so that
the Beam and local outputs are shown byte-identical without keeping two copies of ~12 GB.
From the measured 1 -> 2 worker efficiency it projects N workers (a projection: a cluster's
storage sets its own pace).

    python benchmarks/bench_lits_scale.py [--workers-generate 2] [--quick]

~25 min to generate (2 cores) and ~20 min for the four runs on the reference 2-core machine;
disk: ~13 GB of volumes and ~12 GB of shards at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import DATA, table, write_json  # noqa: E402
from bench_scale import _PREPARE  # noqa: E402


def lits_sized_set(seed: int, workers: int, quick: bool) -> tuple[Path, dict]:
    """The cached LiTS-sized phantom (generated when missing) and how it was made."""
    from keras_livseg.data.phantom import lits_slice_counts, write_phantom_dataset

    counts = lits_slice_counts(seed)
    size = 512
    if quick:  # a test of the script: the first cases, few slices, small matrix
        counts, size = [max(4, n // 40) for n in counts[:3]], 64
    folder = DATA / (f"lits-sized-s{seed}" if not quick else f"lits-sized-quick-s{seed}")
    meta_path = folder / "phantom.json"
    made = {"generated_now": False}
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("slice_counts") != counts or meta.get("size") != size:
        print(f"generating {len(counts)} volumes ({sum(counts):,} slices, {size}x{size}) with {workers} worker(s) ...",
              flush=True)
        start = time.perf_counter()
        write_phantom_dataset(folder, cases=len(counts), seed=seed, size=size, slice_counts=counts,
                              overwrite=True, workers=workers, progress=sys.stderr.isatty())
        made = {"generated_now": True, "generate_s": time.perf_counter() - start, "generate_workers": workers}
    files = sorted(folder.glob("*.nii.gz"))
    made.update(volumes=len(counts), slices=sum(counts), size=size, min_slices=min(counts), max_slices=max(counts),
                gzip_gb=sum(f.stat().st_size for f in files) / 1e9,
                largest_volume_mb=size * size * max(counts) * 2 / 2**20)
    return folder, made


def digests(folder: Path) -> dict[str, str]:
    result = {}
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        result[path.name] = digest.hexdigest()
    return result


def prepare_run(engine: str, src: Path, workers: int, image_size: int) -> dict:
    """One fresh-process run: the script's JSON line plus the output's size and file digests."""
    out = Path(tempfile.mkdtemp(prefix="lits_scale-", dir=DATA)) / "shards"
    try:
        process = subprocess.run([sys.executable, "-c", _PREPARE, engine, str(src), str(out), str(workers), str(image_size)],
                                 capture_output=True, text=True)
        if process.returncode != 0:
            raise SystemExit(f"prepare ({engine}, {workers} workers) failed:\n{process.stderr[-2000:]}")
        result = json.loads(process.stdout.strip().splitlines()[-1])
        result["out_gb"] = sum(p.stat().st_size for p in out.iterdir()) / 1e9
        result["digests"] = digests(out)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    result["worker_peak_rss_mb"] = (result["self_kb"] if workers == 1 else result["children_kb"]) / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers-generate", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="a test of the script: 3 tiny volumes")
    args = parser.parse_args()
    if args.quick:
        args.image_size = 32
    src, made = lits_sized_set(args.seed, args.workers_generate, args.quick)
    results = {"set": made, "image_size": args.image_size, "runs": {}}
    runs, outputs, rows = results["runs"], {}, []
    for engine in ("local", "beam"):
        for workers in (1, 2):
            print(f"prepare: {engine} engine, {workers} worker(s), {made['slices']:,} slices ...", flush=True)
            run = prepare_run(engine, src, workers, args.image_size)
            key = f"{engine}_{workers}"
            outputs[key] = run["digests"]
            runs[key] = {
                "wall_s": run["wall_s"], "slices": run["slices"], "slices_per_s": run["slices"] / run["wall_s"],
                "worker_peak_rss_mb": run["worker_peak_rss_mb"], "out_gb": run["out_gb"], "files": len(run["digests"]),
                "rss_over_largest_volume": run["worker_peak_rss_mb"] / made["largest_volume_mb"],
            }
    results["byte_identical"] = all(digests == outputs["local_1"] for digests in outputs.values())
    for key, run in runs.items():
        engine, workers = key.split("_")
        local = runs[f"local_{workers}"]
        run["x_local"] = run["wall_s"] / local["wall_s"]
        rows.append({"engine": engine, "workers": workers, "wall min": f"{run['wall_s'] / 60:.1f}",
                     "slices/s": f"{run['slices_per_s']:.0f}", "x local": f"{run['x_local']:.2f}",
                     "peak RSS / worker MB": f"{run['worker_peak_rss_mb']:.0f}",
                     "RSS / largest volume": f"{run['rss_over_largest_volume']:.2f}"})
    projection = {}
    for engine in ("local", "beam"):
        one, two = runs[f"{engine}_1"], runs[f"{engine}_2"]
        efficiency = two["slices_per_s"] / (2 * one["slices_per_s"])
        results[f"{engine}_scaling_efficiency_2"] = efficiency
        for n in (8, 32):
            projection[f"{engine}_{n}"] = made["slices"] / (one["slices_per_s"] * n * efficiency)
    results["projection_s"] = projection
    print(f"\n{made['volumes']} volumes, {made['slices']:,} slices ({made['gzip_gb']:.1f} GB gzipped) -> "
          f"{args.image_size} px; all outputs byte-identical: {results['byte_identical']}\n")
    print(table(rows, ["engine", "workers", "wall min", "slices/s", "x local", "peak RSS / worker MB",
                       "RSS / largest volume"]))
    print("\nprojected at the measured 1 -> 2 worker efficiency: "
          + ", ".join(f"{k.replace('_', ' ')} workers {v / 60:.1f} min" for k, v in projection.items()))
    print(f"\n-> {write_json('lits_scale', results)}")


if __name__ == "__main__":
    main()
