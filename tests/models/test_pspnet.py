"""PSPNet and its PyramidPooling layer: exact adaptive pooling, smp's parameter count, training, JAX."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pytest
from models_testing import compile_as_fit, dtype_policy, random_inputs, run_layer_test, save_and_reload

from keras_livseg.models.layers.pyramid_pooling import (
    PyramidPooling,
    adaptive_pool_matrix,
    align_corners_matrix,
)
from keras_livseg.models.pspnet import build_pspnet, feature_stride

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
SMALL = {"encoder": "resnet18", "psp_filters": 16}


def resnet_param_counts(in_channels, blocks, stages):
    """(trainable, batch-norm channels) of the BasicBlock ResNet's stem and first ``stages`` stages."""
    trainable, bn_channels = 7 * 7 * in_channels * 64 + 2 * 64, 64
    cin = 64
    for stage, (count, filters) in enumerate(zip(blocks[:stages], (64, 128, 256, 512))):
        for index in range(count):
            trainable += 9 * cin * filters + 9 * filters * filters + 4 * filters
            bn_channels += 2 * filters
            if (stage > 0 and index == 0) or cin != filters:
                trainable += cin * filters + 2 * filters
                bn_channels += filters
            cin = filters
    return trainable, bn_channels


def pspnet_param_counts(in_channels, blocks, encoder_depth, num_classes, psp_filters=512):
    """(trainable, all) parameters of build_pspnet with bins (1, 2, 3, 6), by hand."""
    trainable, bn_channels = resnet_param_counts(in_channels, blocks, stages=encoder_depth - 1)
    c = (64, 64, 128, 256, 512)[encoder_depth - 1]  # channels of the pooled feature
    f = c // 4
    trainable += (c * f + f) + 3 * (c * f + 2 * f)  # bin 1: conv + bias; bins 2, 3, 6: conv + BN
    bn_channels += 3 * f
    trainable += 2 * c * psp_filters + 2 * psp_filters  # 1x1 conv (no bias) + BN on concat(4f, c)
    bn_channels += psp_filters
    trainable += 9 * psp_filters * num_classes + num_classes  # 3x3 logits
    return trainable, trainable + 2 * bn_channels


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


# PyramidPooling alone.


def reference_adaptive_pool(x, bins):
    """PyTorch's AdaptiveAvgPool2d on one (H, W, C) image, written out window by window."""
    h, w, c = x.shape
    out = np.zeros((bins, bins, c))
    for i in range(bins):
        rows = slice(math.floor(i * h / bins), math.ceil((i + 1) * h / bins))
        for j in range(bins):
            cols = slice(math.floor(j * w / bins), math.ceil((j + 1) * w / bins))
            out[i, j] = x[rows, cols].mean(axis=(0, 1))
    return out


def reference_resize_align_corners(x, h, w):
    """F.interpolate(bilinear, align_corners=True) of one (b, b, C) map to (h, w, C)."""
    bh, bw, c = x.shape
    out = np.zeros((h, w, c))
    for i in range(h):
        sy = i * (bh - 1) / (h - 1) if h > 1 else 0.0
        y0 = int(sy)
        y1, fy = min(y0 + 1, bh - 1), sy - y0
        for j in range(w):
            sx = j * (bw - 1) / (w - 1) if w > 1 else 0.0
            x0 = int(sx)
            x1, fx = min(x0 + 1, bw - 1), sx - x0
            top = x[y0, x0] * (1 - fx) + x[y0, x1] * fx
            bottom = x[y1, x0] * (1 - fx) + x[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize(
    "kwargs, shape, expected",
    [
        ({}, (2, 12, 12, 8), (2, 12, 12, 16)),
        ({"bins": (1, 3), "filters": 4}, (2, 7, 10, 6), (2, 7, 10, 14)),
        ({"bins": (2, 6), "filters": 3}, (2, 4, 5, 2), (2, 4, 5, 8)),  # map smaller than a bin
    ],
)
def test_pyramid_pooling_layer(kwargs, shape, expected):
    layer = run_layer_test(PyramidPooling, kwargs, [shape], expected)
    # The input is passed through unchanged as the last channels.
    data = random_inputs([shape])
    out = keras.ops.convert_to_numpy(layer(data, training=False))
    np.testing.assert_array_equal(out[..., -shape[-1]:], data)


def test_pooling_and_upsampling_matrices_follow_pytorch():
    # 7 rows into 3 bins: windows 0-2, 2-4, 4-6 (floor/ceil, overlapping by one).
    np.testing.assert_allclose(
        adaptive_pool_matrix(7, 3) * 3, [[1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]],
        atol=1e-6,
    )
    # 32 into 3: rows 0-10, 10-21, 21-31 (11, 12 and 11 rows).
    assert [np.flatnonzero(row).tolist() for row in adaptive_pool_matrix(32, 3)] == [
        list(range(0, 11)), list(range(10, 22)), list(range(21, 32))
    ]
    # Bins dividing the size: plain non-overlapping average pooling.
    thirds = np.kron(np.eye(2), np.full((1, 3), 1 / 3))
    np.testing.assert_allclose(adaptive_pool_matrix(6, 2), thirds, atol=1e-7)
    # Align corners: the end points are the end bins, every row sums to one.
    up = align_corners_matrix(9, 3)
    np.testing.assert_allclose(up[[0, 4, 8]], np.eye(3), atol=1e-7)
    np.testing.assert_allclose(up.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(align_corners_matrix(5, 1), np.ones((5, 1)))


def _identity_batchnorm(layer):
    # gamma 1, beta 0, mean 0, var 1 - eps: inference BN is exactly the identity.
    channels = layer.gamma.shape[0]
    ones, zeros = np.ones(channels), np.zeros(channels)
    layer.set_weights([ones, zeros, zeros, ones - layer.epsilon])


def test_pyramid_pooling_by_hand_on_a_3x3_map():
    # One 2x2 bin over a 3x3 ramp: windows rows/cols 0-1 and 1-2, then back to 3x3.
    layer = PyramidPooling(bins=(2,), filters=1)
    x = np.arange(9, dtype="float32").reshape(1, 3, 3, 1)
    layer.build(x.shape)
    layer.branch_convs[0].kernel.assign(np.ones((1, 1, 1, 1)))
    _identity_batchnorm(layer.branch_bns[0])
    out = keras.ops.convert_to_numpy(layer(x, training=False))
    # Pooled: [[(0+1+3+4)/4, (1+2+4+5)/4], [(3+4+6+7)/4, (4+5+7+8)/4]] = [[2, 3], [5, 6]];
    # align-corners upsampling samples it at 0, 0.5, 1 along each axis.
    expected = [[2.0, 2.5, 3.0], [3.5, 4.0, 4.5], [5.0, 5.5, 6.0]]
    np.testing.assert_allclose(out[0, :, :, 0], expected, rtol=1e-5)
    np.testing.assert_array_equal(out[0, :, :, 1], x[0, :, :, 0])


@pytest.mark.parametrize("height, width", [(7, 10), (12, 12), (4, 5)])
def test_pyramid_pooling_against_numpy(height, width):
    rng = np.random.default_rng(0)
    channels, bins = 8, (1, 2, 3, 6)
    layer = PyramidPooling(bins=bins)  # filters = 8 // 4 = 2
    x = rng.normal(size=(2, height, width, channels)).astype("float32")
    layer.build(x.shape)
    for sub in layer.branch_convs + [bn for bn in layer.branch_bns if bn is not None]:
        values = [rng.normal(size=w.shape).astype("float32") for w in sub.weights]
        if isinstance(sub, keras.layers.BatchNormalization):
            values[3] = rng.uniform(0.5, 2.0, size=values[3].shape).astype("float32")
        sub.set_weights(values)
    assert layer.branch_bns[0] is None and layer.branch_convs[0].use_bias  # bin 1: no BN, as smp
    got = keras.ops.convert_to_numpy(layer(x, training=False))

    for n in range(2):
        expected = []
        for size, conv, bn in zip(bins, layer.branch_convs, layer.branch_bns):
            y = reference_adaptive_pool(x[n], size) @ conv.get_weights()[0][0, 0]
            if bn is None:
                y = y + conv.get_weights()[1]
            else:
                gamma, beta, mean, var = bn.get_weights()
                y = (y - mean) / np.sqrt(var + 1.001e-5) * gamma + beta
            expected.append(reference_resize_align_corners(np.maximum(y, 0.0), height, width))
        expected = np.concatenate(expected + [x[n]], axis=-1)
        np.testing.assert_allclose(got[n], expected, rtol=1e-4, atol=1e-5)


def test_pyramid_pooling_channels_first_equals_channels_last():
    x = random_inputs([(2, 7, 10, 8)])
    last = PyramidPooling()
    expected = keras.ops.convert_to_numpy(last(x, training=False))
    keras.config.set_image_data_format("channels_first")
    try:
        first = PyramidPooling()
        first.build((2, 8, 7, 10))
        first.set_weights(last.get_weights())
        got = keras.ops.convert_to_numpy(first(x.transpose(0, 3, 1, 2), training=False))
        assert first.compute_output_shape((2, 8, 7, 10)) == (2, 16, 7, 10)
    finally:
        keras.config.set_image_data_format("channels_last")
    np.testing.assert_allclose(got.transpose(0, 2, 3, 1), expected, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bins": ()}, r"bins=\(\)"),
        ({"bins": 6}, "bins=6"),
        ({"bins": (1, 0)}, "bins entry=0"),
        ({"bins": (2, 2)}, r"bins=\(2, 2\)"),
        ({"filters": 0}, "filters=0"),
    ],
)
def test_pyramid_pooling_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PyramidPooling(**kwargs)


def test_pyramid_pooling_too_few_channels_for_the_bins():
    with pytest.raises(ValueError, match="3 input channels cannot be split into 4 branches"):
        PyramidPooling()(np.ones((1, 6, 6, 3), "float32"))
    assert tuple(PyramidPooling(filters=2)(np.ones((1, 6, 6, 3), "float32")).shape) == (1, 6, 6, 11)


# PSPNet.


@pytest.fixture(scope="module")
def small_model():
    keras.utils.set_random_seed(0)
    return build_pspnet(input_shape=(32, 32, 1), **SMALL)


@pytest.mark.parametrize(
    "input_shape, options",
    [
        ((32, 32, 1), {}),
        ((24, 40, 3), {}),  # 1/8: any multiple of 8
        ((32, 64, 1), {"encoder_depth": 4}),
        ((32, 32, 1), {"encoder_depth": 5, "output_stride": 8}),
        ((48, 32, 1), {"encoder_depth": 5, "output_stride": 16, "bins": (1, 2, 4)}),
    ],
)
def test_output_shape_and_probabilities(input_shape, options):
    model = build_pspnet(input_shape=input_shape, **{**SMALL, **options})
    assert model.inputs[0].name == "ct_slices" and model.output_names == ["probabilities"]
    assert tuple(model.output.shape) == (None,) + input_shape[:2] + (3,)
    probs = keras.ops.convert_to_numpy(model(random_inputs([(2,) + input_shape]), training=False))
    assert probs.shape == (2,) + input_shape[:2] + (3,) and probs.min() >= 0.0
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_sigmoid_head_is_per_class():
    model = build_pspnet(input_shape=(32, 32, 1), num_classes=2, head="sigmoid", **SMALL)
    probs = keras.ops.convert_to_numpy(model(random_inputs([(2, 32, 32, 1)]), training=False))
    assert probs.shape == (2, 32, 32, 2) and 0.0 <= probs.min() and probs.max() <= 1.0
    assert not np.allclose(probs.sum(-1), 1.0, atol=1e-3)


def test_feature_stride():
    cases = [(3, 32), (3, 8), (4, 32), (4, 8), (5, 32), (5, 16), (5, 8)]
    assert [feature_stride(depth, stride) for depth, stride in cases] == [8, 8, 16, 8, 32, 16, 8]


def test_encoder_is_cut_after_encoder_depth(small_model):
    names = [layer.name for layer in small_model.layers]
    assert names == [
        "ct_slices", "resnet18_encoder", "pyramid_pooling", "psp_conv", "psp_bn", "psp_relu",
        "psp_dropout", "logits", "logits_upsample", "probabilities",
    ]
    encoder = small_model.get_layer("resnet18_encoder")
    stages = {layer.name.split("_")[0] for layer in encoder.layers}
    assert stages == {"resnet18", "stem", "layer1", "layer2"}  # stages 3 and 4 are not built
    assert tuple(encoder.outputs[-1].shape) == (None, 4, 4, 128)  # P3, 1/8
    assert tuple(small_model.get_layer("pyramid_pooling").output.shape) == (None, 4, 4, 256)


def test_paper_configuration_dilates_the_last_two_stages():
    model = build_pspnet(input_shape=(32, 32, 1), encoder_depth=5, output_stride=8, **SMALL)
    encoder = model.get_layer("resnet18_encoder")
    assert encoder.get_layer("layer2_0_conv1").strides == (2, 2)
    assert encoder.get_layer("layer3_0_conv1").strides == (1, 1)
    assert encoder.get_layer("layer3_1_conv2").dilation_rate == (2, 2)
    assert encoder.get_layer("layer4_0_conv1").dilation_rate == (4, 4)
    assert tuple(encoder.outputs[-1].shape) == (None, 4, 4, 512)  # P5 at 1/8
    assert trainable_count(model) == pspnet_param_counts(1, RESNET_BLOCKS["resnet18"], 5, 3, 16)[0]


def test_parameter_counts_match_smp():
    # smp 0.6 PSPNet(encoder_name, in_channels=1, classes=3): its parameters() also holds the
    # never-run layer3/layer4 (21,440,931 for resnet34); these are the parameters it runs.
    for encoder, expected in (("resnet34", 1_504_163), ("resnet18", 839_331)):
        model = build_pspnet(encoder=encoder)  # the default (256, 256, 1), encoder_depth 3
        trainable, total = pspnet_param_counts(1, RESNET_BLOCKS[encoder], 3, 3)
        assert trainable_count(model) == trainable == expected, encoder
        assert model.count_params() == total, encoder
    small = build_pspnet(input_shape=(32, 32, 3), encoder_depth=4, **SMALL)
    assert trainable_count(small) == pspnet_param_counts(3, RESNET_BLOCKS["resnet18"], 4, 3, 16)[0]


@pytest.mark.slow
def test_parameter_count_of_the_paper_configuration():
    model = build_pspnet(encoder_depth=5, output_stride=8)
    trainable, total = pspnet_param_counts(1, RESNET_BLOCKS["resnet34"], 5, 3)
    # smp 0.6 PSPNet(encoder_depth=5, output_stride=8, in_channels=1, classes=3)
    assert trainable_count(model) == trainable == 22_080_579
    assert model.count_params() == total


def test_no_dropout_layer_at_rate_zero():
    model = build_pspnet(input_shape=(32, 32, 1), psp_dropout=0.0, **SMALL)
    assert "psp_dropout" not in [layer.name for layer in model.layers]


def test_keras_save_and_load_gives_identical_outputs(small_model, tmp_path):
    data = random_inputs([(2, 32, 32, 1)])
    original, reloaded, model = save_and_reload(small_model, tmp_path / "pspnet.keras", data)
    np.testing.assert_array_equal(original, reloaded)
    assert model.get_layer("pyramid_pooling").bins == (1, 2, 3, 6)


@pytest.mark.parametrize("run_eagerly", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_one_fit_step_trains(run_eagerly):
    keras.utils.set_random_seed(1)
    model = build_pspnet(input_shape=(32, 32, 1), **SMALL)
    compile_as_fit(model, 1e-3, run_eagerly=run_eagerly)
    x = random_inputs([(2, 32, 32, 1)])
    y = keras.utils.to_categorical(np.random.default_rng(0).integers(0, 3, (2, 32, 32)), 3)
    before = [w.numpy().copy() for w in model.trainable_weights]
    loss = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss) and 0.1 < loss < 20.0
    changed = [not np.allclose(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert np.mean(changed) > 0.95, f"{sum(changed)} of {len(changed)} weights changed"


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_a_float32_output(policy):
    with dtype_policy(policy):
        model = build_pspnet(input_shape=(32, 32, 1), **SMALL)
    compute = policy.split("_")[1]
    pyramid = model.get_layer("pyramid_pooling")
    assert pyramid.compute_dtype == compute and pyramid.branch_convs[1].compute_dtype == compute
    assert all(w.dtype == "float32" for w in model.weights)
    probs = model(random_inputs([(1, 32, 32, 1)]), training=False)
    assert keras.backend.standardize_dtype(probs.dtype) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(probs).sum(-1), 1.0, atol=1e-3)


@pytest.mark.parametrize(
    "input_shape, options, match",
    [
        ((30, 32, 1), {}, "height 30 is not a multiple of 8 .*encoder_depth=3.*nearest valid height is 32"),
        ((32, 36, 1), {}, "width 36 .*nearest valid width is 40"),
        ((40, 32, 1), {"encoder_depth": 5, "output_stride": 16},
         "multiple of 16.*nearest valid height is 48"),
        ((40, 32, 1), {"encoder_depth": 5}, "multiple of 32.*nearest valid height is 32"),
    ],
)
def test_wrong_input_size_names_the_nearest_valid_size(input_shape, options, match):
    with pytest.raises(ValueError, match=match):
        build_pspnet(input_shape=input_shape, **{**SMALL, **options})


@pytest.mark.parametrize(
    "options, match",
    [
        ({"encoder": "resnet50"}, "encoder='resnet50'"),
        ({"encoder_depth": 2}, "encoder_depth=2"),
        ({"output_stride": 4}, "output_stride=4"),
        ({"psp_filters": 0}, "psp_filters=0"),
        ({"psp_dropout": 1.0}, "psp_dropout=1.0"),
        ({"bins": (1, 1)}, r"bins=\(1, 1\)"),
        ({"head": "tanh"}, "head='tanh'"),
        ({"num_classes": 1}, "num_classes=1"),
    ],
)
def test_bad_options_raise_value_error_quoting_them(options, match):
    with pytest.raises(ValueError, match=match):
        build_pspnet(input_shape=(32, 32, 1), **options)


def test_channels_first_builds_with_the_same_parameters():
    keras.config.set_image_data_format("channels_first")
    try:
        model = build_pspnet(input_shape=(3, 32, 48), **SMALL)
        assert tuple(model.output.shape) == (None, 3, 32, 48)
        assert tuple(model.get_layer("pyramid_pooling").output.shape) == (None, 256, 4, 6)
        assert trainable_count(model) == pspnet_param_counts(3, RESNET_BLOCKS["resnet18"], 3, 3, 16)[0]
    finally:
        keras.config.set_image_data_format("channels_last")
