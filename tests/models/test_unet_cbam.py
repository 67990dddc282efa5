"""U-Net with CBAM: the CBAM layer alone (against numpy), then the model built with it."""

from __future__ import annotations

import contextlib
import doctest
from pathlib import Path

import keras
import numpy as np
import pytest
from models_testing import compile_as_fit, dtype_policy, random_inputs, run_layer_test, save_and_reload

from keras_livseg.models import unet as unet_module
from keras_livseg.models.layers import cbam as cbam_module
from keras_livseg.models.layers.cbam import CBAM
from keras_livseg.models.unet import build_unet, build_unet_cbam

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SMALL = {"filters": 4, "depth": 2}


@contextlib.contextmanager
def image_data_format(name: str):
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format(name)
    try:
        yield
    finally:
        keras.config.set_image_data_format(previous)


def cbam_param_count(channels, ratio=16, kernel_size=7):
    """Parameters of one CBAM, counted by hand: the shared MLP, then the spatial convolution."""
    hidden = max(1, channels // ratio)
    return (channels * hidden + hidden) + (hidden * channels + channels) + (kernel_size**2 * 2 + 1)


def unet_cbam_extra_params(filters, depth, ratio=16, kernel_size=7):
    """All CBAM parameters of build_unet_cbam: encoder and decoder blocks, and the bottleneck."""
    channels = [filters * 2**level for level in range(depth)] * 2 + [filters * 2**depth]
    return sum(cbam_param_count(c, ratio, kernel_size) for c in channels)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def cbam_numpy(x, w1, b1, w2, b2, kernel, bias):
    """Woo et al. Eq. 1-3 on a channels_last array, the convolution written out as shifted sums."""
    def mlp(v):
        return np.maximum(v @ w1 + b1, 0.0) @ w2 + b2

    channel_gate = sigmoid(mlp(x.mean(axis=(1, 2))) + mlp(x.max(axis=(1, 2))))  # (batch, C)
    refined = x * channel_gate[:, None, None, :]
    maps = np.stack([refined.mean(-1), refined.max(-1)], axis=-1)  # [avg; max]: (batch, H, W, 2)
    k, (height, width) = kernel.shape[0], x.shape[1:3]
    padded = np.pad(maps, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    logits = bias + sum(
        padded[:, i : i + height, j : j + width, :] @ kernel[i, j] for i in range(k) for j in range(k)
    )
    spatial_gate = sigmoid(logits)  # (batch, H, W, 1)
    return refined * spatial_gate, spatial_gate, channel_gate


def _set_known_weights(cbam, channels, hidden, kernel_size, seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(channels, hidden)).astype("float32")
    b1 = rng.normal(size=(hidden,)).astype("float32") + 0.5  # mostly live ReLUs
    w2 = rng.normal(size=(hidden, channels)).astype("float32")
    b2 = rng.normal(size=(channels,)).astype("float32")
    kernel = (0.3 * rng.normal(size=(kernel_size, kernel_size, 2, 1))).astype("float32")
    bias = rng.normal(size=(1,)).astype("float32")
    cbam.channel_mlp_hidden.set_weights([w1[None, None], b1])
    cbam.channel_mlp_output.set_weights([w2[None, None], b2])
    cbam.spatial_conv.set_weights([kernel, bias])
    return w1, b1, w2, b2, kernel, bias


# ---------------------------------------------------------------- CBAM alone


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({"ratio": 2}, (2, 8, 8, 8)),
        ({}, (1, 6, 10, 4)),  # ratio 16 > 4 channels: the MLP keeps one hidden unit
        ({"ratio": 1, "kernel_size": 3}, (2, 5, 5, 3)),
        ({"ratio": 4, "kernel_size": 1}, (2, 4, 4, 8)),
    ],
)
def test_cbam_layer(kwargs, shape):
    layer = run_layer_test(CBAM, kwargs, [shape], shape)
    ratio, kernel_size, channels = kwargs.get("ratio", 16), kwargs.get("kernel_size", 7), shape[-1]
    assert layer.channel_mlp_hidden.filters == max(1, channels // ratio)
    assert layer.count_params() == cbam_param_count(channels, ratio, kernel_size)
    features = random_inputs([shape])
    spatial = keras.ops.convert_to_numpy(layer.compute_attention(features))
    assert spatial.shape == shape[:-1] + (1,) and spatial.min() >= 0.0 and spatial.max() <= 1.0
    channel = keras.ops.convert_to_numpy(layer.compute_channel_attention(features))
    assert channel.shape == (shape[0], 1, 1, channels) and channel.min() >= 0.0 and channel.max() <= 1.0


@pytest.mark.parametrize("kernel_size, shape", [(7, (2, 5, 6, 6)), (3, (1, 4, 4, 5))])
def test_cbam_matches_the_papers_equations_in_numpy(kernel_size, shape):
    x = random_inputs([shape], seed=1)
    cbam = CBAM(ratio=2, kernel_size=kernel_size)
    cbam.build(shape)
    weights = _set_known_weights(cbam, shape[-1], shape[-1] // 2, kernel_size)
    expected, spatial_gate, channel_gate = cbam_numpy(x, *weights)
    to_numpy = keras.ops.convert_to_numpy
    close = {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(to_numpy(cbam.compute_channel_attention(x))[:, 0, 0], channel_gate, **close)
    np.testing.assert_allclose(to_numpy(cbam.compute_attention(x)), spatial_gate, **close)
    np.testing.assert_allclose(to_numpy(cbam(x)), expected, **close)
    assert channel_gate.std() > 0.02 and spatial_gate.std() > 0.02  # the known weights do gate


def test_cbam_channels_first_gives_the_same_result():
    x = random_inputs([(2, 5, 6, 6)], seed=2)
    last = CBAM(ratio=3, kernel_size=3)
    last.build(x.shape)
    _set_known_weights(last, 6, 2, 3)
    expected = keras.ops.convert_to_numpy(last(x))
    with image_data_format("channels_first"):
        x_cf = x.transpose(0, 3, 1, 2)
        first = CBAM(ratio=3, kernel_size=3)
        first.build(x_cf.shape)
        _set_known_weights(first, 6, 2, 3)
        assert tuple(first.compute_attention(x_cf).shape) == (2, 1, 5, 6)
        assert tuple(first.compute_channel_attention(x_cf).shape) == (2, 6, 1, 1)
        out = keras.ops.convert_to_numpy(first(x_cf))
    np.testing.assert_allclose(out.transpose(0, 2, 3, 1), expected, rtol=1e-5, atol=1e-6)


def test_cbam_channel_gate_is_constant_over_space():
    features = np.abs(random_inputs([(2, 6, 6, 8)])) + 0.1
    cbam = CBAM(ratio=2)
    gate = keras.ops.convert_to_numpy(cbam.compute_channel_attention(features))
    refined = features * gate
    factor = refined / features
    np.testing.assert_allclose(factor, np.broadcast_to(factor[:, :1, :1, :], factor.shape), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0}, "ratio=0"),
        ({"ratio": -2}, "ratio=-2"),
        ({"ratio": 2.5}, "ratio=2.5"),
        ({"kernel_size": 0}, "kernel_size=0"),
        ({"kernel_size": 4}, "kernel_size=4; use 5"),
    ],
)
def test_cbam_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CBAM(**kwargs)


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize(
    "input_shape, options",
    [
        ((32, 32, 1), SMALL),
        ((64, 48, 3), {**SMALL, "cbam_ratio": 2, "cbam_kernel_size": 3}),
        ((32, 32, 1), {"filters": 2, "depth": 1, "batchnorm": True, "upsampling": "bilinear"}),
    ],
)
def test_output_shape_and_probabilities(input_shape, options):
    model = build_unet_cbam(input_shape=input_shape, **options)
    assert model.inputs[0].name == "ct_slices" and model.output_names == ["probabilities"]
    assert tuple(model.output.shape) == (None,) + input_shape[:2] + (3,)
    probs = keras.ops.convert_to_numpy(model(random_inputs([(2,) + input_shape])))
    assert probs.shape == (2,) + input_shape[:2] + (3,)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert probs.min() >= 0.0


@pytest.mark.parametrize(
    "filters, depth, in_channels, ratio, kernel_size", [(4, 2, 1, 16, 7), (3, 3, 3, 2, 3), (8, 1, 1, 4, 5)]
)
def test_cbam_after_every_block_and_nothing_else_added(filters, depth, in_channels, ratio, kernel_size):
    shape = (32, 32, in_channels)
    unet = build_unet(input_shape=shape, filters=filters, depth=depth)
    model = build_unet_cbam(
        input_shape=shape, filters=filters, depth=depth, cbam_ratio=ratio, cbam_kernel_size=kernel_size
    )
    modules = [layer for layer in model.layers if isinstance(layer, CBAM)]
    assert [m.name for m in modules] == (
        [f"encoder{level}_cbam" for level in range(1, depth + 1)]
        + ["bottleneck_cbam"]
        + [f"decoder{level}_cbam" for level in range(depth, 0, -1)]
    )
    assert all(m.ratio == ratio and m.kernel_size == kernel_size for m in modules)
    extra = unet_cbam_extra_params(filters, depth, ratio, kernel_size)
    assert model.count_params() - unet.count_params() == extra
    assert [l.name for l in model.layers if not isinstance(l, CBAM)] == [l.name for l in unet.layers]


def test_parameter_count_is_pinned():
    small = build_unet_cbam(input_shape=(32, 32, 1), **SMALL)
    # U-Net 7407 (test_unet) + CBAMs with one hidden unit each (C < 16): 3C + 100 for
    # C = 4, 8 (encoder), 16 (bottleneck), 8, 4 (decoder).
    assert unet_cbam_extra_params(4, 2) == 2 * 112 + 2 * 124 + 148 == 620
    assert small.count_params() == 7407 + 620 == 8027


def test_parameter_count_at_the_default_configuration():
    model = build_unet_cbam(input_shape=(256, 256, 1))
    # C = 64, 128, 256, 512 (twice each) and 1024: hidden 4, 8, 16, 32 and 64.
    per_level = [679, 2_283, 8_563, 33_411]
    assert [cbam_param_count(64 * 2**i) for i in range(4)] == per_level
    assert cbam_param_count(1024) == 132_259
    assert unet_cbam_extra_params(64, 4) == 2 * sum(per_level) + 132_259 == 222_131
    assert model.count_params() == 31_030_723 + 222_131 == 31_252_854


def test_open_gates_compute_exactly_the_unet_and_the_maps_can_be_read():
    keras.utils.set_random_seed(3)
    unet = build_unet(input_shape=(32, 32, 1), **SMALL)
    model = build_unet_cbam(input_shape=(32, 32, 1), **SMALL)
    for layer in unet.layers:
        if layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
    x = random_inputs([(2, 32, 32, 1)])
    modules = [layer for layer in model.layers if isinstance(layer, CBAM)]
    # The spatial maps, read as we will for overlays: one per pixel of each block.
    for module, size in zip(modules, (32, 16, 8, 16, 32)):
        features = keras.Model(model.input, module.input)(x)
        spatial = keras.ops.convert_to_numpy(module.compute_attention(features))
        assert spatial.shape == (2, size, size, 1) and 0.0 <= spatial.min() and spatial.max() <= 1.0
        assert spatial.std() > 1e-4
    # M_c = M_s = 1 (zero kernels, bias +40): every CBAM is the identity.
    for module in modules:
        for conv in (module.channel_mlp_output, module.spatial_conv):
            kernel, bias = conv.get_weights()
            conv.set_weights([np.zeros_like(kernel), np.full_like(bias, 40.0)])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), keras.ops.convert_to_numpy(unet(x)), atol=1e-6
    )


def test_channels_first_computes_the_same_model():
    keras.utils.set_random_seed(4)
    last = build_unet_cbam(input_shape=(32, 32, 2), **SMALL, cbam_kernel_size=3)
    x = random_inputs([(2, 32, 32, 2)])
    expected = keras.ops.convert_to_numpy(last(x))
    with image_data_format("channels_first"):
        first = build_unet_cbam(input_shape=(2, 32, 32), **SMALL, cbam_kernel_size=3)
        first.set_weights(last.get_weights())
        assert tuple(first.output.shape) == (None, 3, 32, 32)
        probs = keras.ops.convert_to_numpy(first(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(probs.transpose(0, 2, 3, 1), expected, atol=1e-5)


def test_keras_save_and_load_gives_identical_outputs(tmp_path):
    model = build_unet_cbam(
        input_shape=(32, 32, 2), **SMALL, batchnorm=True, dropout=0.3, cbam_ratio=2, cbam_kernel_size=5
    )
    data = random_inputs([(2, 32, 32, 2)])
    original, reloaded, clone = save_and_reload(model, tmp_path / "model.keras", data)
    np.testing.assert_array_equal(original, reloaded)
    assert clone.count_params() == model.count_params()
    module = clone.get_layer("decoder1_cbam")
    assert isinstance(module, CBAM) and (module.ratio, module.kernel_size) == (2, 5)
    assert clone.inputs[0].name == "ct_slices" and clone.output_names == ["probabilities"]


@pytest.mark.slow  # about twice the U-Net's step: five CBAMs to trace and differentiate
def test_one_fit_step_trains():
    keras.utils.set_random_seed(0)
    model = build_unet_cbam(input_shape=(32, 32, 1), **SMALL, batchnorm=True, cbam_ratio=2)
    compile_as_fit(model, 1e-2)
    x = random_inputs([(2, 32, 32, 1)])
    y = keras.utils.to_categorical(np.random.default_rng(0).integers(0, 3, (2, 32, 32)), 3)
    before = [w.numpy().copy() for w in model.trainable_weights]
    loss = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss) and 0.5 < loss < 3.0  # ≈ ln 3 at initialization
    changed = [not np.allclose(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert all(changed)
    assert len(model.get_layer("bottleneck_cbam").trainable_weights) == 6  # MLP 2x(W, b), conv W, b


@pytest.mark.parametrize("policy, compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_keeps_a_float32_output(policy, compute):
    with dtype_policy(policy):
        model = build_unet_cbam(input_shape=(32, 32, 1), **SMALL)
        module = model.get_layer("decoder1_cbam")
        assert module.compute_dtype == compute and module.spatial_conv.compute_dtype == compute
        assert all(w.dtype == "float32" for w in module.weights)
        assert model.output.dtype == "float32"
        probs = model(random_inputs([(1, 32, 32, 1)]))
        assert keras.backend.standardize_dtype(probs.dtype) == "float32"
        np.testing.assert_allclose(keras.ops.convert_to_numpy(probs).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"filters": 0}, "filters=0"),
        ({"depth": -1}, "depth=-1"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"head": "relu"}, "head='relu'"),
        ({"cbam_ratio": 0}, "cbam_ratio=0"),
        ({"cbam_ratio": 1.5}, "cbam_ratio=1.5"),
        ({"cbam_kernel_size": 4}, "cbam_kernel_size=4; use 5"),
        ({"cbam_kernel_size": -7}, "cbam_kernel_size=-7"),
        ({"input_shape": (100, 96, 1)}, "height 100 .* nearest valid height is 96"),
        ({"input_shape": (96, 120, 1)}, "width 120 .* nearest valid width is 128"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(options, match):
    options = {"input_shape": (64, 64, 1), **options}
    with pytest.raises(ValueError, match=match):
        build_unet_cbam(**options)



def test_docstring_examples_run():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(verbose=False)
    for obj, module in ((CBAM, cbam_module), (build_unet_cbam, unet_module)):
        for test in finder.find(obj, module=module, globs=vars(module)):
            runner.run(test)
    assert runner.tries >= 4 and runner.failures == 0
