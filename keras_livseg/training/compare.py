"""Train several models on the same data, split, recipe and seeds; score them side by side.

``python -m keras_livseg.compare`` calls :func:`run_comparison`; :func:`compare_runs` alone
compares runs that already exist (any ``fit`` runs scored on the same held-out cases).

Layout of ``runs/<name>/`` (default name ``compare-<recipe>``)::

    <model>-seed<k>/    a normal fit run folder per model and seed (checkpoints, eval/, ...)
    compare.json        everything below, as numbers
    per_case.csv        model, seed, case, liver and tumour Dice (the paired tests' input)
    report.md           the tables: models (parameters, FLOPs, speed), Dice over seeds,
                        paired Wilcoxon tests, the papers' Tables I-IV; the figures
    figures/            dice_vs_speed.png, overlays.png (every model on the same slices)

A finished ``<model>-seed<k>`` run is reused when its settings equal the comparison's, an
interrupted one resumes, and one trained with other settings is refused (named, with what
differs): a comparison never mixes budgets.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from keras_livseg.data.atomic import atomic_path, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

#: Settings every model of a comparison must share (sections of config.json).
SHARED_SECTIONS = ("data", "preprocessing", "training")
#: Keys of those sections that may differ (resolved at run time or irrelevant to the budget).
VOLATILE_KEYS = {"training": {"resolved_precision", "init_from"}, "data": {"shards"}}


@dataclasses.dataclass
class ComparisonResult:
    """What :func:`run_comparison` produced."""

    out_dir: Path
    summary: dict[str, Any]

    @property
    def report(self) -> Path:
        return self.out_dir / "report.md"


def builder_options(model: str) -> set[str]:
    """Option names the registry's builder for ``model`` accepts (besides input shape and classes)."""
    from keras_livseg.models import MODEL_BUILDERS

    return set(inspect.signature(MODEL_BUILDERS[model]).parameters) - {"input_shape", "num_classes", "name"}


def model_section(base: Mapping[str, Any], model: str, per_model: Mapping[str, Mapping[str, Any]]) -> tuple[dict, list[str]]:
    """The ``[model]`` section for one model of a comparison, and the recipe options it ignores.

    The recipe's ``[model]`` options apply to every model that accepts them (``filters`` and
    ``depth`` to the U-Nets, not to EfficientNet-PAN); ``per_model[model]`` (from
    ``--set model.<name>.<key>=value``) applies to that model only.
    """
    accepted = builder_options(model)
    shared = {k: v for k, v in base.items() if k != "name"}
    section = {"name": model, **{k: v for k, v in shared.items() if k in accepted}}
    section.update(per_model.get(model, {}))
    return section, sorted(set(shared) - accepted)


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The shared sections of a config, without the keys allowed to differ; training keys newer
    than a run count as their defaults (which keep what the run did)."""
    from keras_livseg.training.fit import DEFAULTS

    return {section: {k: v for k, v in {**DEFAULTS.get(section, {}), **config.get(section, {})}.items()
                      if k not in VOLATILE_KEYS.get(section, set())}
            for section in SHARED_SECTIONS}


def _differences(left: Mapping[str, Any], right: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(left) | set(right))
    out = []
    for key in keys:
        a, b = left.get(key), right.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{prefix}{key}: {a!r} there, {b!r} here")
    return out


def run_comparison(
    config: dict,
    models: Sequence[str],
    seeds: Sequence[int],
    name: str | None = None,
    per_model: Mapping[str, Mapping[str, Any]] | None = None,
    measure_speed: bool = True,
    verbose: int | str | None = None,
) -> ComparisonResult:
    """Train every model with every seed on the same recipe, then :func:`compare_runs` them.

    Args:
        config: A resolved config (:func:`keras_livseg.training.fit.resolve_config`); its
            ``[model]`` options go to the models that accept them.
        models: Registry names; the first is the paired tests' baseline.
        seeds: Training seeds (``run.seed``); the data and split stay those of the recipe.
        name: Folder under ``run.runs_dir`` (default ``compare-<recipe>``).
        per_model: ``{model: {option: value}}`` for one model only.
        measure_speed: Time training and inference on in-memory batches (a few seconds each).
        verbose: Keras verbosity of the training runs.

    Raises:
        ValueError: an unknown model, no seed, or a finished run with other settings.

    Example:
        >>> from keras_livseg.training.fit import resolve_config
        >>> result = run_comparison(resolve_config(), ["unet", "tam_unet"], [0, 1])  # doctest: +SKIP
        >>> result.report  # doctest: +SKIP
        PosixPath('runs/compare-phantom_demo/report.md')
    """
    from keras_livseg.models import available_models, missing_extra
    from keras_livseg.training.fit import COMPLETE_FILE, train

    per_model = dict(per_model or {})
    unknown = [m for m in list(models) + list(per_model) if m not in available_models()]
    if unknown:
        raise ValueError(f"unknown model name(s) {unknown}; valid names are {', '.join(available_models())}")
    for model in models:
        missing_extra(model)  # a keras-cv model without the extra: one line, before any training
    if not models or not seeds:
        raise ValueError("compare needs at least one model and one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds gave the same seed twice: {list(seeds)}")
    config = same_input_for_all(config, models)
    out_dir = Path(config["run"]["runs_dir"]) / (name or f"compare-{Path(config['recipe']).stem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dirs, total = [], len(models) * len(seeds)
    for index, (model, seed) in enumerate(((m, s) for m in models for s in seeds), start=1):
        run_config = copy.deepcopy(config)
        run_config["model"], ignored = model_section(config["model"], model, per_model)
        if ignored:
            logger.info("%s does not take the recipe's model option(s) %s: its defaults apply", model, ", ".join(ignored))
        run_config["run"].update({"seed": int(seed), "runs_dir": str(out_dir), "name": f"{model}-seed{seed}"})
        run_config["export"]["enabled"] = False
        run_config["training"]["score_volumes"] = True
        run_dir = out_dir / run_config["run"]["name"]
        logger.info("[%d/%d] %s, seed %d -> %s", index, total, model, seed, run_dir)
        saved = run_dir / "config.json"
        if saved.is_file():
            previous = json.loads(saved.read_text())
            differ = _differences(_settings(previous), _settings(run_config)) + _differences(
                previous.get("model", {}), run_config["model"], "model.")
            if differ:
                raise ValueError(f"{run_dir} was trained with other settings ({'; '.join(differ[:4])}); "
                                 "compare under another --name, or delete that run folder")
        if (run_dir / COMPLETE_FILE).is_file():
            logger.info("[%d/%d] %s seed %d: finished before, reused", index, total, model, seed)
        else:
            if run_dir.exists() and not saved.is_file():
                shutil.rmtree(run_dir)  # killed before its config was written: nothing to keep
            started = time.perf_counter()
            result = train(run_config, resume=saved.is_file(), verbose=verbose)
            if result.stopped_on_nan is not None:
                raise ValueError(f"{run_dir}: the loss became NaN; lower the learning rate "
                                 f"(--set model.{model}... or training.learning_rate) and rerun the same command")
            atomic_write_json(run_dir / "wall.json", {"seconds": time.perf_counter() - started}, sort_keys=True)
        run_dirs.append(run_dir)
    summary = compare_runs(run_dirs, out_dir, measure_speed=measure_speed,
                           budget=_budget(config["training"]), labels=[f"{m}" for m in models for _ in seeds])
    return ComparisonResult(out_dir, summary)


def same_input_for_all(config: Mapping[str, Any], models: Sequence[str]) -> dict:
    """``config`` with whole slices for every model when one of ``models`` cannot train on
    patches (``training.crop_size``): a comparison gives every model the same input and budget.

    >>> same_input_for_all({"training": {"crop_size": 64}}, ["unet", "effb0_pan"])["training"]["crop_size"]
    0
    >>> same_input_for_all({"training": {"crop_size": 64}}, ["unet", "tam_unet"])["training"]["crop_size"]
    64
    """
    from keras_livseg.models import PATCH_TRAINABLE

    crop = int(config.get("training", {}).get("crop_size") or 0)
    whole = [model for model in models if model not in PATCH_TRAINABLE]
    if not crop or not whole:
        return dict(config)
    logger.info("%s cannot train on patches: every model trains on whole slices (training.crop_size %d -> 0), so that "
                "all see the same input", ", ".join(whole), crop)
    return {**config, "training": {**config["training"], "crop_size": 0}}


def _budget(training: Mapping[str, Any]) -> str:
    steps = int(training.get("steps_per_epoch") or 0)
    per_epoch = f"{steps} steps" if steps else "one pass over the training slices"
    budget = f"{training['epochs']} epochs of {per_epoch}, batch {training['batch_size']}"
    crop = int(training.get("crop_size") or 0)
    budget += f" of {crop}x{crop} patches" if crop else ""
    minutes = float(training.get("max_minutes") or 0)
    if minutes > 0:
        budget = f"at most {budget}, each run stopped after the first epoch that ended past {minutes:g} min"
    return budget


@dataclasses.dataclass
class _Run:
    path: Path
    label: str
    config: dict
    metrics: dict
    rows: list[dict]

    @property
    def seed(self) -> int:
        return int(self.config["run"]["seed"])


def _load_run(path: Path, label: str | None) -> _Run:
    path = Path(path)
    volumes = path / "eval" / "volumes"
    needed = [path / "config.json", volumes / "metrics.json", volumes / "per_case.csv", path / "checkpoints" / "best.keras"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise ValueError(f"{path} is not a finished, scored run (missing {', '.join(missing)}); finish it with "
                         "python -m keras_livseg.fit --resume --name <run>, and give it test or validation cases")
    config = json.loads((path / "config.json").read_text())
    with (volumes / "per_case.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if label is None:
        label = path.name
        seed_suffix = f"-seed{config['run']['seed']}"
        label = label[: -len(seed_suffix)] if label.endswith(seed_suffix) else label
    return _Run(path, label, config, json.loads((volumes / "metrics.json").read_text()), rows)


def _check_same_cases(runs: Sequence[_Run]) -> None:
    """Refuse runs scored on different data, splits or cases, naming what differs."""
    first = runs[0]

    def key(run: _Run) -> dict[str, Any]:
        return {"shards": run.config["data"].get("shards"), "split": run.metrics.get("split"),
                "cases": sorted(run.metrics.get("cases") or []),
                "preprocessing": run.config.get("preprocessing")}

    for run in runs[1:]:
        differ = _differences(key(first), key(run))
        if differ:
            raise ValueError(f"runs made on different data or splits: {first.path} and {run.path} differ in "
                             f"{'; '.join(d.replace(' there,', f' in {first.path.name},').replace(' here', f' in {run.path.name}') for d in differ[:3])}; "
                             "compare runs trained and scored on the same shards and split")


def compare_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    measure_speed: bool = True,
    budget: str | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Compare finished runs scored on the same held-out cases: tables, paired tests, figures.

    Runs with the same label (the run folder's name less ``-seed<k>``) are seeds of one model;
    the first label is the paired tests' baseline.

    Args:
        run_dirs: ``fit`` run folders, each with ``eval/volumes/metrics.json``.
        out_dir: Where ``compare.json``, ``per_case.csv``, ``report.md`` and ``figures/`` go.
        measure_speed: Time each model's training and inference on in-memory batches.
        budget: How the runs were trained, for the report (default: the first run's epochs).
        labels: One label per run instead of the folder names.

    Returns:
        The summary written to ``compare.json``.

    Raises:
        ValueError: a run that is unfinished or unscored, or runs on different data or splits.
    """
    from keras_livseg.evaluation import plots
    from keras_livseg.evaluation.comparison import (
        TEST_COLUMNS,
        mean_metrics,
        paired_test,
        per_case_means,
        render_comparison,
        spread_metrics,
    )
    from keras_livseg.evaluation.pairs import MatchedCase, manifest_cases
    from keras_livseg.models.complexity import count_flops, count_parameters, measure_throughput
    from keras_livseg.models.saving import load_keras_model
    from keras_livseg.models.attention_maps import attention_maps

    if not run_dirs:
        raise ValueError("compare needs at least one run")
    runs = [_load_run(Path(p), labels[i] if labels else None) for i, p in enumerate(run_dirs)]
    _check_same_cases(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[_Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    for label, members in groups.items():
        seeds = [r.seed for r in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{label}: two runs with the same seed ({', '.join(str(r.path) for r in members)}); "
                             "give each run its own label")

    first = runs[0]
    cases = list(first.metrics["cases"])
    probe_image, probe_mask, probe_title = _attention_slice(first)
    attention: dict[str, dict[str, Any]] = {}
    entries = []
    baseline_means: dict[str, dict[str, float]] = {}
    for position, (label, members) in enumerate(groups.items()):
        logger.info("scoring %s (%d seed(s))", label, len(members))
        model = load_keras_model(members[0].path / "checkpoints" / "best.keras")
        entry: dict[str, Any] = {
            "name": label,
            "model": members[0].config["model"],
            "runs": [str(r.path) for r in members],
            "seeds": [r.seed for r in members],
            "parameters": count_parameters(model),
            "flops": count_flops(model),
            "per_seed": [{"seed": r.seed, "liver_dice": r.metrics["volume"]["liver"]["dice"],
                          "tumor_dice": r.metrics["volume"]["tumor"]["dice"]} for r in members],
            "mean": mean_metrics([r.metrics for r in members]),
            "spread": spread_metrics([r.metrics for r in members]),
        }
        walls = [json.loads((r.path / "wall.json").read_text())["seconds"] for r in members if (r.path / "wall.json").is_file()]
        entry["training_minutes"] = sum(walls) / len(walls) / 60 if walls else None
        if measure_speed:
            batch = int(members[0].config["training"].get("batch_size", 8))
            logger.info("timing %s: training and inference on in-memory batches of %d", label, batch)
            entry["speed"] = measure_throughput(model, batch_size=batch)
        if probe_image is not None:
            attention[label] = attention_maps(model, probe_image[None])
            attention[label] = {k: v[0] for k, v in attention[label].items()}
        del model
        rows = [row for r in members for row in r.rows]
        means = {region: per_case_means(rows, column) for region, column in TEST_COLUMNS.items()}
        entry["per_case_mean"] = means
        if position == 0:
            baseline_means = means
        else:
            entry["paired_tests"] = {
                region: paired_test([means[region].get(c, float("nan")) for c in cases],
                                    [baseline_means[region].get(c, float("nan")) for c in cases])
                for region in TEST_COLUMNS
            }
        entries.append(entry)
    entries[0]["paired_tests"] = {}

    figures: dict[str, str] = {}
    drawn = plots.plot_dice_vs_speed(entries, out_dir / "figures" / "dice_vs_speed.png")
    split = first.metrics.get("split")
    shards = first.config["data"].get("shards")
    matched = []
    if shards and split:
        label_map = {int(k): int(v) for k, v in (json.loads((Path(shards) / "manifest.json").read_text())
                                                   .get("label_map") or {}).items()} or None
        files = {c.case_id: c for c in manifest_cases(shards, split)}
        matched = [MatchedCase(c, files[c].label, files[c].label, files[c].image) for c in cases if c in files]
        predictions = {label: {row["case_id"]: Path(row["prediction"]) for row in members[0].rows}
                       for label, members in groups.items()}
        drawn.update(plots.plot_model_overlays(matched, predictions, out_dir / "figures" / "overlays.png", label_map))
    if probe_image is not None:
        drawn.update(plots.plot_attention(probe_image, probe_mask, attention, out_dir / "figures" / "attention.png",
                                          probe_title))
    figures = {title: str(path.relative_to(out_dir)) for title, path in drawn.items()}

    summary = {
        "models": entries,
        "seeds": sorted({r.seed for r in runs}),
        "cases": cases,
        "split": split,
        "covers": "every slice of each held-out volume, native grid, post-processed (LiTS scoring)",
        "data": shards,
        "recipe": first.config.get("recipe"),
        "budget": budget or _budget(first.config["training"]),
        "input_shape": _input_shape(first.path),
        "speed_batch": int(first.config["training"].get("batch_size", 8)),
        "machine": _machine(),
        "figures": figures,
    }
    from keras_livseg.evaluation.report import _json_ready

    summary = _json_ready(summary)
    with atomic_path(out_dir / "per_case.csv") as partial, partial.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "seed", "case_id", "liver_dice", "tumor_dice"])
        for run in runs:
            for row in run.rows:
                writer.writerow([run.label, run.seed, row["case_id"], row.get("liver_dice"), row.get("tumor_dice")])
    atomic_write_text(out_dir / "report.md", render_comparison(summary))
    atomic_write_json(out_dir / "compare.json", summary, sort_keys=True, default=str)  # last: its presence means the comparison is whole
    logger.info("wrote %s", out_dir / "report.md")
    return summary


def _attention_slice(run: _Run) -> tuple[Any, Any, str]:
    """The held-out model-grid slice with the most tumour (from the run's shards), for the attention figure."""
    import numpy as np

    from keras_livseg.data.dataset import make_dataset
    from keras_livseg.data.prepare import load_manifest
    from keras_livseg.training.callbacks import pick_tumor_slices

    shards, split = run.config["data"].get("shards"), run.metrics.get("split")
    if not shards or not split or not Path(shards, "manifest.json").is_file():
        return None, None, ""
    manifest = load_manifest(Path(shards))
    if not manifest["splits"].get(split, {}).get("slices"):
        return None, None, ""
    images, masks = pick_tumor_slices(make_dataset(manifest, split, 8, training=False), count=1)
    if not len(images):
        return None, None, ""
    return (np.asarray(images[0], np.float32), np.asarray(masks[0]),
            f"the held-out {split} slice with the most tumour, as the models see it (model grid)")


def _input_shape(run_dir: Path) -> str | None:
    path = run_dir / "preprocessing.json"
    if not path.is_file():
        return None
    prep = json.loads(path.read_text()).get("preprocessing", {})
    size = prep.get("image_size") or []
    return "x".join(str(v) for v in [*size, prep.get("context", 1)])


def _machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load {os.getloadavg()[0]:.1f} when timed" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {cores} cores{load}"
