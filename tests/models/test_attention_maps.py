"""Attention gates as maps and Grad-CAM: hand-computable cases."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_livseg.models import build_model
from keras_livseg.models.attention_maps import attention_maps, default_cam_layer, gate_maps, grad_cam


def test_tam_gate_maps_equal_the_sigmoid_of_their_bias():
    model = build_model("tam_unet", input_shape=(32, 32, 1), filters=4, depth=2)
    for index, layer in enumerate(l for l in model.layers if l.name.endswith("_tam")):
        kernel, bias = layer.gate.get_weights()
        layer.gate.set_weights([np.zeros_like(kernel), np.full_like(bias, index - 2.0)])
    maps = gate_maps(model, np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype("float32"))
    assert list(maps) == ["encoder1_tam", "encoder2_tam", "bottleneck_tam", "decoder2_tam", "decoder1_tam"]
    for index, (name, value) in enumerate(maps.items()):
        assert value.shape == (2, 32, 32)  # every gate resized to the input
        np.testing.assert_allclose(value, 1 / (1 + np.exp(-(index - 2.0))), rtol=1e-5, err_msg=name)
    assert gate_maps(build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2), np.zeros((1, 32, 32, 1))) == {}


def identity_model():
    """features = (x, -x); tumour logit = features[0], other logits 0: a square of x lights the tumour."""
    inputs = keras.Input((16, 16, 1))
    features = keras.layers.Conv2D(2, 1, use_bias=False, name="features")(inputs)
    logits = keras.layers.Conv2D(3, 1, use_bias=False, name="logits")(features)
    model = keras.Model(inputs, keras.layers.Softmax(name="probabilities")(logits))
    model.get_layer("features").set_weights([np.array([[[[1.0, -1.0]]]], "float32")])
    model.get_layer("logits").set_weights([np.array([[[[0, 0, 1.0], [0, 0, 0]]]], "float32")])
    return model


def test_grad_cam_by_hand():
    x = np.zeros((1, 16, 16, 1), "float32")
    x[0, 4:9, 6:12, 0] = 5.0
    model = identity_model()
    # Tumour is assigned on the square only; the score's gradient reaches channel 0 there
    # (1 - p_tumour > 0) and channel 1 nowhere, so the map is relu(w0 * x): the square, scaled to 1.
    cam = grad_cam(model, x, class_index=2, layer_name="features")
    np.testing.assert_allclose(cam[0], (x[0, ..., 0] > 0).astype("float32"), atol=1e-6)
    # Liver is assigned nowhere: the whole slice is the region, the weights of x are negative
    # (more x, less liver) and relu leaves nothing.
    assert grad_cam(model, x, class_index=1, layer_name="features").max() == 0.0
    with pytest.raises(ValueError, match="no layer 'nope'"):
        grad_cam(model, x, 2, layer_name="nope")


def test_default_layer_and_the_maps_of_every_kind():
    model = build_model("tam_unet", input_shape=(32, 32, 1), filters=4, depth=2)
    assert default_cam_layer(model) == "bottleneck_tam"  # the deepest map, last of its size
    maps = attention_maps(model, np.random.default_rng(1).normal(size=(3, 32, 32, 1)).astype("float32"))
    assert list(maps) == ["attention gates (mean over layers)", "Grad-CAM tumour", "Grad-CAM liver"]
    for value in maps.values():
        assert value.shape == (3, 32, 32) and value.min() >= 0.0 and value.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("name", ["tam_unet", "attention_unet", "unet_cbam", "unet"])
def test_the_prepared_maps_equal_the_eager_ones(name):
    from keras_livseg.models.attention_maps import AttentionMaps

    model = build_model(name, input_shape=(32, 32, 1), filters=4, depth=2)
    prepared = AttentionMaps(model)
    for count in (3, 1):  # another batch size through the same prepared maps
        x = np.random.default_rng(count).normal(size=(count, 32, 32, 1)).astype("float32")
        eager, fast = attention_maps(model, x), prepared(x)
        assert list(fast) == list(eager)
        for key in eager:
            assert fast[key].shape == (count, 32, 32)
            np.testing.assert_allclose(fast[key], eager[key], atol=2e-4, err_msg=f"{name}: {key}")
