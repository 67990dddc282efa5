"""Tests for the training stage: ``keras_livseg.training.fit`` and ``python -m keras_livseg.fit``.

One tiny phantom run (6 cases, 64x64 phantom, 32x32 slices, a depth-2 TAM-U-Net with 8 filters,
2 epochs) is shared by the run-folder, summary and TensorBoard tests; the resume, NaN and
MirroredStrategy tests make their own.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_livseg import fit as fit_cli
from keras_livseg.inference import tuning
from keras_livseg.training import fit

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PIPELINES = PROJECT_ROOT / "pipelines"
LITS_RECIPES = tuple(sorted(p.name for p in PIPELINES.glob("lits_*.toml")))

NO_AUGMENTATION = "training.augmentation={rotation=0.0,zoom=0.0,translation=0.0,intensity_scale=0.0,intensity_shift=0.0,gamma=0.0,noise_std=0.0}"
# Tumor is ~0.2 % of the tiny phantom's pixels: foreground oversampling, class weights and a high rate
# make two short epochs enough to find it for every seed tried (0 to 7: tumour Dice 0.19 to 0.30, chance
# 0.002), augmentation off. The recipe's run.deterministic fixes the batches' order: without it the
# parallel pipeline's order varied with the load (4 outcomes in 28 runs), and in one clean-clone run
# the order found no tumour.
TINY_ARGS = [
    "--no-export", "--precision", "float32", "--image-size", "32", "--epochs", "2", "--batch-size", "8",
    "--steps-per-epoch", "100", "--learning-rate", "1e-2",
    "--set", "data.phantom_cases=6", "--set", "data.phantom_size=64", "--set", "data.phantom_slices=[12, 16]",
    "--set", "data.split=[0.5, 0.25, 0.25]", "--set", "data.workers=1",
    "--set", "model.filters=8", "--set", "model.depth=2",
    "--set", "training.foreground_fraction=0.6", "--set", "training.class_weights=[1.0, 5.0, 20.0]",
    "--set", NO_AUGMENTATION, "--set", "training.image_every=1",
]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fit_cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def read_history(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


# Our own recipe, so the tests never depend on the demo recipe's tuning (context, schedule, size).
TINY_RECIPE = """
[run]
seed = 0
deterministic = true
[data]
slices = "all"
[preprocessing]
window = [-200.0, 250.0]
image_size = 32
context = 1
normalization = "foreground"
[model]
name = "tam_unet"
[training]
optimizer = "adam"
schedule = "none"
loss = "ce_dice"
[export]
enabled = false
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """The phantom/shard cache of this module (``KERAS_LIVSEG_CACHE``), shared by its runs."""
    path = tmp_path_factory.mktemp("cache")
    (path / "tiny.toml").write_text(TINY_RECIPE)
    TINY_ARGS[:0] = ["--pipeline", str(path / "tiny.toml")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_LIVSEG_CACHE", str(path))
        yield path
    del TINY_ARGS[:2]


@pytest.fixture(scope="module")
def tiny_run(cache_dir, tmp_path_factory):
    """A finished 2-epoch CLI run: ``(exit code, stdout, stderr, run folder)``."""
    runs = tmp_path_factory.mktemp("runs")
    # Two candidate lesion sizes, out of order: the run sorts them and offers only those.
    code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(runs), "--name", "tiny",
                              "--set", "training.postprocessing_diameters_mm=[8, 6]"])
    assert code == 0, err[-3000:]
    return types.SimpleNamespace(code=code, stdout=out, stderr=err, run_dir=runs / "tiny", runs=runs)


# --- a whole run ---------------------------------------------------------------------------------


def test_tiny_fit_beats_chance_and_fills_the_run_folder(tiny_run):
    run_dir = tiny_run.run_dir
    config = json.loads((run_dir / "config.json").read_text())
    assert {"run", "data", "preprocessing", "model", "training", "export", "recipe"} <= set(config)
    assert set(fit.TRAINING_KEYS) <= set(config["training"])  # fully resolved: defaults included
    assert config["training"]["resolved_precision"] == "float32"
    assert config["preprocessing"]["image_size"] == 32

    metrics = json.loads((run_dir / "eval" / "test_metrics.json").read_text())
    manifest = json.loads((Path(config["data"]["shards"]) / "manifest.json").read_text())
    background, liver, tumor = manifest["splits"][metrics["split"]]["class_pixels"]
    assert tumor > 0, "the held-out split must contain tumor for the Dice to mean anything"
    # Chance: Dice of predicting tumor everywhere, 2T / (N + T) (~0.003 here); tumor share is T / N.
    everywhere = 2 * tumor / (background + liver + tumor + tumor)
    assert metrics["tumor_dice"] > 10 * everywhere, (metrics, everywhere)
    assert metrics["liver_dice"] > 0.2, metrics

    history = read_history(run_dir)
    assert [int(row["epoch"]) for row in history] == [0, 1]
    assert all(float(row["learning_rate"]) == pytest.approx(1e-2) for row in history)
    assert {"loss", "tumor_dice", "val_tumor_dice", "val_liver_dice"} <= set(history[0])

    for name in ("best.keras", "last.keras"):
        assert (run_dir / "checkpoints" / name).stat().st_size > 0
    best = keras.saving.load_model(run_dir / "checkpoints" / "best.keras", compile=False)
    assert best.input_shape == (None, 32, 32, 1)
    for part in ("train", "validation", "images"):
        assert list((run_dir / "tensorboard" / part).glob("events.out.tfevents.*")), part
    prep = json.loads((run_dir / "preprocessing.json").read_text())
    assert prep["model"] == "tam_unet"
    assert {k: prep["preprocessing"][k] for k in ("window", "image_size", "context", "normalization")} == {
        "window": [-200.0, 250.0], "image_size": [32, 32], "context": 1, "normalization": "foreground"}  # TINY_RECIPE's
    assert prep["tta_flips"] == []  # trained without flips: test-time augmentation must not mirror it
    # The minimum lesion size was chosen on the validation volumes, every candidate scored.
    chosen = prep["postprocessing"]
    assert chosen["chosen_on"]["cases"] == manifest["splits"]["val"]["cases"]
    scores = chosen["chosen_on"]["scores"]
    # The default size first, then the recipe's candidates (training.postprocessing_diameters_mm), smallest first.
    assert [row["diameter_mm"] for row in scores] == [2.7, 6.0, 8.0] and scores[0]["min_lesion_mm3"] == 10.0
    assert chosen["min_lesion_mm3"] <= tuning.sphere_mm3(8.0) + 0.1
    top = max(row["tumor_dice"] for row in scores)
    picked = next(row for row in scores if row["min_lesion_mm3"] == chosen["min_lesion_mm3"])
    assert picked["tumor_dice"] == top and all(row["tumor_dice"] < top for row in scores[:scores.index(picked)])


def test_cli_summary_prints_dice_folder_checkpoint_and_tensorboard(tiny_run):
    out = tiny_run.stdout
    metrics = json.loads((tiny_run.run_dir / "eval" / "test_metrics.json").read_text())
    assert f"Dice: liver {metrics['liver_dice']:.4f}, tumor {metrics['tumor_dice']:.4f}" in out
    assert f"run folder:      {tiny_run.run_dir}" in out
    assert f"best checkpoint: {tiny_run.run_dir / 'checkpoints' / 'best.keras'}" in out
    assert f"tensorboard --logdir {tiny_run.run_dir / 'tensorboard'}" in out
    assert "finished 2 epochs" in out


def test_existing_run_name_gets_a_suffix(tmp_path, caplog):
    config = {"run": {"name": "exp", "runs_dir": str(tmp_path)}, "model": {"name": "unet"}, "recipe": "x.toml"}
    assert fit.new_run_dir(config, resume=False) == tmp_path / "exp"
    with caplog.at_level("INFO", logger="keras_livseg.training.fit"):
        assert fit.new_run_dir(config, resume=False) == tmp_path / "exp-2"
    assert f"{tmp_path / 'exp'} exists: this run is {tmp_path / 'exp-2'} (--resume --name exp" in caplog.text
    assert fit.new_run_dir(config, resume=False) == tmp_path / "exp-3"
    config["run"]["name"] = ""
    assert fit.new_run_dir(config, resume=False) == tmp_path / "unet-x"


def test_a_run_name_taken_by_another_run_at_the_same_moment_gets_the_next_suffix(tmp_path, monkeypatch):
    config = {"run": {"name": "exp", "runs_dir": str(tmp_path)}, "model": {"name": "unet"}, "recipe": "x.toml"}
    mkdir = Path.mkdir

    def other_run_first(self, *args, **kwargs):
        if self.name in ("exp", "job") and not self.exists():  # the other run makes it between our look and our mkdir
            mkdir(self)
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_run_first)
    assert fit.new_run_dir(config, resume=False) == tmp_path / "exp-2"
    # Several workers never choose another name on their own: a restarted job must find its run.
    config["run"]["name"] = "job"
    with pytest.raises(ValueError, match="job was just made by another run: pass --resume to continue it"):
        fit.new_run_dir(config, resume=False, exact_name=True)


# --- recipes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["phantom_demo.toml", "ircadb_finetune.toml", *LITS_RECIPES])
def test_shipped_recipe_resolves_and_builds_its_model(recipe):
    from keras_livseg.models import build_model

    config = fit.resolve_config(PIPELINES / recipe)
    assert set(fit.DEFAULTS) <= set(config)
    options = {k: v for k, v in config["model"].items() if k not in fit.MODEL_FIXED_KEYS}
    options.update({"filters": 4, "depth": 2} if "filters" in options else {})
    options.update({"decoder_filters": 8, "encoder_weights": None} if config["model"]["name"] == "effb0_pan" else {})
    context = int(config["preprocessing"].get("context", 1))
    model = build_model(config["model"]["name"], input_shape=(64, 64, context), **options)
    assert model.output_shape == (None, 64, 64, 3)
    # The optimizer and loss the recipe names can be built too.
    fit.build_optimizer(config["training"], total_steps=10)
    fit.build_loss(config["training"], options.get("head", "softmax"))
    crop = int(config["training"]["crop_size"])
    if crop:  # the model of the recipe's own size takes its patches
        from keras_livseg.models import any_size

        size = int(config["preprocessing"]["image_size"])
        prep = types.SimpleNamespace(image_size=(size, size), context=context)
        assert fit.resolve_crop_size(crop, config, prep) == crop  # the recipe's own model, depth and all
        own = {k: v for k, v in config["model"].items() if k not in fit.MODEL_FIXED_KEYS}
        full = build_model(config["model"]["name"], input_shape=(*prep.image_size, context), **own)
        assert any_size(full, crop).input_shape == (None, None, None, context)


def test_the_fine_tuning_recipe_takes_the_demo_models_input():
    """Warm-started from the demo's checkpoint, it must see what the demo learnt from: the same
    window, grid and context, the context slices as far apart (``context_mm``), the same network."""
    demo = fit.resolve_config(PIPELINES / "phantom_demo.toml")
    tune = fit.resolve_config(PIPELINES / "ircadb_finetune.toml")
    assert tune["preprocessing"] == demo["preprocessing"]
    assert tune["model"] == demo["model"]


def test_the_fine_tuning_recipe_trains_its_final_model_on_every_case_and_exports_it():
    """Without --folds it is the final model: no case held out, no validation asked of an empty
    split (which fit would refuse), the model exported beside the demo's, not over it."""
    tune = fit.resolve_config(PIPELINES / "ircadb_finetune.toml")
    assert list(tune["data"]["split"]) == [1.0, 0.0, 0.0] and tune["training"]["validation"] == "none"
    assert tune["export"]["enabled"] and tune["export"]["out"] == "saved_models/livseg_ircadb"
    demo = fit.resolve_config(PIPELINES / "phantom_demo.toml")
    assert tune["export"]["out"] != demo["export"]["out"]
    assert tune["training"]["init_from"].endswith("phantom_demo/checkpoints/best.keras")


def test_tversky_weights_of_the_recipe_reach_the_loss():
    training = {**fit.DEFAULTS["training"], "fn_weights": [0.5, 0.7]}
    assert fit.build_loss(training, "softmax").fn_weights == [0.5, 0.7]
    assert fit.build_loss(fit.DEFAULTS["training"], "softmax").fn_weights is None  # the plain soft Dice
    with pytest.raises(ValueError, match="training.fn_weights .* needs loss 'ce_dice'"):
        fit.build_loss({**training, "loss": "bce_dice"}, "sigmoid")


def test_lits_recipes_follow_the_papers():
    tam = fit.resolve_config(PIPELINES / "lits_tam_unet.toml")
    unet = fit.resolve_config(PIPELINES / "lits_unet.toml")
    pan = fit.resolve_config(PIPELINES / "lits_effb0_pan.toml")
    for config in (tam, unet):  # Khimta et al.: 256x256 slices, z-score, Adam, CE + Dice
        assert config["preprocessing"]["image_size"] == 256 and config["preprocessing"]["context"] == 1
        assert config["training"]["optimizer"] == "adam" and config["training"]["loss"] == "ce_dice"
    assert (tam["model"]["name"], unet["model"]["name"]) == ("tam_unet", "unet")
    # The baseline differs from TAM-U-Net by the model alone.
    assert tam["training"] == unet["training"] and tam["preprocessing"] == unet["preprocessing"]
    assert pan["model"]["name"] == "effb0_pan" and pan["preprocessing"]["context"] == 3
    assert (pan["training"]["optimizer"], pan["training"]["schedule"]) == ("adamw", "onecycle")
    assert list(pan["model"]["aspp_rates"]) == [6, 12, 18]
    for config in (tam, unet, pan):
        assert config["data"]["src"], "a LiTS recipe must never fall back to the phantom"


# --- bad input and faults ------------------------------------------------------------------------


def test_unknown_recipe_key_names_it_and_the_valid_keys(tmp_path, capsys):
    code, _, err = run_cli(["--runs-dir", str(tmp_path), "--set", "training.epochz=3"])
    assert code == 2
    assert "epochz" in err and "[training]" in err and "epochs" in err and "learning_rate" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["--runs-dir", str(tmp_path), "--set", "trainin.epochs=3"])
    assert code == 2 and "[trainin]" in err and "training" in err and "valid sections" in err
    code, _, err = run_cli(["--runs-dir", str(tmp_path), "--set", "epochs"])
    assert code == 2 and "section.key=value" in err
    code, _, err = run_cli(["--runs-dir", str(tmp_path), "--set", "run.deterministic=flase"])
    assert code == 2 and "run.deterministic must be true or false, got 'flase'" in err and "Traceback" not in err
    for bad in ("[0]", "[6, true]", "8", "0", "false", "[6, 500]"):
        code, _, err = run_cli(["--runs-dir", str(tmp_path), "--set", f"training.postprocessing_diameters_mm={bad}"])
        assert code == 2 and "training.postprocessing_diameters_mm must be a list of lesion diameters in mm" in err, bad
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # refused before any run folder
    code, _, err = run_cli(["--runs-dir", str(tmp_path), "--set", "data.stratify=flase"])
    assert code == 2 and "data.stratify must be true or false, got 'flase'" in err and "Traceback" not in err
    for switch in ("training.score_slices", "training.score_volumes", "training.cache", "export.enabled"):
        code, _, err = run_cli(["--runs-dir", str(tmp_path), "--set", f"{switch}=2"])
        assert code == 2 and f"{switch} must be true or false, got 2" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["--runs-dir", str(tmp_path), "--set", "training.epochs.first=3"])
    assert code == 2 and "training.epochs is a value, not a table" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["--runs-dir", str(tmp_path), "--set", "training.augmentaton.rotation=0.1"])
    assert code == 2 and "augmentaton" in err and "[training]" in err and "Traceback" not in err
    code, _, err = run_cli(["--runs-dir", str(tmp_path), "--set", "training.augmentation.rotaton=0.1"])
    assert code == 2 and "unknown augmentation key(s) ['rotaton']" in err and "rotation" in err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir()), "a bad option must fail before making a run folder"


def test_a_dotted_override_sets_one_entry_of_a_nested_table_and_keeps_the_others():
    """--set training.augmentation.rotation=0.04 on the demo recipe: rotation set, the recipe's
    other augmentation settings kept (a shallow update would have dropped them)."""
    from keras_livseg.data.augment import Augmentation

    recipe = fit.resolve_config(PIPELINES / "phantom_demo.toml")["training"]["augmentation"]
    section, key, value = fit.parse_override("training.augmentation.rotation=0.04")
    assert (section, key, value) == ("training", "augmentation.rotation", 0.04)
    config = fit.resolve_config(PIPELINES / "phantom_demo.toml", {section: {key: value}})
    assert config["training"]["augmentation"] == {**recipe, "rotation": 0.04} and recipe["rotation"] == 0.0
    assert Augmentation.from_config(config["training"]["augmentation"]).zoom == recipe["zoom"] == 0.1


def test_data_folder_without_volumes_is_one_line_and_exit_2(tmp_path, cache_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path / "runs"), "--data", str(empty),
                              "--shards", str(tmp_path / "shards")])
    assert code == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and str(empty) in error_lines[0], err


def test_shard_folder_without_manifest_says_how_to_fix(tiny_run, tmp_path):
    import shutil

    from keras_livseg.data.dataset import make_dataset
    from keras_livseg.data.volumes import DataError

    shards = Path(json.loads((tiny_run.run_dir / "config.json").read_text())["data"]["shards"])
    for path in shards.glob("*.tfrecord*"):
        shutil.copy(path, tmp_path)
    assert list(tmp_path.glob("train-*"))
    with pytest.raises(DataError, match=r"manifest\.json not found.*keras_livseg\.prepare"):
        make_dataset(tmp_path, "train", 4)


def test_model_data_mismatch_names_both_shapes_and_the_fix():
    prep = types.SimpleNamespace(image_size=(64, 64), context=3)
    with pytest.raises(ValueError) as error:
        fit.check_model_matches_data((None, 32, 32, 1), prep)
    message = str(error.value)
    assert "32x32x1" in message and "64x64x3" in message
    assert "preprocessing.image_size 64" in message and "preprocessing.context 3" in message
    fit.check_model_matches_data((None, 64, 64, 3), prep)  # a match passes


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    code, _, err = run_cli(["--runs-dir", str(tmp_path), "--name", "never-ran", "--resume", "--no-export"])
    assert code == 2
    assert "no run to resume" in err and "never-ran" in err and "--name" in err
    assert "Traceback" not in err


@keras.saving.register_keras_serializable(package="keras_livseg_tests")
class _BlowUpAfter(keras.optimizers.schedules.LearningRateSchedule):
    """A sane rate for ``steps`` steps, then NaN: the weights (and the loss) turn NaN in epoch 2."""

    def __init__(self, steps: int, rate: float = 1e-2):
        self.steps = steps
        self.rate = rate

    def __call__(self, step):
        return keras.ops.where(keras.ops.less(step, self.steps), self.rate, float("nan"))

    def get_config(self):
        return {"steps": self.steps, "rate": self.rate}


@pytest.fixture(scope="module")
def nan_run(cache_dir, tmp_path_factory):
    """A run whose loss turns NaN early in epoch 2 (the rate becomes NaN after one good epoch)."""
    steps = int(TINY_ARGS[TINY_ARGS.index("--steps-per-epoch") + 1])  # one good epoch
    runs = tmp_path_factory.mktemp("nan-runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit, "build_optimizer", lambda training, total: keras.optimizers.Adam(_BlowUpAfter(steps)))
        code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(runs), "--name", "nan", "--epochs", "3"])
    return types.SimpleNamespace(code=code, stdout=out, stderr=err, run_dir=runs / "nan")


def _finite_model(path: Path) -> bool:
    model = keras.saving.load_model(path, compile=False)
    probabilities = np.asarray(model.predict(np.zeros((2, 32, 32, 1), "float32"), verbose=0))
    return all(np.isfinite(w).all() for w in model.get_weights()) and bool(np.isfinite(probabilities).all())


def test_nan_loss_stops_with_a_message_and_keeps_the_good_checkpoint(nan_run):
    assert nan_run.code == 3, nan_run.stderr[-2000:]
    run_dir = nan_run.run_dir
    assert "the loss became NaN at epoch 2, batch" in nan_run.stderr
    assert str(run_dir / "checkpoints" / "best.keras") in nan_run.stderr and "Lower the learning rate" in nan_run.stderr
    history = read_history(run_dir)
    assert [int(row["epoch"]) for row in history] == [0, 1]  # stopped in epoch 2, never started epoch 3
    assert np.isfinite(float(history[0]["loss"]))
    assert _finite_model(run_dir / "checkpoints" / "best.keras")


def test_nan_stop_leaves_last_checkpoint_finite(nan_run):
    assert nan_run.code == 3
    assert _finite_model(nan_run.run_dir / "checkpoints" / "last.keras")


def test_nan_stop_records_epoch_and_batch():
    from keras_livseg.training.callbacks import NaNStop

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.stop_training = False  # as fit sets it
    stop = NaNStop()
    stop.set_model(model)
    stop.on_epoch_begin(4)
    stop.on_train_batch_end(6, {"loss": 0.5})
    assert stop.stopped_at is None and not model.stop_training
    stop.on_train_batch_end(7, {"loss": float("inf")})
    assert stop.stopped_at == (4, 7) and model.stop_training


# --- precision and distribution ------------------------------------------------------------------

CPU_PLAIN = "processor : 0\nflags : fpu sse sse2 avx avx2 fma avx512f avx512bw\n"
CPU_BF16 = "processor : 0\nflags : fpu sse sse2 avx avx2 avx512f avx512_bf16\n"
CPU_AMX = "processor : 0\nflags : fpu avx2 amx_bf16 amx_tile\n"


@pytest.mark.parametrize("cpuinfo, expected", [(CPU_PLAIN, "float32"), (CPU_BF16, "mixed_bfloat16"),
                                               (CPU_AMX, "mixed_bfloat16"), ("", "float32")])
def test_auto_precision_on_cpu_never_picks_float16(cpuinfo, expected):
    policy = fit_resolve_precision("auto", gpus=0, cpuinfo=cpuinfo)
    assert policy == expected and "float16" not in policy.replace("bfloat16", "")


def test_auto_precision_on_gpu_picks_mixed_float16():
    assert fit_resolve_precision("auto", gpus=1, cpuinfo=CPU_PLAIN) == "mixed_float16"
    assert fit_resolve_precision("auto", gpus=4, cpuinfo=CPU_BF16) == "mixed_float16"
    assert fit_resolve_precision("float32", gpus=1) == "float32"  # explicit choices are kept
    with pytest.raises(ValueError, match="float64"):
        fit_resolve_precision("float64", gpus=0)


def fit_resolve_precision(*args, **kwargs):
    from keras_livseg.training.precision import resolve_precision

    return resolve_precision(*args, **kwargs)


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras
    import numpy as np
    from keras_livseg.models import build_model
    from keras_livseg.training.fit import DEFAULTS, build_loss, build_optimizer
    from keras_livseg.training.metrics import default_metrics
    from keras_livseg.training.strategy import choose_strategy

    strategy = choose_strategy(devices=["/cpu:0", "/cpu:1"])
    # Seeded: an unseeded initialization once started with a loss of 5.6 (confident wrong logits).
    keras.utils.set_random_seed(0)
    per_replica = 2
    global_batch = per_replica * strategy.num_replicas_in_sync
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4 * global_batch, 32, 32, 1)).astype("float32")
    masks = rng.integers(0, 3, size=(4 * global_batch, 32, 32)).astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices((images, masks)).batch(global_batch).repeat()
    with strategy.scope():
        model = build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2)
        model.compile(optimizer=build_optimizer(DEFAULTS["training"], 2),
                      loss=build_loss(DEFAULTS["training"], "softmax"), metrics=default_metrics())
    history = model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "strategy": type(strategy).__name__,
                      "global_batch": global_batch, "loss": history.history["loss"][-1],
                      "iterations": int(model.optimizer.iterations.numpy()),
                      "tumor_dice": history.history["tumor_dice"][-1]}))
    """
)


@pytest.mark.slow
def test_mirrored_strategy_over_two_logical_cpus_trains():
    done = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True, timeout=240,
                          cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["strategy"] == "MirroredStrategy" and result["replicas"] == 2
    assert result["global_batch"] == 4 and result["iterations"] == 2
    # Cross entropy (about ln 3 at initialization) plus a soft Dice loss (at most 1) per class.
    assert 0.3 < result["loss"] < 4.0 and 0.0 <= result["tumor_dice"] <= 1.0


# --- resume after a kill -------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_run_resumes_at_the_saved_epoch_and_learning_rate_step(tmp_path, cache_dir):
    from keras_livseg.training.schedules import OneCycle

    steps, epochs, max_lr = 6, 4, 1e-2
    args = [sys.executable, "-m", "keras_livseg.fit", *TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "killed",
            "--epochs", str(epochs), "--steps-per-epoch", str(steps), "--learning-rate", str(max_lr),
            "--set", "training.schedule=\"onecycle\"", "--set", "training.image_every=100"]
    env = {**os.environ, "KERAS_LIVSEG_CACHE": str(cache_dir), "TF_CPP_MIN_LOG_LEVEL": "2"}
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    committed = run_dir / "backup" / "state.json"  # the first epoch's backup
    try:
        deadline = time.monotonic() + 600  # a loaded machine may take minutes to its first epoch
        while time.monotonic() < deadline and process.poll() is None and not committed.is_file():
            time.sleep(0.1)
        alive = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        output = process.stdout.read().decode()[-2000:]
        assert alive, "the run finished (or died) before it could be killed: " + output
        assert committed.is_file(), "no epoch was committed within 600 s: " + output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    done_before = json.loads((run_dir / "backup" / "state.json").read_text())["epoch"]
    assert 1 <= done_before < epochs
    assert len(read_history(run_dir)) >= done_before  # a row may be there for an epoch the backup lacks

    resumed = subprocess.run([sys.executable, "-m", "keras_livseg.fit", "--runs-dir", str(tmp_path),
                              "--name", "killed", "--resume", "--epochs", str(epochs), "--no-export"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Epoch 1/4" not in resumed.stdout  # never starts over
    assert f"Epoch {done_before + 1}/{epochs}" in resumed.stdout
    assert f"finished {epochs} epochs" in resumed.stdout

    history = read_history(run_dir)
    assert [int(row["epoch"]) for row in history] == list(range(epochs))  # continues, no repeats
    # The rate is logged at each epoch's last step: OneCycle at (epoch + 1) * steps only if the
    # optimizer's iteration count survived the kill (a reset count would log the rate of step `steps`).
    schedule = OneCycle(max_lr=max_lr, total_steps=steps * epochs, warmup_fraction=0.3)
    logged = [float(row["learning_rate"]) for row in history]
    expected = [float(schedule((epoch + 1) * steps)) for epoch in range(epochs)]
    np.testing.assert_allclose(logged, expected, rtol=1e-4)
    assert len(set(np.round(expected, 8))) == epochs  # the schedule tells the epochs apart
    assert (run_dir / "checkpoints" / "last.keras").is_file()
    assert not (run_dir / "backup").exists()  # complete: nothing left to resume


def test_a_run_killed_after_its_last_epoch_finishes_on_resume_without_training_again(cache_dir, tmp_path, monkeypatch):
    from keras_livseg.training import multi_worker

    def killed(weights):
        raise KeyboardInterrupt  # as a SIGINT right after the last epoch's backup, before complete.json

    args = [*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "late", "--steps-per-epoch", "3",
            "--set", "training.score_volumes=false"]
    with monkeypatch.context() as patch:
        patch.setattr(multi_worker, "weights_digest", killed)
        code, _, err = run_cli(args)
    run_dir = tmp_path / "late"
    assert code != 0 and "interrupted" in err
    assert not (run_dir / "complete.json").exists()
    assert json.loads((run_dir / "backup" / "state.json").read_text())["epoch"] == 2
    history = (run_dir / "history.csv").read_bytes()

    code, out, err = run_cli([*args, "--resume"])
    assert code == 0, err[-3000:]
    # Nothing trained again: Keras' own backup was deleted when training ended, and this started over at epoch 0.
    assert "Epoch 1/2" not in out and "Epoch 2/2" not in out
    assert json.loads((run_dir / "complete.json").read_text())["epochs_done"] == 2
    assert (run_dir / "history.csv").read_bytes() == history
    assert not (run_dir / "backup").exists()


# --- TensorBoard ---------------------------------------------------------------------------------


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode())


@pytest.mark.slow
def test_tensorboard_serves_the_runs_scalars_and_images(tiny_run, start_server):
    tensorboard = Path(sys.executable).parent / "tensorboard"
    if not tensorboard.is_file():
        pytest.skip(f"tensorboard is not installed beside {sys.executable}")
    _, port = start_server(  # stopped by the fixture
        lambda port: [str(tensorboard), "--logdir", str(tiny_run.run_dir / "tensorboard"), "--host", "127.0.0.1",
                      "--port", str(port), "--reload_interval", "1"],
        ready=lambda port: bool(_get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags") is not None),
    )
    base = f"http://127.0.0.1:{port}"
    scalars = images = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            scalars = _get_json(f"{base}/data/plugin/scalars/tags")
            images = _get_json(f"{base}/data/plugin/images/tags")
        except OSError:
            time.sleep(0.5)
            continue
        if "train" in scalars and "images" in images:
            break
        time.sleep(0.5)
    assert scalars and "train" in scalars and "validation" in scalars, scalars
    assert {"epoch_loss", "epoch_tumor_dice", "epoch_learning_rate"} <= set(scalars["train"]), scalars["train"]
    assert "epoch_tumor_dice" in scalars["validation"]
    assert images and "validation/ct_truth_prediction" in images.get("images", {}), images

    points = _get_json(f"{base}/data/plugin/scalars/scalars?run=train&tag=epoch_learning_rate")
    assert [step for _, step, _ in points] == [0, 1]
    assert [value for _, _, value in points] == pytest.approx([1e-2, 1e-2])
    grid = _get_json(f"{base}/data/plugin/images/images?run=images&tag=validation/ct_truth_prediction")
    assert [entry["step"] for entry in grid] == [0, 1]
    query = grid[-1]["query"]
    with urllib.request.urlopen(f"{base}/data/plugin/images/individualImage?{query}", timeout=5) as response:
        png = response.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # Rows of (CT, truth, prediction) for each chosen slice: three 32-pixel columns.
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == 3 * 32 and height % 32 == 0 and height >= 32, (width, height)
    # What the TAM-U-Net attends to: CT, the mean of its TAM gates, Grad-CAM tumour and liver.
    assert "validation/attention" in images["images"], images
    attention = _get_json(f"{base}/data/plugin/images/images?run=images&tag=validation/attention")
    with urllib.request.urlopen(f"{base}/data/plugin/images/individualImage?{attention[-1]['query']}", timeout=5) as response:
        png = response.read()
    assert int.from_bytes(png[16:20], "big") == 4 * 32 and int.from_bytes(png[20:24], "big") == height


# --- export --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_exports_a_saved_model(tmp_path, cache_dir):
    args = [arg for arg in TINY_ARGS if arg != "--no-export"]
    code, out, err = run_cli([*args, "--runs-dir", str(tmp_path / "runs"), "--name", "exported", "--epochs", "1",
                              "--steps-per-epoch", "5", "--export-dir", str(tmp_path / "saved"),
                              "--set", "export.enabled=true"])
    assert code == 0, err[-3000:]
    versions = [p for p in (tmp_path / "saved").iterdir() if p.is_dir()]
    assert len(versions) == 1 and (versions[0] / "saved_model.pb").is_file()
    assert f"export:          {versions[0]}" in out
    # The command exported this run's best checkpoint with this run's preprocessing.
    metadata = json.loads((versions[0] / "assets.extra" / "preprocessing.json").read_text())
    assert Path(metadata["run"]).name == "exported" and metadata["model_file"].endswith("best.keras")
    from keras_livseg.data.preprocessing import read_preprocessing_json

    exported_prep, _ = read_preprocessing_json(versions[0] / "assets.extra" / "preprocessing.json")
    run_prep, _ = read_preprocessing_json(tmp_path / "runs" / "exported" / "preprocessing.json")
    assert exported_prep == run_prep and tuple(run_prep.image_size) == (32, 32)
    # The post-processing the run chose travels with the export, and predict finds it there.
    run_metadata = json.loads((tmp_path / "runs" / "exported" / "preprocessing.json").read_text())
    assert metadata["postprocessing"] == run_metadata["postprocessing"]
    from keras_livseg.inference.predictor import stored_postprocessing, stored_tta_flips

    assert stored_postprocessing(versions[0]).min_lesion_mm3 == run_metadata["postprocessing"]["min_lesion_mm3"]
    # So does the record of the flips it was trained with (none), which --tta checks.
    assert run_metadata["tta_flips"] == [] and stored_tta_flips(versions[0]) == ()


def test_phantom_spacing_recipe_key_reaches_the_phantom(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_LIVSEG_CACHE", str(tmp_path / "cache"))

    def spacings(spacing_mm):
        config = fit.resolve_config(None, {
            "data": {"phantom_cases": 3, "phantom_size": 64, "phantom_slices": [8, 8], "phantom_spacing_mm": spacing_mm},
            "preprocessing": {"image_size": 32, "context": 1},
        })
        shards = fit.ensure_data(config)
        manifest = json.loads((shards / "manifest.json").read_text())
        return np.array([case["spacing"][0] for case in manifest["cases"].values()])

    wide, tight = spacings([0.6, 1.0]), spacings([0.3, 0.35])
    # A tighter field of view never widens a case's pixels, and narrows them on average.
    assert (tight <= wide + 1e-6).all() and tight.mean() < wide.mean()


def test_cached_shards_follow_changes_of_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_LIVSEG_CACHE", str(tmp_path / "cache"))
    from keras_livseg.data.phantom import write_phantom_dataset

    source = tmp_path / "src"
    write_phantom_dataset(source, 3, 0, size=64, slices=(8, 8))
    config = fit.resolve_config(None, {"data": {"src": str(source)}, "preprocessing": {"image_size": 32, "context": 1}})
    first = fit.ensure_data(config)
    assert fit.ensure_data(config) == first  # unchanged source: reused
    write_phantom_dataset(tmp_path / "more", 4, 1, size=64, slices=(8, 8))
    for path in (tmp_path / "more").glob("*-3.nii.gz"):
        path.rename(source / path.name)
    second = fit.ensure_data(config)
    assert second != first and len(json.loads((second / "manifest.json").read_text())["cases"]) == 4


# --- held-out figures, validation policy, cross-validation, warm start --------------------------


def test_held_out_dice_covers_every_slice_of_the_held_out_volumes(tiny_run):
    run_dir = tiny_run.run_dir
    config = json.loads((run_dir / "config.json").read_text())
    manifest = json.loads((Path(config["data"]["shards"]) / "manifest.json").read_text())
    volumes = json.loads((run_dir / "eval" / "held_out_volumes.json").read_text())
    assert volumes["split"] == "test" and volumes["cases"] == manifest["splits"]["test"]["cases"]
    assert sorted(volumes["per_case"]) == sorted(manifest["splits"]["test"]["cases"])
    assert "every slice" in volumes["covers"] and "held-out Dice (every slice" in tiny_run.stdout
    # Predictions are whole volumes on each case's own grid.
    import nibabel as nib

    for cid in volumes["cases"]:
        source = nib.load(manifest["cases"][cid]["image"])
        predicted = nib.load(str(run_dir / "eval" / "predictions" / f"segmentation-{cid}.nii.gz"))
        assert predicted.shape == source.shape
    assert 0.2 < volumes["liver_dice_global"] <= 1.0, volumes


def test_held_out_volumes_are_scored_by_stratum_when_the_manifest_records_strata(tiny_run, tmp_path):
    import shutil

    from keras_livseg.data.prepare import load_manifest

    config = json.loads((tiny_run.run_dir / "config.json").read_text())
    shards = shutil.copytree(config["data"]["shards"], tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    test_cases = manifest["splits"]["test"]["cases"]
    for index, cid in enumerate(test_cases):
        manifest["cases"][cid]["stratum"] = ("portal/hypo", "arterial/hyper")[index % 2]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    result = fit.score_held_out_volumes(tiny_run.run_dir / "checkpoints" / "best.keras", load_manifest(shards), "test",
                                        tmp_path / "eval", postprocess=None)
    expected = {"portal/hypo": len(test_cases[0::2]), "arterial/hyper": len(test_cases[1::2])}
    assert {name: s["n_cases"] for name, s in result["by_stratum"].items()} == {k: v for k, v in expected.items() if v}
    written = json.loads((tmp_path / "eval" / "held_out_volumes.json").read_text())
    assert written["by_stratum"] == result["by_stratum"]


def test_empty_validation_split_is_refused_not_silently_replaced_by_training_data(cache_dir, tmp_path):
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--set", "data.split=[1.0, 0.0, 0.0]"])
    assert code == 2
    assert "the validation split of" in err and "training.validation" in err and "Traceback" not in err
    assert "6 case(s) from 6 patient(s)" in err and "--folds 6" in err


def test_training_without_validation_keeps_the_last_epoch_and_reports_no_held_out(cache_dir, tmp_path):
    code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "all", "--epochs", "1",
                              "--steps-per-epoch", "5", "--set", "data.split=[1.0, 0.0, 0.0]",
                              "--set", "training.validation=none"])
    assert code == 0, err[-2000:]
    assert "held-out Dice:   none" in out
    history = read_history(tmp_path / "all")
    assert "loss" in history[0] and not any(key.startswith("val_") for key in history[0])  # nothing was validated
    best = keras.saving.load_model(tmp_path / "all" / "checkpoints" / "best.keras", compile=False)
    last = keras.saving.load_model(tmp_path / "all" / "checkpoints" / "last.keras", compile=False)
    for a, b in zip(best.get_weights(), last.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_validation_none_skips_the_pass_but_its_cases_still_choose_the_postprocessing(cache_dir, tmp_path):
    code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "noval", "--epochs", "2",
                              "--steps-per-epoch", "4", "--set", "training.validation=none",
                              "--set", "training.score_volumes=false"])
    assert code == 0, err[-2000:]
    run = tmp_path / "noval"
    history = read_history(run)
    assert len(history) == 2 and "loss" in history[0] and not any(key.startswith("val_") for key in history[0])
    assert not list((run / "tensorboard" / "validation").glob("events.out.tfevents.*"))  # no pass, no curve
    assert list((run / "tensorboard" / "images").glob("events.out.tfevents.*"))  # the validation slices drawn
    best = keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)
    last = keras.saving.load_model(run / "checkpoints" / "last.keras", compile=False)
    for a, b in zip(best.get_weights(), last.get_weights()):
        np.testing.assert_array_equal(a, b)  # no validation: the last epoch is the model
    manifest = json.loads((Path(json.loads((run / "config.json").read_text())["data"]["shards"]) / "manifest.json").read_text())
    chosen = json.loads((run / "preprocessing.json").read_text())["postprocessing"]
    assert chosen["chosen_on"]["cases"] == manifest["splits"]["val"]["cases"] != []


def test_validating_only_the_last_epochs_chooses_the_best_among_them(cache_dir, tmp_path, caplog):
    code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "late", "--epochs", "3",
                              "--steps-per-epoch", "4", "--set", "training.validate_last=1",
                              "--set", "training.score_volumes=false"])
    assert code == 0, err[-2000:]
    history = read_history(tmp_path / "late")
    assert [row["val_loss"] == "NA" for row in history] == [True, True, False]
    assert float(history[-1]["val_tumor_dice"]) >= 0.0
    # Only the last epoch was validated, so it is the best; Keras' own checkpoint would have saved
    # every unvalidated epoch as the best.
    best = keras.saving.load_model(tmp_path / "late" / "checkpoints" / "best.keras", compile=False)
    last = keras.saving.load_model(tmp_path / "late" / "checkpoints" / "last.keras", compile=False)
    for a, b in zip(best.get_weights(), last.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert "Can save best model only" not in err + caplog.text
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--set", "training.validate_last=-2"])
    assert code == 2 and "training.validate_last=-2 must be a whole number" in err and "Traceback" not in err


def test_without_slice_scoring_the_held_out_figures_are_the_whole_volumes_only(cache_dir, tmp_path, caplog):
    code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "volumes", "--epochs", "1",
                              "--steps-per-epoch", "3", "--set", "training.score_slices=false"])
    assert code == 0, err[-2000:]
    run = tmp_path / "volumes"
    assert not (run / "eval" / "test_metrics.json").exists()
    volumes = json.loads((run / "eval" / "held_out_volumes.json").read_text())
    assert volumes["split"] == "test" and 0.0 <= volumes["liver_dice"] <= 1.0
    assert "held-out Dice (every slice of" in out and "model grid" not in out and "held-out Dice:   none" not in out
    complete = json.loads((run / "complete.json").read_text())
    assert complete["test_metrics"] == {} and complete["volume_metrics"]["split"] == "test"
    code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "none", "--epochs", "1",
                              "--steps-per-epoch", "3", "--set", "training.score_slices=false",
                              "--set", "training.score_volumes=false"])
    assert code == 0 and "score_volumes and training.score_slices both false" in out
    assert "the test cases were not scored (score them with: python -m keras_livseg.evaluate --model" in caplog.text


def test_case_balanced_tumour_sampling_trains_and_a_bad_value_is_one_line(cache_dir, tmp_path):
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "cases", "--epochs", "1",
                            "--steps-per-epoch", "3", "--set", "training.tumor_sampling=case",
                            "--set", "training.score_volumes=false"])
    assert code == 0, err[-2000:]
    assert len(read_history(tmp_path / "cases")) == 1
    assert json.loads((tmp_path / "cases" / "config.json").read_text())["training"]["tumor_sampling"] == "case"
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--set", "training.tumor_sampling=lesion"])
    assert code == 2 and "tumor_sampling must be 'slice', 'case' or 'stratum', got 'lesion'" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_run_stopped_before_its_validated_epochs_keeps_the_last_as_best(cache_dir, tmp_path, caplog):
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "cut", "--epochs", "4",
                            "--steps-per-epoch", "3", "--set", "training.validate_last=2",
                            "--set", "training.max_minutes=0.001", "--set", "training.score_volumes=false"])
    assert code == 0, err[-2000:]
    assert [row["val_loss"] for row in read_history(tmp_path / "cut")] == ["NA"]
    assert "no epoch of this run was validated" in caplog.text
    best = keras.saving.load_model(tmp_path / "cut" / "checkpoints" / "best.keras", compile=False)
    last = keras.saving.load_model(tmp_path / "cut" / "checkpoints" / "last.keras", compile=False)
    for a, b in zip(best.get_weights(), last.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_deterministic_run_repeats_exactly_and_leaves_tensorflow_as_it_was(cache_dir, tmp_path):
    """``run.deterministic`` (the tiny recipe's): same seed, same batches, same weights, bit for bit."""
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    runs = []
    for name in ("first", "second"):
        code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", name, "--epochs", "1",
                                  "--steps-per-epoch", "20", "--set", "training.score_volumes=false",
                                  "--set", "training.choose_postprocessing=false"])
        assert code == 0, err[-2000:]
        # TensorFlow's switch is process-wide: the run restores it for whatever runs next.
        assert tf_config.is_op_determinism_enabled() == was
        last = keras.saving.load_model(tmp_path / name / "checkpoints" / "last.keras", compile=False)
        runs.append((read_history(tmp_path / name)[0], last.get_weights()))
    (history_1, weights_1), (history_2, weights_2) = runs
    assert history_1["loss"] == history_2["loss"] and history_1["val_tumor_dice"] == history_2["val_tumor_dice"]
    assert len(weights_1) == len(weights_2) > 10
    for a, b in zip(weights_1, weights_2):
        np.testing.assert_array_equal(a, b)


def test_patch_training_fits_patches_and_keeps_whole_slice_checkpoints(cache_dir, tmp_path, monkeypatch):
    from keras_livseg.data import dataset
    from keras_livseg.training import precision

    sizes = []
    cut = dataset.random_crops
    monkeypatch.setattr(dataset, "random_crops", lambda images, masks, size, *rest: sizes.append(size) or cut(images, masks, size, *rest))
    # precision "auto" on a bf16 CPU times the model: at the patch's shape, the one a train step sees.
    probed = []

    def probe(build, key, batch, cache_file):
        probed.append((tuple(build().input_shape), tuple(key["input_shape"])))
        return "float32"

    monkeypatch.setattr(precision, "cpu_supports_bfloat16", lambda cpuinfo=None: True)
    monkeypatch.setattr(precision, "choose_cpu_policy", probe)
    code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "patches", "--epochs", "1",
                              "--steps-per-epoch", "10", "--set", "training.crop_size=16", "--precision", "auto"])
    assert code == 0, err[-3000:]
    assert probed == [((None, 16, 16, 1), (16, 16, 1))]
    assert sizes and set(sizes) == {16}  # the training pipeline cut 16x16 patches
    run = tmp_path / "patches"
    for name in ("best.keras", "last.keras"):  # what predict and the export read: the whole-slice model
        saved = keras.saving.load_model(run / "checkpoints" / name, compile=False)
        assert tuple(saved.input_shape) == (None, 32, 32, 1)
    history = read_history(run)
    assert float(history[0]["val_loss"]) > 0 and history[0]["val_liver_dice"] != "NA"  # validated on whole slices
    held_out = json.loads((run / "eval" / "held_out_volumes.json").read_text())
    assert 0 < held_out["liver_dice"] <= 1
    assert list((run / "tensorboard" / "images").iterdir())  # the prediction grid drew the whole-slice model


@pytest.mark.parametrize(
    "value, fragment",
    [("10", "training.crop_size 10: tam_unet: input height 10 is not a multiple of 4"),
     ("48", "training.crop_size 48 is larger than the slices (32x32); give at most 32"),
     ("-1", "training.crop_size must be a whole number of pixels"),
     ("16.5", "training.crop_size must be a whole number of pixels")],
)
def test_bad_crop_size_is_one_line(cache_dir, tmp_path, value, fragment):
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path / "runs"), "--set", f"training.crop_size={value}"])
    assert code == 2 and fragment in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no run folder left behind


def test_a_model_that_cannot_take_patches_trains_on_whole_slices_and_says_so(cache_dir, tmp_path, caplog):
    tam_unet_options = {i for i, arg in enumerate(TINY_ARGS) if arg.startswith("model.")}
    args = [arg for i, arg in enumerate(TINY_ARGS) if i not in tam_unet_options and i + 1 not in tam_unet_options]
    with caplog.at_level("WARNING", logger="keras_livseg.training.fit"):
        code, _, err = run_cli([*args, "--runs-dir", str(tmp_path), "--name", "linknet", "--image-size", "64",
                                "--epochs", "1", "--steps-per-epoch", "2", "--set", "model.name=linknet",
                                "--set", "model.encoder=resnet18", "--set", "training.crop_size=32",
                                "--set", "training.score_volumes=false", "--set", "training.choose_postprocessing=false"])
    assert code == 0, err[-2000:]
    assert any("linknet cannot train on patches" in r.getMessage() and "whole 64x64 slices" in r.getMessage()
               for r in caplog.records)
    saved = keras.saving.load_model(tmp_path / "linknet" / "checkpoints" / "last.keras", compile=False)
    assert tuple(saved.input_shape) == (None, 64, 64, 1)


def test_resuming_a_run_from_before_a_recipe_key_existed_uses_its_default(tiny_run, tmp_path):
    """A run whose config.json predates ``training.crop_size`` (and other new keys) resumes as it trained."""
    import shutil

    run = tmp_path / "old"
    shutil.copytree(tiny_run.run_dir, run)
    (run / "complete.json").unlink()
    saved = json.loads((run / "config.json").read_text())
    del saved["training"]["crop_size"], saved["training"]["fn_weights"]
    (run / "config.json").write_text(json.dumps(saved))
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "old", "--resume", "--epochs", "3",
                            "--set", "training.score_volumes=false", "--set", "training.choose_postprocessing=false"])
    assert code == 0, err[-2000:]  # a KeyError before the defaults filled in
    resumed = json.loads((run / "config.json").read_text())["training"]
    assert resumed["crop_size"] == 0 and resumed["fn_weights"] == []
    assert float(read_history(run)[-1]["epoch"]) == 2  # it trained to the third epoch


@pytest.mark.slow
def test_cross_validation_by_patient_with_warm_start(tiny_run, tmp_path):
    source = tiny_run.run_dir / "checkpoints" / "best.keras"
    code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "cv", "--folds", "2",
                              "--epochs", "1", "--steps-per-epoch", "10", "--init-from", str(source)])
    assert code == 0, err[-3000:]
    cv = tmp_path / "cv"
    plan = json.loads((cv / "folds.json").read_text())
    folds = [set(fold) for fold in plan["folds"]]
    assert len(folds) == 2 and not folds[0] & folds[1] and len(folds[0] | folds[1]) == 6
    for index, fold in enumerate(plan["folds"]):
        run = cv / f"fold-{index}"
        manifest = json.loads((Path(json.loads((run / "config.json").read_text())["data"]["shards"]) / "manifest.json").read_text())
        assert manifest["splits"]["test"]["cases"] == sorted(fold, key=int)
        assert not set(manifest["splits"]["train"]["cases"]) & set(fold)
        assert "(100.0%); skipped 0, new 0" in (run / "warm_start.txt").read_text()  # same architecture: all of it
    assert len(list((cv / "predictions").glob("segmentation-*.nii.gz"))) == 6
    metrics = json.loads((cv / "eval" / "metrics.json").read_text())
    assert metrics["n_cases"] == 6
    assert "out-of-fold (6 cases, whole volumes)" in out and "fold 1: case" in out
    assert not (tmp_path / "saved_models").exists()


@pytest.mark.parametrize(
    "extra, fragment",
    [(["--folds", "7"], "--folds 7 needs at least 7 patients but the data holds 6"),
     (["--fold", "1"], "--fold needs --folds")],
)
def test_cross_validation_bad_input_is_one_line(cache_dir, tmp_path, extra, fragment):
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), *extra])
    assert code == 2 and fragment in err and "Traceback" not in err


def test_cross_validation_keeps_a_patients_scans_in_one_fold(cache_dir, tmp_path):
    """Six scans of three patients (a CSV's patient column): three folds, a patient each, also
    through the mixed-in phantom's CSV."""
    from keras_livseg.data.phantom import write_phantom_dataset
    from keras_livseg.data.volumes import discover_cases

    scans = tmp_path / "scans"
    write_phantom_dataset(scans, 6, seed=7, size=48, slices=(8, 8))
    owner = {str(i): f"P{i // 2}" for i in range(6)}  # scans 0 and 1 are patient P0's, and so on
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("image,label,case_id,patient\n" + "".join(
        f"{scans}/volume-{cid}.nii.gz,{scans}/segmentation-{cid}.nii.gz,{cid},{who}\n" for cid, who in owner.items()))
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path / "runs"), "--data", str(csv_path), "--folds", "4"])
    assert code == 2 and "--folds 4 needs at least 4 patients but the data holds 3" in err, err[-2000:]
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path / "runs"), "--name", "cv", "--data", str(csv_path),
                            "--folds", "3", "--fold", "0", "--epochs", "1", "--steps-per-epoch", "2"])
    assert code == 0, err[-3000:]
    plan = json.loads((tmp_path / "runs" / "cv" / "folds.json").read_text())
    assert sorted(sorted({owner[cid] for cid in fold}) for fold in plan["folds"]) == [["P0"], ["P1"], ["P2"]]
    assert sorted(len(fold) for fold in plan["folds"]) == [2, 2, 2]
    # Mixed with phantom cases, the source is another CSV: it keeps the patients.
    config = fit.resolve_config(PIPELINES / "phantom_demo.toml", {"data": {
        "src": str(csv_path), "mix_phantom": 2, "phantom_cases": 2, "phantom_size": 48, "phantom_slices": [8, 8]}})
    mixed = {c.case_id: c.patient for c in discover_cases(fit.ensure_source(config))}
    assert {cid: mixed[cid] for cid in owner} == owner and len(mixed) == 8


def test_init_from_a_file_that_is_not_a_checkpoint_is_one_line(cache_dir, tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a model")
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path / "runs"), "--name", "warm", "--init-from", str(bogus)])
    assert code == 2 and "notes.txt" in err and ".keras" in err and "Traceback" not in err
    # Refused before training: no folder is left, so the corrected command gets the name it asked for.
    assert not (tmp_path / "runs" / "warm").exists()
    code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path / "runs"), "--name", "warm", "--epochs", "1",
                              "--steps-per-epoch", "2"])
    assert code == 0 and (tmp_path / "runs" / "warm" / "checkpoints" / "best.keras").is_file(), err[-2000:]
    assert not (tmp_path / "runs" / "warm-2").exists()


def test_the_demo_checkpoint_missing_says_to_run_the_demo_first(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(fit, "ensure_data", lambda *a, **k: pytest.fail("the data was prepared before the refusal"))
    missing = tmp_path / "runs" / "tam_unet-phantom_demo" / "checkpoints" / "best.keras"
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--set", f"training.init_from={missing}"])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    assert "does not exist yet: run the phantom demo first" in err and "--init-from none" in err
    other = tmp_path / "elsewhere.keras"
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--init-from", str(other)])
    assert code == 2 and f"warm start source '{other}' does not exist; pass a .keras checkpoint" in err, err[-2000:]


def test_init_from_with_a_home_folder_is_found_as_the_warm_start_finds_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ck.keras").write_bytes(b"checked later, by the warm start")
    fit._check_init_from("~/ck.keras", resume=False)  # exists: no error
    with pytest.raises(FileNotFoundError, match="warm start source .*missing.keras' does not exist"):
        fit._check_init_from("~/missing.keras", resume=False)
    fit._check_init_from("~/missing.keras", resume=True)  # a resumed run restores its own weights


def test_init_from_a_checkpoint_sharing_no_layer_is_one_line(cache_dir, tmp_path):
    inputs = keras.Input((4,), name="unrelated_input")
    other = keras.Model(inputs, keras.layers.Dense(2, name="unrelated_dense")(inputs), name="unrelated")
    other.save(tmp_path / "unrelated.keras")
    code, _, err = run_cli([*TINY_ARGS, "--runs-dir", str(tmp_path), "--init-from", str(tmp_path / "unrelated.keras")])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    assert "unrelated.keras: nothing matched" in err and "no layer name is shared" in err


def test_a_volume_normalized_model_with_export_on_is_refused_before_training(cache_dir, tmp_path):
    argv = [arg for arg in TINY_ARGS if arg != "--no-export"]
    code, _, err = run_cli([*argv, "--runs-dir", str(tmp_path), "--name", "vol", "--set", "export.enabled=true",
                            "--set", "preprocessing.normalization=volume"])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    assert "normalization='volume' models cannot be exported" in err and "--no-export" in err
    assert not list(tmp_path.glob("vol*")) and not (tmp_path / "saved_models").exists()  # refused, nothing left


def test_mixed_phantom_cases_always_train_and_are_never_held_out(tmp_path, monkeypatch):
    from keras_livseg.data.phantom import write_phantom_dataset
    from keras_livseg.data.volumes import discover_cases

    monkeypatch.setenv("KERAS_LIVSEG_CACHE", str(tmp_path / "cache"))
    real = tmp_path / "real"
    write_phantom_dataset(real, 4, seed=5, size=48, slices=(8, 8))  # stands in for real scans
    overrides = {"data": {"src": str(real), "mix_phantom": 3, "phantom_cases": 4, "phantom_size": 48,
                          "phantom_slices": [8, 8], "split": [0.5, 0.25, 0.25]}}
    config = fit.resolve_config(PIPELINES / "phantom_demo.toml", overrides)
    source = fit.ensure_source(config)
    cases = discover_cases(source)
    ids = [c.case_id for c in cases]
    assert sorted(ids) == sorted(["0", "1", "2", "3", "phantom-0", "phantom-1", "phantom-2"])
    stamp = source.stat().st_mtime_ns
    assert fit.ensure_source(config) == source and source.stat().st_mtime_ns == stamp  # the shard cache holds
    patients = {c.case_id: c.patient for c in cases}
    split = fit.mixed_assignment(config, ids, patients)
    assert all(split[cid] == "train" for cid in ids if cid.startswith("phantom-"))
    assert sorted(split[cid] for cid in ("0", "1", "2", "3")) == ["test", "train", "train", "val"]
    fold = fit.mixed_assignment(config, ids, patients, held_out={"2": "test"})
    assert [cid for cid in ids if fold[cid] == "test"] == ["2"]
    # The mixed CSV keeps each case's stratum (here the phantom's own), for a stratified split
    # of the real cases; mixed-in phantom cases train whatever their stratum.
    real_strata = {c.case_id: c.stratum for c in discover_cases(real)}
    assert {c.case_id: c.stratum for c in cases if not c.case_id.startswith("phantom-")} == real_strata
    assert all(c.stratum for c in cases)
    assert config["data"]["stratify"] is True  # the demo's recipe stratifies
    strata = fit._strata(config, cases, source)
    assert strata == real_strata
    assert fit._strata({"data": {"stratify": False}}, cases, source) is None
    stratified = fit.mixed_assignment(config, ids, patients, strata=strata)
    assert all(stratified[cid] == "train" for cid in ids if cid.startswith("phantom-"))
    from keras_livseg.data.prepare import split_cases

    real_ids = ["0", "1", "2", "3"]
    expected = split_cases(real_ids, config["data"]["split"], int(config["data"]["seed"]), patients, real_strata)
    assert {cid: stratified[cid] for cid in real_ids} == {cid: s for s, members in expected.items() for cid in members}
    # Without mixing, a case id that merely starts with "phantom-" is a case like any other.
    assert fit._strata({"data": {"stratify": True}}, cases, source) == {c.case_id: c.stratum for c in cases}
    config["data"]["label_map"] = "5:1"
    with pytest.raises(ValueError, match="mix_phantom cannot be combined with data.label_map"):
        fit.ensure_source(config)


@pytest.mark.slow
def test_single_folds_fill_one_cross_validation_folder(cache_dir, tmp_path):
    common = [*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "cv1", "--folds", "2", "--epochs", "1",
              "--steps-per-epoch", "3"]
    code, out, err = run_cli([*common, "--fold", "1"])
    assert code == 0, err[-3000:]
    assert "out-of-fold (3 cases" in out and not (tmp_path / "cv1" / "fold-0").exists()
    code, out, err = run_cli([*common, "--fold", "0"])
    assert code == 0, err[-3000:]
    assert "out-of-fold (6 cases" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv1"]  # no cv1-2: the same folder


def test_auto_precision_times_the_model_once_and_caches_the_answer(tmp_path, monkeypatch):
    """On a bf16 CPU, auto picks what trains this model faster, measured once per model and input."""
    import keras

    from keras_livseg.models import build_model
    from keras_livseg.training import precision

    calls = []
    real = precision._train_step_seconds

    built_under = []

    def timed(build, policies, batch, rounds):
        calls.append(tuple(policies))

        def recording_build():
            built_under.append(keras.mixed_precision.global_policy().name)
            return build()

        # Really builds and steps the models, each under its policy, taking turns.
        measured = real(recording_build, policies, batch, 2)
        assert sorted(measured) == sorted(policies) and min(measured.values()) > 0
        return {"float32": 1.0, "mixed_bfloat16": slow}

    monkeypatch.setattr(precision, "_train_step_seconds", timed)
    build = lambda: build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2)  # noqa: E731
    cache = tmp_path / "precision.json"
    key = {"model": "unet", "options": {"filters": 4, "depth": 2}, "input_shape": (32, 32, 1)}
    slow = 1.2
    probe = lambda: precision.choose_cpu_policy(build, key, 2, cache)  # noqa: E731
    assert precision.resolve_precision("auto", gpus=0, cpuinfo=CPU_BF16, probe=probe) == "float32"
    assert calls == [("float32", "mixed_bfloat16")] and keras.mixed_precision.global_policy().name == "float32"
    assert built_under == ["float32", "mixed_bfloat16"]
    slow = 0.5  # the cached answer stands; no new measurement
    assert precision.choose_cpu_policy(build, key, 2, cache) == "float32" and len(calls) == 1
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["float32_s"] == 1.0 and entry["mixed_bfloat16_s"] == 1.2 and entry["key"]["batch"] == 2
    assert entry["key"]["probe"] == precision.PROBE_VERSION  # an answer measured another way is measured again
    # Another input size is another question: measured, and bfloat16 wins this time.
    assert precision.choose_cpu_policy(build, {**key, "input_shape": (64, 64, 1)}, 2, cache) == "mixed_bfloat16"
    assert len(calls) == 2
    # Without native bf16 nothing is timed.
    assert precision.resolve_precision("auto", gpus=0, cpuinfo=CPU_PLAIN, probe=probe) == "float32" and len(calls) == 2


def test_resume_of_a_finished_run_says_so_and_exits_zero(tiny_run):
    """A scheduler reruns the job: the finished run is reported, not retrained, its files untouched."""
    run_dir = tiny_run.run_dir
    files = {p: p.read_bytes() for p in (run_dir / "history.csv", run_dir / "checkpoints" / "best.keras", run_dir / "complete.json")}
    done = json.loads((run_dir / "complete.json").read_text())
    assert done["epochs_done"] == 2 and done["best_checkpoint"].endswith("best.keras")
    code, out, err = run_cli([*TINY_ARGS, "--runs-dir", str(run_dir.parent), "--name", run_dir.name, "--resume"])
    assert code == 0, err[-2000:]
    assert f"{run_dir} had already finished its 2 epochs: nothing to do" in out
    metrics = json.loads((run_dir / "eval" / "test_metrics.json").read_text())
    # The held-out figures of the finished run are shown again.
    assert f"Dice: liver {metrics['liver_dice']:.4f}, tumor {metrics['tumor_dice']:.4f}" in out
    assert {p: p.read_bytes() for p in files} == files


@pytest.mark.slow
def test_a_time_budget_stops_at_an_epoch_end_and_the_run_counts_as_done(cache_dir, tmp_path):
    args = [*TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "budget", "--epochs", "4", "--steps-per-epoch", "3",
            "--set", "training.max_minutes=0.001", "--set", "training.score_volumes=false"]
    code, out, err = run_cli(args)
    assert code == 0, err[-3000:]
    run_dir = tmp_path / "budget"
    assert [int(row["epoch"]) for row in read_history(run_dir)] == [0]  # 0.06 s: past after the first epoch
    done = json.loads((run_dir / "complete.json").read_text())
    assert done["epochs_done"] == 1 and done["stopped_early"] is True
    # A rerun of the job (a scheduler's) finds it done instead of training the other 3 epochs.
    code, out, err = run_cli([*args, "--resume"])
    assert code == 0 and "had already finished its 1 epochs: nothing to do" in out, err[-2000:]
    assert [int(row["epoch"]) for row in read_history(run_dir)] == [0]


def test_the_phantom_is_made_by_data_workers_processes_when_it_is_large(tmp_path, monkeypatch):
    from keras_livseg.data import phantom
    from keras_livseg.training import fit as training_fit

    monkeypatch.setenv("KERAS_LIVSEG_CACHE", str(tmp_path / "cache"))
    asked: list[int] = []

    def record(out, cases, seed, *, workers=1, **_):
        asked.append(workers)
        Path(out).mkdir(parents=True)
        (Path(out) / "phantom.json").write_text("{}")

    monkeypatch.setattr(phantom, "write_phantom_dataset", record)
    large = training_fit.PHANTOM_CASES_PER_WORKER
    training_fit._phantom_dir({"phantom_cases": large, "phantom_size": 32, "workers": 2})
    training_fit._phantom_dir({"phantom_cases": large - 1, "phantom_size": 32, "workers": 2})
    folder = training_fit._phantom_dir({"phantom_cases": large, "phantom_size": 32, "workers": 2})  # cached
    assert asked == [2, 1] and (folder / "phantom.json").is_file()


# Makes (or reuses) the phantom and the shards of a tiny demo recipe, as a run's start does.
_ENSURE_DATA = """
import logging, sys
from keras_livseg.training import fit
logging.basicConfig(level=logging.INFO, format="%(message)s")
config = fit.resolve_config(sys.argv[1], {
    "data": {"phantom_cases": 6, "phantom_size": 64, "phantom_slices": [12, 16], "split": [0.5, 0.25, 0.25],
             "workers": 1, "stratify": False},
    "preprocessing": {"image_size": 32}})
print("shards:", fit.ensure_data(config))
"""


@pytest.mark.slow
def test_two_runs_started_together_make_the_phantom_and_the_shards_once(tmp_path):
    """Two seeds of one recipe started at once on an empty cache: before, both generated the
    phantom (other file times, so other shards) or both wrote the same shard files, and one failed."""
    env = {**os.environ, "KERAS_LIVSEG_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, "-c", _ENSURE_DATA, str(PIPELINES / "phantom_demo.toml")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outputs = [run.communicate(timeout=600) for run in runs]
    finally:
        for run in runs:
            run.kill()
    assert [run.returncode for run in runs] == [0, 0], [err[-3000:] for _, err in outputs]
    shards = {line for out, _ in outputs for line in out.splitlines() if line.startswith("shards:")}
    assert len(shards) == 1
    logs = "".join(err for _, err in outputs)
    assert logs.count("generating 6 phantom cases") == 1 and logs.count("prepared the shards") == 1
    made = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert made == ["phantom", "shards"]


def test_finished_data_is_reused_without_writing_to_the_cache(tmp_path, monkeypatch):
    """A shared, read-only cache: reusing its phantom and shards must not need the lock file."""
    monkeypatch.setenv("KERAS_LIVSEG_CACHE", str(tmp_path / "cache"))
    config = fit.resolve_config(PIPELINES / "phantom_demo.toml", {
        "data": {"phantom_cases": 4, "phantom_size": 64, "phantom_slices": [12, 16], "split": [0.5, 0.25, 0.25],
                 "workers": 1, "stratify": False},
        "preprocessing": {"image_size": 32}})
    shards = fit.ensure_data(config)

    def read_only(folder, what):
        raise PermissionError(f"{folder}: read-only file system")

    monkeypatch.setattr(fit, "one_maker", read_only)
    assert fit.ensure_data(config) == shards
