"""Squeeze-and-Excitation channel attention (Hu et al., CVPR 2018)."""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_livseg.models._utils import channel_axis, check_positive_int, spatial_axes


@keras.saving.register_keras_serializable(package="keras_livseg")
class SqueezeExcitation(layers.Layer):
    """Squeeze-and-Excitation: rescale each channel by a learned gate in (0, 1).

    As in the Enhanced PAN paper (Swapna, Sujatha, Step 3) and Hu et al. 2018::

        z = GlobalAveragePool(F)                     # (batch, C)
        s = sigmoid(W_2 · ReLU(W_1 · z))             # W_1: C -> C // ratio, W_2: C/r -> C
        F' = s · F

    The two fully connected layers are 1x1 convolutions on the pooled 1x1 map, which
    is the same computation and keeps the layer independent of the data format.
    There is no batch normalization after the pooling, so the layer behaves the same
    at batch size 1 in training.

    Args:
        ratio: int. Reduction ratio ``r``; the bottleneck has ``channels // ratio``
            units. Must be positive and not larger than the input channels.
            Defaults to ``4``.
        **kwargs: standard ``keras.layers.Layer`` arguments.

    Input shape:
        4D image tensor, ``(batch, H, W, C)`` or ``(batch, C, H, W)``.

    Output shape:
        Same as the input.

    Example:

    >>> import numpy as np
    >>> se = SqueezeExcitation(ratio=2)
    >>> tuple(se(np.ones((1, 8, 8, 16), "float32")).shape)
    (1, 8, 8, 16)
    """

    def __init__(self, ratio: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.ratio = check_positive_int("ratio", ratio, "SqueezeExcitation")
        self.squeeze = None
        self.excite = None

    def build(self, input_shape):
        channels = input_shape[channel_axis()]
        if channels is None:
            raise ValueError(
                f"SqueezeExcitation: the channel dimension must be known, got input_shape={input_shape}."
            )
        if self.ratio > channels:
            raise ValueError(
                f"SqueezeExcitation: `ratio` must be positive and not larger than the input channels, "
                f"got ratio={self.ratio} channels={channels}; use ratio <= {channels}."
            )
        data_format = keras.config.image_data_format()
        pooled_shape = list(input_shape)
        for axis in spatial_axes():
            pooled_shape[axis] = 1
        self.squeeze = layers.Conv2D(
            channels // self.ratio, 1, activation="relu", data_format=data_format,
            dtype=self.dtype_policy, name="squeeze",
        )
        self.excite = layers.Conv2D(
            channels, 1, activation="sigmoid", data_format=data_format,
            dtype=self.dtype_policy, name="excite",
        )
        self.squeeze.build(tuple(pooled_shape))
        pooled_shape[channel_axis()] = channels // self.ratio
        self.excite.build(tuple(pooled_shape))
        self.built = True

    def call(self, inputs):
        pooled = ops.mean(inputs, axis=spatial_axes(), keepdims=True)
        return inputs * self.excite(self.squeeze(pooled))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"ratio": self.ratio})
        return config
