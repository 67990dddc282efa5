"""Attention U-Net: the AttentionGate alone (against numpy), then the model built with it."""

from __future__ import annotations

import contextlib
import doctest
from pathlib import Path

import keras
import numpy as np
import pytest
from models_testing import compile_as_fit, dtype_policy, random_inputs, run_layer_test, save_and_reload

from keras_livseg.models import unet as unet_module
from keras_livseg.models.layers import attention_gate as attention_gate_module
from keras_livseg.models.layers.attention_gate import AttentionGate
from keras_livseg.models.unet import build_attention_unet, build_unet

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


def gate_param_count(filters, depth):
    """Parameters of the gates of build_attention_unet, counted by hand: W_x (no bias), W_g, psi."""
    total = 0
    for level in range(depth):
        channels = filters * 2**level
        inter = max(1, channels // 2)
        total += channels * inter + (channels * inter + inter) + (inter + 1)
    return total


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- AttentionGate alone


@pytest.mark.parametrize(
    "kwargs, shapes",
    [
        ({"inter_channels": 2}, [(2, 8, 8, 4), (2, 8, 8, 6)]),
        ({}, [(1, 6, 10, 3), (1, 6, 10, 3)]),  # default F_int = 3 // 2 = 1
        ({"inter_channels": 5}, [(2, 4, 4, 1), (2, 4, 4, 2)]),
    ],
)
def test_attention_gate_layer(kwargs, shapes):
    layer = run_layer_test(AttentionGate, kwargs, shapes, shapes[0])
    skip_channels, gating_channels = shapes[0][-1], shapes[1][-1]
    inter = kwargs.get("inter_channels") or max(1, skip_channels // 2)
    assert layer.count_params() == skip_channels * inter + gating_channels * inter + inter + inter + 1
    alpha = keras.ops.convert_to_numpy(layer.compute_attention(random_inputs(shapes)))
    assert alpha.shape == shapes[0][:-1] + (1,)
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0


def _set_known_weights(gate, skip_channels, gating_channels, inter, seed=0):
    rng = np.random.default_rng(seed)
    w_x = rng.normal(size=(skip_channels, inter)).astype("float32")
    w_g = rng.normal(size=(gating_channels, inter)).astype("float32")
    b_g = rng.normal(size=(inter,)).astype("float32")
    w_psi = rng.normal(size=(inter, 1)).astype("float32")
    b_psi = rng.normal(size=(1,)).astype("float32")
    gate.skip_projection.set_weights([w_x[None, None]])
    gate.gating_projection.set_weights([w_g[None, None], b_g])
    gate.psi.set_weights([w_psi[None, None], b_psi])
    return w_x, w_g, b_g, w_psi, b_psi


def test_attention_gate_matches_the_papers_equation_in_numpy():
    # alpha = sigmoid(psi^T relu(W_x^T x + W_g^T g + b_g) + b_psi), x_hat = alpha * x (Oktay et al.).
    x, g = random_inputs([(2, 3, 5, 4), (2, 3, 5, 6)], seed=1)
    gate = AttentionGate(inter_channels=3)
    gate.build([x.shape, g.shape])
    w_x, w_g, b_g, w_psi, b_psi = _set_known_weights(gate, 4, 6, 3)
    joint = np.maximum(x @ w_x + g @ w_g + b_g, 0.0)
    alpha = sigmoid(joint @ w_psi + b_psi)
    to_numpy = keras.ops.convert_to_numpy
    np.testing.assert_allclose(to_numpy(gate.compute_attention([x, g])), alpha, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(gate([x, g])), alpha * x, rtol=1e-5, atol=1e-6)
    assert 0.05 < alpha.std()  # the known weights give a map that varies, not a constant


def test_attention_gate_channels_first_gives_the_same_map():
    x, g = random_inputs([(2, 3, 5, 4), (2, 3, 5, 6)], seed=2)
    last = AttentionGate(inter_channels=3)
    last.build([x.shape, g.shape])
    _set_known_weights(last, 4, 6, 3)
    expected = keras.ops.convert_to_numpy(last([x, g]))
    with image_data_format("channels_first"):
        x_cf, g_cf = x.transpose(0, 3, 1, 2), g.transpose(0, 3, 1, 2)
        first = AttentionGate(inter_channels=3)
        first.build([x_cf.shape, g_cf.shape])
        _set_known_weights(first, 4, 6, 3)
        alpha = keras.ops.convert_to_numpy(first.compute_attention([x_cf, g_cf]))
        assert alpha.shape == (2, 1, 3, 5)
        out = keras.ops.convert_to_numpy(first([x_cf, g_cf]))
    np.testing.assert_allclose(out.transpose(0, 2, 3, 1), expected, rtol=1e-5, atol=1e-6)


def test_attention_gate_map_is_per_pixel_and_follows_the_gating_signal():
    x, g = random_inputs([(1, 4, 4, 3), (1, 4, 4, 3)], seed=3)
    gate = AttentionGate(inter_channels=2)
    gate.build([x.shape, g.shape])
    # Positive weights and bias: the ReLU passes, so a change of g must reach alpha.
    gate.skip_projection.set_weights([np.full((1, 1, 3, 2), 0.1, "float32")])
    gate.gating_projection.set_weights([np.full((1, 1, 3, 2), 0.5, "float32"), np.full(2, 20.0, "float32")])
    gate.psi.set_weights([np.full((1, 1, 2, 1), 0.1, "float32"), np.full(1, -4.0, "float32")])
    moved = g.copy()
    moved[0, 1, 2] += 5.0
    a, b = (keras.ops.convert_to_numpy(gate.compute_attention([x, gating])) for gating in (g, moved))
    assert {tuple(p[1:3]) for p in np.argwhere(np.abs(a - b) > 1e-7)} == {(1, 2)}


@pytest.mark.parametrize("inter_channels", [0, -3, 2.5, True])
def test_attention_gate_bad_inter_channels(inter_channels):
    with pytest.raises(ValueError, match=f"inter_channels={inter_channels}"):
        AttentionGate(inter_channels=inter_channels)


def test_attention_gate_needs_matching_sizes_and_two_inputs():
    with pytest.raises(ValueError, match="same height and width"):
        AttentionGate()([np.zeros((1, 8, 8, 2), "float32"), np.zeros((1, 4, 4, 2), "float32")])
    with pytest.raises(ValueError, match=r"list \[x, g\]"):
        AttentionGate().build((1, 8, 8, 2))


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize(
    "input_shape, options",
    [
        ((32, 32, 1), SMALL),
        ((64, 48, 3), SMALL),
        ((32, 32, 1), {"filters": 2, "depth": 1, "batchnorm": True, "upsampling": "bilinear"}),
    ],
)
def test_output_shape_and_probabilities(input_shape, options):
    model = build_attention_unet(input_shape=input_shape, **options)
    assert model.inputs[0].name == "ct_slices" and model.output_names == ["probabilities"]
    assert tuple(model.output.shape) == (None,) + input_shape[:2] + (3,)
    probs = keras.ops.convert_to_numpy(model(random_inputs([(2,) + input_shape])))
    assert probs.shape == (2,) + input_shape[:2] + (3,)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert probs.min() >= 0.0


@pytest.mark.parametrize("filters, depth, in_channels", [(4, 2, 1), (3, 3, 3), (1, 2, 1)])
def test_gates_on_every_skip_and_nothing_else_added(filters, depth, in_channels):
    shape = (32, 32, in_channels)
    unet = build_unet(input_shape=shape, filters=filters, depth=depth)
    model = build_attention_unet(input_shape=shape, filters=filters, depth=depth)
    gates = [layer for layer in model.layers if isinstance(layer, AttentionGate)]
    assert [gate.name for gate in gates] == [f"decoder{level}_gate" for level in range(depth, 0, -1)]
    assert [gate.inter_channels for gate in gates] == [
        max(1, filters * 2 ** (level - 1) // 2) for level in range(depth, 0, -1)
    ]
    assert model.count_params() - unet.count_params() == gate_param_count(filters, depth)
    assert [l.name for l in model.layers if not isinstance(l, AttentionGate)] == [l.name for l in unet.layers]


def test_parameter_count_is_pinned():
    small = build_attention_unet(input_shape=(32, 32, 1), **SMALL)
    # U-Net 7407 (test_unet) + gates: level 1 (C=4, F_int=2) 21, level 2 (C=8, F_int=4) 73.
    assert gate_param_count(4, 2) == 21 + 73
    assert small.count_params() == 7407 + 94 == 7501


def test_parameter_count_at_the_default_configuration():
    model = build_attention_unet(input_shape=(256, 256, 1))
    # U-Net 31_030_723 + gates 4_161 + 16_513 + 65_793 + 262_657.
    assert gate_param_count(64, 4) == 349_124
    assert model.count_params() == 31_030_723 + 349_124 == 31_379_847


def test_open_gates_compute_exactly_the_unet_and_the_maps_can_be_read():
    keras.utils.set_random_seed(3)
    unet = build_unet(input_shape=(32, 32, 1), **SMALL)
    model = build_attention_unet(input_shape=(32, 32, 1), **SMALL)
    for layer in unet.layers:
        if layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
    x = random_inputs([(2, 32, 32, 1)])
    # The maps of the fresh gates, read as we will for overlays: one per pixel of the skip.
    for level, size in ((1, 32), (2, 16)):
        gate = model.get_layer(f"decoder{level}_gate")
        gate_inputs = keras.Model(model.input, gate.input)(x)  # [skip, gating signal]
        alpha = keras.ops.convert_to_numpy(gate.compute_attention(gate_inputs))
        assert alpha.shape == (2, size, size, 1) and 0.0 <= alpha.min() and alpha.max() <= 1.0
        assert alpha.std() > 1e-4
    # alpha = 1 everywhere (psi kernel 0, bias +40): the gated skips are the skips.
    for gate in (model.get_layer("decoder1_gate"), model.get_layer("decoder2_gate")):
        kernel, bias = gate.psi.get_weights()
        gate.psi.set_weights([np.zeros_like(kernel), np.full_like(bias, 40.0)])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), keras.ops.convert_to_numpy(unet(x)), atol=1e-6
    )


def test_channels_first_computes_the_same_model():
    keras.utils.set_random_seed(4)
    last = build_attention_unet(input_shape=(32, 32, 2), **SMALL)
    x = random_inputs([(2, 32, 32, 2)])
    expected = keras.ops.convert_to_numpy(last(x))
    with image_data_format("channels_first"):
        first = build_attention_unet(input_shape=(2, 32, 32), **SMALL)
        first.set_weights(last.get_weights())
        assert tuple(first.output.shape) == (None, 3, 32, 32)
        probs = keras.ops.convert_to_numpy(first(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(probs.transpose(0, 2, 3, 1), expected, atol=1e-5)


def test_keras_save_and_load_gives_identical_outputs(tmp_path):
    model = build_attention_unet(input_shape=(32, 32, 2), **SMALL, batchnorm=True, dropout=0.3)
    data = random_inputs([(2, 32, 32, 2)])
    original, reloaded, clone = save_and_reload(model, tmp_path / "model.keras", data)
    np.testing.assert_array_equal(original, reloaded)
    assert clone.count_params() == model.count_params()
    assert isinstance(clone.get_layer("decoder1_gate"), AttentionGate)
    assert clone.inputs[0].name == "ct_slices" and clone.output_names == ["probabilities"]


def test_one_fit_step_trains():
    keras.utils.set_random_seed(0)
    model = build_attention_unet(input_shape=(32, 32, 1), **SMALL, batchnorm=True)
    compile_as_fit(model, 1e-2)
    x = random_inputs([(2, 32, 32, 1)])
    y = keras.utils.to_categorical(np.random.default_rng(0).integers(0, 3, (2, 32, 32)), 3)
    before = [w.numpy().copy() for w in model.trainable_weights]
    loss = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss) and 0.5 < loss < 3.0  # ≈ ln 3 at initialization
    changed = [not np.allclose(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert all(changed)
    gate_weights = model.get_layer("decoder1_gate").trainable_weights
    assert len(gate_weights) == 5  # W_x, W_g, b_g, psi, b_psi: all among the trained weights


@pytest.mark.parametrize("policy, compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_keeps_a_float32_output(policy, compute):
    with dtype_policy(policy):
        model = build_attention_unet(input_shape=(32, 32, 1), **SMALL)
        gate = model.get_layer("decoder1_gate")
        assert gate.compute_dtype == compute and gate.psi.compute_dtype == compute
        assert all(w.dtype == "float32" for w in gate.weights)
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
        ({"upsampling": "cubic"}, "upsampling='cubic'"),
        ({"input_shape": (100, 96, 1)}, "height 100 .* nearest valid height is 96"),
        ({"input_shape": (96, 120, 1)}, "width 120 .* nearest valid width is 128"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(options, match):
    options = {"input_shape": (64, 64, 1), **options}
    with pytest.raises(ValueError, match=match):
        build_attention_unet(**options)



def test_docstring_examples_run():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(verbose=False)
    for obj, module in ((AttentionGate, attention_gate_module), (build_attention_unet, unet_module)):
        for test in finder.find(obj, module=module, globs=vars(module)):
            runner.run(test)
    assert runner.tries >= 4 and runner.failures == 0
