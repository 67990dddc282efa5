"""compare: per-model options, settings checks, statistics, and a whole tiny comparison (slow)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from keras_livseg import compare as compare_cli
from keras_livseg.evaluation.comparison import (
    mean_metrics,
    paired_test,
    per_case_means,
    smallest_p_value,
    spread_metrics,
)
from keras_livseg.training.compare import model_section

TINY_RECIPE = """
[run]
seed = 0
[data]
slices = "all"
phantom_cases = 6
phantom_size = 64
phantom_slices = [12, 16]
split = [0.34, 0.16, 0.5]
workers = 1
[preprocessing]
window = [-200.0, 250.0]
image_size = 32
context = 1
normalization = "foreground"
[model]
name = "tam_unet"
filters = 4
depth = 2
[training]
epochs = 1
steps_per_epoch = 12
batch_size = 4
optimizer = "adam"
learning_rate = 1e-2
schedule = "none"
loss = "ce_dice"
precision = "float32"
foreground_fraction = 0.6
image_every = 1
[export]
enabled = false
"""


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = compare_cli.main(argv)
    return code, out.getvalue(), err.getvalue()


# --- statistics, by hand ---------------------------------------------------------------------------


def test_mean_and_spread_over_seeds_leaf_by_leaf():
    seeds = [{"volume": {"liver": {"dice": 0.75, "hd95": None}, "tumor": {"dice": 0.5}}, "split": "test"},
             {"volume": {"liver": {"dice": 0.25, "hd95": 4.0}, "tumor": {"dice": math.nan}}, "split": "test"}]
    mean = mean_metrics(seeds)
    assert mean == {"volume": {"liver": {"dice": 0.5, "hd95": 4.0}, "tumor": {"dice": 0.5}}, "split": "test"}
    spread = spread_metrics(seeds)
    assert spread["volume"]["liver"]["dice"] == {"std": pytest.approx(math.sqrt(0.125)), "min": 0.25, "max": 0.75}
    assert spread["volume"]["tumor"]["dice"] == {"std": 0.0, "min": 0.5, "max": 0.5}  # NaN left out


def test_paired_test_by_hand():
    # Six cases, all better: the exact two-sided p is 2 / 2**6.
    better = paired_test([0.9, 0.8, 0.85, 0.7, 0.95, 0.6], [0.8, 0.7, 0.8, 0.65, 0.9, 0.5])
    assert better["p_value"] == pytest.approx(0.03125)
    assert (better["wins"], better["losses"], better["ties"]) == (6, 0, 0)
    assert better["median_difference"] == pytest.approx(0.075)
    assert better["statistic"] == 0.0  # the smaller rank sum
    # Differences -1, +2, +3, +4 (ranks 1..4): W- = 1, exact p = 2 * P(W <= 1) = 2 * 2/16.
    mixed = paired_test([0.0, 2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 0.0])
    assert mixed["statistic"] == 1.0 and mixed["p_value"] == pytest.approx(0.25)
    # NaN pairs dropped and counted; identical scores give p = 1.
    same = paired_test([0.5, math.nan, 0.7], [0.5, 0.4, 0.7])
    assert same["n"] == 2 and same["dropped"] == 1 and same["p_value"] == 1.0
    assert smallest_p_value(5) == 0.0625 and smallest_p_value(6) == 0.03125
    with pytest.raises(ValueError, match="same cases"):
        paired_test([0.1, 0.2], [0.1])


def test_per_case_means_average_seeds_first():
    rows = [{"case_id": "3", "liver_dice": "0.8"}, {"case_id": "3", "liver_dice": "0.6"},
            {"case_id": "7", "liver_dice": "nan"}, {"case_id": "7", "liver_dice": ""}]
    means = per_case_means(rows, "liver_dice")
    assert means["3"] == pytest.approx(0.7) and math.isnan(means["7"])


def test_recipe_model_options_go_to_the_models_that_take_them():
    base = {"name": "tam_unet", "filters": 16, "depth": 4, "batchnorm": False}
    unet, ignored = model_section(base, "unet", {})
    assert unet == {"name": "unet", "filters": 16, "depth": 4, "batchnorm": False} and ignored == []
    pan, ignored = model_section(base, "effb0_pan", {"effb0_pan": {"decoder_filters": 32}})
    assert pan == {"name": "effb0_pan", "decoder_filters": 32}
    assert ignored == ["batchnorm", "depth", "filters"]


def test_bad_command_lines_end_in_one_line(tmp_path):
    code, _, err = run_cli(["--models", "unet,resnet", "--runs-dir", str(tmp_path)])
    assert code == 2 and "unknown model name(s) ['resnet']" in err and "tam_unet" in err and "Traceback" not in err
    code, _, err = run_cli(["--models", "unet", "--seeds", "0", "--runs-dir", str(tmp_path)])
    assert code == 2 and "--seeds must be at least 1" in err
    code, _, err = run_cli(["--runs", str(tmp_path / "nothing")])
    assert code == 2 and "--runs needs --out" in err
    code, _, err = run_cli(["--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert code == 2 and "is not a finished, scored run" in err


# --- a whole comparison ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    (root / "tiny.toml").write_text(TINY_RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_LIVSEG_CACHE", str(root / "cache"))
        argv = ["--pipeline", str(root / "tiny.toml"), "--models", "unet,tam_unet", "--seeds", "2",
                "--runs-dir", str(root / "runs"), "--name", "tiny"]
        code, out, err = run_cli(argv)
        assert code == 0, err[-3000:]
        yield root / "runs" / "tiny", argv, out


@pytest.mark.slow
def test_compare_writes_the_tables_with_the_computed_numbers(tiny_comparison):
    out_dir, _, stdout = tiny_comparison
    summary = json.loads((out_dir / "compare.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["unet", "tam_unet"]
    assert summary["seeds"] == [0, 1]
    report = (out_dir / "report.md").read_text()
    per_run = {}
    for model in ("unet", "tam_unet"):
        for seed in (0, 1):
            run = out_dir / f"{model}-seed{seed}"
            assert json.loads((run / "config.json").read_text())["model"]["name"] == model
            per_run[model, seed] = json.loads((run / "eval" / "volumes" / "metrics.json").read_text())
    cases = per_run["unet", 0]["cases"]
    # The same held-out cases for every run: half of the 6 phantom cases (data.split [0.34, 0.16, 0.5]).
    assert len(cases) == 3 and all(per_run[key]["cases"] == cases for key in per_run)
    for entry in summary["models"]:
        liver = [per_run[entry["name"], s]["volume"]["liver"]["dice"] for s in (0, 1)]
        assert entry["mean"]["volume"]["liver"]["dice"] == pytest.approx(np.mean(liver))
        assert entry["spread"]["volume"]["liver"]["dice"]["min"] == pytest.approx(min(liver))
        assert f"{np.mean(liver):.4f} ± {np.std(liver, ddof=1):.4f}" in report
        assert entry["flops"] > 0
        assert entry["speed"]["train_slices_per_s"] > 0
        assert f"{entry['name']}: liver Dice {np.mean(liver):.4f}".strip() in " ".join(stdout.split())
    # TAM-U-Net has exactly the U-Net's parameters plus its TAMs' (C*C + C per block).
    tam_extra = sum(c * c + c for c in (4, 8, 4, 8, 16))
    unet, tam = summary["models"]
    # By hand, U-Net base 4, depth 2, one input channel: encoder 188 + 880, bottom 3,488, decoder
    # (upsampling and a 2x2 convolution, then two 3x3) 2,264 + 572, head 15.
    assert unet["parameters"]["trainable"] == 7407
    assert tam["parameters"]["trainable"] - unet["parameters"]["trainable"] == tam_extra

    # The paired test is recomputed from the per-case Dice of the runs.
    with (out_dir / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * len(cases)
    means = {m: per_case_means([r for r in rows if r["model"] == m], "tumor_dice") for m in ("unet", "tam_unet")}
    expected = paired_test([means["tam_unet"][c] for c in cases], [means["unet"][c] for c in cases])
    got = tam["paired_tests"]["tumor"]
    assert got["n"] == expected["n"] and got["wins"] == expected["wins"]
    assert got["median_difference"] == pytest.approx(expected["median_difference"], nan_ok=True)
    assert "Paired tests against the first model" in report and "cannot be significant" in report
    assert "Table I. Overall segmentation" in report and "Table IV. Large tumors" in report

    assert "What each model attends to" in summary["figures"]
    for figure in ("dice_vs_speed.png", "overlays.png", "attention.png"):
        data = (out_dir / "figures" / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.slow
def test_compare_reuses_finished_runs_and_refuses_other_settings(tiny_comparison, tmp_path):
    out_dir, argv, _ = tiny_comparison
    history = (out_dir / "unet-seed0" / "history.csv").read_bytes()
    code, _, err = run_cli(argv + ["--no-speed"])
    assert code == 0, err[-2000:]
    assert (out_dir / "unet-seed0" / "history.csv").read_bytes() == history  # not trained again
    code, _, err = run_cli(argv + ["--epochs", "2"])
    assert code == 2 and "was trained with other settings" in err and "epochs: 1 there, 2 here" in err

    # Runs scored on other cases are refused by --runs, naming what differs.
    other = tmp_path / "other"
    shutil.copytree(out_dir / "tam_unet-seed0", other)
    metrics_path = other / "eval" / "volumes" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["cases"] = metrics["cases"] + ["999"]
    metrics_path.write_text(json.dumps(metrics))
    code, _, err = run_cli(["--runs", str(out_dir / "unet-seed0"), str(other), "--out", str(tmp_path / "c"), "--no-speed"])
    assert code == 2 and "different data or splits" in err and "999" in err


def test_the_budget_line_names_epochs_and_minutes():
    from keras_livseg.training.compare import _budget

    assert _budget({"epochs": 5, "steps_per_epoch": 80, "batch_size": 8}) == "5 epochs of 80 steps, batch 8"
    line = _budget({"epochs": 100, "steps_per_epoch": 0, "batch_size": 4, "max_minutes": 30.0})
    assert line == ("at most 100 epochs of one pass over the training slices, batch 4, each run stopped after the "
                    "first epoch that ended past 30 min")
    args = compare_cli.build_parser().parse_args(["--minutes", "12.5", "--epochs", "50"])
    shared, _ = compare_cli.split_overrides(args)
    assert shared["training"] == {"epochs": 50, "max_minutes": 12.5}


def test_one_model_without_patches_puts_every_model_on_whole_slices():
    from keras_livseg.training.compare import _budget, same_input_for_all

    recipe = {"training": {"crop_size": 64, "epochs": 10, "steps_per_epoch": 180, "batch_size": 8}}
    assert same_input_for_all(recipe, ["unet", "tam_unet"])["training"]["crop_size"] == 64
    mixed = same_input_for_all(recipe, ["tam_unet", "effb0_pan"])
    assert mixed["training"]["crop_size"] == 0 and recipe["training"]["crop_size"] == 64  # a copy, not the recipe
    assert _budget(recipe["training"]) == "10 epochs of 180 steps, batch 8 of 64x64 patches"
    assert _budget(mixed["training"]) == "10 epochs of 180 steps, batch 8"


def test_a_run_from_before_a_training_key_existed_compares_as_its_default():
    from keras_livseg.training.compare import _differences, _settings
    from keras_livseg.training.fit import DEFAULTS

    now = {"training": {**DEFAULTS["training"], "epochs": 5}}
    before = {"training": {k: v for k, v in now["training"].items() if k != "crop_size"}}
    assert _differences(_settings(before), _settings(now)) == []
    assert _differences(_settings(before), _settings({"training": {**now["training"], "crop_size": 32}})) == [
        "training.crop_size: 0 there, 32 here"]
