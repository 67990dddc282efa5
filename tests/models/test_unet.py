"""U-Net and TAM-U-Net: shapes, parameter counts, TAM placement, save/load, training, registry."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from models_testing import compile_as_fit, dtype_policy, random_inputs, save_and_reload

from keras_livseg.models import build_model
from keras_livseg.models.layers import TumorAttention
from keras_livseg.models.unet import build_tam_unet, build_unet, expand_tam_stages

SMALL = {"filters": 4, "depth": 2}


def unet_param_count(in_channels, filters, depth, num_classes):
    """Parameters of build_unet without batch norm, counted by hand."""
    def conv(k, cin, cout):
        return k * k * cin * cout + cout

    total, cin = 0, in_channels
    for level in range(depth):
        f = filters * 2**level
        total += conv(3, cin, f) + conv(3, f, f)
        cin = f
    f_bottom = filters * 2**depth
    total += conv(3, cin, f_bottom) + conv(3, f_bottom, f_bottom)
    cin = f_bottom
    for level in reversed(range(depth)):
        f = filters * 2**level
        total += conv(2, cin, f) + conv(3, 2 * f, f) + conv(3, f, f)
        cin = f
    return total + conv(1, cin, num_classes)


def tam_param_count(filters, depth, mode="channel"):
    channels = [filters * 2**i for i in range(depth)] * 2 + [filters * 2**depth]
    return sum(c * c + c if mode == "channel" else c + 1 for c in channels)


@pytest.mark.parametrize("name", ["unet", "tam_unet"])
@pytest.mark.parametrize(
    "input_shape, options",
    [
        ((32, 32, 1), SMALL),
        ((64, 48, 3), SMALL),
        ((16, 40, 5), {"filters": 2, "depth": 3}),
        ((32, 32, 1), {"filters": 2, "depth": 1, "batchnorm": True, "upsampling": "bilinear"}),
    ],
)
def test_output_shapes_and_probabilities(name, input_shape, options):
    model = build_model(name, input_shape=input_shape, **options)
    assert model.inputs[0].name == "ct_slices" and model.output_names == ["probabilities"]
    assert tuple(model.output.shape) == (None,) + input_shape[:2] + (3,)
    probs = keras.ops.convert_to_numpy(model(random_inputs([(2,) + input_shape])))
    assert probs.shape == (2,) + input_shape[:2] + (3,)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert probs.min() >= 0.0


def test_sigmoid_head_is_per_class():
    model = build_unet(input_shape=(32, 32, 1), num_classes=2, head="sigmoid", **SMALL)
    probs = keras.ops.convert_to_numpy(model(random_inputs([(2, 32, 32, 1)])))
    assert probs.shape == (2, 32, 32, 2)
    assert 0.0 <= probs.min() and probs.max() <= 1.0
    assert not np.allclose(probs.sum(-1), 1.0, atol=1e-3)
    single = build_unet(input_shape=(32, 32, 1), num_classes=1, head="sigmoid", **SMALL)
    assert tuple(single.output.shape) == (None, 32, 32, 1)


def test_parameter_count_is_pinned():
    small = build_unet(input_shape=(32, 32, 1), **SMALL)
    assert small.count_params() == unet_param_count(1, 4, 2, 3) == 7407
    # The paper's configuration (base 64, depth 4) on one 256x256 slice.
    paper = build_model("unet", input_shape=(256, 256, 1))
    assert paper.count_params() == unet_param_count(1, 64, 4, 3) == 31_030_723
    assert build_model("tam_unet", input_shape=(256, 256, 1)).count_params() == (
        31_030_723 + tam_param_count(64, 4)
    )


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize("filters, depth, in_channels", [(4, 2, 1), (3, 3, 3)])
def test_unet_and_tam_unet_differ_by_exactly_the_tam_parameters(mode, filters, depth, in_channels):
    shape = (32, 32, in_channels)
    unet = build_unet(input_shape=shape, filters=filters, depth=depth)
    tam = build_tam_unet(input_shape=shape, filters=filters, depth=depth, tam_mode=mode)
    tams = [layer for layer in tam.layers if isinstance(layer, TumorAttention)]
    assert len(tams) == 2 * depth + 1
    assert tam.count_params() - unet.count_params() == tam_param_count(filters, depth, mode)
    assert tam.count_params() - unet.count_params() == sum(t.count_params() for t in tams)


def test_tam_stages_are_configurable():
    assert expand_tam_stages(("decoder",), depth=2) == ("decoder2", "decoder1")
    assert expand_tam_stages(["encoder1", "bottleneck"], depth=3) == ("encoder1", "bottleneck")
    model = build_tam_unet(input_shape=(32, 32, 1), tam_stages=("bottleneck", "decoder1"), **SMALL)
    assert sorted(l.name for l in model.layers if isinstance(l, TumorAttention)) == [
        "bottleneck_tam",
        "decoder1_tam",
    ]
    with pytest.raises(ValueError, match="'decoder7'"):
        build_tam_unet(input_shape=(32, 32, 1), tam_stages=("decoder7",), **SMALL)
    with pytest.raises(ValueError, match="tam_mode='pixel'"):
        build_tam_unet(input_shape=(32, 32, 1), tam_mode="pixel", **SMALL)


def test_tam_gates_inside_the_network():
    # Same convolution weights; open gates (A = 1) make TAM-U-Net compute exactly the U-Net.
    keras.utils.set_random_seed(3)
    unet = build_unet(input_shape=(32, 32, 1), **SMALL)
    tam = build_tam_unet(input_shape=(32, 32, 1), **SMALL)
    for layer in unet.layers:
        if layer.weights:
            tam.get_layer(layer.name).set_weights(layer.get_weights())
    x = random_inputs([(2, 32, 32, 1)])
    for layer in tam.layers:
        if isinstance(layer, TumorAttention):
            kernel, bias = layer.get_weights()
            layer.set_weights([np.zeros_like(kernel), np.full_like(bias, 40.0)])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(tam(x)), keras.ops.convert_to_numpy(unet(x)), atol=1e-6)
    # Closed gates (large negative bias) zero the features: only the head bias is left.
    for layer in tam.layers:
        if isinstance(layer, TumorAttention):
            kernel, bias = layer.get_weights()
            layer.set_weights([np.zeros_like(kernel), np.full_like(bias, -40.0)])
    probs = keras.ops.convert_to_numpy(tam(x))
    bias = tam.get_layer("logits").bias.numpy()
    expected = np.exp(bias) / np.exp(bias).sum()
    np.testing.assert_allclose(probs, np.broadcast_to(expected, probs.shape), atol=1e-6)


@pytest.mark.parametrize(
    "builder, options",
    [
        (build_unet, {"batchnorm": True, "dropout": 0.3}),
        (build_tam_unet, {"tam_mode": "spatial", "upsampling": "bilinear"}),
    ],
)
def test_keras_save_and_load_gives_identical_outputs(tmp_path, builder, options):
    model = builder(input_shape=(32, 32, 2), **SMALL, **options)
    original, reloaded, clone = save_and_reload(model, tmp_path / "model.keras", random_inputs([(2, 32, 32, 2)]))
    np.testing.assert_array_equal(original, reloaded)
    assert clone.count_params() == model.count_params()
    assert clone.inputs[0].name == "ct_slices" and clone.output_names == ["probabilities"]


@pytest.mark.parametrize("name", ["unet", "tam_unet"])
def test_one_fit_step_trains(name):
    model = build_model(name, input_shape=(32, 32, 1), **SMALL, batchnorm=True)
    compile_as_fit(model, 1e-2)
    x = random_inputs([(2, 32, 32, 1)])
    y = keras.utils.to_categorical(np.random.default_rng(0).integers(0, 3, (2, 32, 32)), 3)
    before = [w.numpy().copy() for w in model.trainable_weights]
    loss = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss) and 0.5 < loss < 3.0  # ≈ ln 3 at initialization
    changed = [not np.allclose(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert all(changed)


@pytest.mark.parametrize("name", ["unet", "tam_unet"])
def test_mixed_bfloat16_computes_in_bfloat16_and_outputs_float32(name):
    with dtype_policy("mixed_bfloat16"):
        model = build_model(name, input_shape=(32, 32, 1), **SMALL)
        assert model.get_layer("encoder1_1_conv").compute_dtype == "bfloat16"
        assert model.get_layer("logits").compute_dtype == "bfloat16"
        assert model.get_layer("encoder1_1_conv").kernel.dtype == "float32"
        assert model.output.dtype == "float32"
        probs = model(random_inputs([(1, 32, 32, 1)]))
        assert keras.backend.standardize_dtype(probs.dtype) == "float32"
        np.testing.assert_allclose(keras.ops.convert_to_numpy(probs).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"filters": 0}, "filters=0"),
        ({"filters": -8}, "filters=-8"),
        ({"depth": 0}, "depth=0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"head": "relu"}, "head='relu'"),
        ({"upsampling": "cubic"}, "upsampling='cubic'"),
        ({"num_classes": 1}, "num_classes=1"),
        ({"input_shape": (100, 96, 1)}, "height 100 .* nearest valid height is 96"),
        ({"input_shape": (96, 120, 1)}, "width 120 .* nearest valid width is 128"),
        ({"input_shape": (None, 96, 1)}, "height=None"),
        ({"input_shape": (96, 96)}, r"input_shape=\(96, 96\)"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(options, match):
    options = {"input_shape": (64, 64, 1), **options}
    with pytest.raises(ValueError, match=match):
        build_model("unet", **options)

