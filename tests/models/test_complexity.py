"""Parameters, FLOPs and throughput: counted numbers against hand computations."""

from __future__ import annotations

import keras

from keras_livseg.models import build_model
from keras_livseg.models.complexity import count_flops, count_parameters, measure_throughput


def test_flops_of_single_layers_by_hand():
    conv = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, padding="same", use_bias=False)])
    assert count_flops(conv) == 2 * 16 * 16 * 3 * 3 * 3 * 8
    depthwise = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)])
    assert count_flops(depthwise) == 2 * 16 * 16 * 3 * 3 * 3
    # A transposed convolution scatters each input pixel through the kernel: input-sized count.
    transposed = keras.Sequential([keras.Input((16, 16, 3)),
                                   keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", use_bias=False)])
    assert count_flops(transposed) == 2 * 16 * 16 * 3 * 3 * 3 * 8


def test_parameters_split_trainable_and_statistics():
    model = build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2, batchnorm=True)
    counts = count_parameters(model)
    bn_channels = 2 * (4 + 8) + 2 * 16 + (4 + 8) * 3  # encoder, bottleneck, decoder (up conv + two convs)
    assert counts["non_trainable"] == 2 * bn_channels  # moving mean and variance
    assert counts["total"] == model.count_params() == counts["trainable"] + counts["non_trainable"]


def test_throughput_reports_positive_rates():
    model = build_model("unet", input_shape=(32, 32, 1), filters=2, depth=1)
    speed = measure_throughput(model, batch_size=2, train_steps=2, warmup_steps=1)
    assert speed["batch_size"] == 2 and speed["steps"] == 2
    assert speed["train_slices_per_s"] > 0 and speed["inference_slices_per_s"] > speed["train_slices_per_s"] / 10
