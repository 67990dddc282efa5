"""EfficientNetB0-PAN: shapes, unscaled stem input, weight loading, save/load, training."""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest
from models_testing import dtype_policy, random_inputs, save_and_reload

from keras_livseg.models import build_model
from keras_livseg.models.efficientnet_pan import (
    ENCODER_NAME,
    PYRAMID_TAPS,
    build_efficientnet_encoder,
    imagenet_weights_path,
)
from keras_livseg.models.layers import (
    ASPP,
    ConvBNReLU,
    FeaturePyramidAttention,
    GlobalAttentionUpsample,
    SqueezeExcitation,
)
from keras_livseg.models.layers._conv_bn import dilated_conv_same
from keras_livseg.models.layers._fast_kernels import FusedBatchNormalization, SwishActivation

SMALL = {"decoder_filters": 8}


def stem_probe(encoder):
    """encoder input → stem_conv output (rebuilt from config: its layers have one node each)."""
    clean = keras.Model.from_config(encoder.get_config())
    clean.set_weights(encoder.get_weights())
    return keras.Model(clean.input, clean.get_layer("stem_conv").output)


def all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


@pytest.fixture(scope="module")
def reference_encoder():
    """A keras.applications EfficientNetB0 no-top with weights unlike any fresh init."""
    reference = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    for weight in reference.weights:
        values = weight.numpy()
        weight.assign(values + rng.normal(0.0, 0.05, values.shape).astype(values.dtype) * (values.ndim > 0))
    return reference


@pytest.fixture(scope="module")
def weights_file(reference_encoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "effb0_notop.weights.h5"
    reference_encoder.save_weights(path)
    return path


@pytest.mark.parametrize(
    "input_shape, options",
    [((32, 32, 1), SMALL), ((64, 32, 3), SMALL), ((32, 64, 5), {"decoder_filters": 4, "head": "sigmoid"})],
)
def test_output_shapes_and_pyramid(input_shape, options):
    model = build_model("effb0_pan", input_shape=input_shape, **options)
    assert model.inputs[0].name == "ct_slices" and model.output_names == ["probabilities"]
    probs = keras.ops.convert_to_numpy(model(random_inputs([(2,) + input_shape])))
    assert probs.shape == (2,) + input_shape[:2] + (3,)
    assert 0.0 <= probs.min() and probs.max() <= 1.0
    if options.get("head", "softmax") == "softmax":
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    encoder = model.get_layer(ENCODER_NAME)
    h, w = input_shape[:2]
    assert [tuple(t.shape[1:]) for t in encoder.outputs] == [
        (h // 4, w // 4, 24),
        (h // 8, w // 8, 40),
        (h // 16, w // 16, 112),
        (h // 32, w // 32, 320),
    ]
    assert [encoder.get_layer(n).name for n in PYRAMID_TAPS.values()] == list(PYRAMID_TAPS.values())
    kinds = [type(layer) for layer in model.layers]
    assert kinds.count(SqueezeExcitation) == 3 and kinds.count(GlobalAttentionUpsample) == 3
    assert kinds.count(ASPP) == 1 and kinds.count(FeaturePyramidAttention) == 1


def test_parameter_count_is_pinned():
    model = build_model("effb0_pan", input_shape=(32, 32, 1), **SMALL)
    encoder = model.get_layer(ENCODER_NAME)
    # keras.applications' B0 no-top (4,049,571 at 3 channels) minus the head conv/BN after
    # block7a (409,600 + 5,120), the Normalization (7) and 2 of 3 stem-kernel input channels (576).
    assert encoder.count_params() == 4_049_571 - 409_600 - 5_120 - 7 - 576 == 3_634_268
    assert model.count_params() == 3_730_270
    assert encoder.count_params() == sum(
        np.prod(w.shape) for w in keras.applications.EfficientNetB0(
            include_top=False, weights=None, input_shape=(32, 32, 1)
        ).weights
        if not w.path.startswith(("normalization", "top_"))
    )


def test_ct_reaches_the_stem_unscaled():
    model = build_model("effb0_pan", input_shape=(32, 32, 1), **SMALL)
    names = [type(layer).__name__ for layer in all_layers(model)]
    assert "Rescaling" not in names and "Normalization" not in names
    encoder = model.get_layer(ENCODER_NAME)
    layer_configs = encoder.get_config()["layers"]
    assert layer_configs[1]["name"] == "stem_conv_pad"
    fed_by = layer_configs[1]["inbound_nodes"][0]["args"][0]["config"]["keras_history"][0]
    assert layer_configs[0]["class_name"] == "InputLayer" and fed_by == layer_configs[0]["name"]
    stem = stem_probe(encoder)
    x = random_inputs([(1, 32, 32, 1)]) * 3.0  # standardized CT: O(1) values, negative too
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # keras.applications' correct_pad
    expected = keras.ops.conv(padded, encoder.get_layer("stem_conv").kernel, strides=2, padding="valid")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(stem(x)), keras.ops.convert_to_numpy(expected), rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("channels", [3, 1])
def test_weights_from_a_local_file(weights_file, reference_encoder, channels):
    shape = (32, 32, channels)
    keras.utils.set_random_seed(7)
    scratch = build_model("effb0_pan", input_shape=shape, **SMALL)
    keras.utils.set_random_seed(7)
    loaded = build_model("effb0_pan", input_shape=shape, encoder_weights=str(weights_file), **SMALL)
    for layer in scratch.layers:  # same decoder, so only the encoder can make a difference
        if layer.name != ENCODER_NAME:
            loaded.get_layer(layer.name).set_weights(layer.get_weights())
    x = random_inputs([(1,) + shape])
    assert not np.allclose(keras.ops.convert_to_numpy(scratch(x)), keras.ops.convert_to_numpy(loaded(x)))
    encoder = loaded.get_layer(ENCODER_NAME)
    compared = 0
    for layer in encoder.layers[1:]:  # after the InputLayer
        for mine, theirs in zip(layer.weights, reference_encoder.get_layer(layer.name).weights):
            expected = theirs.numpy()
            if layer.name == "stem_conv" and channels == 1:
                expected = expected.sum(axis=2, keepdims=True)  # gray = R = G = B
            np.testing.assert_array_equal(mine.numpy(), expected)
            compared += 1
    assert compared == len(encoder.weights) > 300


def test_one_channel_stem_matches_the_rgb_network_on_a_replicated_slice(weights_file, reference_encoder):
    model = build_model("effb0_pan", input_shape=(32, 32, 1), encoder_weights=weights_file, **SMALL)
    encoder = model.get_layer(ENCODER_NAME)
    gray = random_inputs([(1, 32, 32, 1)])
    stem_gray = stem_probe(encoder)(gray)
    rgb_kernel = reference_encoder.get_layer("stem_conv").kernel
    padded = np.pad(np.repeat(gray, 3, axis=-1), ((0, 0), (0, 1), (0, 1), (0, 0)))
    stem_rgb = keras.ops.conv(padded, rgb_kernel, strides=2, padding="valid")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(stem_gray), keras.ops.convert_to_numpy(stem_rgb), rtol=1e-4, atol=1e-4
    )


def test_imagenet_weights_read_from_the_keras_cache(tmp_path, monkeypatch, reference_encoder):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    expected_path = tmp_path / "models" / "efficientnetb0_notop.h5"
    assert imagenet_weights_path() == expected_path
    with pytest.raises(FileNotFoundError) as missing:
        build_model("effb0_pan", input_shape=(32, 32, 3), encoder_weights="imagenet", **SMALL)
    assert "'efficientnetb0_notop.h5'" in str(missing.value)
    assert f"'{tmp_path / 'models'}'" in str(missing.value)
    # The official file is in the legacy HDF5 layout: write one the same way.
    from keras.src.legacy.saving import legacy_h5_format

    expected_path.parent.mkdir()
    with h5py.File(expected_path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, reference_encoder)
    model = build_model("effb0_pan", input_shape=(32, 32, 3), encoder_weights="imagenet", **SMALL)
    np.testing.assert_array_equal(
        model.get_layer(ENCODER_NAME).get_layer("block5c_project_conv").kernel.numpy(),
        reference_encoder.get_layer("block5c_project_conv").kernel.numpy(),
    )


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"encoder_weights": "/nonexistent/b0.h5"}, FileNotFoundError, "'/nonexistent/b0.h5'"),
        ({"encoder_weights": 3}, ValueError, "encoder_weights=3"),
        ({"se_ratio": 32}, ValueError, "ratio=32 channels=24"),
        ({"se_ratio": 0}, ValueError, "se_ratio=0"),
        ({"decoder_filters": 0}, ValueError, "decoder_filters=0"),
        ({"aspp_rates": (6, 0)}, ValueError, "rates=0"),
        ({"input_shape": (100, 96, 1)}, ValueError, "height 100 .* multiple of 32.* nearest valid height is 96"),
        ({"input_shape": (64, 80, 1)}, ValueError, "width 80 .* nearest valid width is 96"),
        ({"input_shape": (16, 16, 1)}, ValueError, "height 16 .* nearest valid height is 32"),
    ],
)
def test_bad_arguments(options, error, match):
    options = {"input_shape": (32, 32, 1), **SMALL, **options}
    with pytest.raises(error, match=match):
        build_model("effb0_pan", **options)


def test_weights_need_one_or_three_channels(weights_file):
    with pytest.raises(ValueError, match="2 channels"):
        build_model("effb0_pan", input_shape=(32, 32, 2), encoder_weights=weights_file, **SMALL)


def test_frozen_encoder():
    model = build_model("effb0_pan", input_shape=(32, 32, 1), encoder_trainable=False, **SMALL)
    encoder = model.get_layer(ENCODER_NAME)
    assert not encoder.trainable_weights
    trainable = sum(np.prod(w.shape) for w in model.trainable_weights)
    assert 0 < trainable < model.count_params() - encoder.count_params()


def test_mixed_bfloat16_computes_in_bfloat16_and_outputs_float32():
    with dtype_policy("mixed_bfloat16"):
        model = build_model("effb0_pan", input_shape=(32, 32, 1), **SMALL)
        assert model.get_layer(ENCODER_NAME).get_layer("stem_conv").compute_dtype == "bfloat16"
        assert model.get_layer("gau_p2").compute_dtype == "bfloat16"
        assert model.output.dtype == "float32"
        probs = model(random_inputs([(1, 32, 32, 1)]))
        assert keras.backend.standardize_dtype(probs.dtype) == "float32"
        np.testing.assert_allclose(keras.ops.convert_to_numpy(probs).sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_keras_save_and_load_gives_identical_outputs(tmp_path):
    model = build_model("effb0_pan", input_shape=(32, 32, 3), **SMALL)
    original, reloaded, clone = save_and_reload(model, tmp_path / "pan.keras", random_inputs([(2, 32, 32, 3)]))
    np.testing.assert_array_equal(original, reloaded)
    assert clone.count_params() == model.count_params()
    assert fast_layer_kinds(clone) == fast_layer_kinds(model)  # the fast kernels survive a reload


# ---------------------------------------------------------------- fast TF kernels (docs/perf-effb0_pan.md)


def flat_layers(model):
    return model._flatten_layers(include_self=False, recursive=True)


def fast_layer_kinds(model):
    kinds = [type(layer) for layer in flat_layers(model)]
    return {
        "fused_bn": kinds.count(FusedBatchNormalization),
        "plain_bn": kinds.count(keras.layers.BatchNormalization),
        "swish": kinds.count(SwishActivation),
        "plain_activation": kinds.count(keras.layers.Activation),
    }


def use_plain_keras_layers(model, monkeypatch):
    """Undo the speed-ups: plain Keras BN/Activation and dilated Conv2D, as before them."""
    for layer in flat_layers(model):
        if type(layer) is FusedBatchNormalization:
            layer.__class__ = keras.layers.BatchNormalization
        elif type(layer) is SwishActivation:
            layer.__class__ = keras.layers.Activation
    monkeypatch.setattr(ConvBNReLU, "dilated_as_taps", False)


def test_every_batchnorm_and_swish_uses_the_fast_kernels():
    model = build_model("effb0_pan", input_shape=(32, 32, 1), **SMALL)
    # 48 BN in the encoder (B0 no-top without top_bn) + ASPP's 5 ConvBNReLU + FPA mid + 3 GAU
    # details (no GAU needs a projection, the FPA pyramid has no BN); 32 swish activations.
    assert fast_layer_kinds(model) == {"fused_bn": 48 + 5 + 1 + 3, "plain_bn": 0, "swish": 32,
                                       "plain_activation": 0}
    assert model.count_params() == 3_730_270  # unchanged (test_parameter_count_is_pinned)


@pytest.mark.parametrize(
    "size, kernel_size, rate",
    [((8, 8), 3, 6), ((8, 8), 3, 12), ((8, 8), 3, 18), ((4, 4), 3, 2), ((7, 5), 3, 4), ((5, 9), 5, 2),
     ((6, 6), 2, 3), ((3, 3), 2, 18), ((16, 16), 3, 1)],
)
def test_dilated_conv_same_equals_the_dilated_convolution(size, kernel_size, rate):
    import tensorflow as tf

    x = tf.constant(random_inputs([(2,) + size + (5,)]))
    kernel = tf.constant(np.random.default_rng(1).normal(size=(kernel_size, kernel_size, 5, 4)).astype("float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, kernel])
        expected = keras.ops.conv(x, kernel, padding="same", dilation_rate=rate)
        got = dilated_conv_same(x, kernel, rate)
        weights = tf.reshape(tf.range(tf.size(got), dtype="float32") % 5.0, tf.shape(got))
        loss_expected, loss_got = tf.reduce_sum(expected * weights), tf.reduce_sum(got * weights)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    for mine, reference in zip(tape.gradient(loss_got, [x, kernel]), tape.gradient(loss_expected, [x, kernel])):
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_fast_kernels_are_a_pure_reexpression(monkeypatch):
    """Same weights: the same outputs, gradients and BN statistics as the plain Keras layers."""
    import tensorflow as tf

    # 128x128 puts a 4x4 map under ASPP: rates 2 and 3 keep all taps (shifted copies),
    # rate 6 only the centre one (a 1x1 convolution).
    keras.utils.set_random_seed(11)  # the same weights whichever tests ran before
    model = build_model("effb0_pan", input_shape=(128, 128, 1), aspp_rates=(2, 3, 6), aspp_dropout=0.0, **SMALL)
    for layer in flat_layers(model):  # stochastic depth would draw other masks in each run
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    x = tf.constant(random_inputs([(2, 128, 128, 1)]) * 2.0)
    cotangent = tf.constant(np.random.default_rng(3).normal(size=(2, 128, 128, 3)).astype("float32"))
    initial = model.get_weights()

    def run():
        model.set_weights(initial)
        inference = model(x, training=False).numpy()
        with tf.GradientTape() as tape:
            training = model(x, training=True)
            loss = tf.reduce_sum(training * cotangent)
        gradients = [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]
        return inference, training.numpy(), gradients, model.get_weights()  # get_weights: updated BN statistics

    fast = run()
    use_plain_keras_layers(model, monkeypatch)
    assert fast_layer_kinds(model)["fused_bn"] == fast_layer_kinds(model)["swish"] == 0
    plain = run()
    np.testing.assert_allclose(fast[0], plain[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fast[1], plain[1], rtol=1e-4, atol=1e-6)
    # Some gradients are zero up to rounding (the beta of a BN that feeds, through linear
    # layers only, another training-mode BN): compare against the largest gradient.
    largest = max(np.abs(g).max() for g in plain[2])
    for mine, reference in zip(fast[2], plain[2]):
        np.testing.assert_allclose(mine, reference, rtol=2e-3, atol=1e-5 * largest)
    for mine, reference in zip(fast[3], plain[3]):
        np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_checkpoint_with_plain_keras_layers_loads_and_agrees(tmp_path, monkeypatch):
    """A .keras saved before the fast kernels existed (plain BN and Activation) still loads."""
    model = build_model("effb0_pan", input_shape=(32, 32, 1), **SMALL)
    x = random_inputs([(2, 32, 32, 1)])
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    use_plain_keras_layers(model, monkeypatch)
    model.save(tmp_path / "plain.keras")
    reloaded = keras.models.load_model(tmp_path / "plain.keras")
    assert fast_layer_kinds(reloaded)["plain_bn"] == 48  # the encoder's, as saved
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(x, training=False)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_one_training_step_at_batch_size_one():
    # Batch size 1 in training: no BatchNorm sits after a global pooling.
    model = build_model("effb0_pan", input_shape=(32, 32, 1), **SMALL)
    # Eager: tracing the EfficientNet gradient graph costs ~30 s on 2 cores, one step ~2 s.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", run_eagerly=True)
    x = random_inputs([(1, 32, 32, 1)])
    y = keras.utils.to_categorical(np.random.default_rng(0).integers(0, 3, (1, 32, 32)), 3)
    before = model.get_layer("gau_p2").attention.kernel.numpy().copy()
    stem_before = model.get_layer(ENCODER_NAME).get_layer("stem_conv").kernel.numpy().copy()
    loss = model.fit(x, y, batch_size=1, epochs=1, verbose=0).history["loss"][0]
    assert 0.5 < loss < 3.0  # categorical cross entropy near ln 3 at initialization
    assert not np.allclose(before, model.get_layer("gau_p2").attention.kernel.numpy())
    assert not np.allclose(stem_before, model.get_layer(ENCODER_NAME).get_layer("stem_conv").kernel.numpy())
    probs = keras.ops.convert_to_numpy(model(x, training=False))
    assert probs.shape == (1, 32, 32, 3) and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)


def test_encoder_builder_alone():
    encoder = build_efficientnet_encoder((64, 64, 3))
    assert encoder.name == ENCODER_NAME and len(encoder.outputs) == 4
