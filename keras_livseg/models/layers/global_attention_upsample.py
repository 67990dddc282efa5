"""Global Attention Upsample (GAU), from the Pyramid Attention Network (Li et al., BMVC 2018)."""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_livseg.models._utils import (
    channel_axis,
    check_positive_int,
    spatial_axes,
    spatial_shape,
)
from keras_livseg.models.layers._conv_bn import ConvBNReLU


@keras.saving.register_keras_serializable(package="keras_livseg")
class GlobalAttentionUpsample(layers.Layer):
    """Global Attention Upsample: high-level context weights low-level detail.

    Li et al. 2018 (arXiv 1805.10180), Section 3.3, as in
    segmentation_models.pytorch's ``GAUBlock``; called on ``[low, high]``::

        detail  = ConvBNReLU3x3(low)                                  # filters channels
        weights = sigmoid(Conv1x1(GlobalAvgPool(high)))               # (batch, 1, 1, filters)
        y       = detail ⊙ weights + upsample(high, size of low)

    ``high`` is projected to ``filters`` channels by a 1x1 ConvBNReLU (created in
    ``build``) only when it has a different number of channels. Upsampling is
    bilinear to the exact size of ``low``, so the levels need not differ by exactly
    2x. The channel attention has no batch norm after the global pooling (the paper's
    "1x1 conv with BN"): at batch size 1 in training BN would turn every weight into
    ``sigmoid(beta)``, independent of the image.

    Args:
        filters: int. Output channels. Defaults to ``256``.
        **kwargs: standard ``keras.layers.Layer`` arguments.

    Input shape:
        A list ``[low, high]`` of 4D tensors with static height and width: low-level
        features ``(batch, H, W, C_low)`` and high-level ``(batch, h, w, C_high)``.

    Output shape:
        ``(batch, H, W, filters)``.

    Example:

    >>> import numpy as np
    >>> gau = GlobalAttentionUpsample(filters=8)
    >>> low, high = np.ones((2, 16, 16, 4), "float32"), np.ones((2, 8, 8, 8), "float32")
    >>> tuple(gau([low, high]).shape)
    (2, 16, 16, 8)
    """

    def __init__(self, filters: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.filters = check_positive_int("filters", filters, "GlobalAttentionUpsample")
        policy = self.dtype_policy
        self.detail = ConvBNReLU(filters, 3, dtype=policy, name="detail")
        self.attention = layers.Conv2D(
            filters, 1, activation="sigmoid", data_format=keras.config.image_data_format(),
            dtype=policy, name="attention",
        )
        self.high_projection = None
        self._low_size = None

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2 or not isinstance(
            input_shape[0], (list, tuple)
        ):
            raise ValueError(
                f"GlobalAttentionUpsample: expects a list [low, high] of two 4D tensors, got "
                f"input_shape={input_shape}."
            )
        low_shape, high_shape = (tuple(s) for s in input_shape)
        height, width = spatial_shape(low_shape)
        if height is None or width is None:
            raise ValueError(
                f"GlobalAttentionUpsample: the low-level height and width must be static, got "
                f"{low_shape}."
            )
        self._low_size = (height, width)
        self.detail.build(low_shape)
        high_channels = high_shape[channel_axis()]
        if high_channels != self.filters:
            self.high_projection = ConvBNReLU(
                self.filters, 1, dtype=self.dtype_policy, name="high_projection"
            )
            self.high_projection.build(high_shape)
        pooled_shape = list(high_shape)
        for axis in spatial_axes():
            pooled_shape[axis] = 1
        pooled_shape[channel_axis()] = self.filters
        self.attention.build(tuple(pooled_shape))
        self.built = True

    def call(self, inputs, training=None):
        low, high = inputs
        if self.high_projection is not None:
            high = self.high_projection(high, training=training)
        weights = self.attention(ops.mean(high, axis=spatial_axes(), keepdims=True))
        detail = self.detail(low, training=training)
        upsampled = ops.image.resize(
            high, self._low_size, interpolation="bilinear",
            data_format=keras.config.image_data_format(),
        )
        return detail * weights + upsampled

    def compute_output_shape(self, input_shape):
        shape = list(input_shape[0])
        shape[channel_axis()] = self.filters
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters})
        return config
