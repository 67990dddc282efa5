"""Tests for keras_livseg.training.warm_start: matching by layer key and shape, and its errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_livseg.models import build_model
from keras_livseg.training.warm_start import (
    WarmStartReport,
    copy_matching_weights,
    load_matching_weights,
    weighted_layers,
)

TINY = dict(filters=4, depth=2)
UNET_LAYERS = [
    "encoder1_1_conv", "encoder1_2_conv", "encoder2_1_conv", "encoder2_2_conv",
    "bottleneck_1_conv", "bottleneck_2_conv",
    "decoder2_up_conv", "decoder2_1_conv", "decoder2_2_conv",
    "decoder1_up_conv", "decoder1_1_conv", "decoder1_2_conv",
    "logits",
]
TAM_LAYERS = ["encoder1_tam", "encoder2_tam", "bottleneck_tam", "decoder2_tam", "decoder1_tam"]


def randomize(model: keras.Model, seed: int = 0) -> None:
    """Give every weight (BN statistics included) values no fresh init would have."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))


def weights_of(model: keras.Model) -> dict[str, list[np.ndarray]]:
    layers = weighted_layers(model)
    return {key: [np.array(w) for w in layer.get_weights()] for key, layer in layers.items()}


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def save(tmp_path):
    def _save(model: keras.Model, name: str = "best.keras"):
        path = tmp_path / "runs" / "demo" / "checkpoints" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        return path

    return _save


def test_channel_change_skips_only_the_first_conv(save):
    source = build_model("unet", input_shape=(32, 32, 1), **TINY)
    randomize(source)
    target = build_model("unet", input_shape=(32, 32, 3), **TINY)
    fresh = weights_of(target)

    report = load_matching_weights(target, save(source))

    assert report.loaded == UNET_LAYERS[1:]
    assert [s.name for s in report.skipped] == ["encoder1_1_conv"]
    skipped = report.skipped[0]
    assert skipped.target_shapes == ((3, 3, 3, 4), (4,))
    assert skipped.source_shapes == ((3, 3, 1, 4), (4,))
    assert report.new == [] and report.unused == []
    loaded, source_weights = weights_of(target), weights_of(source)
    for key in report.loaded:
        assert_same(loaded[key], source_weights[key])
    assert_same(loaded["encoder1_1_conv"], fresh["encoder1_1_conv"])  # fresh init kept
    first_conv = 3 * 3 * 3 * 4 + 4
    assert report.params_total == target.count_params()
    assert report.params_loaded == target.count_params() - first_conv
    assert "encoder1_1_conv: shapes differ, target [(3, 3, 3, 4), (4,)] vs source " \
           "[(3, 3, 1, 4), (4,)]" in report.summary()


def test_num_classes_change_skips_only_the_head(save):
    source = build_model("unet", input_shape=(32, 32, 1), num_classes=3, **TINY)
    target = build_model("unet", input_shape=(64, 64, 1), num_classes=2, **TINY)  # size is free

    report = load_matching_weights(target, save(source))

    assert report.loaded == UNET_LAYERS[:-1]
    assert [(s.name, s.target_shapes, s.source_shapes) for s in report.skipped] == [
        ("logits", ((1, 1, 4, 2), (2,)), ((1, 1, 4, 3), (3,)))
    ]
    assert report.new == []


def test_tam_unet_from_unet_reports_attention_as_new(save):
    source = build_model("unet", input_shape=(32, 32, 1), **TINY)
    randomize(source)
    target = build_model("tam_unet", input_shape=(32, 32, 1), **TINY)
    fresh = weights_of(target)

    report = load_matching_weights(target, save(source))

    assert report.loaded == UNET_LAYERS
    assert report.skipped == []
    assert sorted(report.new) == sorted(TAM_LAYERS)
    tam_params = sum(target.get_layer(name).count_params() for name in TAM_LAYERS)
    assert report.params_loaded == source.count_params()
    assert report.params_total - report.params_loaded == tam_params
    loaded = weights_of(target)
    for name in TAM_LAYERS:
        assert_same(loaded[name], fresh[name])
    assert "new: encoder1_tam" in report.summary()


def test_identical_architecture_reproduces_predictions(save):
    source = build_model("unet", input_shape=(32, 32, 1), batchnorm=True, **TINY)
    randomize(source)  # non-zero BN moving statistics must travel too
    target = build_model("unet", input_shape=(32, 32, 1), batchnorm=True, **TINY)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 1)).astype("float32")
    expected = source.predict(images, verbose=0)
    assert not np.allclose(target.predict(images, verbose=0), expected)

    report = load_matching_weights(target, save(source))

    assert report.fraction_loaded == 1.0 and report.skipped == [] and report.new == []
    np.testing.assert_allclose(target.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-6)


def test_report_summary_is_one_block_for_logging():
    report = WarmStartReport("best.keras", "unet", loaded=["a"], new=["b"], params_loaded=3,
                             params_total=4)
    assert report.summary().splitlines()[0] == (
        "warm start from best.keras (model 'unet'): loaded 1 layers, 3 of 4 parameters (75.0%); "
        "skipped 0, new 1"
    )


def _plain_net(channels: int, nested: bool) -> keras.Model:
    """Unnamed Conv2D layers (auto-named conv2d_N), optionally inside a nested model."""
    inputs = keras.Input((8, 8, channels))
    if nested:
        inner_in = keras.Input((8, 8, channels))
        inner = keras.Model(inner_in, keras.layers.Conv2D(2, 3, padding="same")(inner_in),
                            name="backbone")
        x = inner(inputs)
    else:
        x = keras.layers.Conv2D(2, 3, padding="same")(inputs)
    x = keras.layers.Conv2D(3, 1)(x)
    return keras.Model(inputs, keras.layers.Conv2D(1, 1)(x))


def test_auto_named_layers_match_by_order():
    source = _plain_net(1, nested=False)
    target = _plain_net(1, nested=False)
    source_names = [layer.name for layer in source.layers[1:]]
    target_names = [layer.name for layer in target.layers[1:]]
    assert not set(source_names) & set(target_names)  # counters moved on between builds
    randomize(source)

    report = copy_matching_weights(target, source)

    assert report.loaded == ["conv2d#0", "conv2d#1", "conv2d#2"]
    for s, t in zip(source.layers[1:], target.layers[1:]):
        assert_same(t.get_weights(), s.get_weights())


def test_nested_models_are_walked_by_name(save):
    source = _plain_net(1, nested=True)
    randomize(source)
    target = _plain_net(3, nested=True)

    report = load_matching_weights(target, save(source))

    assert [s.name for s in report.skipped] == ["backbone/conv2d#0"]
    assert report.loaded == ["conv2d#0", "conv2d#1"]


@pytest.mark.slow
def test_effb0_pan_loads_the_nested_encoder(save):
    source = build_model("effb0_pan", input_shape=(32, 32, 1), num_classes=3, decoder_filters=8)
    target = build_model("effb0_pan", input_shape=(32, 32, 1), num_classes=2, decoder_filters=8)

    report = load_matching_weights(target, save(source))

    assert [s.name for s in report.skipped] == ["logits"]
    assert report.new == []
    assert "efficientnetb0_encoder/stem_conv" in report.loaded
    encoder_layers = [key for key in report.loaded if key.startswith("efficientnetb0_encoder/")]
    assert len(encoder_layers) == len(weighted_layers(target.get_layer("efficientnetb0_encoder")))
    assert_same(
        target.get_layer("efficientnetb0_encoder").get_layer("block7a_project_conv").get_weights(),
        source.get_layer("efficientnetb0_encoder").get_layer("block7a_project_conv").get_weights(),
    )


# Errors: each one line, naming the path and the fix.


def test_missing_file(tmp_path):
    missing = tmp_path / "runs" / "x" / "checkpoints" / "best.keras"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_matching_weights(build_model("unet", input_shape=(32, 32, 1), **TINY), missing)
    assert str(missing) in str(info.value) and "runs/<name>/checkpoints/" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kind", ["text.keras", "notes.txt", "weights.h5", "model.weights.h5", "saved_model"]
)
def test_not_a_keras_checkpoint(tmp_path, kind):
    path = tmp_path / kind
    if kind == "saved_model":
        path.mkdir()
        (path / "saved_model.pb").write_bytes(b"\x08\x01")
    else:
        path.write_text("not a model\n")
    with pytest.raises(ValueError, match="not a Keras checkpoint") as info:
        load_matching_weights(build_model("unet", input_shape=(32, 32, 1), **TINY), path)
    message = str(info.value)
    assert str(path) in message and ".keras file from runs/<name>/checkpoints/" in message
    assert "\n" not in message


def test_nothing_matched_names_the_source(save):
    inputs = keras.Input((32, 32, 1))
    other = keras.Model(
        inputs, keras.layers.Dense(2, name="classifier_dense")(inputs), name="some_classifier"
    )
    path = save(other, "other.keras")
    with pytest.raises(ValueError, match="nothing matched") as info:
        load_matching_weights(build_model("unet", input_shape=(32, 32, 1), **TINY), path)
    message = str(info.value)
    assert "'some_classifier'" in message and "classifier_dense" in message and str(path) in message
    assert "\n" not in message


def test_same_names_but_no_same_shapes_is_nothing_matched(save):
    path = save(build_model("unet", input_shape=(32, 32, 1), filters=8, depth=2))
    with pytest.raises(ValueError, match="nothing matched.*share names") as info:
        load_matching_weights(build_model("unet", input_shape=(32, 32, 1), **TINY), path)
    assert "\n" not in str(info.value)
