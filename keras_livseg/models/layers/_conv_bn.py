"""Conv-BatchNorm-ReLU, the unit the ASPP, FPA and GAU layers are assembled from."""

from __future__ import annotations

import keras
from keras import layers

from keras_livseg.models._utils import channel_axis


@keras.saving.register_keras_serializable(package="keras_livseg")
class ConvBNReLU(layers.Layer):
    """``Conv2D`` (no bias when normalized) → optional ``BatchNormalization`` → optional ReLU.

    Args:
        filters: int. Output channels.
        kernel_size: int. Square kernel size. Defaults to ``3``.
        dilation_rate: int. Atrous rate. Defaults to ``1``.
        use_batchnorm: bool. Batch norm after the convolution. Defaults to ``True``.
        activation: bool. ReLU at the end. Defaults to ``True``.
        **kwargs: standard ``keras.layers.Layer`` arguments.

    Input shape:
        4D image tensor. Output shape: same height and width (``"same"`` padding),
        ``filters`` channels.

    Example:

    >>> import numpy as np
    >>> tuple(ConvBNReLU(8)(np.ones((1, 16, 16, 3), "float32")).shape)
    (1, 16, 16, 8)
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int = 3,
        dilation_rate: int = 1,
        use_batchnorm: bool = True,
        activation: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.dilation_rate = dilation_rate
        self.use_batchnorm = use_batchnorm
        self.activation = activation
        self.conv = layers.Conv2D(
            filters, kernel_size, padding="same", dilation_rate=dilation_rate,
            use_bias=not use_batchnorm, data_format=keras.config.image_data_format(),
            dtype=self.dtype_policy, name="conv",
        )
        self.bn = (
            layers.BatchNormalization(axis=channel_axis(), dtype=self.dtype_policy, name="bn")
            if use_batchnorm
            else None
        )
        self.relu = layers.ReLU(dtype=self.dtype_policy, name="relu") if activation else None

    def build(self, input_shape):
        self.conv.build(input_shape)
        out_shape = self.conv.compute_output_shape(input_shape)
        if self.bn is not None:
            self.bn.build(out_shape)
        self.built = True

    def call(self, inputs, training=None):
        x = self.conv(inputs)
        if self.bn is not None:
            x = self.bn(x, training=training)
        if self.relu is not None:
            x = self.relu(x)
        return x

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "dilation_rate": self.dilation_rate,
                "use_batchnorm": self.use_batchnorm,
                "activation": self.activation,
            }
        )
        return config
