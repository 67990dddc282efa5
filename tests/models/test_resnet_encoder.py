"""The shared ResNet encoder: pyramid shapes, dilation, torchvision's parameter counts, bad options."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_livseg.models.resnet_encoder import RESNET_BLOCKS, build_resnet_encoder

TINY = {"blocks": (1, 1, 1, 1), "filters": (4, 8, 16, 32)}


def trainable(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize(
    "output_stride, expected",
    [
        (32, [(32, 32, 4), (16, 16, 4), (8, 8, 8), (4, 4, 16), (2, 2, 32)]),
        (16, [(32, 32, 4), (16, 16, 4), (8, 8, 8), (4, 4, 16), (4, 4, 32)]),
        (8, [(32, 32, 4), (16, 16, 4), (8, 8, 8), (8, 8, 16), (8, 8, 32)]),
    ],
)
def test_pyramid_shapes_and_dilation(output_stride, expected):
    encoder = build_resnet_encoder((64, 64, 3), output_stride=output_stride, **TINY)
    assert [tuple(t.shape[1:]) for t in encoder.outputs] == expected
    rates = {layer.name: layer.dilation_rate[0] for layer in encoder.layers
             if isinstance(layer, keras.layers.Conv2D) and layer.kernel_size == (3, 3)}
    # Dilated stages replace their stride: rate 2 in the first dilated stage, 4 in the next.
    assert rates["layer3_0_conv1"] == (2 if output_stride == 8 else 1)
    assert rates["layer4_0_conv2"] == {32: 1, 16: 2, 8: 4}[output_stride]
    assert rates["layer2_0_conv1"] == 1
    # Same weights whatever the stride: a dilated encoder takes a strided one's weights.
    assert trainable(encoder) == trainable(build_resnet_encoder((64, 64, 3), **TINY))


def test_trainable_parameters_equal_torchvision():
    # torchvision resnet18 / resnet34 without fc: 11,689,512 - 513,000 and 21,797,672 - 513,000.
    assert trainable(build_resnet_encoder((64, 64, 3), blocks=RESNET_BLOCKS["resnet18"])) == 11_176_512
    assert trainable(build_resnet_encoder((64, 64, 3), blocks=RESNET_BLOCKS["resnet34"])) == 21_284_672


def test_residual_identity_with_zeroed_branch():
    # With the second BN of every block scaling by zero, each block is relu(shortcut):
    # stage 1 (identity shortcuts) then passes the max-pooled stem through unchanged.
    encoder = build_resnet_encoder((32, 32, 1), blocks=(2, 1, 1, 1), filters=(4, 8, 16, 32))
    for layer in encoder.layers:
        if layer.name.endswith("_bn2"):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([np.zeros_like(gamma), beta, mean, var])
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 1)).astype("float32")
    p1, p2 = [keras.ops.convert_to_numpy(t) for t in encoder(x)[:2]]
    pooled = keras.ops.convert_to_numpy(
        keras.layers.MaxPooling2D(3, strides=2, padding="same")(p1)
    )
    np.testing.assert_allclose(p2, pooled, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"output_stride": 4}, "output_stride=4"),
        ({"blocks": (2, 2, 2)}, "4 entries"),
        ({"blocks": (2, 0, 2, 2)}, "positive integer"),
        ({"input_shape": (40, 64, 1)}, "nearest valid height is 32"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    options = {"input_shape": (64, 64, 1), **kwargs}
    with pytest.raises(ValueError, match=message):
        build_resnet_encoder(**options)
