"""Feature Pyramid Attention (FPA), from the Pyramid Attention Network (Li et al., BMVC 2018)."""

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


def _half(size: int) -> int:
    """Spatial size after a 2x2 max pool with "same" padding."""
    return (size + 1) // 2


@keras.saving.register_keras_serializable(package="keras_livseg")
class FeaturePyramidAttention(layers.Layer):
    """Feature Pyramid Attention: a U-shaped 7/5/3 pyramid gates the projected input.

    Li, Xiong, An, Wang, "Pyramid Attention Network for Semantic Segmentation"
    (BMVC 2018, arXiv 1805.10180), Section 3.2, in the form of
    segmentation_models.pytorch's ``FPABlock``::

        mid  = ConvBNReLU1x1(x)                                   # filters channels
        g    = broadcast(ReLU(Conv1x1(GlobalAvgPool(x))))         # global branch
        x1   = Conv7x7(MaxPool(x))                                 # 1/2
        x2   = Conv5x5(MaxPool(x1))                                # 1/4
        x3   = Conv3x3(Conv3x3(MaxPool(x2)))                       # 1/8
        p    = up(Conv7x7'(x1) + up(Conv5x5'(x2) + up(x3)))        # back to 1/1
        y    = p ⊙ mid + g

    The pyramid has ``pyramid_filters`` channels (1 by default, a spatial attention
    map as in the reference implementations). Pooling uses "same" padding and every
    upsampling resizes bilinearly to the exact size of the level above, so any static
    feature size works (8 → 4 → 2 → 1 → 2 → 4 → 8, and 7 → 4 → 2 → 1 → 2 → 4 → 7).

    Batch-size-1 trap: neither the global branch (one value per channel after
    pooling) nor, by default, the pyramid (one channel, 1x1 at its coarsest level on
    a 256x256 input seen at stride 32) uses batch normalization: with one sample per
    batch in training, BN there normalizes a single value to ``beta`` and the branch
    carries no information. ``pyramid_batchnorm=True`` restores the paper's BN in the
    pyramid for large batches.

    Args:
        filters: int. Output channels. Defaults to ``256``.
        pyramid_filters: int. Channels of the pyramid: ``1`` (default) or ``filters``.
        pyramid_batchnorm: bool. Batch norm in the pyramid convolutions. Defaults to
            ``False`` (see above).
        **kwargs: standard ``keras.layers.Layer`` arguments.

    Input shape:
        4D image tensor with static height and width, ``(batch, H, W, C)``.

    Output shape:
        ``(batch, H, W, filters)``.

    Example:

    >>> import numpy as np
    >>> fpa = FeaturePyramidAttention(filters=8)
    >>> tuple(fpa(np.ones((2, 8, 8, 16), "float32")).shape)
    (2, 8, 8, 8)
    """

    def __init__(
        self,
        filters: int = 256,
        pyramid_filters: int = 1,
        pyramid_batchnorm: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = check_positive_int("filters", filters, "FeaturePyramidAttention")
        check_positive_int("pyramid_filters", pyramid_filters, "FeaturePyramidAttention")
        if pyramid_filters not in (1, filters):
            raise ValueError(
                f"FeaturePyramidAttention: `pyramid_filters` must be 1 or filters={filters}, got "
                f"pyramid_filters={pyramid_filters!r}."
            )
        self.pyramid_filters = pyramid_filters
        self.pyramid_batchnorm = bool(pyramid_batchnorm)
        policy = self.dtype_policy
        data_format = keras.config.image_data_format()

        def pyramid_conv(kernel_size, name):
            return ConvBNReLU(
                pyramid_filters, kernel_size, use_batchnorm=self.pyramid_batchnorm,
                dtype=policy, name=name,
            )

        self.mid = ConvBNReLU(filters, 1, dtype=policy, name="mid")
        self.global_conv = layers.Conv2D(
            filters, 1, activation="relu", data_format=data_format, dtype=policy, name="global_conv"
        )
        self.pool = layers.MaxPooling2D(2, padding="same", data_format=data_format, dtype=policy, name="pool")
        self.down1 = pyramid_conv(7, "down1")
        self.down2 = pyramid_conv(5, "down2")
        self.down3a = pyramid_conv(3, "down3a")
        self.down3b = pyramid_conv(3, "down3b")
        self.conv2 = pyramid_conv(5, "conv2")
        self.conv1 = pyramid_conv(7, "conv1")
        self._sizes = None

    def build(self, input_shape):
        height, width = spatial_shape(input_shape)
        if height is None or width is None:
            raise ValueError(
                f"FeaturePyramidAttention: height and width must be static, got input_shape={input_shape}."
            )
        sizes = [(height, width)]
        for _ in range(3):
            sizes.append((_half(sizes[-1][0]), _half(sizes[-1][1])))
        self._sizes = sizes

        def shape_at(level, channels):
            shape = list(input_shape)
            h_axis, w_axis = spatial_axes()
            shape[h_axis], shape[w_axis] = sizes[level]
            shape[channel_axis()] = channels
            return tuple(shape)

        self.mid.build(input_shape)
        pooled_shape = list(input_shape)
        for axis in spatial_axes():
            pooled_shape[axis] = 1
        self.global_conv.build(tuple(pooled_shape))
        self.down1.build(shape_at(1, input_shape[channel_axis()]))
        self.down2.build(shape_at(2, self.pyramid_filters))
        self.down3a.build(shape_at(3, self.pyramid_filters))
        self.down3b.build(shape_at(3, self.pyramid_filters))
        self.conv2.build(shape_at(2, self.pyramid_filters))
        self.conv1.build(shape_at(1, self.pyramid_filters))
        self.built = True

    def _resize(self, x, level):
        return ops.image.resize(
            x, self._sizes[level], interpolation="bilinear",
            data_format=keras.config.image_data_format(),
        )

    def call(self, inputs, training=None):
        mid = self.mid(inputs, training=training)
        pooled = ops.mean(inputs, axis=spatial_axes(), keepdims=True)
        global_branch = self.global_conv(pooled)

        x1 = self.down1(self.pool(inputs), training=training)  # 1/2
        x2 = self.down2(self.pool(x1), training=training)  # 1/4
        x3 = self.down3b(self.down3a(self.pool(x2), training=training), training=training)  # 1/8

        x = self.conv2(x2, training=training) + self._resize(x3, 2)  # 1/4
        x = self.conv1(x1, training=training) + self._resize(x, 1)  # 1/2
        pyramid = self._resize(x, 0)  # 1/1
        return pyramid * mid + global_branch

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        shape[channel_axis()] = self.filters
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "pyramid_filters": self.pyramid_filters,
                "pyramid_batchnorm": self.pyramid_batchnorm,
            }
        )
        return config
