"""``fit``: recipe → data (phantom or real) → shards → model → ``model.fit`` → test metrics.

:func:`resolve_config` merges the recipe (``pipelines/<name>.toml``) with command-line
overrides into one fully resolved dict (saved as ``<run>/config.json``); :func:`train`
runs everything and returns a :class:`FitResult`.

A run folder ``runs/<name>/`` holds ``config.json``, ``preprocessing.json`` (with the
post-processing chosen on the validation volumes after training), ``history.csv``,
``tensorboard/``, ``checkpoints/best.keras`` (best ``val_tumor_dice``) and ``last.keras``,
``backup/`` (:class:`~keras_livseg.training.callbacks.RunBackup`: a killed run continues with
``--resume`` at the right epoch and learning-rate step; removed once the run is complete) and
``eval/``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from keras_livseg.data import storage
from keras_livseg.data.atomic import atomic_path, atomic_write_json, atomic_write_text, make_once, one_maker
from keras_livseg.training.recipe import DATA_KEYS, PREPROCESSING_KEYS, check_keys, load_recipe

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = "phantom_demo.toml"
RUN_KEYS = frozenset({"name", "runs_dir", "seed", "deterministic"})
TRAINING_KEYS = frozenset(
    {
        "epochs", "batch_size", "steps_per_epoch", "optimizer", "learning_rate", "weight_decay", "schedule",
        "warmup_fraction", "div_factor", "final_div_factor", "loss", "ce_weight", "dice_weight", "class_weights",
        "fn_weights",
        "foreground_fraction", "augmentation", "precision", "image_every", "early_stopping_patience", "cache",
        "shuffle_buffer", "monitor", "validation", "validate_last", "init_from", "score_volumes", "score_slices", "max_minutes",
        "choose_postprocessing", "postprocessing_diameters_mm", "crop_size", "tumor_sampling",
    }
)
EXPORT_KEYS = frozenset({"enabled", "out", "version", "overwrite"})
MODEL_FIXED_KEYS = frozenset({"name"})  # everything else in [model] goes to build_model

DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {"name": "", "runs_dir": "runs", "seed": 0, "deterministic": False},
    "data": {},
    "preprocessing": {},
    "model": {"name": "tam_unet"},
    "training": {
        "epochs": 20,
        "batch_size": 8,
        "steps_per_epoch": 0,
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "weight_decay": 1e-4,
        "schedule": "none",
        "warmup_fraction": 0.3,
        "div_factor": 25.0,
        "final_div_factor": 1e4,
        "loss": "ce_dice",
        "ce_weight": 1.0,
        "dice_weight": 1.0,
        "class_weights": [],
        "fn_weights": [],
        "foreground_fraction": 0.33,
        "augmentation": {},
        "precision": "auto",
        "image_every": 1,
        "early_stopping_patience": 0,
        "cache": True,
        "shuffle_buffer": 2048,
        "monitor": "val_tumor_dice",
        # "split": validate on the validation split in model.fit (training.validate_last says which
        # epochs) and keep the best checkpoint by training.monitor. "none": no validation pass while
        # training; best.keras is the last epoch, as nnU-Net keeps its final checkpoint. Validation
        # cases, when the split has any, still choose the post-processing on their whole volumes and
        # give TensorBoard its images.
        "validation": "split",
        # > 0: validate only in the last this many epochs (the best checkpoint is chosen among
        # them), giving the time of the others' validation to training; 0 validates every epoch.
        "validate_last": 0,
        "init_from": "",
        "score_volumes": True,  # also score the held-out cases' whole volumes (native grid, LiTS)
        # Also evaluate the held-out split's shard slices (model grid; eval/test_metrics.json):
        # the figures that compare with training's. Off, a run with score_volumes has only those.
        "score_slices": True,
        "max_minutes": 0.0,  # > 0: stop after the first epoch that ends past this many minutes
        # Choose the minimum lesion size on the validation volumes (inference.tuning), as nnU-Net
        # chooses its post-processing; predict, evaluate and the export then apply it.
        "choose_postprocessing": True,
        # The candidate minimum lesion sizes, as sphere diameters in mm (inference.tuning's
        # CANDIDATE_DIAMETERS_MM when empty). The largest one caps what the choice may delete:
        # e.g. [6, 8] never removes a predicted lesion of 8 mm or more.
        "postprocessing_diameters_mm": [],
        # > 0: train on crop_size x crop_size patches (the tumor quota's around their tumor), as
        # nnU-Net does; validation, checkpoints and everything after see whole slices.
        "crop_size": 0,
        # How the foreground quota draws its tumour slices: "slice" (each alike), "case" (each
        # tumour-bearing case alike, then one of its tumour slices, as nnU-Net picks a case first)
        # or "stratum" (each stratum of a stratified split alike: data.stratify = true).
        "tumor_sampling": "slice",
    },
    "export": {"enabled": True, "out": "saved_models/livseg", "version": 0, "overwrite": False},
}


def recipe_path(name_or_path: str | Path | None) -> Path:
    """Find a recipe: a path, or a file name under the project's ``pipelines/`` folder."""
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    path = Path(name_or_path)
    if path.is_file():
        return path
    for folder in (Path.cwd() / "pipelines", Path(__file__).resolve().parents[2] / "pipelines"):
        candidate = folder / path.name
        if candidate.is_file():
            return candidate
    return path  # load_recipe reports it with the available recipes


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` (value parsed as TOML, else a string) → ``(section, key, value)``.

    Example:
        >>> parse_override("training.epochs=3")
        ('training', 'epochs', 3)
    """
    import tomllib

    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"--set expects section.key=value (e.g. training.epochs=3), got {text!r}")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section.strip(), key.strip(), value


def _set_dotted(table: dict, section: str, key: str, value: Any) -> None:
    """``table[key] = value``, where a dotted ``key`` (``augmentation.rotation``) sets one entry of a
    nested table and keeps its others, as ``--set training.augmentation.rotation=0.04`` needs.

    Example:
        >>> table = {"augmentation": {"zoom": 0.1}}
        >>> _set_dotted(table, "training", "augmentation.rotation", 0.04); table
        {'augmentation': {'zoom': 0.1, 'rotation': 0.04}}
    """
    *parents, last = key.split(".")
    for depth, part in enumerate(parents):
        child = table.setdefault(part, {})  # a new name is refused by the key check that follows
        if not isinstance(child, dict):
            name = ".".join([section, *parents[:depth + 1]])
            raise ValueError(f"{name} is a value, not a table: set it whole with --set {name}=VALUE")
        table = child
    table[last] = value


def resolve_config(recipe: str | Path | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """Defaults ← recipe ← overrides, with every key checked.

    Raises:
        ValueError: an unknown section or key (named, with the valid ones).
    """
    path = recipe_path(recipe)
    loaded = load_recipe(path)
    config = copy.deepcopy(DEFAULTS)
    for layer in (loaded, overrides or {}):
        for section, values in layer.items():
            if section not in config:
                raise ValueError(f"unknown recipe section [{section}]; valid sections: {', '.join(config)}")
            for key, value in values.items():
                _set_dotted(config[section], section, key, value)
    check_keys(config["run"], RUN_KEYS, "run")
    check_keys(config["data"], DATA_KEYS, "data")
    check_keys(config["preprocessing"], PREPROCESSING_KEYS, "preprocessing")
    check_keys(config["training"], TRAINING_KEYS, "training")
    check_keys(config["export"], EXPORT_KEYS, "export")
    from keras_livseg.data.augment import Augmentation  # TensorFlow is loaded for the training anyway

    Augmentation.from_config(config["training"]["augmentation"])  # its keys and values, before any run folder
    # Every switch (a key whose default is true or false, and data.stratify) must be one: a string
    # such as "flase" or a number would otherwise read as true.
    switches = [(section, key) for section, table in DEFAULTS.items() if isinstance(table, dict)
                for key, default in table.items() if isinstance(default, bool)] + [("data", "stratify")]
    for section, key in switches:
        if key in config[section] and not isinstance(config[section][key], bool):
            raise ValueError(f"{section}.{key} must be true or false, got {config[section][key]!r}")
    postprocessing_diameters(config["training"])  # before any data is made or read
    config["recipe"] = str(path)
    return config


@dataclasses.dataclass
class FitResult:
    """What a finished run produced: paths and numbers for the summary."""

    run_dir: Path
    best_checkpoint: Path | None
    export_dir: Path | None
    test_metrics: dict[str, float]
    epochs_done: int
    seconds: float
    stopped_on_nan: tuple[int, int] | None = None
    volume_metrics: dict[str, Any] | None = None
    warm_start: str | None = None
    already_complete: bool = False
    #: False on the other workers of a multi-worker run: they write nothing and export nothing.
    chief: bool = True
    #: SHA-256 of the final weights (every worker logs it: equal on all workers).
    weights_sha256: str | None = None


#: Written last by a run that finished all its epochs and its held-out scoring.
COMPLETE_FILE = "complete.json"


def _finished_run(run_dir: Path, epochs: int) -> FitResult | None:
    """The result of a run that already finished ``epochs`` epochs (``--resume`` of a done job)."""
    path = run_dir / COMPLETE_FILE
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    if int(done["epochs_done"]) < epochs and not done.get("stopped_early"):
        return None  # --resume with more epochs: train on (a run its budget or early stopping ended is done)
    best = Path(done["best_checkpoint"]) if done.get("best_checkpoint") else None
    return FitResult(run_dir, best, None, done.get("test_metrics") or {}, int(done["epochs_done"]), 0.0,
                     volume_metrics=done.get("volume_metrics"), already_complete=True)


def _cache_root() -> Path:
    return Path(os.environ.get("KERAS_LIVSEG_CACHE", ".cache/keras_livseg"))


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


#: Case-id prefix of the phantom cases mixed into real training data (``data.mix_phantom``).
MIXED_PHANTOM_PREFIX = "phantom-"


#: Below this many phantom cases, fit makes them in its own process.
PHANTOM_CASES_PER_WORKER = 16


def _phantom_dir(data: Mapping[str, Any]) -> Path:
    """The recipe's phantom dataset (generated once, cached by its parameters and generator version)."""
    from keras_livseg.data.phantom import GENERATOR_VERSION, write_phantom_dataset

    phantom = {
        "generator": GENERATOR_VERSION,
        "cases": int(data.get("phantom_cases", 12)),
        "seed": int(data.get("phantom_seed", 0)),
        "size": int(data.get("phantom_size", 256)),
        "slices": tuple(data.get("phantom_slices", (32, 64))),
        "spacing_mm": tuple(data.get("phantom_spacing_mm", (0.6, 1.0))),
    }
    phantom_dir = _cache_root() / f"phantom-{_digest(phantom)}"

    def generate() -> None:
        # data.workers processes, as prepare uses (0: one per CPU, at most 4); a few cases are
        # made faster in this process than a spawned worker starts.
        workers = int(data.get("workers") or min(os.cpu_count() or 1, 4)) if phantom["cases"] >= PHANTOM_CASES_PER_WORKER else 1
        logger.info("generating %d phantom cases in %s (%d process(es))", phantom["cases"], phantom_dir, workers)
        started = time.perf_counter()
        write_phantom_dataset(phantom_dir, phantom["cases"], phantom["seed"], size=phantom["size"],
                              slices=phantom["slices"], spacing_mm=phantom["spacing_mm"], overwrite=True, workers=workers)
        logger.info("generated %d phantom cases in %.0f s", phantom["cases"], time.perf_counter() - started)

    make_once(phantom_dir, phantom_dir / "phantom.json", "the phantom", generate)
    return phantom_dir


def mixed_phantom_count(config: Mapping[str, Any]) -> int:
    """How many phantom cases join real training data (``data.mix_phantom``; 0 without ``data.src``)."""
    data = config["data"]
    count = int(data.get("mix_phantom", 0) or 0)
    if count < 0:
        raise ValueError(f"data.mix_phantom must be 0 or a number of phantom cases, got {count}")
    return count if data.get("src") else 0


def ensure_source(config: dict) -> Path:
    """The dataset ``fit`` trains on: ``data.src``, the phantom, or both mixed.

    With ``data.mix_phantom = N`` and ``data.src``, the first N cases of the recipe's phantom
    join the real cases in a CSV (case ids ``phantom-<id>``): they always go to the training split
    (see :func:`mixed_assignment`) and are never scored, so a fine-tuned model keeps what the
    phantom taught (small lesions, every contrast phase) while it learns the real scans.
    """
    data = config["data"]
    mix = mixed_phantom_count(config)
    # A gs:// or s3:// source is read from its local mirror (downloaded once, then only what changed).
    src = storage.local_input(data["src"]) if data.get("src") else None
    if src is not None and not mix:
        return src
    phantom_dir = _phantom_dir(data)
    if not data.get("src"):
        return phantom_dir
    from keras_livseg.data.volumes import discover_cases

    if data.get("label_map"):
        raise ValueError(
            "data.mix_phantom cannot be combined with data.label_map (the phantom's labels are already "
            "0/1/2); remap your labels first or set data.mix_phantom=0"
        )
    real = discover_cases(src)
    clash = [c.case_id for c in real if c.case_id.startswith(MIXED_PHANTOM_PREFIX)]
    if clash:
        raise ValueError(f"case ids {clash[:3]} start with {MIXED_PHANTOM_PREFIX!r}, reserved for mixed phantom cases; rename them")
    phantom = discover_cases(phantom_dir)
    if mix > len(phantom):
        raise ValueError(f"data.mix_phantom={mix} but the phantom has {len(phantom)} cases; raise data.phantom_cases")
    rows = [(c.image.resolve(), c.label.resolve(), c.case_id, c.patient, c.stratum or "") for c in real]
    rows += [(c.image.resolve(), c.label.resolve(), MIXED_PHANTOM_PREFIX + c.case_id, MIXED_PHANTOM_PREFIX + c.case_id,
              c.stratum or "") for c in phantom[:mix]]
    text = "image,label,case_id,patient,stratum\n" + "".join(",".join(map(str, row)) + "\n" for row in rows)
    path = _cache_root() / f"mixed-{_digest(text)}.csv"
    # Written once: unchanged content keeps its time stamp, so the shard cache holds.
    make_once(path, path, "the list of mixed cases", lambda: atomic_write_text(path, text))
    return path


def mixed_assignment(config: Mapping[str, Any], case_ids: list[str], patients: Mapping[str, str],
                     held_out: Mapping[str, str] | None = None,
                     strata: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The split of every case when phantom cases are mixed in: phantom cases in train, real cases
    by ``held_out`` (a fold) or else by ``data.split`` over the real patients only (stratified by
    ``strata`` when given)."""
    if not mixed_phantom_count(config):
        return None
    from keras_livseg.data.prepare import split_cases

    real = [cid for cid in case_ids if not cid.startswith(MIXED_PHANTOM_PREFIX)]
    if held_out is None:
        data = config["data"]
        parts = split_cases(real, data.get("split", (0.7, 0.15, 0.15)), int(data.get("seed", 0)), patients, strata)
        held_out = {cid: split for split, members in parts.items() for cid in members}
    return {cid: held_out.get(cid, "train") for cid in case_ids}


def _strata(config: Mapping[str, Any], cases: Sequence[Any], source: Path) -> dict[str, str] | None:
    """The real cases' strata when ``data.stratify`` is on (mixed-in phantom cases always train), else None."""
    if not config["data"].get("stratify", False):
        return None
    from keras_livseg.data.prepare import case_strata

    mixed = mixed_phantom_count(config)
    return case_strata([c for c in cases if not (mixed and c.case_id.startswith(MIXED_PHANTOM_PREFIX))], source)


def _source_stamp(source: Path) -> list:
    """Names, sizes and times of the files behind a source (a CSV's listed files included)."""
    if source.is_dir():
        files = sorted(f for f in source.rglob("*") if f.is_file())
    else:
        files = [source]
        if source.suffix.lower() == ".csv":
            from keras_livseg.data.volumes import discover_cases

            for case in discover_cases(source):
                files += [case.image] + ([case.label] if case.label else [])
    return [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files]


def ensure_data(config: dict) -> Path:
    """Make (or reuse from the cache) the phantom and the shards; return the shard folder.

    With ``data.src`` set, real volumes are prepared into ``data.out`` (or a cache folder keyed
    by the parameters); without it a phantom dataset is generated first.
    """
    from keras_livseg.data.prepare import MANIFEST_NAME, PrepareOptions, prepare_in_fresh_process
    from keras_livseg.data.volumes import discover_cases

    data = config["data"]
    prep_keys = {k: v for k, v in data.items() if k in PrepareOptions.__dataclass_fields__}
    source = ensure_source(config)
    prep_keys["src"] = str(source)
    if mixed_phantom_count(config) and prep_keys.get("assignment") is None:
        cases = discover_cases(source)
        prep_keys["assignment"] = mixed_assignment(config, [c.case_id for c in cases], {c.case_id: c.patient for c in cases},
                                                   strata=_strata(config, cases, source))
    prep_keys.update(config["preprocessing"])
    # The cache key covers the source files' names, sizes and times: added or edited cases
    # give new shards instead of silently reusing old ones.
    stamp = _source_stamp(source)
    from keras_livseg.data.preprocessing import PREPROCESSING_VERSION

    out = prep_keys.pop("out", None) or _cache_root() / f"shards-{_digest([prep_keys, stamp, PREPROCESSING_VERSION])}"
    # Shards in a bucket: the mirror holds what is there (reused if finished), and new ones go up after prepare.
    remote = storage.is_url(str(out))
    if not remote and (Path(out) / MANIFEST_NAME).is_file():  # reused without the lock: a read-only cache works
        logger.info("reusing shards in %s", out)
        return Path(out)
    # One run at a time from here; for a bucket the lock covers the pull and the upload too, or a
    # second run's pull would clear the first one's shards from the mirror while it writes them.
    with one_maker(storage.mirror_path(str(out)) if remote else out, "the shards"), \
            storage.local_output(out, pull=True) as local:
        if (local / MANIFEST_NAME).is_file():  # made while this run waited, or already in the bucket
            logger.info("reusing shards in %s", out)
            return local
        # resume=True: an interrupted earlier preparation of the same data continues where it stopped.
        started = time.perf_counter()
        prepare_in_fresh_process(PrepareOptions(out=local, resume=True, **prep_keys))
        logger.info("prepared the shards %s (%.0f s)", out, time.perf_counter() - started)
    return local


def new_run_dir(config: dict, resume: bool, exact_name: bool = False) -> Path:
    """``runs/<name>``: a fresh name (``-2``, ``-3``...) unless resuming an existing run.

    ``exact_name`` (several workers: a resumed job must find the same folder) refuses an
    existing folder instead of choosing another name.
    """
    runs_value = str(config["run"]["runs_dir"])
    remote = storage.is_url(runs_value)
    # Runs in a bucket are trained in a local mirror and uploaded as they go (run_url).
    runs = storage.mirror_path(runs_value) if remote else Path(runs_value)
    name = config["run"]["name"] or f"{config['model']['name']}-{Path(config['recipe']).stem}"
    run_dir = runs / name

    def taken(folder: Path) -> bool:
        return folder.exists() or (remote and storage.exists(run_url(config, folder)))

    if resume:
        if remote and storage.exists(run_url(config, run_dir)):
            storage.download(run_url(config, run_dir))
        if not (run_dir / "config.json").is_file():
            raise ValueError(f"--resume: no run to resume at {run_url(config, run_dir) if remote else run_dir} "
                             "(missing config.json); check --name")
        return run_dir
    if exact_name and taken(run_dir):
        raise ValueError(f"{run_dir} exists: pass --resume to continue it, or another --name (several workers "
                         "never pick a new name on their own, so that a restarted job finds its run)")
    suffix = 2
    while True:
        if not taken(run_dir):
            try:
                run_dir.mkdir(parents=True)
                if run_dir.name != name:  # else only the last lines of a long run would say where it went
                    logger.info("%s exists: this run is %s (--resume --name %s continues that one)",
                                runs / name, run_dir, name)
                return run_dir
            except FileExistsError:  # a run started at the same moment took this name first
                if exact_name:
                    raise ValueError(f"{run_dir} was just made by another run: pass --resume to continue it, or "
                                     "another --name") from None
        run_dir = runs / f"{name}-{suffix}"
        suffix += 1


def run_url(config: Mapping[str, Any], run_dir: Path) -> str | None:
    """Where a run folder goes in a bucket (``run.runs_dir`` is a URL), else None."""
    runs = str(config["run"]["runs_dir"])
    return f"{runs.rstrip('/')}/{run_dir.name}" if storage.is_url(runs) else None


def build_optimizer(training: Mapping[str, Any], total_steps: int):
    """Keras' Adam or AdamW (one fused update per variable on TensorFlow) with the recipe's schedule."""
    from keras_livseg.training.optimizers import FusedAdam, FusedAdamW
    from keras_livseg.training.schedules import OneCycle

    rate: Any = float(training["learning_rate"])
    if training["schedule"] == "onecycle":
        rate = OneCycle(max_lr=rate, total_steps=max(total_steps, 1), warmup_fraction=training["warmup_fraction"],
                        div_factor=training["div_factor"], final_div_factor=training["final_div_factor"])
    elif training["schedule"] != "none":
        raise ValueError(f"training.schedule must be 'none' or 'onecycle', got {training['schedule']!r}")
    if training["optimizer"] == "adam":
        return FusedAdam(learning_rate=rate)
    if training["optimizer"] == "adamw":
        return FusedAdamW(learning_rate=rate, weight_decay=float(training["weight_decay"]))
    raise ValueError(f"training.optimizer must be 'adam' or 'adamw', got {training['optimizer']!r}")


def build_loss(training: Mapping[str, Any], head: str):
    from keras_livseg.training.losses import BCEDiceLoss, CombinedCEDiceLoss

    if training["loss"] == "ce_dice":
        if head != "softmax":
            raise ValueError("training.loss 'ce_dice' needs the softmax head; use loss 'bce_dice' with head 'sigmoid'")
        return CombinedCEDiceLoss(ce_weight=training["ce_weight"], dice_weight=training["dice_weight"],
                                  class_weights=training["class_weights"] or None,
                                  fn_weights=training["fn_weights"] or None)
    if training["loss"] == "bce_dice":
        if training["fn_weights"]:
            raise ValueError("training.fn_weights (the Tversky term) needs loss 'ce_dice'; leave it out with 'bce_dice'")
        return BCEDiceLoss(bce_weight=training["ce_weight"], dice_weight=training["dice_weight"])
    raise ValueError(f"training.loss must be 'ce_dice' or 'bce_dice', got {training['loss']!r}")


def check_model_matches_data(model_input_shape, prep) -> None:
    """The model's input (H, W, C) must equal the shards' (image_size, context)."""
    height, width, channels = (int(d) if d is not None else None for d in model_input_shape[1:])
    want = (*prep.image_size, prep.context)
    if (height, width, channels) != want:
        raise ValueError(
            f"the model takes {height}x{width}x{channels} slices but the shards hold "
            f"{want[0]}x{want[1]}x{want[2]}; build the model with the shards' size (preprocessing.image_size "
            f"{want[0]}, preprocessing.context {want[2]}) or prepare the data again with the model's size"
        )


def resolve_crop_size(value: Any, config: Mapping[str, Any], prep) -> int:
    """``training.crop_size`` as the run will use it: 0 for whole slices, else the patch side.

    A size the model cannot be built at (a U-Net of depth 4 needs a multiple of 16) is refused
    here, before the run's config is written, not at the first step deep in a concatenation.
    A model that cannot train on patches (not in :data:`~keras_livseg.models.PATCH_TRAINABLE`,
    e.g. ``fit --model effb0_pan`` on the demo's recipe) trains on whole slices, with a warning.
    """
    from keras_livseg.models import PATCH_TRAINABLE, build_model

    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"training.crop_size must be a whole number of pixels (0 for whole slices), got {value!r}")
    if value == 0:
        return 0
    if value > min(prep.image_size):
        raise ValueError(f"training.crop_size {value} is larger than the slices ({prep.image_size[0]}x{prep.image_size[1]}); "
                         f"give at most {min(prep.image_size)}, or 0 for whole slices")
    if value == min(prep.image_size) == max(prep.image_size):
        return 0  # the whole slice
    name = config["model"]["name"]
    if name not in PATCH_TRAINABLE:
        logger.warning("%s cannot train on patches (its encoder is built for one input size): training.crop_size %d "
                       "is ignored, it trains on whole %dx%d slices", name, value, *prep.image_size)
        return 0
    try:
        build_model(name, input_shape=(value, value, prep.context), **_model_options(config))
    except ValueError as error:
        raise ValueError(f"training.crop_size {value}: {error}") from None
    return value


def _model_options(config: Mapping[str, Any]) -> dict[str, Any]:
    # TOML has no null: the string "none" stands for None (e.g. model.encoder_weights = "none").
    return {
        k: (None if isinstance(v, str) and v.lower() == "none" else v)
        for k, v in config["model"].items()
        if k not in MODEL_FIXED_KEYS
    }


def _chief_setup(config: dict, resume: bool, several_workers: bool, made: list[Path]) -> dict[str, Any]:
    """The run folder, the data and the precision: what the chief (or a lone process) decides.

    A new run folder is appended to ``made`` (see :func:`train`).

    Returns ``{"finished": FitResult | None, "run_dir", "config", "shards", "precision"}``.
    """
    import keras

    from keras_livseg.data.prepare import load_manifest, verify_shards
    from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
    from keras_livseg.models import build_model
    from keras_livseg.training.precision import apply_precision, choose_cpu_policy

    training = config["training"]
    _check_init_from(str(training.get("init_from") or ""), resume)  # before the data and the timing, ~15 s
    if resume:
        run_dir = new_run_dir(config, resume=True)
        finished = _finished_run(run_dir, int(training["epochs"]))
        if finished is not None:
            logger.info("%s already finished %d epochs: nothing to do", run_dir, finished.epochs_done)
            return {"finished": finished, "run_dir": str(run_dir)}
        saved = json.loads((run_dir / "config.json").read_text())
        saved["training"]["epochs"] = training["epochs"]  # the one value a resume may extend
        for key, value in DEFAULTS["training"].items():  # keys newer than the run: their defaults keep its behaviour
            saved["training"].setdefault(key, value)
        config = saved
        training = config["training"]
    else:
        run_dir = new_run_dir(config, resume=False, exact_name=several_workers)
        made.append(run_dir)
    keras.utils.set_random_seed(int(config["run"]["seed"]))
    shard_dir = ensure_data(config)
    manifest = load_manifest(shard_dir)
    verify_shards(manifest)  # a shard changed since prepare is named before any step runs
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    config["data"]["shards"] = str(shard_dir)
    if config["export"]["enabled"] and prep.normalization == "volume":
        raise ValueError(
            "normalization='volume' models cannot be exported for serving (a request holds slices, not the "
            "volume); pass --no-export, or use preprocessing.normalization='foreground'"
        )
    crop = resolve_crop_size(training["crop_size"], config, prep)  # a bad size stops before config.json exists
    model_options = _model_options(config)
    # Timed at the shape a train step sees: a 64 px patch can favour another precision than a whole
    # 128 px slice (casting costs per weight, bfloat16 saves per activation).
    step_shape = (crop, crop, prep.context) if crop else (*prep.image_size, prep.context)

    def fastest_cpu_policy() -> str:
        return choose_cpu_policy(
            lambda: build_model(config["model"]["name"], input_shape=step_shape, **model_options),
            {"model": config["model"]["name"], "options": model_options, "input_shape": step_shape},
            int(training["batch_size"]), _cache_root() / "precision.json",
        )

    policy = apply_precision(training["precision"], probe=fastest_cpu_policy)
    config["training"]["resolved_precision"] = policy
    atomic_write_json(run_dir / "config.json", config, sort_keys=True, default=str)
    from keras_livseg.data.augment import Augmentation

    write_preprocessing_json(run_dir / "preprocessing.json", prep, model=config["model"]["name"],
                             classes=["background", "liver", "tumor"],
                             tta_flips=Augmentation.from_config(config["training"]["augmentation"]).flips)
    return {"finished": None, "run_dir": str(run_dir), "config": config, "shards": str(shard_dir), "precision": policy,
            "crop_size": crop}


def _check_init_from(init_from: str, resume: bool) -> None:
    """Refuse a warm-start source that does not exist, before any data is prepared.

    The fine-tuning recipe names the demo's checkpoint: missing, it asks for the demo first.
    """
    if init_from.lower() in ("", "none") or resume or storage.is_url(init_from):
        return
    from keras_livseg.training.warm_start import check_source_exists

    if init_from.endswith("phantom_demo/checkpoints/best.keras") and not Path(init_from).expanduser().exists():
        raise ValueError(
            f"training.init_from {init_from} does not exist yet: run the phantom demo first "
            "(python -m keras_livseg.fit), pass --init-from CHECKPOINT, or --init-from none to train from scratch"
        )
    check_source_exists(Path(init_from).expanduser())  # as the warm start itself reads it


def _copy_resume_state(chief_run: Path, scratch: Path) -> None:
    """Give a non-chief worker the chief's backup and history, so that it restores the same epoch."""
    backup = chief_run / "backup"
    if not backup.is_dir():
        return  # nothing saved yet: every worker starts at epoch 0
    shutil.copytree(backup, scratch / "backup")
    if (chief_run / "history.csv").is_file():
        shutil.copy2(chief_run / "history.csv", scratch / "history.csv")


def train(config: dict, resume: bool = False, verbose: int | str | None = None) -> FitResult:
    """Run a whole training job from a resolved config (see :func:`resolve_config`).

    With ``run.deterministic = true`` the run repeats exactly for its ``run.seed``: the training
    batches come in a fixed order and TensorFlow's ops pick deterministic kernels (slower; off by
    default, since the parallel input pipeline's order otherwise varies from run to run).

    Example:
        >>> result = train(resolve_config("pipelines/phantom_demo.toml"))  # doctest: +SKIP
        >>> result.test_metrics["tumor_dice"]  # doctest: +SKIP
    """
    made: list[Path] = []
    try:
        with op_determinism(config["run"].get("deterministic", False)):
            return _train(config, resume, verbose, made)
    except ValueError:  # bad input, refused in one line (DataError too)
        for run_dir in made:
            _discard_untrained(run_dir)
        raise


def _discard_untrained(run_dir: Path) -> None:
    """Remove a run folder that this call made and that holds nothing trained.

    A run refused before its first epoch (a bad --init-from, crop size or recipe value) then leaves
    no folder behind, and the corrected command takes the same name instead of ``NAME-2``.
    """
    if (run_dir / "history.csv").exists() or list(run_dir.glob("checkpoints/*.keras")):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    logger.debug("removed %s: the run stopped before training", run_dir)


@contextlib.contextmanager
def op_determinism(enabled: bool) -> Iterator[None]:
    """Deterministic TensorFlow kernels inside the block when ``enabled``; the previous setting after.

    TensorFlow's switch is process-wide and has no public "off": restoring it keeps a library
    call (or one test) from changing every later run in the process.
    """
    if not enabled:
        yield
        return
    from tensorflow.python.framework import config as tf_config

    was_enabled = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if not was_enabled:
            tf_config.disable_op_determinism()


def _train(config: dict, resume: bool, verbose: int | str | None, made: list[Path]) -> FitResult:
    import keras

    from keras_livseg.data.dataset import Augmentation, make_dataset, steps_per_epoch
    from keras_livseg.data.prepare import load_manifest
    from keras_livseg.data.preprocessing import Preprocessing
    from keras_livseg.models import any_size, build_model
    from keras_livseg.training import multi_worker
    from keras_livseg.training.callbacks import (
        PredictionImages,
        RunBackup,
        TimeBudget,
        UploadRun,
        pick_tumor_slices,
        standard_callbacks,
        validation_epochs,
    )
    from keras_livseg.training.metrics import default_metrics
    from keras_livseg.training.optimizers import build_optimizer_variables
    from keras_livseg.training.precision import apply_precision
    from keras_livseg.training.strategy import choose_strategy, cluster_task

    started = time.perf_counter()
    if verbose is None:
        import sys

        # A live progress bar on a terminal; one line per epoch in logs and CI.
        verbose = 1 if sys.stdout.isatty() else 2
    task = cluster_task()  # a malformed TF_CONFIG stops here, naming the field
    # Under TF_CONFIG the strategy must exist before any other TensorFlow operation.
    strategy = choose_strategy()
    chief = task is None or task.is_chief
    if task is not None:
        multi_worker.patch_keras_for_multi_worker()
        multi_worker.check_same_recipe(strategy, {**config, "resume": resume}, task.name)
        if float(config["training"].get("max_minutes") or 0) > 0:
            raise ValueError("training.max_minutes cannot stop several workers at the same step (each has its own "
                             "clock); give training.epochs instead")

    if chief:
        try:
            setup = _chief_setup(config, resume, several_workers=task is not None, made=made)
        except Exception as error:  # the others must stop too, with the reason, not wait for the chief
            if task is not None:
                multi_worker.share_from_chief(strategy, True, {"error": str(error)})
            raise
        if task is not None:
            multi_worker.share_from_chief(strategy, True, {k: v for k, v in setup.items() if k != "finished"}
                                          | {"finished": setup["finished"] is not None})
        if setup["finished"] is not None:
            return setup["finished"]
        run_dir, config = Path(setup["run_dir"]), setup["config"]
        shard_dir, crop = Path(setup["shards"]), int(setup["crop_size"])
        manifest = load_manifest(shard_dir)
    else:
        shared = multi_worker.share_from_chief(strategy, False, None)
        if shared["finished"]:
            logger.info("%s: the chief found the run already finished: nothing to do", task.name)
            return FitResult(Path(shared["run_dir"]), None, None, {}, 0, 0.0, already_complete=True, chief=False)
        config, shard_dir, crop = shared["config"], Path(shared["shards"]), int(shared["crop_size"])
        scratch = Path(tempfile.mkdtemp(prefix=f"keras_livseg-{task.name}-"))
        run_dir = scratch
        error = None
        try:
            manifest = load_manifest(shard_dir)
            apply_precision(shared["precision"])
            if resume:
                chief_run = Path(shared["run_dir"])
                url = run_url(config, chief_run)  # runs in a bucket: this worker's own copy of the chief's
                _copy_resume_state(storage.download(url) if url else chief_run, scratch)
        except Exception as failure:
            error = f"{task.name}: {failure}"
        multi_worker.agree(strategy, error)
    if task is not None and chief:
        multi_worker.agree(strategy, None)
    training = config["training"]
    keras.utils.set_random_seed(int(config["run"]["seed"]))
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    model_options = _model_options(config)
    replicas = strategy.num_replicas_in_sync
    global_batch = int(training["batch_size"]) * replicas
    steps = int(training["steps_per_epoch"]) or steps_per_epoch(manifest, "train", global_batch)
    epochs = int(training["epochs"])
    has_val = bool(manifest["splits"]["val"]["slices"])
    if not has_val and training["validation"] != "none":
        patients = {record.get("patient") or cid for cid, record in manifest["cases"].items()}
        raise ValueError(
            f"the validation split of {shard_dir} is empty: {len(manifest['cases'])} case(s) from {len(patients)} "
            f"patient(s), data.split {manifest['split']['fractions']} gives none to validation; with this few "
            f"patients measure with --folds {len(patients)} (leave one out), give data.split a larger validation "
            "fraction, or pass --set training.validation=none to train on everything and keep the last epoch"
        )
    if training["validation"] not in ("split", "none"):
        raise ValueError(f"training.validation must be 'split' or 'none', got {training['validation']!r}")
    validates = has_val and training["validation"] == "split"
    monitor = training["monitor"] if validates else None
    if has_val and not validates:
        logger.info("training.validation = none: no validation pass while training, best.keras is the last epoch; "
                    "the %d validation case(s) choose the post-processing", len(manifest["splits"]["val"]["cases"]))
    validation_freq = validation_epochs(epochs, training["validate_last"])
    augmentation = Augmentation.from_config(training["augmentation"])
    # Each worker reads its own shards; every batch is made of one part per replica.
    shard = (task.num_workers, task.worker_index) if task is not None else None
    train_ds = make_dataset(manifest, "train", global_batch, augmentation=augmentation, crop_size=crop or None,
                            foreground_fraction=float(training["foreground_fraction"]),
                            tumor_sampling=str(training["tumor_sampling"]),
                            cache=bool(training["cache"]), seed=int(config["run"]["seed"]),
                            shuffle_buffer=int(training["shuffle_buffer"]), replicas=replicas,
                            input_shard=shard, deterministic=config["run"].get("deterministic", False))
    # Several workers split the validation set by batch: a cache of it would hold one worker's part.
    # Without a validation pass the split is read once, for TensorBoard's images: nothing to cache.
    val_ds = make_dataset(manifest, "val", global_batch, training=False,
                          cache=bool(training["cache"]) and task is None and validates,
                          input_shard=shard) if has_val else None

    head = model_options.get("head", "softmax")
    with strategy.scope():
        model = build_model(config["model"]["name"], input_shape=(*prep.image_size, prep.context), **model_options)
        check_model_matches_data(model.input_shape, prep)
        # Patches: fit the twin that takes any size (the same layers); checkpoints, held-out
        # scores and the export use the fixed-size model, compiled alike.
        trainer = any_size(model, crop) if crop else model
        trainer.compile(optimizer=build_optimizer(training, steps * epochs), loss=build_loss(training, head),
                        metrics=default_metrics(head=head))
        if crop:
            model.compile(optimizer=trainer.optimizer, loss=trainer.loss, metrics=default_metrics(head=head))
        build_optimizer_variables(trainer)  # not inside the first traced step: a smaller graph
    logger.info("model %s: %s parameters; %d steps/epoch x %d epochs, global batch %d",
                config["model"]["name"], f"{model.count_params():,}", steps, epochs, global_batch)
    warm_start = None
    init_from = str(training["init_from"] or "")
    if init_from.lower() not in ("", "none") and not resume:  # a resumed run restores its own weights
        from keras_livseg.training.warm_start import load_matching_weights

        report = load_matching_weights(model, init_from)
        warm_start = report.summary()
        logger.info("%s", warm_start)
        (run_dir / "warm_start.txt").write_text(warm_start + "\n")

    extra = []
    if has_val:
        images, masks = pick_tumor_slices(val_ds, count=4)
        if len(images):
            extra.append(PredictionImages(images, masks, run_dir / "tensorboard", every=int(training["image_every"]),
                                          model=model))
    budget = TimeBudget(float(training.get("max_minutes") or 0)) if float(training.get("max_minutes") or 0) > 0 else None
    if budget is not None:
        extra.append(budget)
    callbacks, nan_stop = standard_callbacks(run_dir, monitor=monitor, resume=resume,
                                             early_stopping_patience=int(training["early_stopping_patience"]) or None,
                                             extra=extra, saves=model if crop else None)
    upload_to = run_url(config, run_dir) if chief else None
    if upload_to:
        callbacks.append(UploadRun(run_dir, upload_to))
    # Exact batch counts of the finite splits: Keras otherwise learns them by running out of
    # data, and warns "Your input ran out of data" on every first pass.
    val_steps = math.ceil(manifest["splits"]["val"]["slices"] / global_batch) if validates else None
    try:
        history = trainer.fit(train_ds, epochs=epochs, steps_per_epoch=steps, validation_data=val_ds if validates else None,
                              validation_steps=val_steps, validation_freq=validation_freq, callbacks=callbacks,
                              verbose=verbose, shuffle=False)  # the dataset shuffles itself
    except Exception as error:
        if task is not None and multi_worker.is_peer_failure(error):
            raise multi_worker.WorkerLost(
                f"{task.name} lost a peer worker during training ({type(error).__name__}); the chief's checkpoints "
                f"of the last finished epoch are intact: start every worker again with --resume --name {config['run']['name'] or run_dir.name}"
            ) from None
        raise
    # A run killed after its last epoch's backup resumes with no epoch left to run.
    restored = max((c.restored_epoch for c in callbacks if isinstance(c, RunBackup)), default=0)
    epochs_done = max(len(history.epoch) and history.epoch[-1] + 1, restored)
    digest = multi_worker.weights_digest(model.get_weights())
    logger.info("%sweights sha256 %s after %d epoch(s)", f"{task.name}: " if task else "", digest, epochs_done)
    stopped_early = (budget is not None and budget.stopped_at is not None) or any(
        getattr(callback, "stopped_epoch", 0) for callback in callbacks if isinstance(callback, keras.callbacks.EarlyStopping))

    best = run_dir / "checkpoints" / "best.keras"
    if nan_stop.stopped_at is not None:
        return FitResult(run_dir, best if best.is_file() else None, None, {}, epochs_done,
                         time.perf_counter() - started, stopped_on_nan=nan_stop.stopped_at)
    last = run_dir / "checkpoints" / "last.keras"
    if monitor is not None and not best.is_file() and last.is_file():
        # Stopped (time budget, early stop) before its first validated epoch (training.validate_last).
        logger.warning("no epoch of this run was validated (training.validate_last=%s; %d epoch(s) done): "
                       "best.keras is the last epoch", training["validate_last"], epochs_done)
        with atomic_path(best) as partial:
            shutil.copy2(last, partial)
    if best.is_file():
        model.load_weights(best)
    if chief and best.is_file() and has_val and bool(training["choose_postprocessing"]):
        choose_postprocessing(best, manifest, run_dir / "preprocessing.json", postprocessing_diameters(training))
    # Held-out figures come from cases the model never trained on: test, else validation
    # (labelled as such: it chose the checkpoint), else none at all. Never the training split.
    held_out = next((split for split in ("test", "val") if manifest["splits"][split]["slices"]), None)
    test_metrics: dict[str, Any] = {}
    volume_metrics = None
    (run_dir / "eval").mkdir(exist_ok=True)
    score_slices, score_volumes = bool(training.get("score_slices", True)), bool(training.get("score_volumes", True))
    if held_out is not None and score_slices:
        test_ds = make_dataset(manifest, held_out, global_batch, training=False, input_shard=shard)
        test_steps = math.ceil(manifest["splits"][held_out]["slices"] / global_batch)
        # The trained model's twin (same weights) has built metrics: the fixed-size one, compiled but
        # never run, would take a batch from the evaluation to build them under several workers.
        scores = trainer.evaluate(test_ds, steps=test_steps, verbose=0, return_dict=True)
        test_metrics = {k: float(v) for k, v in scores.items()}
        test_metrics["split"] = held_out
        test_metrics["covers"] = f"{manifest['selection']['slices']} slices of the shards, {len(manifest['splits'][held_out]['cases'])} case(s), model grid"
        (run_dir / "eval" / "test_metrics.json").write_text(json.dumps(test_metrics, indent=1, sort_keys=True) + "\n")
    if held_out is not None and chief and best.is_file() and score_volumes:
        volume_metrics = score_held_out_volumes(best, manifest, held_out, run_dir / "eval")
    if held_out is None:
        # Asked for (every case trains, no validation: a final model) it is not a warning.
        log = logger.info if training["validation"] == "none" else logger.warning
        log("no held-out cases (test and val splits are empty): no held-out figures for this run; measure with "
            "--folds K")
    elif not (score_slices or score_volumes):
        logger.warning("training.score_volumes and training.score_slices are both false: the %s cases were not scored "
                       "(score them with: python -m keras_livseg.evaluate --model %s --data %s --split %s)",
                       held_out, best, manifest["_dir"], held_out)

    result = FitResult(run_dir, best if best.is_file() else None, None, test_metrics, epochs_done,
                       time.perf_counter() - started, volume_metrics=volume_metrics, warm_start=warm_start,
                       weights_sha256=digest)
    if not chief:
        # This worker's files were its own copy of the chief's; the chief holds the run.
        shutil.rmtree(run_dir, ignore_errors=True)
        return dataclasses.replace(result, run_dir=Path(shared["run_dir"]), best_checkpoint=None, chief=False)
    if epochs_done >= epochs or stopped_early:
        # Last, atomically: a run killed before this line resumes instead of passing for done.
        record = {"epochs_done": epochs_done, "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
                  "test_metrics": test_metrics, "volume_metrics": volume_metrics, "stopped_early": bool(stopped_early),
                  "weights_sha256": digest, "workers": task.num_workers if task else 1}
        atomic_write_json(run_dir / COMPLETE_FILE, record, sort_keys=True, default=str)
        shutil.rmtree(run_dir / "backup", ignore_errors=True)  # complete: nothing left to resume
    if upload_to:
        storage.upload(run_dir, upload_to, last=(COMPLETE_FILE,))  # the held-out scores, complete.json last
    # The export is the command's last step (keras_livseg.fit), not the training stage's.
    return result


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def postprocessing_diameters(training: Mapping[str, Any]) -> tuple[float, ...]:
    """The candidate minimum lesion sizes of ``training.postprocessing_diameters_mm`` (sphere
    diameters in mm), or :data:`~keras_livseg.inference.tuning.CANDIDATE_DIAMETERS_MM` when empty.

    Example:
        >>> postprocessing_diameters({"postprocessing_diameters_mm": [8, 6]})
        (6.0, 8.0)
        >>> postprocessing_diameters({"postprocessing_diameters_mm": [0]})
        Traceback (most recent call last):
        ValueError: training.postprocessing_diameters_mm must be a list of lesion diameters in mm, each above 0 and at most 100, e.g. [6, 8, 10]; got [0]
    """
    from keras_livseg.inference.tuning import CANDIDATE_DIAMETERS_MM

    value = training.get("postprocessing_diameters_mm", [])  # not `or []`: 0 or false must be refused, not read as empty
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(d, (int, float)) and not isinstance(d, bool) and 0 < d <= 100 for d in value):
        raise ValueError("training.postprocessing_diameters_mm must be a list of lesion diameters in mm, each above 0 "
                         f"and at most 100, e.g. [6, 8, 10]; got {value!r}")
    return tuple(sorted(float(d) for d in value)) or CANDIDATE_DIAMETERS_MM


def choose_postprocessing(checkpoint: Path, manifest: Mapping[str, Any], preprocessing_json: Path,
                          diameters_mm: Sequence[float] | None = None) -> dict[str, Any]:
    """Choose the minimum lesion size on the validation volumes and record it in the run.

    The choice (:func:`~keras_livseg.inference.tuning.choose_min_lesion_size`: every validation
    volume predicted once, each candidate size scored by mean per-case tumour Dice) goes into
    ``preprocessing_json`` under ``postprocessing``, where ``predict``, ``evaluate`` and the
    export find it. ``diameters_mm``: the candidate sizes (default
    :data:`~keras_livseg.inference.tuning.CANDIDATE_DIAMETERS_MM`). Returns that entry.
    """
    from keras_livseg.data.preprocessing import read_preprocessing_json, write_preprocessing_json
    from keras_livseg.evaluation.pairs import manifest_cases
    from keras_livseg.inference import SegmentationModel
    from keras_livseg.inference.tuning import CANDIDATE_DIAMETERS_MM, choose_min_lesion_size

    cases = manifest_cases(manifest["_dir"], "val")
    label_map = {int(k): int(v) for k, v in (manifest.get("label_map") or {}).items()} or None
    choice = choose_min_lesion_size(SegmentationModel.load(checkpoint), cases, label_map=label_map,
                                    diameters_mm=tuple(diameters_mm or CANDIDATE_DIAMETERS_MM))
    logger.info("%s", choice.summary())
    prep, metadata = read_preprocessing_json(preprocessing_json)
    metadata["postprocessing"] = choice.to_dict()
    write_preprocessing_json(preprocessing_json, prep, **metadata)  # atomic: a temporary name, then rename
    return metadata["postprocessing"]


def score_held_out_volumes(checkpoint: Path, manifest: Mapping[str, Any], split: str, out_dir: Path,
                           postprocess: Any = "model") -> dict[str, Any]:
    """Predict the whole volumes of a split's cases (every slice, native grid) and score them as LiTS.

    Unlike the shard metrics (the selected slices on the model grid) these figures cover every
    slice of every held-out case at its own resolution, after ``predict``'s post-processing.

    Args:
        checkpoint: the ``.keras`` model (its run's ``preprocessing.json`` beside it).
        manifest: the shards' manifest, as :func:`~keras_livseg.data.prepare.load_manifest` reads it.
        split: the held-out split to score.
        out_dir: ``predictions/`` and the LiTS report ``volumes/`` go here.
        postprocess: ``"model"`` (default: what the run chose on its validation volumes), a
            :class:`~keras_livseg.inference.PostProcessing`, or ``None``.

    Returns:
        ``{"split", "cases", "covers", "liver_dice", "tumor_dice", "liver_dice_global",
        "tumor_dice_global", "per_case": {case: {"liver_dice", "tumor_dice"}}}``, and
        ``"by_stratum"`` (:func:`~keras_livseg.evaluation.report.stratum_summary`) when the
        manifest records strata.
    """
    import csv

    from keras_livseg.evaluation.pairs import manifest_cases
    from keras_livseg.evaluation.report import EvaluationOptions, evaluate_folders
    from keras_livseg.inference import SegmentationModel, predict_paths

    shards = manifest["_dir"]
    cases = manifest_cases(shards, split)  # the source files, resolved
    out_dir = Path(out_dir)
    predict_paths(SegmentationModel.load(checkpoint), [c.image for c in cases], out_dir / "predictions", progress=False,
                  postprocess=postprocess)
    label_map = {int(k): int(v) for k, v in (manifest.get("label_map") or {}).items()} or None
    summary = evaluate_folders(out_dir / "predictions", shards, out_dir / "volumes", split=split,
                               options=EvaluationOptions(label_map=label_map),
                               model_name=Path(checkpoint).parent.parent.name, figures=False)
    with (out_dir / "volumes" / "per_case.csv").open(newline="") as handle:
        per_case = {row["case_id"]: {"liver_dice": _number(row.get("liver_dice")), "tumor_dice": _number(row.get("tumor_dice"))}
                    for row in csv.DictReader(handle)}
    volume = summary["volume"]
    result = {
        "split": split,
        "cases": [c.case_id for c in cases],
        "covers": f"every slice of {len(cases)} held-out {split} volume(s), native grid, post-processed"
                  + (" (the validation cases also chose the checkpoint and the post-processing)" if split == "val" else ""),
        "liver_dice": volume["liver"]["dice"],
        "tumor_dice": volume["tumor"]["dice"],
        "liver_dice_global": volume["liver"]["dice_global"],
        "tumor_dice_global": volume["tumor"]["dice_global"],
        "per_case": per_case,
    }
    if summary.get("by_stratum"):  # a stratified split: Dice per contrast phase and lesion kind
        result["by_stratum"] = summary["by_stratum"]
    (out_dir / "held_out_volumes.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    return result


@dataclasses.dataclass
class CrossValidationResult:
    """What :func:`cross_validate` produced: one run per fold and one out-of-fold report."""

    cv_dir: Path
    folds: list[list[str]]
    fold_results: list[dict[str, Any]]
    report_dir: Path
    summary: dict[str, Any]
    seconds: float


def cross_validate(config: dict, folds: int, only_fold: int | None = None, resume: bool = False,
                   verbose: int | str | None = None) -> CrossValidationResult:
    """K-fold cross-validation by patient, as nnU-Net: one run per fold, one out-of-fold report.

    Each fold trains on the other folds' patients and is scored on its own held-out patients,
    whole volumes at their native resolution; nothing is selected on held-out data (the folds
    train without a validation split and keep their last epoch). The held-out predictions of
    all folds are then scored together: ``<cv>/eval/report.md`` covers every patient once.
    Folds are for measuring: nothing is exported (train on all cases for the final model).

    Layout: ``runs/<name>/fold-<k>/`` (a normal run folder each), ``runs/<name>/predictions/``
    (every case, predicted by the fold that held it out), ``runs/<name>/eval/``, ``folds.json``.
    With ``resume``, finished folds are reused and an interrupted one continues.

    Args:
        config: a resolved config (:func:`resolve_config`).
        folds: K >= 2; the number of patients gives leave-one-patient-out.
        only_fold: run only this fold (0-based) in ``runs/<name>`` (successive calls fill the same
            folder); the report then covers the folds finished so far.
        resume: continue ``runs/<name>`` (an interrupted fold resumes at its last epoch) instead
            of starting a new folder.
        verbose: Keras verbosity.

    Raises:
        DataError: fewer patients than folds, and other bad input (one line each).

    Example:
        >>> result = cross_validate(resolve_config("ircadb_finetune.toml", {"data": {"src": "ircadb/"}}), 2)  # doctest: +SKIP
        >>> result.summary["volume"]["liver"]["dice"]  # doctest: +SKIP
    """
    from keras_livseg.data.prepare import assign_folds
    from keras_livseg.data.volumes import discover_cases, parse_label_map
    from keras_livseg.evaluation.report import EvaluationOptions, evaluate_folders

    started = time.perf_counter()
    source = ensure_source(config)
    everything = discover_cases(source)
    patients = {c.case_id: c.patient for c in everything}
    # Mixed-in phantom cases train in every fold and are never held out or scored.
    cases = [c for c in everything if not (mixed_phantom_count(config) and c.case_id.startswith(MIXED_PHANTOM_PREFIX))]
    parts = assign_folds([c.case_id for c in cases], folds, seed=int(config["data"].get("seed", 0)),
                         patients={c.case_id: c.patient for c in cases}, strata=_strata(config, cases, source))
    if only_fold is not None and not 0 <= only_fold < folds:
        raise ValueError(f"--fold {only_fold} is not one of the {folds} folds; pass 0..{folds - 1}")
    name = config["run"]["name"] or f"{config['model']['name']}-{Path(config['recipe']).stem}-cv{folds}"
    cv_config = copy.deepcopy(config)
    cv_config["run"]["name"] = name
    # --fold runs one fold of a cross-validation: successive calls fill the same folder.
    reuse = resume or only_fold is not None
    cv_dir = Path(config["run"]["runs_dir"]) / name if reuse else new_run_dir(cv_config, resume=False)
    cv_dir.mkdir(parents=True, exist_ok=True)
    plan = {"folds": parts, "patients": patients, "source": str(source)}
    if (cv_dir / "folds.json").is_file():
        saved = json.loads((cv_dir / "folds.json").read_text())
        if saved.get("folds") != parts:
            raise ValueError(f"{cv_dir} holds other folds ({saved.get('folds')}); resume with the same data and "
                             "--folds, or drop --resume to start a new cross-validation")
    (cv_dir / "folds.json").write_text(json.dumps(plan, indent=1) + "\n")
    predictions = cv_dir / "predictions"
    predictions.mkdir(exist_ok=True)
    fold_results = []
    for index, held_out in enumerate(parts):
        fold_dir = cv_dir / f"fold-{index}"
        done = fold_dir / "eval" / "held_out_volumes.json"
        if only_fold is not None and index != only_fold:
            if done.is_file():
                fold_results.append(json.loads(done.read_text()))
            continue
        if not done.is_file():
            fold_config = copy.deepcopy(config)
            fold_config["run"].update({"runs_dir": str(cv_dir), "name": f"fold-{index}"})
            fold_config["data"]["src"] = str(source)
            fold_config["data"]["assignment"] = {cid: ("test" if cid in held_out else "train") for cid in patients}
            fold_config["data"]["mix_phantom"] = 0  # already in the source: the mixed CSV
            fold_config["training"]["validation"] = "none"
            fold_config["export"]["enabled"] = False
            logger.info("fold %d/%d: held out %s", index + 1, folds, ", ".join(held_out))
            started_before = (fold_dir / "config.json").is_file()
            if fold_dir.exists() and not started_before:
                shutil.rmtree(fold_dir)  # killed before its config was written: nothing to keep
            result = train(fold_config, resume=started_before, verbose=verbose)
            if result.stopped_on_nan is not None:
                raise ValueError(f"fold {index}: the loss became NaN; lower the learning rate and rerun with --resume")
        for produced in (fold_dir / "eval" / "predictions").iterdir():
            link = predictions / produced.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(produced.resolve())
        fold_results.append(json.loads(done.read_text()))
    scored = [cid for result in fold_results for cid in result["cases"]]
    pairs = cv_dir / "out_of_fold_pairs.csv"
    by_id = {c.case_id: c for c in cases}
    pairs.write_text("image,label,case_id\n" + "".join(f"{by_id[c].image.resolve()},{by_id[c].label.resolve()},{c}\n" for c in scored))
    label_map = parse_label_map(config["data"].get("label_map"))
    summary = evaluate_folders(predictions, pairs, cv_dir / "eval", options=EvaluationOptions(label_map=label_map),
                               model_name=f"{config['model']['name']} ({folds}-fold out-of-fold)")
    return CrossValidationResult(cv_dir, parts, fold_results, cv_dir / "eval", summary, time.perf_counter() - started)
