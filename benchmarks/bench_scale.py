"""Scale-out figures: prepare's Beam engine against the local one, and fit on two workers against one.

Part 1, prepare (goal: Beam's DirectRunner within 1.5x of the local engine on one machine).
The local engine and Beam's DirectRunner, each with 1 and 2 workers, on the same phantom
volumes (512x512, LiTS-like slice counts), each in a fresh process: wall time, slices/s, peak
RSS per worker (``RUSAGE_CHILDREN``; the process itself with one in-process worker), and a
check that both engines wrote byte-identical folders. From the 2-worker rate and the measured
1 -> 2 worker efficiency it projects the time to prepare LiTS (131 volumes, 58,638 slices) on
N workers, assuming that efficiency holds (a projection, not a measurement: a cluster's
storage may be slower or faster than this disk).

Part 2, fit: the same tiny recipe trained by one process (both cores) and by two workers on
loopback (``TF_CONFIG``, one core each, the same per-replica batch): slices/s of the last
epoch. On one 2-core machine two workers share the cores, so the ratio is the cost of the
collectives plus the core split, not the speed-up of two machines.

    python benchmarks/bench_scale.py [--cases 12] [--quick]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import phantom_volumes, table, write_json  # noqa: E402

from keras_livseg.training.multi_worker import free_loopback_port  # noqa: E402

LITS_VOLUMES, LITS_SLICES = 131, 58_638

_PREPARE = """
import json, resource, sys, time, logging
logging.disable(logging.WARNING)
from keras_livseg.data.prepare import PrepareOptions, prepare_dataset
engine, src, out, workers, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
options = PrepareOptions(src, out, workers=workers, progress=False, image_size=size)
if engine == "beam":
    from keras_livseg.data.prepare_beam import prepare_with_beam
    run = lambda: prepare_with_beam(options)
else:
    run = lambda: prepare_dataset(options)
t = time.perf_counter()
manifest = run()
wall = time.perf_counter() - t
slices = sum(s["slices"] for s in manifest["splits"].values())
print(json.dumps({"wall_s": wall, "slices": slices, "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

TINY_RECIPE = """
[run]
seed = 0
[data]
slices = "all"
[preprocessing]
image_size = {size}
[model]
name = "unet"
filters = 16
depth = 3
[training]
schedule = "none"
precision = "float32"
[export]
enabled = false
"""


def prepare_once(engine: str, src: Path, workers: int, image_size: int, keep: Path | None = None) -> dict:
    out = Path(tempfile.mkdtemp()) / "shards"
    try:
        line = subprocess.run([sys.executable, "-c", _PREPARE, engine, str(src), str(out), str(workers), str(image_size)],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        result = json.loads(line)
        if keep is not None:
            shutil.copytree(out, keep)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    # One worker runs in the process itself (both engines); more are child processes.
    result["worker_peak_rss_mb"] = (result["self_kb"] if workers == 1 else result["children_kb"]) / 1024
    return result


def same_folders(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def fit_rate(workers: int, work: Path, size: int, batch: int, steps: int, epochs: int) -> float:
    """Global slices/s of the last epoch, from Keras's per-step time."""
    recipe = work / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(size=size))
    args = [sys.executable, "-m", "keras_livseg.fit", "--pipeline", str(recipe), "--no-export", "--batch-size", str(batch),
            "--steps-per-epoch", str(steps), "--epochs", str(epochs), "--set", "data.phantom_cases=8",
            "--set", "data.phantom_size=128", "--set", "data.phantom_slices=[24, 32]", "--set", "data.shard_mb=0.5",
            "--set", "data.workers=1", "--set", "training.validation=none", "--set", "training.score_volumes=false",
            "--runs-dir", str(work / f"runs{workers}"), "--name", "bench"]
    ports = [free_loopback_port() for _ in range(workers)]
    processes = []
    for index in range(workers):
        env = {**os.environ, "KERAS_LIVSEG_CACHE": str(work / "cache")}
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                                           "task": {"type": "worker", "index": index}})
        log = (work / f"fit{workers}-{index}.log").open("w")
        processes.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
    for process in processes:
        if process.wait(timeout=1800) != 0:
            tail = "\n".join((work / f"fit{workers}-{i}.log").read_text()[-1500:] for i in range(workers))
            raise SystemExit(f"fit with {workers} worker(s) failed:\n{tail}")
    text = (work / f"fit{workers}-0.log").read_text()
    per_step = re.findall(r"(\d+)/\1 - \S+ - (\d+(?:\.\d+)?)(ms|s)/step", text)
    if not per_step:
        raise SystemExit(f"no per-step time in {work}/fit{workers}-0.log")
    _, value, unit = per_step[-1]
    seconds = float(value) / (1000 if unit == "ms" else 1)
    return batch * workers / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, nargs=2, default=(200, 300), metavar=("MIN", "MAX"))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--fit-size", type=int, default=64)
    parser.add_argument("--fit-steps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="a test of the script: tiny volumes, a few steps")
    args = parser.parse_args()
    if args.quick:
        args.cases, args.size, args.slices, args.image_size, args.fit_size, args.fit_steps = 2, 64, (8, 10), 32, 32, 3
    src = phantom_volumes(args.cases, size=args.size, slices=tuple(args.slices))
    prepare_once("local", src, 1, args.image_size)  # warm the page cache

    work = Path(tempfile.mkdtemp(prefix="bench_scale-"))
    rows, results = [], {"cases": args.cases, "size": args.size, "slices": list(args.slices), "image_size": args.image_size}
    try:
        runs = {}
        for engine in ("local", "beam"):
            for workers in (1, 2):
                print(f"prepare: {engine} engine, {workers} worker(s) ...", flush=True)
                keep = work / f"{engine}{workers}" if workers == 2 else None
                runs[(engine, workers)] = prepare_once(engine, src, workers, args.image_size, keep)
        identical = same_folders(work / "local2", work / "beam2")
        for (engine, workers), run in runs.items():
            local = runs[("local", workers)]
            rows.append({
                "engine": f"{engine} ({'DirectRunner' if engine == 'beam' else 'processes'})", "workers": workers,
                "wall s": f"{run['wall_s']:.2f}", "slices/s": f"{run['slices'] / run['wall_s']:.0f}",
                "x local": f"{run['wall_s'] / local['wall_s']:.2f}",
                "peak RSS / worker MB": f"{run['worker_peak_rss_mb']:.0f}",
            })
            results[f"{engine}_{workers}"] = {"wall_s": run["wall_s"], "slices": run["slices"],
                                              "slices_per_s": run["slices"] / run["wall_s"],
                                              "x_local": run["wall_s"] / local["wall_s"],
                                              "worker_peak_rss_mb": run["worker_peak_rss_mb"]}
        results["byte_identical"] = identical
        print(f"\nprepare: {args.cases} phantom volumes {args.size}x{args.size}x{args.slices[0]}-{args.slices[1]} "
              f"-> {args.image_size} px; Beam and local outputs byte-identical: {identical}\n")
        print(table(rows, ["engine", "workers", "wall s", "slices/s", "x local", "peak RSS / worker MB"]))

        projection = []
        for engine in ("local", "beam"):
            one, two = results[f"{engine}_1"], results[f"{engine}_2"]
            efficiency = two["slices_per_s"] / (2 * one["slices_per_s"])
            results[f"{engine}_scaling_efficiency_2"] = efficiency
            for n in (1, 8, 32):
                rate = one["slices_per_s"] * (1 if n == 1 else n * efficiency)
                projection.append({"engine": engine, "workers": n, "projected LiTS s": f"{LITS_SLICES / rate:.0f}"})
        results["lits_projection_s"] = {f"{p['engine']}_{p['workers']}": float(p["projected LiTS s"]) for p in projection}
        print(f"\nLiTS ({LITS_VOLUMES} volumes, {LITS_SLICES:,} slices) at these phantom rates, projected at the measured "
              f"1 -> 2 worker efficiency (local {results['local_scaling_efficiency_2']:.2f}, "
              f"beam {results['beam_scaling_efficiency_2']:.2f}):\n")
        print(table(projection, ["engine", "workers", "projected LiTS s"]))

        print("\nfit: one process against two workers on loopback ...", flush=True)
        one = fit_rate(1, work, args.fit_size, 8, args.fit_steps, 2)
        two = fit_rate(2, work, args.fit_size, 8, args.fit_steps, 2)
        results["fit"] = {"size": args.fit_size, "per_replica_batch": 8, "steps": args.fit_steps,
                          "one_worker_slices_per_s": one, "two_workers_slices_per_s": two, "two_over_one": two / one}
        print(table([{"run": "1 process (2 cores)", "global batch": 8, "slices/s": f"{one:.1f}", "x one": "1.00"},
                     {"run": "2 workers (1 core each)", "global batch": 16, "slices/s": f"{two:.1f}", "x one": f"{two / one:.2f}"}],
                    ["run", "global batch", "slices/s", "x one"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ngoal: Beam DirectRunner within 1.5x of the local engine -> {write_json('scale', results)}")


if __name__ == "__main__":
    main()
