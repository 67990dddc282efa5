"""What every command shares (keras_livseg.cli): the parser, quiet TensorFlow start-up, error exits."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keras_livseg import cli

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOISE = ("cuInit", "oneDNN", "absl::InitializeLog", "cuda drivers", "I0000", "E0000")


def test_make_parser_names_the_command_and_shows_the_examples():
    doc = "Summary.\n\nExamples:\n    python -m keras_livseg.fit --epochs 1\n"
    parser = cli.make_parser("fit", "Train.", doc, verbose_help="say more")
    text = parser.format_help()
    assert text.startswith("usage: python -m keras_livseg.fit [-h] [-v]")
    assert "Examples:\n    python -m keras_livseg.fit --epochs 1" in text and "say more" in text
    assert parser.parse_args(["-v"]).verbose is True


def _fake_tensorflow(tmp_path: Path) -> Path:
    """A stand-in 'tensorflow' that writes TensorFlow's start-up noise and one real line to fd 2."""
    package = tmp_path / "fake" / "tensorflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent("""
        import os
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
        os.write(2, b"I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on.\\n")
        os.write(2, b"I0000 00:00:1.0 1 cudart_stub.cc:31] Could not find cuda drivers on your machine.\\n")
        os.write(2, b"a real problem while loading\\n")
    """))
    return package.parent


@pytest.mark.parametrize("verbose", [False, True])
def test_tensorflow_start_up_noise_is_dropped_unless_verbose(tmp_path, verbose):
    code = f"from keras_livseg import cli; cli.quiet_tensorflow({verbose}); import tensorflow; import os; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    env = {**os.environ, "PYTHONPATH": f"{_fake_tensorflow(tmp_path)}{os.pathsep}{PROJECT_ROOT}"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "a real problem while loading" in done.stderr  # never hidden
    if verbose:
        assert done.stdout.strip() == "0" and "oneDNN" in done.stderr and "cuda drivers" in done.stderr
    else:
        assert done.stdout.strip() in ("2", "3")
        assert not any(word in done.stderr for word in NOISE), done.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_tensorflows_python_info_lines_only_with_verbose(verbose):
    """On two workers TensorFlow logged 51 INFO lines about its collectives in a three-epoch run."""
    code = ("import logging; from keras_livseg import cli; cli.configure_logging(%s); "
            "tf = logging.getLogger('tensorflow'); tf.info('Collective all_reduce tensors: 1 all_reduces'); "
            "tf.warning('a real warning'); logging.getLogger('keras_livseg.fit').info('ours')" % verbose)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    assert "W tensorflow: a real warning" in done.stderr and "I keras_livseg.fit: ours" in done.stderr
    assert ("Collective all_reduce" in done.stderr) is verbose


def test_a_level_the_user_set_is_kept(tmp_path):
    code = "from keras_livseg import cli; cli.quiet_tensorflow(False); import os; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    env = {**os.environ, "PYTHONPATH": f"{_fake_tensorflow(tmp_path)}{os.pathsep}{PROJECT_ROOT}", "TF_CPP_MIN_LOG_LEVEL": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == "1", done.stderr


_ONEDNN_ON = ("import tensorflow; from tensorflow.python.util import _pywrap_util_port as port; "
              "print(port.IsMklEnabled())")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN's CPU kernels are x86")
@pytest.mark.parametrize("first, user_value, expected", [
    ("import keras_livseg", None, "True"),  # a notebook: the package, then TensorFlow
    ("import keras_livseg", "0", "False"),  # the user's choice is kept
    ("import sys; sys.path.insert(0, 'benchmarks'); import _common", None, "True"),  # every benchmark script
])
def test_the_package_turns_on_tensorflows_onednn_kernels_on_any_x86_cpu(first, user_value, expected):
    """TensorFlow turns them on by itself only on AVX-512 VNNI/BF16 or AMX CPUs (a 256-px step on AVX2: 2.7 s with them, 3.4 s without)."""
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if user_value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = user_value
    done = subprocess.run([sys.executable, "-c", f"{first}; {_ONEDNN_ON}"], capture_output=True, text=True,
                          env=env, cwd=PROJECT_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected


def _tiny_checkpoint(folder: Path) -> Path:
    """A 32-pixel U-Net saved as a run's best checkpoint, with the run's preprocessing.json."""
    from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
    from keras_livseg.models import build_model

    model = folder / "run" / "checkpoints" / "best.keras"
    model.parent.mkdir(parents=True)
    build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(model)
    write_preprocessing_json(folder / "run" / "preprocessing.json", Preprocessing(image_size=(32, 32)))
    return model


@pytest.mark.slow
def test_a_real_command_prints_no_tensorflow_start_up_lines(tmp_path):
    """The real TensorFlow, through a command that loads and exports a model."""
    model = _tiny_checkpoint(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "keras_livseg.export", "--model", str(model), "--out", str(tmp_path / "saved")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "saved" / "1" / "saved_model.pb").is_file()
    assert not any(word in done.stderr for word in NOISE), done.stderr


@pytest.mark.slow
def test_predict_prints_no_tensorflow_start_up_lines(tmp_path):
    """predict loads TensorFlow late, after reading the inputs' headers, and still quietly.

    (-v showing them is quiet_tensorflow's, tested above with a stand-in TensorFlow.)
    """
    import nibabel as nib
    import numpy as np

    model = _tiny_checkpoint(tmp_path)
    volume = tmp_path / "volume-1.nii.gz"
    nib.save(nib.Nifti1Image(np.full((24, 24, 4), 60, np.int16), np.diag([1.5, 1.5, 5.0, 1.0])), str(volume))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "keras_livseg.predict", "--model", str(model), str(volume),
                           "--out", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "segmentation-1.nii.gz").is_file()
    assert not any(word in done.stderr for word in NOISE), done.stderr
