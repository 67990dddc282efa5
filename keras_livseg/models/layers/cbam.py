"""The Convolutional Block Attention Module (Woo et al., ECCV 2018)."""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_livseg.models._utils import channel_axis, check_positive_int, spatial_axes


@keras.saving.register_keras_serializable(package="keras_livseg")
class CBAM(layers.Layer):
    """CBAM: channel attention, then spatial attention, each a sigmoid gate.

    Eq. 1-3 of Woo et al. 2018, "CBAM: Convolutional Block Attention Module"
    (arXiv 1807.06521)::

        M_c = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))     # (batch, 1, 1, C), shared MLP
        F'  = M_c ⊙ F
        M_s = sigmoid(conv_kxk([AvgPool_c(F'); MaxPool_c(F')]))  # (batch, H, W, 1)
        F'' = M_s ⊙ F'

    The MLP is ``C -> C // ratio -> C`` with a ReLU between and biases on both layers
    (as nn.Linear in the authors' code), written as 1x1 convolutions on the pooled
    1x1 maps so that it is independent of the data format. Its hidden width is
    ``max(1, C // ratio)``: a block with fewer channels than ``ratio`` still gets a
    one-unit MLP instead of an error. The spatial convolution has a bias and no batch
    normalization, as in the paper's Eq. 3 (the authors' code puts a BN after a
    bias-free convolution), so the module behaves the same at batch size 1.

    Args:
        ratio: int. Reduction ratio ``r`` of the shared MLP. Defaults to ``16``
            (the paper's).
        kernel_size: int, odd. Size of the spatial attention's convolution. Defaults
            to ``7`` (the paper's best).
        **kwargs: standard ``keras.layers.Layer`` arguments.

    Input shape:
        4D image tensor, ``(batch, H, W, C)`` or ``(batch, C, H, W)``.

    Output shape:
        Same as the input.

    Example:

    >>> import numpy as np
    >>> cbam = CBAM(ratio=4, kernel_size=3)
    >>> features = np.ones((2, 8, 8, 16), "float32")
    >>> tuple(cbam(features).shape)
    (2, 8, 8, 16)
    >>> tuple(cbam.compute_attention(features).shape)   # the spatial map M_s
    (2, 8, 8, 1)
    """

    def __init__(self, ratio: int = 16, kernel_size: int = 7, **kwargs):
        super().__init__(**kwargs)
        self.ratio = check_positive_int("ratio", ratio, "CBAM")
        self.kernel_size = check_positive_int("kernel_size", kernel_size, "CBAM")
        if kernel_size % 2 == 0:
            raise ValueError(
                f"CBAM: `kernel_size` must be odd so the spatial map stays centred, got "
                f"kernel_size={kernel_size}; use {kernel_size + 1}."
            )
        data_format = keras.config.image_data_format()
        self.spatial_conv = layers.Conv2D(
            1, kernel_size, padding="same", use_bias=True, data_format=data_format,
            dtype=self.dtype_policy, name="spatial_conv",
        )
        self.channel_mlp_hidden = None
        self.channel_mlp_output = None

    def build(self, input_shape):
        channels = input_shape[channel_axis()]
        if channels is None:
            raise ValueError(f"CBAM: the channel dimension must be known, got input_shape={input_shape}.")
        hidden = max(1, channels // self.ratio)
        data_format = keras.config.image_data_format()
        self.channel_mlp_hidden = layers.Conv2D(
            hidden, 1, activation="relu", data_format=data_format, dtype=self.dtype_policy,
            name="channel_mlp_hidden",
        )
        self.channel_mlp_output = layers.Conv2D(
            channels, 1, data_format=data_format, dtype=self.dtype_policy, name="channel_mlp_output"
        )
        pooled_shape = list(input_shape)
        for axis in spatial_axes():
            pooled_shape[axis] = 1
        self.channel_mlp_hidden.build(tuple(pooled_shape))
        pooled_shape[channel_axis()] = hidden
        self.channel_mlp_output.build(tuple(pooled_shape))
        maps_shape = list(input_shape)
        maps_shape[channel_axis()] = 2
        self.spatial_conv.build(tuple(maps_shape))
        self.built = True

    def _ensure_built(self, inputs):
        if not self.built:
            self.build(tuple(inputs.shape))

    def compute_channel_attention(self, inputs):
        """The channel gate ``M_c``: ``(batch, 1, 1, C)`` (channels_last) in [0, 1]."""
        self._ensure_built(inputs)
        average = ops.mean(inputs, axis=spatial_axes(), keepdims=True)
        maximum = ops.max(inputs, axis=spatial_axes(), keepdims=True)
        return ops.sigmoid(self._shared_mlp(average) + self._shared_mlp(maximum))

    def _shared_mlp(self, pooled):
        return self.channel_mlp_output(self.channel_mlp_hidden(pooled))

    def _spatial_attention(self, refined):
        axis = channel_axis()
        maps = ops.concatenate(
            [ops.mean(refined, axis=axis, keepdims=True), ops.max(refined, axis=axis, keepdims=True)],
            axis=axis,
        )
        return ops.sigmoid(self.spatial_conv(maps))

    def compute_attention(self, inputs):
        """The spatial gate ``M_s`` (of the channel-refined features): ``(batch, H, W, 1)`` in [0, 1]."""
        self._ensure_built(inputs)
        return self._spatial_attention(inputs * self.compute_channel_attention(inputs))

    def call(self, inputs):
        refined = inputs * self.compute_channel_attention(inputs)
        return refined * self._spatial_attention(refined)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"ratio": self.ratio, "kernel_size": self.kernel_size})
        return config
