"""``prepare`` on Apache Beam: the same cases, shards and manifest as the local engine.

The local engine (:func:`keras_livseg.data.prepare.prepare_dataset`) runs worker processes on
one machine. This engine expresses the same run as a Beam pipeline, so that it runs wherever a
platform team already operates Beam (Dataflow, Flink, Spark, or the DirectRunner on one
machine). Every step is the local engine's own function; only the scheduling differs:

1. ``Cases`` → ``Reshuffle`` → ``Process``: one element per case;
   :func:`~keras_livseg.data.prepare.process_case` reads one volume and writes its examples
   to ``<out>/.work/<case>.tfrecord`` plus a summary. A worker holds one volume at a time.
2. ``Plan``: the outcomes, gathered (summaries only, a few kB a case), give the patient split
   (:func:`~keras_livseg.data.prepare.assign_splits`) and the shard plan.
3. ``TrainStatistics``: a ``CombineGlobally`` of the training cases' foreground statistics
   (:class:`~keras_livseg.data.preprocessing.StatisticsSum`: exact, so any merge order gives
   the local engine's figures to the last bit).
4. ``WriteShards``: one element per shard, concatenating per-case files record by record.
5. ``Manifest``: waits on every shard (side inputs), then writes ``manifest.json`` last,
   atomically, and removes ``.work/``.

The result is byte-identical to the local engine's on the same input: same shards, same
manifest. ``--resume`` reuses finished per-case files exactly as the local engine does.

The runner's workers must all see ``--src`` and ``--out``: on one machine (DirectRunner, a local
Flink or Spark) any folder; on a cluster a shared filesystem.

Example:
    >>> from keras_livseg.data.prepare import PrepareOptions
    >>> manifest = prepare_with_beam(PrepareOptions(src="phantom/", out="shards/"),
    ...                              runner="DirectRunner")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from keras_livseg.data.prepare import (
    MANIFEST_NAME,
    SPLITS,
    WORK_DIR,
    PrepareOptions,
    _worker,
    assign_splits,
    build_manifest,
    finish_run,
    load_manifest,
    plan_split_shards,
    remove_finished_run,
    split_record,
    standardized_preprocessing,
    start_run,
    write_shard,
)
from keras_livseg.data.preprocessing import StatisticsSum
from keras_livseg.data.volumes import CaseFiles, DataError

logger = logging.getLogger(__name__)

#: Runners this engine accepts (Beam's names).
RUNNERS = ("DirectRunner", "PrismRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner")
#: Runners whose workers run on other machines: ``--src`` and ``--out`` must be shared storage.
REMOTE_RUNNERS = ("DataflowRunner",)
_FAILED = "failed.json"  # in .work/: why the pipeline wrote no manifest, for the driver to report


def _import_beam():
    # Beam's import logs warnings about Google Cloud clients this engine never uses.
    logging.disable(logging.WARNING)
    try:
        import apache_beam
    except ImportError:
        raise DataError('--engine beam needs Apache Beam: pip install "keras_livseg[beam]"') from None
    finally:
        logging.disable(logging.NOTSET)
    return apache_beam


class _Progress:
    """A progress bar in the driver, counting the per-case summaries the workers have written.

    Beam's workers are other processes (or machines); their finished cases show up as
    ``.work/<case>.json`` files, which every runner's workers write to the shared ``--out``.
    """

    def __init__(self, work_dir: Path, done_before: int, total: int, enabled: bool) -> None:
        self.work_dir, self.done_before, self.total = work_dir, done_before, total
        self.enabled = enabled and sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _count(self) -> int:
        # Hidden names are writes in progress (or left by a killed worker): not finished cases.
        return sum(1 for p in self.work_dir.glob("*.json") if p.name != _FAILED and not p.name.startswith("."))

    def _run(self) -> None:
        from tqdm import tqdm

        with tqdm(total=self.total, initial=self.done_before, desc="prepare (beam)", unit="case") as bar:
            while not self._stop.wait(0.5):
                bar.update(max(self._count() - bar.n, 0))
            bar.update(max(self._count() - bar.n, 0))

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()


def _process(files: CaseFiles, options: PrepareOptions, work_dir: str) -> tuple[str, dict | None, str | None]:
    case_id, summary, error = _worker((files, options, Path(work_dir)))
    if error is None:
        logger.info("case %s: %d slices", case_id, len(summary["slice_indices"]))
    return case_id, summary, error


def _plan(outcomes: Sequence[tuple], options: PrepareOptions, case_order: Sequence[str],
          patients: Mapping[str, str], strata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Split and shard plan from every case's outcome; ``{"error": ...}`` when the run must stop."""
    position = {cid: i for i, cid in enumerate(case_order)}
    outcomes = sorted(outcomes, key=lambda o: position[o[0]])
    errors = [(cid, error) for cid, _, error in outcomes if error is not None]
    if errors and options.on_error == "stop":
        return {"error": errors[0][1]}
    for cid, error in errors:
        logger.warning("skipping case %s: %s", cid, error)
    by_id = {cid: summary for cid, summary, error in outcomes if error is None}
    if not by_id:
        return {"error": f"every case in {options.src} was skipped; see the warnings above"}
    try:
        splits = assign_splits(options, list(by_id), patients, strata)
    except DataError as error:
        return {"error": str(error)}
    shard_plan = [
        (split, name, case_ids)
        for split in SPLITS
        for name, case_ids in plan_split_shards(split, [by_id[cid] for cid in splits[split]], options)
    ]
    remove_finished_run(Path(options.out))  # --overwrite: the old run stays until every case was read
    return {
        "by_id": by_id,
        "splits": splits,
        "strata": strata,
        "skipped": [{"case_id": cid, "reason": error} for cid, error in errors],
        "shards": shard_plan,
    }


def _training_parts(outcome: tuple, plan: Mapping[str, Any]):
    case_id, summary, error = outcome
    if error is None and "splits" in plan and case_id in plan["splits"]["train"]:
        yield summary["foreground"]


def _write_shard(item: tuple, options: PrepareOptions) -> dict[str, Any]:
    split, name, case_ids = item
    out = Path(options.out)
    written = write_shard(out, out / WORK_DIR, name, case_ids, options.compression)
    logger.info("shard %s: %d cases, %d bytes", name, len(case_ids), written["bytes"])
    return {"split": split, **written}


def _finalize(_, plan: Mapping[str, Any], statistics: StatisticsSum, written: Sequence[Mapping[str, Any]],
              options: PrepareOptions, patients: Mapping[str, str]) -> None:
    out = Path(options.out)
    try:
        if "error" in plan:
            raise DataError(plan["error"])
        foreground = statistics.result()
        prep = standardized_preprocessing(options, foreground)
        by_id, splits = plan["by_id"], plan["splits"]
        order = {name: i for i, (_, name, _) in enumerate(plan["shards"])}
        split_info = {
            split: split_record(
                [by_id[cid] for cid in splits[split]],
                sorted((w for w in written if w["split"] == split), key=lambda w: order[w["name"]]),
            )
            for split in SPLITS
        }
        manifest = build_manifest(options, prep, foreground, splits, split_info, by_id, patients, plan["skipped"],
                                  plan.get("strata"))
    except DataError as error:
        (out / WORK_DIR / _FAILED).write_text(json.dumps({"error": str(error)}))
        return
    finish_run(out, manifest)


def _statistics_combine(window: Sequence[float]):
    """A Beam ``CombineFn`` summing per-case foreground parts (defined here: Beam is an extra)."""
    import apache_beam as beam

    class StatisticsCombine(beam.CombineFn):
        def create_accumulator(self) -> StatisticsSum:
            return StatisticsSum(window)

        def add_input(self, accumulator: StatisticsSum, part: Mapping[str, Any]) -> StatisticsSum:
            accumulator.add(part)
            return accumulator

        def merge_accumulators(self, accumulators) -> StatisticsSum:
            merged = StatisticsSum(window)
            for accumulator in accumulators:
                merged.merge(accumulator)
            return merged

        def extract_output(self, accumulator: StatisticsSum) -> StatisticsSum:
            return accumulator

    return StatisticsCombine()


def pipeline_options(runner: str, workers: int, pipeline_args: Sequence[str] = (), verbose: bool = False) -> Any:
    """Beam ``PipelineOptions`` for ``runner``; on the DirectRunner, ``workers`` processes.

    ``pipeline_args`` (Beam's own flags, such as ``--project`` or ``--flink_master``) come last
    and win over these defaults.

    Raises:
        DataError: a flag that Beam does not know (Beam itself would drop it with a warning).
    """
    _import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    # Workers log warnings only: Beam's harness chatter would bury the command's own output.
    flags = [f"--runner={runner}", f"--default_sdk_harness_log_level={'INFO' if verbose else 'WARNING'}"]
    if runner == "DirectRunner":
        workers = workers or min(os.cpu_count() or 1, 4)
        mode = "multi_processing" if workers > 1 else "in_memory"
        flags += [f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"]
    options = PipelineOptions(flags + list(pipeline_args))
    # Beam drops flags it does not know with a warning; a typo would then be silently ignored.
    logging.disable(logging.WARNING)
    try:
        known = options.get_all_options(retain_unknown_options=False)
        unknown = [k for k in options.get_all_options(retain_unknown_options=True) if k not in known]
    finally:
        logging.disable(logging.NOTSET)
    if unknown:
        raise DataError(
            f"unknown option --{unknown[0]}: neither prepare's nor a Beam pipeline option; "
            "see python -m keras_livseg.prepare --help and Beam's pipeline options"
        )
    return options


def _check_runner(runner: str, options: PrepareOptions) -> None:
    if runner not in RUNNERS:
        raise DataError(f"unknown Beam runner {runner!r}; use one of {', '.join(RUNNERS)}")
    if runner in REMOTE_RUNNERS:
        raise DataError(
            f"--runner {runner} runs on other machines, which cannot read the local paths --src {options.src} "
            f"and --out {options.out}; use --runner FlinkRunner or SparkRunner on a cluster whose workers share "
            "a filesystem, or the DirectRunner here"
        )


def prepare_with_beam(options: PrepareOptions, runner: str = "DirectRunner",
                      pipeline_args: Sequence[str] = (), verbose: bool = False) -> dict[str, Any]:
    """Run ``prepare`` as an Apache Beam pipeline and return the manifest.

    Args:
        options: the same options as the local engine; ``workers`` sets the DirectRunner's
            worker processes (0: one per core, at most 4).
        runner: a Beam runner name (:data:`RUNNERS`).
        pipeline_args: further Beam pipeline flags, passed through.
        verbose: Beam's own INFO logging too (workers and driver).

    Raises:
        DataError: bad input (the same checks and messages as the local engine), an unknown
            runner, or Beam not installed.
    """
    _check_runner(runner, options)
    beam_options = pipeline_options(runner, options.workers, pipeline_args, verbose)
    beam = _import_beam()
    if not verbose:
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
        # The DirectRunner forwards each worker's start-up warnings once more through this logger.
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
    out, all_cases, reused, strata = start_run(options)
    if reused is None:
        return load_manifest(out)
    work_dir = out / WORK_DIR
    (work_dir / _FAILED).unlink(missing_ok=True)
    todo = [files for files in all_cases if files.case_id not in reused]
    case_order = [c.case_id for c in all_cases]
    patients = {c.case_id: c.patient for c in all_cases}
    window = options.preprocessing().window
    # Workers must not draw progress bars or re-check the output: the driver did.
    worker_options = dataclasses.replace(options, progress=False)
    logger.info("prepare on Beam's %s: %d cases to process, %d reused", runner, len(todo), len(reused))

    progress = _Progress(work_dir, len(reused), len(all_cases), options.progress)
    with progress, beam.Pipeline(options=beam_options) as pipeline:
        fresh = (
            pipeline
            | "Cases" >> beam.Create(todo)
            | "Spread" >> beam.Reshuffle()
            | "Process" >> beam.Map(_process, options=worker_options, work_dir=str(work_dir))
        )
        done_before = pipeline | "Reused" >> beam.Create([(cid, summary, None) for cid, summary in reused.items()])
        outcomes = (fresh, done_before) | "Outcomes" >> beam.Flatten()
        plan = (
            outcomes
            | "Gather" >> beam.combiners.ToList()
            | "Plan" >> beam.Map(_plan, options=worker_options, case_order=case_order, patients=patients,
                                      strata=strata)
        )
        statistics = (
            outcomes
            | "TrainingParts" >> beam.FlatMap(_training_parts, plan=beam.pvalue.AsSingleton(plan))
            | "TrainStatistics" >> beam.CombineGlobally(_statistics_combine(window))
        )
        written = (
            plan
            | "ShardPlan" >> beam.FlatMap(lambda p: p.get("shards", []))
            | "SpreadShards" >> beam.Reshuffle()
            | "WriteShards" >> beam.Map(_write_shard, options=worker_options)
        )
        (
            pipeline
            | "Once" >> beam.Create([None])
            | "Manifest" >> beam.Map(
                _finalize,
                plan=beam.pvalue.AsSingleton(plan),
                statistics=beam.pvalue.AsSingleton(statistics),
                written=beam.pvalue.AsList(written),
                options=worker_options,
                patients=patients,
            )
        )

    failed = work_dir / _FAILED
    if failed.is_file():  # first: under --overwrite the old run's manifest is still there
        raise DataError(json.loads(failed.read_text())["error"])
    if (out / MANIFEST_NAME).is_file():
        return load_manifest(out)
    raise DataError(f"the Beam pipeline finished without writing {out / MANIFEST_NAME}; rerun with --resume")
