"""``fit`` on the JAX backend (the GPU path): tf.data still feeds, XLA compiles, the export is TensorFlow's."""

import csv
import json
import subprocess
import sys

import pytest

RECIPE = """
[preprocessing]
image_size = 32
[model]
name = "unet"
filters = 4
depth = 2
[training]
schedule = "none"
"""


@pytest.mark.slow
def test_fit_on_jax_trains_scores_and_exports(tmp_path, jax_env):
    pytest.importorskip("jax")
    (tmp_path / "tiny.toml").write_text(RECIPE)
    env = {**jax_env, "KERAS_LIVSEG_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "keras_livseg.fit", "--pipeline", str(tmp_path / "tiny.toml"), "--precision", "mixed_bfloat16",
         "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "4", "--set", "data.phantom_cases=6",
         "--set", "data.phantom_size=64", "--set", "data.phantom_slices=[12, 16]", "--set", "data.workers=1",
         "--runs-dir", str(tmp_path / "runs"), "--name", "jax", "--export-dir", str(tmp_path / "models")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "jax"
    config = json.loads((run / "config.json").read_text())
    assert config["training"]["resolved_precision"] == "mixed_bfloat16"
    with (run / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [0, 1] and all(float(r["loss"]) > 0 for r in rows)
    assert json.loads((run / "complete.json").read_text())["epochs_done"] == 2
    assert "dtype policy: mixed_bfloat16" in result.stderr and "this process runs jax" in result.stderr
    # The SavedModel, written by a TensorFlow-backend process from the backend-neutral checkpoint.
    assert (tmp_path / "models" / "1" / "saved_model.pb").is_file()
    extra = json.loads((tmp_path / "models" / "1" / "assets.extra" / "preprocessing.json").read_text())
    assert extra["model"] == "unet" and extra["run"] == str(run.resolve())  # found from any folder
