"""SIGKILL ``prepare``, ``fit`` and ``export`` at random points, rerun, and check what survived.

- ``prepare``: killed again and again, each rerun with ``--resume``, then finished; its shards
  and manifest must be byte-identical to an uninterrupted run on the same data.
- ``fit``: killed again and again mid-training, each rerun with ``--resume``; the finished run
  must have every epoch exactly once in ``history.csv`` and ``complete.json`` at the end.
- ``export``: killed mid-write; a version folder TF Serving would load (all digits) must always
  be complete (``saved_model.pb`` and ``assets.extra/preprocessing.json``), never half-written.

"Bytes lost" counts files that differ from the uninterrupted run or are missing (goal 0).

    python benchmarks/kill_resume.py                  # 10 kills per command
    python benchmarks/kill_resume.py --kills 3 --commands prepare export
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402

FIT_ARGS = [
    "--no-export", "--precision", "float32", "--image-size", "32", "--batch-size", "4", "--steps-per-epoch", "15",
    "--set", "data.phantom_cases=4", "--set", "data.phantom_size=64", "--set", "data.phantom_slices=[8, 10]",
    "--set", "data.split=[0.5, 0.25, 0.25]", "--set", "data.workers=1", "--set", "model.filters=4",
    "--set", "model.depth=2", "--set", "training.image_every=100", "--set", "training.score_volumes=false",
    "--set", "training.crop_size=0",  # the demo's 64-pixel patches do not fit 32-pixel slices
]


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "KERAS_LIVSEG_CACHE": str(work / "cache")}  # the commands quiet TensorFlow themselves


def _run(argv: list[str], env: dict[str, str], cwd: Path, kill_after: float | None) -> str:
    """Run a command; SIGKILL it after ``kill_after`` s. ``"killed"``, ``"finished"`` or ``"failed: ..."``."""
    process = subprocess.Popen([sys.executable, *argv], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.communicate()
        return "killed"
    if process.returncode != 0:
        return f"failed: {err.decode(errors='replace').strip().splitlines()[-1:]}"
    return "finished"


def _timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    outcome = _run(argv, env, cwd, None)
    if outcome != "finished":
        raise RuntimeError(f"{' '.join(argv)}: {outcome}")
    return time.perf_counter() - started


def _kill_loop(argv: Callable[[], list[str]], env: dict[str, str], cwd: Path, kills: int,
               span: tuple[float, float], rng: random.Random) -> dict:
    """Kill the command ``kills`` times at random points of ``span``, rerunning it each time, then finish it.

    ``argv()`` gives the command line for the next attempt (with ``--resume`` once there is
    something to resume).
    """
    killed = finished_early = 0
    for _ in range(kills):
        outcome = _run(argv(), env, cwd, rng.uniform(*span))
        if outcome == "killed":
            killed += 1
        elif outcome == "finished":
            finished_early += 1
        else:
            return {"kills": killed, "finished_early": finished_early, "error": outcome}
    final = _run(argv(), env, cwd, None)
    return {"kills": killed, "finished_early": finished_early, "error": None if final == "finished" else final}


def _lost_bytes(reference: Path, result: Path) -> tuple[int, list[str]]:
    lost, differing = 0, []
    for path in sorted(reference.rglob("*")):
        if not path.is_file():
            continue
        other = result / path.relative_to(reference)
        if not other.is_file() or other.read_bytes() != path.read_bytes():
            lost += path.stat().st_size
            differing.append(str(path.relative_to(reference)))
    return lost, differing


def kill_prepare(work: Path, kills: int, rng: random.Random, quick: bool = False) -> dict:
    from keras_livseg.data.phantom import write_phantom_dataset

    source = work / "phantom"
    # Large enough that prepare runs for seconds, so that kills land inside the work, not the imports.
    cases, size, slices = (6, 256, (48, 64)) if quick else (8, 384, (80, 100))
    write_phantom_dataset(source, cases, 0, size=size, slices=slices, overwrite=True, progress=False)
    base = ["-m", "keras_livseg.prepare", "--src", str(source), "--image-size", "128", "--workers", "1", "--no-progress"]
    seconds = _timed([*base, "--out", str(work / "prepare-ref")], _env(work), work)
    # Trials on a fresh folder, killed twice each (the run, then its resume), then finished: once a
    # run completes, later reruns only say so, which would not test anything.
    totals = {"kills": 0, "finished_early": 0, "error": None}
    lost, differing = 0, []
    for trial in range(max(kills // 2, 1)):
        out = work / f"prepare-killed-{trial}"
        outcome = _kill_loop(lambda out=out: [*base, "--out", str(out), "--resume"], _env(work), work, 2, (0.3, seconds), rng)
        totals["kills"] += outcome["kills"]
        totals["finished_early"] += outcome["finished_early"]
        totals["error"] = totals["error"] or outcome["error"]
        trial_lost, trial_differing = _lost_bytes(work / "prepare-ref", out)
        lost += trial_lost
        differing += [f"{out.name}/{name}" for name in trial_differing]
    return {"command": "prepare", **totals, "seconds_uninterrupted": round(seconds, 1), "bytes_lost": lost,
            "differing_files": differing}


def kill_fit(work: Path, kills: int, rng: random.Random, epochs: int = 4) -> dict:
    argv = ["-m", "keras_livseg.fit", *FIT_ARGS, "--epochs", str(epochs), "--runs-dir", str(work / "runs")]
    seconds = _timed([*argv, "--name", "reference"], _env(work), work)
    reference = list(csv.DictReader((work / "runs" / "reference" / "history.csv").open()))
    totals = {"kills": 0, "finished_early": 0, "error": None}
    bad_runs, same_rates = [], True
    for trial in range(max(kills // 2, 1)):  # a fresh run each trial, killed twice, then finished
        name = f"killed-{trial}"
        run_dir = work / "runs" / name

        def next_attempt(name=name, run_dir=run_dir) -> list[str]:
            if (run_dir / "config.json").is_file():
                return [*argv, "--name", name, "--resume"]
            shutil.rmtree(run_dir, ignore_errors=True)  # killed before anything was saved: start again
            return [*argv, "--name", name]

        outcome = _kill_loop(next_attempt, _env(work), work, 2, (seconds * 0.3, seconds), rng)
        totals["kills"] += outcome["kills"]
        totals["finished_early"] += outcome["finished_early"]
        totals["error"] = totals["error"] or outcome["error"]
        history = run_dir / "history.csv"
        rows = list(csv.DictReader(history.open())) if history.is_file() else []
        if [int(row["epoch"]) for row in rows] != list(range(epochs)) or not (run_dir / "complete.json").is_file():
            bad_runs.append(name)
        rates = [float(row["learning_rate"]) for row in rows if row.get("learning_rate")]
        expected = [float(row["learning_rate"]) for row in reference if row.get("learning_rate")]
        same_rates = same_rates and len(rates) == len(expected) and all(abs(a - b) <= 1e-6 * max(abs(b), 1e-12)
                                                                        for a, b in zip(rates, expected))
    return {"command": "fit", **totals, "seconds_uninterrupted": round(seconds, 1), "runs_with_wrong_history": bad_runs,
            "same_learning_rates": same_rates, "bytes_lost": 0 if not bad_runs and same_rates else -1}


def kill_export(work: Path, kills: int, rng: random.Random) -> dict:
    model = work / "export-run" / "checkpoints" / "best.keras"
    model.parent.mkdir(parents=True, exist_ok=True)
    setup = ("import sys; from keras_livseg.models import build_model; "
             "from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json; "
             "build_model('unet', input_shape=(32, 32, 1), filters=4, depth=2).save(sys.argv[1]); "
             "write_preprocessing_json(sys.argv[2], Preprocessing(image_size=(32, 32), mean=60.0, std=40.0))")
    subprocess.run([sys.executable, "-c", setup, str(model), str(work / "export-run" / "preprocessing.json")], check=True)
    base = work / "saved"
    argv = ["-m", "keras_livseg.export", "--model", str(model), "--out", str(base)]
    seconds = _timed([*argv, "--version", "1"], _env(work), work)
    half_written, killed, finished, error = [], 0, 0, None
    for attempt in range(kills):
        outcome = _run([*argv, "--version", str(attempt + 2)], _env(work), work, rng.uniform(seconds * 0.3, seconds))
        killed += outcome == "killed"
        finished += outcome == "finished"
        if outcome.startswith("failed"):  # an export that fails on its own is an error, not an early finish
            error = error or f"export --version {attempt + 2}: {outcome}"
        for version in (p for p in base.iterdir() if p.is_dir() and p.name.isdigit()):
            complete = (version / "saved_model.pb").is_file() and (version / "assets.extra" / "preprocessing.json").is_file()
            if not complete:
                half_written.append(version.name)
    hidden = [p.name for p in base.iterdir() if p.name.startswith(".")]
    return {"command": "export", "kills": killed, "finished_early": finished, "error": error,
            "seconds_uninterrupted": round(seconds, 1), "half_written_versions": sorted(set(half_written)),
            "hidden_partials_left": len(hidden), "bytes_lost": 0 if not half_written else -1}


COMMANDS = {"prepare": kill_prepare, "fit": kill_fit, "export": kill_export}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="kills per command (default 10)")
    parser.add_argument("--commands", nargs="+", choices=list(COMMANDS), default=list(COMMANDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 kills of prepare and export: a test of the script")
    args = parser.parse_args(argv)
    if args.quick:
        args.kills, args.commands = 2, ["prepare", "export"]
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for name in args.commands:
            print(f"[kill_resume] {name}: {args.kills} kills ...", file=sys.stderr, flush=True)
            extra = {"quick": args.quick} if name == "prepare" else {}
            rows.append(COMMANDS[name](work, args.kills, rng, **extra))
    print(table(rows, ["command", "kills", "finished_early", "error", "bytes_lost", "seconds_uninterrupted"]))
    path = write_json("kill_resume", {"kills_per_command": args.kills, "seed": args.seed, "rows": rows,
                                      "goal": {"bytes_lost": 0, "errors": 0}})
    print(f"\ngoal: bytes lost 0 and no error after any kill -> {path}")
    return 1 if any(row["bytes_lost"] or row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
