"""Export: raw-HU SavedModel for TF Serving (keras_livseg.serving and python -m keras_livseg.export)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_livseg
from keras_livseg import export as export_cli
from keras_livseg.data.preprocessing import (
    Preprocessing,
    context_stack,
    read_preprocessing_json,
    resize_bilinear,
    write_preprocessing_json,
)
from keras_livseg.models import build_model
from keras_livseg.serving import export_saved_model, make_serving_function, next_version

BIN = Path(sys.executable).parent
PREP = Preprocessing(image_size=(32, 32), mean=60.0, std=40.0)
# A size other than the training size, and not a multiple of it.
ROWS, COLS = 300, 280


def tiny_model(channels: int = 1, seed: int = 0, name: str = "unet") -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_model(name, input_shape=(32, 32, channels), filters=4, depth=2)


def raw_hu_slices(batch: int, rows: int = ROWS, cols: int = COLS, seed: int = 0) -> np.ndarray:
    """``[batch, rows, cols]`` float32 HU: air, a soft-tissue body, a brighter 'liver', noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    body = ((yy - rows / 2) / (0.45 * rows)) ** 2 + ((xx - cols / 2) / (0.45 * cols)) ** 2 < 1
    liver = ((yy - rows * 0.45) / (0.2 * rows)) ** 2 + ((xx - cols * 0.35) / (0.18 * cols)) ** 2 < 1
    base = np.where(body, 40.0, -1000.0) + np.where(liver, 60.0, 0.0)
    return (base[None] + rng.normal(0.0, 30.0, (batch, rows, cols))).astype(np.float32)


def keras_reference(model: keras.Model, prep: Preprocessing, hu: np.ndarray) -> np.ndarray:
    """What the export must compute, by the NumPy path: ``[B, rows, cols, 3]`` probabilities.

    ``hu`` is ``[B, rows, cols]`` (a stack of consecutive slices) for context 1.
    """
    volume = np.transpose(hu, (1, 2, 0))  # canonical [rows, cols, slices]
    probabilities = model.predict(prep.model_input(volume, range(hu.shape[0])), verbose=0)
    resized = np.stack([resize_bilinear(p, hu.shape[1:3]) for p in probabilities])
    return resized / resized.sum(axis=-1, keepdims=True)


def assert_same_prediction(reference: np.ndarray, probabilities: np.ndarray, mask: np.ndarray) -> None:
    assert probabilities.dtype == np.float32 and mask.dtype == np.uint8
    assert probabilities.shape == reference.shape and mask.shape == reference.shape[:-1]
    np.testing.assert_allclose(probabilities, reference, atol=1e-4)
    agreement = float(np.mean(mask == reference.argmax(axis=-1)))
    assert agreement >= 0.999, f"masks agree on only {agreement:.5f} of the pixels"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny model exported once: ``(model, version folder, run folder)``."""
    root = tmp_path_factory.mktemp("export")
    model = tiny_model()
    # A run folder as fit leaves it, for the CLI tests.
    run = root / "runs" / "demo"
    (run / "checkpoints").mkdir(parents=True)
    model.save(run / "checkpoints" / "best.keras")
    write_preprocessing_json(run / "preprocessing.json", PREP, model="unet")
    version_dir = export_saved_model(model, root / "saved_models" / "livseg", PREP)
    return model, version_dir, run


# -- the signature ----------------------------------------------------------------------------


@pytest.mark.slow
def test_saved_model_in_fresh_process_matches_keras_at_another_size(exported, tmp_path):
    model, version_dir, _ = exported
    assert version_dir.name == "1"
    hu = raw_hu_slices(batch=3)
    np.save(tmp_path / "hu.npy", hu)
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "served = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "out = served(ct_slices=tf.constant(np.load(sys.argv[2])))\n"
        "np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(version_dir), str(tmp_path / "hu.npy"), str(tmp_path / "out.npz")],
        check=True, capture_output=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    served = np.load(tmp_path / "out.npz")
    assert sorted(served.files) == ["mask", "probabilities"]
    assert_same_prediction(keras_reference(model, PREP, hu), served["probabilities"], served["mask"])
    np.testing.assert_allclose(served["probabilities"].sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_saved_model_cli_lists_named_input_and_outputs(exported):
    _, version_dir, _ = exported
    result = subprocess.run(
        [str(BIN / "saved_model_cli"), "show", "--dir", str(version_dir), "--tag_set", "serve",
         "--signature_def", "serving_default"],
        check=True, capture_output=True, text=True, timeout=120,
    )
    text = result.stdout
    blocks = {}
    # "inputs['ct_slices'] tensor_info:\n dtype: DT_FLOAT\n shape: (-1, -1, -1)" and so on.
    for kind, name in (("inputs", "ct_slices"), ("outputs", "probabilities"), ("outputs", "mask")):
        head = f"{kind}['{name}'] tensor_info:"
        assert head in text, text
        blocks[name] = text.split(head, 1)[1].split("name:", 1)[0]
    assert "DT_FLOAT" in blocks["ct_slices"] and "(-1, -1, -1)" in blocks["ct_slices"]
    assert "DT_FLOAT" in blocks["probabilities"] and "(-1, -1, -1, 3)" in blocks["probabilities"]
    assert "DT_UINT8" in blocks["mask"] and "(-1, -1, -1)" in blocks["mask"]
    assert "tensorflow/serving/predict" in text


def test_export_records_preprocessing_in_assets_extra(exported):
    _, version_dir, _ = exported
    prep, metadata = read_preprocessing_json(version_dir / "assets.extra" / "preprocessing.json")
    assert prep == PREP
    assert metadata["classes"] == ["background", "liver", "tumor"]
    assert metadata["input_name"] == "ct_slices"
    assert metadata["output_names"] == ["probabilities", "mask"]
    assert metadata["model_name"] == "unet" and metadata["keras_livseg_version"] == keras_livseg.__version__
    assert metadata["keras_version"] == keras.__version__ and metadata["tensorflow_version"] == tf.__version__
    assert (version_dir / "saved_model.pb").is_file()


@pytest.mark.slow
def test_context_3_takes_stacks_of_adjacent_slices(tmp_path):
    prep = Preprocessing(image_size=(32, 32), context=3, mean=60.0, std=40.0)
    model = tiny_model(channels=3, name="tam_unet")
    version_dir = export_saved_model(model, tmp_path / "livseg3", prep)
    served = tf.saved_model.load(str(version_dir))
    signature = served.signatures["serving_default"]
    assert signature.structured_input_signature[1]["ct_slices"].shape.rank is None  # stacks or plain slices

    volume = np.transpose(raw_hu_slices(batch=4, rows=70, cols=90, seed=1), (1, 2, 0))
    request = np.stack([context_stack(volume, i, 3) for i in range(4)])  # [4, 70, 90, 3]
    out = signature(ct_slices=tf.constant(request))
    probabilities = model.predict(prep.model_input(volume, range(4)), verbose=0)
    reference = np.stack([resize_bilinear(p, (70, 90)) for p in probabilities])
    assert_same_prediction(reference / reference.sum(-1, keepdims=True), out["probabilities"].numpy(),
                           out["mask"].numpy())
    # The "serve" endpoint is the same function.
    np.testing.assert_array_equal(served.serve(tf.constant(request))["mask"].numpy(), out["mask"].numpy())
    # Plain consecutive slices: the graph stacks the neighbours itself, edges repeated, exactly
    # as context_stack does over these four slices.
    plain = signature(ct_slices=tf.constant(np.transpose(volume, (2, 0, 1))))
    np.testing.assert_array_equal(plain["mask"].numpy(), out["mask"].numpy())
    np.testing.assert_allclose(plain["probabilities"].numpy(), out["probabilities"].numpy(), atol=1e-6)
    # One slice alone is its own neighbour in every channel.
    single = signature(ct_slices=tf.constant(np.transpose(volume, (2, 0, 1))[1:2]))
    stacked = signature(ct_slices=tf.constant(np.repeat(volume[None, :, :, 1:2], 3, axis=-1)))
    np.testing.assert_array_equal(single["mask"].numpy(), stacked["mask"].numpy())
    # Stacks of another depth, or another rank: refused with the shapes it takes.
    for bad in (request[..., :2], request[0, :, :, 0]):
        with pytest.raises(tf.errors.InvalidArgumentError, match="ct_slices"):
            signature(ct_slices=tf.constant(bad))


@pytest.mark.slow
def test_the_readmes_request_works_on_an_export_like_the_demos(tmp_path):
    """The README's exact TF Serving request body, against a 2.5D model that resamples to 3 mm."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = json.loads(re.search(r"-d '(\{\"inputs\".*?)'\n", readme).group(1))
    prep = Preprocessing(image_size=(32, 32), context=3, spacing_mm=3.0, mean=60.0, std=40.0)
    version_dir = export_saved_model(tiny_model(channels=3, name="tam_unet"), tmp_path / "livseg", prep)
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    assert set(body["inputs"]) == set(signature.structured_input_signature[1])  # every input the server wants
    out = signature(**{name: tf.constant(value, tf.float32) for name, value in body["inputs"].items()})
    rows, cols = np.shape(body["inputs"]["ct_slices"])[1:]
    assert out["mask"].shape == (1, rows, cols) and out["probabilities"].shape == (1, rows, cols, 3)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, rtol=1e-5)


def test_volume_normalization_is_refused_with_the_alternative(tmp_path):
    prep = Preprocessing(image_size=(32, 32), normalization="volume")
    with pytest.raises(ValueError, match="normalization='volume'.*foreground.*keras_livseg.predict"):
        export_saved_model(tiny_model(), tmp_path / "livseg", prep)
    assert not (tmp_path / "livseg").exists()


def spacing_reference(model: keras.Model, prep: Preprocessing, hu: np.ndarray, spacing) -> np.ndarray:
    """The NumPy path of a spacing-resampling model: model grid, network, back to the slices."""
    volume = np.transpose(hu, (1, 2, 0))
    probabilities = model.predict(prep.model_input(volume, range(hu.shape[0]), spacing), verbose=0)
    restored = prep.model_grid_to_slices(probabilities, hu.shape[1:3], spacing)
    resized = np.stack([resize_bilinear(p, hu.shape[1:3]) for p in restored])
    return resized / resized.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("spacing", [(0.7, 0.7), (3.0, 2.5)])
def test_spacing_model_takes_the_pixel_spacing_and_matches_numpy(tmp_path, spacing):
    # 32 px at 4 mm: a 128 mm field; 300x280 px at 0.7 mm (210x196 mm) is cropped, at 3 mm padded.
    prep = Preprocessing(image_size=(32, 32), mean=60.0, std=40.0, spacing_mm=4.0)
    model = tiny_model()
    hu = raw_hu_slices(batch=2)
    version_dir = export_saved_model(model, tmp_path / "livseg", prep)
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    assert sorted(signature.structured_input_signature[1]) == ["ct_slices", "pixel_spacing_mm"]
    out = signature(ct_slices=tf.constant(hu), pixel_spacing_mm=tf.constant(spacing, tf.float32))
    assert out["probabilities"].shape == (2, ROWS, COLS, 3)
    assert_same_prediction(spacing_reference(model, prep, hu, spacing), out["probabilities"].numpy(), out["mask"].numpy())
    if spacing[0] < 1.0:
        # Cropped away: the corners of a 210 mm slice lie outside the 128 mm field, so background.
        np.testing.assert_allclose(out["probabilities"].numpy()[:, 0, 0], [[1.0, 0.0, 0.0]] * 2, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_model_exports_float32_outputs(tmp_path, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = tiny_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.save(tmp_path / "mixed.keras")
    version_dir = export_saved_model(tmp_path / "mixed.keras", tmp_path / "livseg", PREP)
    out = tf.saved_model.load(str(version_dir)).signatures["serving_default"](
        ct_slices=tf.constant(raw_hu_slices(batch=2, rows=40, cols=36))
    )
    assert out["probabilities"].dtype == tf.float32 and out["mask"].dtype == tf.uint8
    assert out["probabilities"].shape == (2, 40, 36, 3)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)


def test_model_that_disagrees_with_preprocessing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="context 3"):
        export_saved_model(tiny_model(), tmp_path / "livseg", Preprocessing(image_size=(32, 32), context=3))
    with pytest.raises(ValueError, match=r"resizes to \(64, 64\)"):
        export_saved_model(tiny_model(), tmp_path / "livseg", Preprocessing(image_size=(64, 64)))
    assert not (tmp_path / "livseg").exists()
    with pytest.raises(ValueError, match="positive integer"):
        export_saved_model(tiny_model(), tmp_path / "livseg", PREP, version=0)


# -- versions --------------------------------------------------------------------------------


@pytest.mark.slow
def test_versions_count_up_refuse_existing_and_overwrite(tmp_path):
    base = tmp_path / "livseg"
    (base / "notes").mkdir(parents=True)  # non-integer folders are not versions
    assert next_version(base) == 1
    model = tiny_model(seed=0)
    assert export_saved_model(model, base, PREP).name == "1"
    assert export_saved_model(model, base, PREP).name == "2"
    assert export_saved_model(model, base, PREP, version=7).name == "7"
    assert next_version(base) == 8

    weights = base / "1" / "variables" / "variables.data-00000-of-00001"
    before = weights.read_bytes()
    other = tiny_model(seed=1)
    with pytest.raises(ValueError, match=r"1 already exists; pass --overwrite") as error:
        export_saved_model(other, base, PREP, version=1)
    assert "\n" not in str(error.value)
    assert weights.read_bytes() == before
    assert sorted(p.name for p in base.iterdir()) == ["1", "2", "7", "notes"]  # nothing half-written

    assert export_saved_model(other, base, PREP, version=1, overwrite=True).name == "1"
    assert weights.read_bytes() != before
    assert sorted(p.name for p in base.iterdir()) == ["1", "2", "7", "notes"]
    hu = raw_hu_slices(batch=1, rows=33, cols=47)
    out = tf.saved_model.load(str(base / "1")).signatures["serving_default"](ct_slices=tf.constant(hu))
    np.testing.assert_allclose(out["probabilities"].numpy(), keras_reference(other, PREP, hu), atol=1e-4)


def test_an_export_finishing_beside_another_takes_the_next_version_and_replaces_nothing(tmp_path, monkeypatch):
    """Two runs of one recipe export to the same base at once: both chose version 1."""
    from keras_livseg.serving import saved_model

    base = tmp_path / "livseg"
    write_json = saved_model.write_preprocessing_json

    def other_export_finishes_first(path, *args, **kwargs):
        write_json(path, *args, **kwargs)
        if not (base / "1").exists():  # the other export renames its version 1 into place now
            (base / "1").mkdir(parents=True)
            (base / "1" / "saved_model.pb").write_bytes(b"the other run's model")

    monkeypatch.setattr(saved_model, "write_preprocessing_json", other_export_finishes_first)
    assert export_saved_model(tiny_model(), base, PREP).name == "2"
    assert (base / "1" / "saved_model.pb").read_bytes() == b"the other run's model"
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]  # no partial or retired folder left
    # A version asked for by number is refused, not replaced.
    (base / "1").rename(base / "old-1")
    with pytest.raises(ValueError, match=r"1 already exists \(another export just wrote it\); pass --overwrite"):
        export_saved_model(tiny_model(), base, PREP, version=1)
    assert (base / "1" / "saved_model.pb").read_bytes() == b"the other run's model"


# -- the command -----------------------------------------------------------------------------


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("export: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_refuses_a_model_that_is_not_keras(tmp_path, capsys):
    saved_model_dir = tmp_path / "1"
    saved_model_dir.mkdir()
    for model in (saved_model_dir, tmp_path / "best.h5"):
        assert export_cli.main(["--model", str(model), "--out", str(tmp_path / "out")]) == 2
        line = _error_line(capsys)
        assert str(model) in line and ".keras" in line
    assert not (tmp_path / "out").exists()


def test_cli_missing_preprocessing_says_where_it_looked(tmp_path, capsys):
    checkpoint = tmp_path / "run" / "checkpoints" / "best.keras"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not read: the preprocessing is checked first")
    assert export_cli.main(["--model", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert str(tmp_path / "run" / "preprocessing.json") in line and "--preprocessing" in line

    missing = tmp_path / "nowhere.json"
    assert export_cli.main(["--model", str(checkpoint), "--out", str(tmp_path / "out"),
                            "--preprocessing", str(missing)]) == 2
    assert str(missing) in _error_line(capsys)


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "Examples:" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_exports_from_a_run_folder_and_refuses_an_existing_version(exported, tmp_path, capsys):
    _, _, run = exported
    out = tmp_path / "saved_models" / "livseg"
    args = ["--model", str(run / "checkpoints" / "best.keras"), "--out", str(out)]
    assert export_cli.main(args) == 0
    assert (out / "1" / "saved_model.pb").is_file()
    _, metadata = read_preprocessing_json(out / "1" / "assets.extra" / "preprocessing.json")
    assert metadata["model_file"] == str((run / "checkpoints" / "best.keras").resolve())
    capsys.readouterr()

    assert export_cli.main(args + ["--version", "1"]) == 2
    assert "--overwrite" in _error_line(capsys)
    assert export_cli.main(args + ["--version", "1", "--overwrite"]) == 0


# -- TF Serving itself, where it is installed ------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("tensorflow_model_server") is None,
    reason="tensorflow_model_server is not on PATH (TF Serving cannot be installed on these machines)",
)
def test_tensorflow_model_server_answers_a_rest_request(exported, start_server):
    model, version_dir, _ = exported

    def available(port: int) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/livseg", timeout=2) as response:
            return "AVAILABLE" in response.read().decode()

    _, port = start_server(  # stopped by the fixture
        lambda port: ["tensorflow_model_server", f"--rest_api_port={port}", "--port=0", "--model_name=livseg",
                      f"--model_base_path={version_dir.parent.resolve()}"],
        ready=available,
    )
    status_url = f"http://127.0.0.1:{port}/v1/models/livseg"
    hu = raw_hu_slices(batch=2, rows=60, cols=52)
    request = urllib.request.Request(
        f"{status_url}:predict",
        data=json.dumps({"inputs": {"ct_slices": hu.tolist()}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        outputs = json.loads(response.read())["outputs"]
    reference = keras_reference(model, PREP, hu)
    assert_same_prediction(
        reference, np.asarray(outputs["probabilities"], np.float32), np.asarray(outputs["mask"], np.uint8)
    )



def test_the_signature_refuses_bad_requests_with_what_is_wrong(tmp_path):
    from keras_livseg.serving.signature import MAX_SLICE_SIDE

    serve = make_serving_function(tiny_model(), PREP)
    good = raw_hu_slices(batch=1)
    assert serve(tf.constant(good))["mask"].shape == (1, ROWS, COLS)
    nan = good.copy()
    nan[0, 3, 4] = np.nan
    cases = {
        "NaN or Inf": nan,
        "Inf": np.full_like(good, np.inf),
        f"side over {MAX_SLICE_SIDE}": np.zeros((1, 8, MAX_SLICE_SIDE + 1), np.float32),
        "empty": np.zeros((0, ROWS, COLS), np.float32),
    }
    for expected, request in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            serve(tf.constant(request))
        assert expected.split(" or ")[0] in str(error.value), (expected, str(error.value)[:300])


def test_keras_files_load_in_safe_mode_only(tmp_path):
    """A .keras file holding Python code (a Lambda) is refused by every loader, never run."""
    from keras_livseg.models.saving import load_keras_model
    from keras_livseg.training.warm_start import load_matching_weights

    inputs = keras.Input((32, 32, 1), name="ct_slices")
    touched = keras.layers.Lambda(lambda t: t * 2.0, name="code")(inputs)
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, activation="softmax", name="probabilities")(touched))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ValueError, match="Python code that would run on loading.*safe mode"):
        load_keras_model(path)
    with pytest.raises(ValueError, match="warm start source.*safe mode"):
        load_matching_weights(tiny_model(), path)
    write_preprocessing_json(tmp_path / "preprocessing.json", PREP)
    code = export_cli.main(["--model", str(path), "--out", str(tmp_path / "saved")])
    assert code == 2 and not (tmp_path / "saved" / "1").exists()
