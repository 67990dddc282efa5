"""Atrous Spatial Pyramid Pooling (Chen et al., DeepLabv3, arXiv 1706.05587)."""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_livseg.models._utils import channel_axis, check_positive_int, check_rate, spatial_axes
from keras_livseg.models.layers._conv_bn import ConvBNReLU


@keras.saving.register_keras_serializable(package="keras_livseg")
class ASPP(layers.Layer):
    """Atrous Spatial Pyramid Pooling: parallel dilated convolutions plus image pooling.

    The Enhanced PAN paper (Swapna, Sujatha, Step 4) applies it to the deepest encoder
    features with dilation rates 6, 12, 18 and an image-pooling branch::

        b0 = ConvBNReLU1x1(x)
        b_k = ConvBNReLU3x3(x, dilation=rate_k)          for rate_k in rates
        b_pool = broadcast(ReLU(Conv1x1(GlobalAvgPool(x))))
        y = Dropout(ConvBNReLU1x1(concat(b0, b_1..b_K, b_pool)))

    The image-pooling branch has no batch norm (DeepLab has one): after global
    pooling a batch-size-1 training step would normalize a single value per channel
    to ``beta`` and erase the branch. On feature maps smaller than a rate, the
    dilated taps fall in the zero padding and the branch reduces to its centre tap,
    as in every DeepLab implementation; the branches are computed that way, without
    TensorFlow's slow SpaceToBatch dilated convolution (see
    :func:`~keras_livseg.models.layers._conv_bn.dilated_conv_same`; same weights
    and results).

    Args:
        filters: int. Channels of every branch and of the output. Defaults to ``256``.
        rates: tuple of int. Dilation rates of the 3x3 branches. Defaults to
            ``(6, 12, 18)``.
        dropout: float in [0, 1). Dropout after the projection. Defaults to ``0.1``.
        **kwargs: standard ``keras.layers.Layer`` arguments.

    Input shape:
        4D image tensor ``(batch, H, W, C)`` (or channels_first).

    Output shape:
        ``(batch, H, W, filters)``.

    Example:

    >>> import numpy as np
    >>> aspp = ASPP(filters=8, rates=(2, 4))
    >>> tuple(aspp(np.ones((2, 16, 16, 4), "float32")).shape)
    (2, 16, 16, 8)
    """

    def __init__(self, filters: int = 256, rates=(6, 12, 18), dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.filters = check_positive_int("filters", filters, "ASPP")
        if not isinstance(rates, (tuple, list)) or not rates:
            raise ValueError(f"ASPP: `rates` must be a non-empty tuple of positive ints, got rates={rates!r}.")
        for rate in rates:
            check_positive_int("rates", rate, "ASPP")
        self.rates = tuple(int(r) for r in rates)
        self.dropout = check_rate("dropout", dropout, "ASPP")
        policy = self.dtype_policy
        self.branch_1x1 = ConvBNReLU(filters, 1, dtype=policy, name="branch_1x1")
        self.branch_atrous = [
            ConvBNReLU(filters, 3, dilation_rate=rate, dtype=policy, name=f"branch_rate{rate}")
            for rate in self.rates
        ]
        self.pool_conv = layers.Conv2D(
            filters, 1, activation="relu", data_format=keras.config.image_data_format(),
            dtype=policy, name="pool_conv",
        )
        self.project = ConvBNReLU(filters, 1, dtype=policy, name="project")
        self.project_dropout = layers.Dropout(self.dropout, dtype=policy, name="project_dropout")

    def build(self, input_shape):
        self.branch_1x1.build(input_shape)
        for branch in self.branch_atrous:
            branch.build(input_shape)
        pooled_shape = list(input_shape)
        for axis in spatial_axes():
            pooled_shape[axis] = 1
        self.pool_conv.build(tuple(pooled_shape))
        concat_shape = list(input_shape)
        concat_shape[channel_axis()] = self.filters * (len(self.rates) + 2)
        self.project.build(tuple(concat_shape))
        self.built = True

    def call(self, inputs, training=None):
        first = self.branch_1x1(inputs, training=training)
        branches = [first]
        branches += [branch(inputs, training=training) for branch in self.branch_atrous]
        pooled = self.pool_conv(ops.mean(inputs, axis=spatial_axes(), keepdims=True))
        branches.append(ops.broadcast_to(pooled, ops.shape(first)))
        x = ops.concatenate(branches, axis=channel_axis())
        x = self.project(x, training=training)
        return self.project_dropout(x, training=training)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        shape[channel_axis()] = self.filters
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "rates": self.rates, "dropout": self.dropout})
        return config
