"""Run every benchmark, write its JSON with the machine's description, regenerate the README's tables.

    python -m benchmarks.run_all                    # everything (~3 h on 2 cores; compare ~1 h, lits_scale ~35 min, real CT ~30 min)
    python -m benchmarks.run_all --only models pipeline
    python -m benchmarks.run_all --skip real_ct     # without the real-scan training runs
    python -m benchmarks.run_all --quick            # a test of the scripts: tiny sizes, minutes
    python -m benchmarks.readme_tables              # only rewrite the README's tables from the JSON

Each benchmark runs in its own process (fresh memory peaks, no state shared between them), one
after another, so that they do not compete for the cores; its output streams to the terminal.
The JSON goes to ``benchmarks/results/`` (or ``$KERAS_LIVSEG_BENCH_RESULTS``); the README's
tables between ``<!-- bench:NAME -->`` markers are rewritten from it (not with ``--quick``,
whose tiny figures mean nothing). A benchmark that fails is reported and the others still run;
the exit status is then 1.

``run_all.json`` is the record of every benchmark's last run through this runner, not only of
this invocation's: a run with ``--only`` replaces its benchmarks' entries and keeps the others'
(date, minutes, exit status, CPU), so the README's index of benchmarks says when and on what
each figure was last measured, and how long a full run takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, results_dir  # noqa: E402
from keras_livseg.data.atomic import atomic_write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One script: its arguments for the README's figures and for a quick test of the script."""

    name: str  # also the JSON file's name
    script: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] | None = ("--quick",)  # None: no quick form (needs real data or hours)
    needs_real_data: bool = False
    what: str = ""


BENCHMARKS = (
    Benchmark("prepare", "bench_prepare.py", args=("--repeats", "5"), what="prepare against the read floor (nibabel and our ISA-L reader), peak RSS per worker"),
    Benchmark("scale", "bench_scale.py", what="prepare on Beam against local, 1 and 2 workers; fit on two workers"),
    Benchmark("lits_scale", "bench_lits_scale.py",
              what="prepare on a LiTS-sized phantom (131 volumes, 58,638 slices), local and Beam, 1 and 2 workers (~35 min)"),
    Benchmark("pipeline", "bench_pipeline.py", what="tf.data with full augmentation against naive loaders",
              quick_args=("--cases", "2", "--batches", "5", "--size", "64", "--volume-size", "128", "--slices", "20-30",
                          "--rounds", "1")),
    Benchmark("models", "bench_models.py", what="parameters, FLOPs, train step time, Keras against PyTorch",
              # Two cheap models: the script has no model-specific Keras code, and effb0_pan doubled this
              # part's time (75 against 39 s), building and tracing EfficientNet in two precisions.
              quick_args=("--quick", "--models", "unet", "tam_unet", "--size", "32", "--batch", "2", "--filters", "4",
                          "--depth", "2", "--no-torch")),
    Benchmark("memory", "bench_memory.py", what="a train step's peak memory split into graph, live tensors and the rest, Keras and PyTorch"),
    Benchmark("predict", "bench_predict.py", what="predict against the model's forward pass, peak RSS"),
    Benchmark("predict_trained", "bench_predict.py", args=("--train", "--name", "predict_trained"), quick_args=None,
              what="predict against the forward pass with a 256-pixel model trained on the phantom (~5 min to train)"),
    Benchmark("predict_long", "bench_predict.py", args=("--slices", "1000", "--name", "predict_long"),
              quick_args=None, what="predict's peak memory on a 512x512x1000 volume"),
    Benchmark("fit_loop", "bench_fit_loop.py", what="fit from shards against in-memory tensors"),
    Benchmark("phantom_speed", "bench_phantom.py",
              quick_args=("--cases", "2", "--size", "32", "--slices", "8", "8", "--repeats", "1"),
              what="the demo's phantom made with one BLAS thread per worker against one per core; its deflate, zlib against ISA-L"),
    Benchmark("profile_effb0_pan", "profile_effb0_pan.py", args=("ops", "blocks", "repro", "whole"), quick_args=None,
              what="where an EfficientNetB0-PAN train step's time goes, TensorFlow against PyTorch"),
    Benchmark("profile_effb0_pan_plain", "profile_effb0_pan.py", args=("--plain", "ops"), quick_args=None,
              what="the same op profile with keras_livseg's TensorFlow speed-ups undone (the 'before')"),
    Benchmark("fuzz", "fuzz_inputs.py", quick_args=("--commands", "prepare", "--limit", "4"),
              what="broken NIfTI files against prepare and predict: results, refusals, crashes"),
    Benchmark("kill_resume", "kill_resume.py", quick_args=None,
              what="prepare, fit and export SIGKILLed at random points, then resumed"),
    Benchmark("phantom_realism", "phantom_realism.py", quick_args=None, needs_real_data=True,
              what="phantom intensities against the real scans"),
    Benchmark("compare_phantom", "bench_compare.py", quick_args=None,
              what="every model in the same budget on the phantom: Dice, speed, paired tests (~1 h)"),
    Benchmark("real_ct", "bench_real.py", args=("demo", "fresh", "sim2real", "lopo", "lopo-starts", "sizes", "--rerun", "--fresh-runs", "3"), quick_args=None,
              needs_real_data=True,
              what="the demo's held-out Dice, sim-to-real, leave-one-patient-out on real CT, and each minimum lesion size on the demo models"),
    Benchmark("predict_long_trained", "bench_predict.py", quick_args=None, needs_real_data=True,
              args=("--slices", "1000", "--checkpoint", "runs/bench_real/demo-seed0/checkpoints/best.keras",
                    "--name", "predict_long_trained"),
              what="predict's peak memory on 512x512x1000 with the demo model real_ct trained"),
)
NAMES = tuple(b.name for b in BENCHMARKS)
REAL_DATA = HERE.parent.parent / "shared" / "data" / "real"


def run_benchmark(benchmark: Benchmark, quick: bool, env: dict[str, str]) -> dict:
    """Run one script, streaming its output; ``{"name", "seconds", "returncode", "args"}``."""
    args = list(benchmark.quick_args if quick else benchmark.args)
    command = [sys.executable, str(HERE / benchmark.script), *args]
    print(f"\n=== {benchmark.name}: {benchmark.what}\n$ {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, env=env, cwd=HERE.parent).returncode
    seconds = time.perf_counter() - started
    print(f"=== {benchmark.name}: {'done' if code == 0 else f'FAILED (exit {code})'} in {seconds / 60:.1f} min", flush=True)
    return {"name": benchmark.name, "args": args, "seconds": round(seconds, 1), "returncode": code}


def benchmark_index(previous: dict | None, runs: list[dict], machine_now: dict) -> list[dict]:
    """Every benchmark with its last run: this invocation's ``runs``, else ``previous``'s record.

    ``previous`` is the ``run_all.json`` written before (``None`` when there is none). A run
    recorded before the index existed keeps its minutes and exit status, with no date or CPU.

    Example:
        >>> rows = benchmark_index(None, [{"name": "fuzz", "args": [], "seconds": 60.0, "returncode": 0}],
        ...                        {"date": "2026-12-03", "cpu": "AMD EPYC", "cpu_flags": ["avx2"]})
        >>> [r["last_run"] for r in rows if r["name"] == "fuzz"][0]["minutes"], len(rows) == len(BENCHMARKS)
        (1.0, True)
    """
    earlier = {}
    for entry in (previous or {}).get("benchmarks") or []:
        if entry.get("last_run"):
            earlier[entry["name"]] = entry["last_run"]
    for run in (previous or {}).get("runs") or []:  # a file written before the index: its runs only
        earlier.setdefault(run["name"], {"minutes": round(run["seconds"] / 60, 1), "returncode": run["returncode"],
                                         "args": run["args"], "date": None, "cpu": None, "cpu_flags": None})
    now = {run["name"]: {"minutes": round(run["seconds"] / 60, 1), "returncode": run["returncode"], "args": run["args"],
                         "date": machine_now.get("date"), "cpu": machine_now.get("cpu"),
                         "cpu_flags": machine_now.get("cpu_flags")} for run in runs}
    return [{"name": b.name, "script": b.script, "args": list(b.args), "what": b.what,
             "needs_real_data": b.needs_real_data, "last_run": now.get(b.name, earlier.get(b.name))}
            for b in BENCHMARKS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help=f"run these only ({', '.join(NAMES)})")
    parser.add_argument("--skip", nargs="+", choices=NAMES, default=[], metavar="NAME", help="leave these out")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every script runs, in minutes")
    parser.add_argument("--results", type=Path, help="JSON folder (default benchmarks/results or $KERAS_LIVSEG_BENCH_RESULTS)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README's tables")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    if args.results:
        env["KERAS_LIVSEG_BENCH_RESULTS"] = str(args.results.resolve())
    os.environ.update({k: v for k, v in env.items() if k == "KERAS_LIVSEG_BENCH_RESULTS"})
    selected = [b for b in BENCHMARKS if (not args.only or b.name in args.only) and b.name not in args.skip]
    runs, skipped = [], []
    for benchmark in selected:
        if args.quick and benchmark.quick_args is None:
            skipped.append(f"{benchmark.name} (no quick form)")
        elif benchmark.needs_real_data and not REAL_DATA.is_dir():
            skipped.append(f"{benchmark.name} (needs {REAL_DATA})")
        else:
            runs.append(run_benchmark(benchmark, args.quick, env))
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("run_all_quick.json" if args.quick else "run_all.json")
    previous = json.loads(path.read_text()) if path.is_file() else None
    now = machine()
    summary = {"machine": now, "quick": args.quick, "runs": runs, "skipped": skipped,
               "benchmarks": benchmark_index(previous, runs, now)}
    atomic_write_json(path, summary)  # a half-written record would lose every earlier benchmark's entry

    print("\n| benchmark | minutes | result |\n| --- | ---: | --- |")
    for run in runs:
        print(f"| {run['name']} | {run['seconds'] / 60:.1f} | {'ok' if run['returncode'] == 0 else 'FAILED'} |")
    for line in skipped:
        print(f"| {line} | | skipped |")
    if not args.quick and not args.no_readme and runs:
        from readme_tables import update_readme

        changed = update_readme(results=folder)
        print(f"\nREADME tables rewritten from {folder}: {', '.join(changed) or 'none changed'}")
    return 1 if any(run["returncode"] for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
