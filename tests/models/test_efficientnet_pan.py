"""EfficientNetB0-PAN: shapes, unscaled stem input, weight loading, save/load, training."""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from models_testing import compile_as_fit, dtype_policy, random_inputs, save_and_reload

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
    # Offline: Keras's downloader fails; one error says which file to place where.
    asked = []

    def offline(fname, origin, **kwargs):
        asked.append((fname, origin, kwargs))
        raise OSError("no network")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(FileNotFoundError) as missing:
        build_model("effb0_pan", input_shape=(32, 32, 3), encoder_weights="imagenet", **SMALL)
    assert "'efficientnetb0_notop.h5'" in str(missing.value)
    assert f"'{tmp_path / 'models'}'" in str(missing.value) and "could not be downloaded" in str(missing.value)
    # The download goes through Keras's cache, into exactly that folder, with the hash checked.
    fname, origin, kwargs = asked[0]
    assert (fname, kwargs["cache_dir"], kwargs["cache_subdir"]) == ("efficientnetb0_notop.h5", str(tmp_path), "models")
    assert origin.endswith("efficientnetb0_notop.h5") and kwargs["file_hash"]
    # The official file is in the legacy HDF5 layout: write one the same way.
    from keras.src.legacy.saving import legacy_h5_format

    expected_path.parent.mkdir()
    with h5py.File(expected_path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, reference_encoder)
    asked.clear()
    model = build_model("effb0_pan", input_shape=(32, 32, 3), encoder_weights="imagenet", **SMALL)
    assert not asked  # a cached file is used as it is
    np.testing.assert_array_equal(
        model.get_layer(ENCODER_NAME).get_layer("block5c_project_conv").kernel.numpy(),
        reference_encoder.get_layer("block5c_project_conv").kernel.numpy(),
    )


def test_imagenet_weights_downloaded_into_the_keras_cache_when_missing(tmp_path, monkeypatch, reference_encoder):
    from keras.src.legacy.saving import legacy_h5_format

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def online(fname, origin, cache_dir, cache_subdir, file_hash):  # what get_file does, minus the network
        target = Path(cache_dir) / cache_subdir / fname
        target.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(target, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, reference_encoder)
        return str(target)

    monkeypatch.setattr(keras.utils, "get_file", online)
    model = build_model("effb0_pan", input_shape=(32, 32, 3), encoder_weights="imagenet", **SMALL)
    assert (tmp_path / "models" / "efficientnetb0_notop.h5").is_file()
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
        ({"output_stride": 8}, ValueError, "output_stride=8"),
        ({"output_stride": "16"}, ValueError, "output_stride='16'"),
        ({"output_stride": 16.0}, ValueError, "output_stride=16.0"),
        ({"decoder": "fpn"}, ValueError, "decoder='fpn'"),
        ({"output_stride": 16, "input_shape": (36, 48, 1)}, ValueError,
         "height 36 is not a multiple of 16 .*output_stride=16.* nearest valid height is 32"),
        ({"output_stride": 16, "input_shape": (48, 8, 1)}, ValueError, "width 8 .* nearest valid width is 16"),
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
    compile_as_fit(model, 1e-3, run_eagerly=True)
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


# ---------------------------------------------------------------- output_stride=16 and decoder="paper"

DILATED = ("block6a_dwconv", "block6b_dwconv", "block6c_dwconv", "block6d_dwconv", "block7a_dwconv")


def dwconv_settings(encoder):
    """``{name: (strides, dilation_rate)}`` of the encoder's depthwise convolutions."""
    return {
        layer.name: (tuple(layer.strides), tuple(layer.dilation_rate))
        for layer in encoder.layers
        if isinstance(layer, keras.layers.DepthwiseConv2D)
    }


def inbound(model, layer_name):
    """``[(layer, node, tensor)]`` feeding ``layer_name`` in ``model``'s functional config."""
    for layer in model.get_config()["layers"]:
        if layer["name"] == layer_name:
            args = layer["inbound_nodes"][0]["args"][0]
            args = args if isinstance(args, list) else [args]
            return [tuple(arg["config"]["keras_history"]) for arg in args]
    raise KeyError(layer_name)


def se_params(channels, ratio):
    """SqueezeExcitation: 1x1 convolutions with bias, channels -> channels // ratio -> channels."""
    hidden = channels // ratio
    return channels * hidden + hidden + hidden * channels + channels


def decoder_params(filters, se_ratio=4, rates=3, classes=3, paper=False):
    """The decoder by hand (ConvBNReLU: conv without bias + BN's 4 values per channel)."""

    def conv_bn(c_in, c_out, k):
        return k * k * c_in * c_out + 4 * c_out

    def conv_bias(c_in, c_out, k):
        return k * k * c_in * c_out + c_out

    aspp = (conv_bn(320, filters, 1) + rates * conv_bn(320, filters, 3) + conv_bias(320, filters, 1)
            + conv_bn((rates + 2) * filters, filters, 1))
    fpa = (conv_bn(filters, filters, 1) + conv_bias(filters, filters, 1) + conv_bias(filters, 1, 7)
           + 2 * conv_bias(1, 1, 5) + 2 * conv_bias(1, 1, 3) + conv_bias(1, 1, 7))
    gau = sum(conv_bn(c, filters, 3) + conv_bias(filters, filters, 1) for c in (112, 40, 24))
    se = sum(se_params(c, se_ratio) for c in (24, 40, 112) + ((320,) if paper else ()))
    return aspp + fpa + gau + se + conv_bias(filters, classes, 1)


def depthwise_by_hand(x, kernel, rate):
    """A stride-1 "same" depthwise convolution at dilation ``rate``, in numpy (float64)."""
    size = kernel.shape[0]
    half = rate * (size - 1) // 2
    padded = np.pad(x.astype("float64"), ((0, 0), (half, half), (half, half), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros(x.shape, "float64")
    for a in range(size):
        for b in range(size):
            out += padded[:, a * rate : a * rate + height, b * rate : b * rate + width, :] * kernel[a, b, :, 0]
    return out


@pytest.mark.parametrize("input_shape, decoder", [((32, 32, 1), "smp"), ((48, 64, 3), "paper")])
def test_output_stride_16_keeps_p5_at_one_sixteenth(input_shape, decoder):
    model = build_model("effb0_pan", input_shape=input_shape, output_stride=16, decoder=decoder, **SMALL)
    h, w = input_shape[:2]
    encoder = model.get_layer(ENCODER_NAME)
    assert [tuple(t.shape[1:]) for t in encoder.outputs] == [
        (h // 4, w // 4, 24),
        (h // 8, w // 8, 40),
        (h // 16, w // 16, 112),
        (h // 16, w // 16, 320),
    ]
    # ASPP, FPA and the first GAU work at 1/16: that GAU adds d5 to P4 without resizing.
    for name in ("aspp", "fpa", "gau_p4"):
        assert tuple(model.get_layer(name).output.shape[1:3]) == (h // 16, w // 16), name
    probs = keras.ops.convert_to_numpy(model(random_inputs([(2,) + input_shape])))
    assert probs.shape == (2, h, w, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert fast_layer_kinds(model)["plain_bn"] == 0  # the rebuilt encoder keeps the fast kernels


def test_output_stride_16_dilates_block6a_on_and_changes_nothing_else():
    e32 = build_efficientnet_encoder((32, 32, 1))
    e16 = build_efficientnet_encoder((32, 32, 1), output_stride=16)
    assert dwconv_settings(e32)["block6a_dwconv"] == ((2, 2), (1, 1))
    expected = {
        name: ((1, 1), (2, 2)) if name in DILATED else setting for name, setting in dwconv_settings(e32).items()
    }
    assert dwconv_settings(e16) == expected
    assert e16.get_layer("block6a_dwconv_pad").padding == ((4, 4), (4, 4))  # "same" for a 5x5 at rate 2
    assert all(tuple(layer.dilation_rate) == (1, 1) for layer in e16.layers if type(layer) is keras.layers.Conv2D)
    # Same layers (fast kernels included), names and weight shapes: weight files fit both.
    assert [(layer.name, type(layer)) for layer in e16.layers[1:]] == [
        (layer.name, type(layer)) for layer in e32.layers[1:]
    ]
    assert [(w.path, w.shape) for w in e16.weights] == [(w.path, w.shape) for w in e32.weights]
    assert e16.count_params() == e32.count_params() == 3_634_268
    # Nothing before block6a changes: with the same weights, P2, P3 and P4 agree.
    e16.set_weights(e32.get_weights())
    x = random_inputs([(2, 32, 32, 1)])
    for p32, p16 in zip(e32(x)[:3], e16(x)[:3]):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(p16), keras.ops.convert_to_numpy(p32), rtol=1e-5, atol=1e-5
        )


def test_dilated_depthwise_convolutions_match_a_hand_computation():
    # 128 px: an 8x8 map at 1/16, so every tap of a rate-2 5x5 (offsets up to 4) is live.
    encoder = build_efficientnet_encoder((128, 128, 1), output_stride=16)
    rng = np.random.default_rng(5)
    names = []
    for block in ("block6a", "block6b"):
        dwconv = encoder.get_layer(f"{block}_dwconv")
        dwconv.kernel.assign(rng.normal(size=dwconv.kernel.shape).astype("float32"))
        names += [f"{block}_expand_activation", f"{block}_dwconv"]
    probe = keras.Model(encoder.input, [encoder.get_layer(name).output for name in names])
    outputs = [keras.ops.convert_to_numpy(t) for t in probe(random_inputs([(1, 128, 128, 1)]))]
    for (inputs, got), block in zip(zip(outputs[::2], outputs[1::2]), ("block6a", "block6b")):
        assert inputs.shape == got.shape == (1, 8, 8, 672 if block == "block6a" else 1152)
        kernel = encoder.get_layer(f"{block}_dwconv").kernel.numpy()
        np.testing.assert_allclose(got, depthwise_by_hand(inputs, kernel, rate=2), rtol=1e-4, atol=1e-4)


def test_stride_32_weight_file_loads_into_a_stride_16_model(weights_file, reference_encoder):
    model = build_model(
        "effb0_pan", input_shape=(32, 32, 3), output_stride=16, encoder_weights=weights_file, **SMALL
    )
    encoder = model.get_layer(ENCODER_NAME)
    assert dwconv_settings(encoder)["block6a_dwconv"] == ((1, 1), (2, 2))
    compared = 0
    for layer in encoder.layers[1:]:
        for mine, theirs in zip(layer.weights, reference_encoder.get_layer(layer.name).weights):
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
            compared += 1
    assert compared == len(encoder.weights) > 300


def test_encoder_weights_saved_at_stride_32_load_at_stride_16(tmp_path):
    e32 = build_efficientnet_encoder((32, 32, 1))
    path = tmp_path / "encoder32.weights.h5"
    e32.save_weights(path)
    e16 = build_efficientnet_encoder((64, 64, 1), output_stride=16)
    assert not np.array_equal(e16.get_layer("block6a_dwconv").kernel.numpy(),
                              e32.get_layer("block6a_dwconv").kernel.numpy())
    e16.load_weights(path)
    for w32, w16 in zip(e32.weights, e16.weights):
        assert w32.path == w16.path
        np.testing.assert_array_equal(w16.numpy(), w32.numpy())


def test_paper_decoder_puts_one_se_on_p5_before_aspp():
    keras.utils.set_random_seed(3)
    ours = build_model("effb0_pan", input_shape=(32, 32, 1), **SMALL)
    keras.utils.set_random_seed(3)
    paper = build_model("effb0_pan", input_shape=(32, 32, 1), decoder="paper", **SMALL)
    assert inbound(ours, "aspp") == [(ENCODER_NAME, 0, 3)]
    assert inbound(paper, "se_p5") == [(ENCODER_NAME, 0, 3)] and inbound(paper, "aspp") == [("se_p5", 0, 0)]
    assert [inbound(paper, f"gau_p{i}")[0] for i in (4, 3, 2)] == [("se_p4", 0, 0), ("se_p3", 0, 0), ("se_p2", 0, 0)]
    assert paper.count_params() - ours.count_params() == se_params(320, 4) == 51_600
    for layer in ours.layers:
        if layer.weights:
            paper.get_layer(layer.name).set_weights(layer.get_weights())
    x = random_inputs([(2, 32, 32, 1)])
    taps = keras.Model(paper.input, [paper.get_layer("se_p5").input, paper.get_layer("aspp").input])
    excite = paper.get_layer("se_p5").excite
    excite.kernel.assign(np.zeros(excite.kernel.shape, "float32"))
    # A gate of sigmoid(0) = 0.5: ASPP gets half of P5.
    excite.bias.assign(np.zeros(excite.bias.shape, "float32"))
    p5, aspp_input = (keras.ops.convert_to_numpy(t) for t in taps(x, training=False))
    assert p5.shape == (2, 1, 1, 320) and np.abs(p5).max() > 0
    np.testing.assert_allclose(aspp_input, 0.5 * p5, rtol=1e-6, atol=1e-7)
    # A gate of sigmoid(30) = 1.0 in float32 passes P5 as is: the smp reading exactly.
    excite.bias.assign(np.full(excite.bias.shape, 30.0, "float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(taps(x, training=False)[1]), p5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(paper(x, training=False)),
        keras.ops.convert_to_numpy(ours(x, training=False)),
        rtol=1e-6, atol=1e-7,
    )


@pytest.mark.parametrize("output_stride", [32, 16])
@pytest.mark.parametrize("decoder", ["smp", "paper"])
def test_parameter_counts_by_hand(output_stride, decoder):
    # Counts do not depend on the input size: 32x32 gives the 256x256 figures.
    model = build_model("effb0_pan", input_shape=(32, 32, 1), output_stride=output_stride, decoder=decoder)
    paper = decoder == "paper"
    assert model.count_params() == 3_634_268 + decoder_params(64, paper=paper)
    assert model.count_params() == {False: 4_384_182, True: 4_435_782}[paper]
    assert decoder_params(8) == 3_730_270 - 3_634_268  # test_parameter_count_is_pinned


def test_gau_at_equal_sizes_adds_the_high_level_features_unresized():
    # At output_stride=16 the first GAU gets P4 and d5 at the same size (upsampling x1).
    gau = GlobalAttentionUpsample(filters=4)
    low, high = random_inputs([(2, 4, 4, 3), (2, 4, 4, 4)])
    gau([low, high])
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=gau.attention.kernel.shape).astype("float32")
    bias = rng.normal(size=gau.attention.bias.shape).astype("float32")
    gau.attention.kernel.assign(kernel)
    gau.attention.bias.assign(bias)
    weights = 1.0 / (1.0 + np.exp(-(high.mean(axis=(1, 2), keepdims=True) @ kernel[0, 0] + bias)))
    detail = keras.ops.convert_to_numpy(gau.detail(low, training=False))
    expected = detail * weights + high
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gau([low, high], training=False)), expected,
                               rtol=1e-5, atol=1e-6)


def test_output_stride_16_under_mixed_float16_outputs_float32():
    with dtype_policy("mixed_float16"):
        model = build_model("effb0_pan", input_shape=(32, 32, 1), output_stride=16, decoder="paper", **SMALL)
        encoder = model.get_layer(ENCODER_NAME)
        assert encoder.get_layer("block6a_dwconv").compute_dtype == "float16"
        assert model.get_layer("se_p5").compute_dtype == "float16"
        assert model.output.dtype == "float32"
        probs = model(random_inputs([(1, 32, 32, 1)]))
        assert keras.backend.standardize_dtype(probs.dtype) == "float32"
        np.testing.assert_allclose(keras.ops.convert_to_numpy(probs).sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_output_stride_16_paper_decoder_keras_round_trip(tmp_path):
    model = build_model("effb0_pan", input_shape=(32, 32, 3), output_stride=16, decoder="paper", **SMALL)
    original, reloaded, clone = save_and_reload(model, tmp_path / "pan16.keras", random_inputs([(2, 32, 32, 3)]))
    np.testing.assert_array_equal(original, reloaded)
    encoder = clone.get_layer(ENCODER_NAME)
    assert tuple(encoder.outputs[3].shape[1:3]) == (2, 2)
    assert dwconv_settings(encoder) == dwconv_settings(model.get_layer(ENCODER_NAME))
    assert encoder.get_layer("block6a_dwconv_pad").padding == ((4, 4), (4, 4))
    assert clone.count_params() == model.count_params() and clone.get_layer("se_p5").ratio == 4


@pytest.mark.slow
def test_one_training_step_at_output_stride_16():
    model = build_model("effb0_pan", input_shape=(32, 32, 1), output_stride=16, decoder="paper", **SMALL)
    # Eager, as test_one_training_step_at_batch_size_one: tracing the gradient costs more than a step.
    compile_as_fit(model, 1e-3, run_eagerly=True)
    x = random_inputs([(2, 32, 32, 1)])
    y = keras.utils.to_categorical(np.random.default_rng(0).integers(0, 3, (2, 32, 32)), 3)
    watched = [
        model.get_layer(ENCODER_NAME).get_layer("block6b_dwconv").kernel,
        model.get_layer("se_p5").excite.kernel,
        model.get_layer("gau_p4").attention.kernel,
    ]
    before = [w.numpy().copy() for w in watched]
    loss = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history["loss"][0]
    assert 0.5 < loss < 3.0  # categorical cross entropy near ln 3 at initialization
    assert all(not np.allclose(b, w.numpy()) for b, w in zip(before, watched))


@pytest.mark.slow
def test_docstring_examples_run():
    import doctest

    from keras_livseg.models import efficientnet_pan

    result = doctest.testmod(efficientnet_pan)
    assert result.failed == 0 and result.attempted >= 7
