"""The Multi-scale Fusion Attention Block (MFAB) of MA-Net (Fan et al., IEEE Access 2020)."""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_livseg.models._utils import (
    check_choice,
    channel_axis,
    check_positive_int,
    spatial_axes,
    spatial_shape,
)
from keras_livseg.models.layers._fast_kernels import TORCH_BN_EPSILON, FusedBatchNormalization

INTERPOLATIONS = ("nearest", "bilinear")


@keras.saving.register_keras_serializable(package="keras_livseg")
class MultiscaleFusionAttention(layers.Layer):
    """Multi-scale Fusion Attention Block: one MA-Net decoder stage.

    Fan, Wang, Li, Wang, "MA-Net: A Multi-Scale Attention Network for Liver and Tumor
    Segmentation", IEEE Access 8 (2020), as segmentation_models.pytorch
    (smp) 0.6 builds it (``MFABBlock``; smp's names in brackets). Called on
    ``[high, low]``: the coarser decoder features and the encoder skip at twice
    their resolution, with ``C_low`` channels::

        h = ConvBNReLU1x1(ConvBNReLU3x3(high))     # C_high → C_high → C_low  [hl_conv]
        h = upsample2x(h)                           # nearest (or bilinear)
        s = SE(h) + SE(low)                         # two gates in (0, 1), summed: (0, 2)
        y = concat([h ⊙ s, low])                    # 2·C_low channels
        out = ConvBNReLU3x3(ConvBNReLU3x3(y))       # filters channels       [conv1, conv2]

    Each ``SE`` is squeeze-and-excitation without the rescaling:
    ``sigmoid(Conv1x1(ReLU(Conv1x1(GlobalAvgPool(·)))))`` through
    ``max(1, C_low // reduction)`` channels, with biases and no batch norm
    [SE_hl, SE_ll]. Batch norm as PyTorch's (momentum 0.1; epsilon 1e-5, raised to
    1.001e-5, the least TensorFlow's fused kernel takes); the convolutions before it
    have no bias, those without it (``use_batchnorm=False``) do.

    Args:
        filters: int. Output channels.
        reduction: int. SE reduction ratio. Defaults to ``16``.
        use_batchnorm: bool. Batch norm after each ConvReLU convolution. Defaults to ``True``.
        interpolation: ``"nearest"`` (default, smp's) or ``"bilinear"`` upsampling of ``high``.
        kernel_initializer: initializer of every convolution. Defaults to
            ``"he_uniform"`` (smp: Kaiming uniform, fan-in, ReLU gain); biases start at 0.
        **kwargs: standard ``keras.layers.Layer`` arguments.

    Input shape:
        A list ``[high, low]``: ``(batch, h, w, C_high)`` and ``(batch, 2h, 2w, C_low)``
        (channels_first: ``(batch, C, H, W)``), channels known.

    Output shape:
        ``(batch, 2h, 2w, filters)``.

    Example:

    >>> import numpy as np
    >>> mfab = MultiscaleFusionAttention(filters=8)
    >>> high, low = np.ones((2, 4, 4, 16), "float32"), np.ones((2, 8, 8, 4), "float32")
    >>> tuple(mfab([high, low]).shape)
    (2, 8, 8, 8)
    """

    def __init__(
        self,
        filters: int,
        reduction: int = 16,
        use_batchnorm: bool = True,
        interpolation: str = "nearest",
        kernel_initializer="he_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = "MultiscaleFusionAttention"
        self.filters = check_positive_int("filters", filters, owner)
        self.reduction = check_positive_int("reduction", reduction, owner)
        check_choice("interpolation", interpolation, INTERPOLATIONS, owner)
        self.use_batchnorm = bool(use_batchnorm)
        self.interpolation = interpolation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.data_format = keras.config.image_data_format()
        self.upsample = layers.UpSampling2D(
            2, interpolation=interpolation, data_format=self.data_format,
            dtype=self.dtype_policy, name="upsample",
        )
        self.conv1, self.bn1 = self._conv_bn(filters, 3, "conv1")
        self.conv2, self.bn2 = self._conv_bn(filters, 3, "conv2")
        # Built in build(): their widths follow the input channels.
        self.high_conv1 = self.high_bn1 = self.high_conv2 = self.high_bn2 = None
        self.high_squeeze = self.high_excite = self.low_squeeze = self.low_excite = None

    def _conv(self, filters: int, kernel_size: int, name: str, use_bias=True, activation=None):
        return layers.Conv2D(
            filters, kernel_size, padding="same", use_bias=use_bias, activation=activation,
            kernel_initializer=self.kernel_initializer, data_format=self.data_format,
            dtype=self.dtype_policy, name=name,
        )

    def _conv_bn(self, filters: int, kernel_size: int, name: str):
        conv = self._conv(filters, kernel_size, name, use_bias=not self.use_batchnorm)
        bn = None
        if self.use_batchnorm:
            bn = FusedBatchNormalization(
                axis=channel_axis(), momentum=0.9, epsilon=TORCH_BN_EPSILON, dtype=self.dtype_policy,
                name=f"{name}_bn",
            )
        return conv, bn

    def build(self, input_shape):
        owner = "MultiscaleFusionAttention"
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2 or not isinstance(
            input_shape[0], (list, tuple)
        ):
            raise ValueError(
                f"{owner}: expects a list [high, low] of two 4D tensors, got "
                f"input_shape={input_shape}."
            )
        high_shape, low_shape = (tuple(s) for s in input_shape)
        high_channels, low_channels = high_shape[channel_axis()], low_shape[channel_axis()]
        if high_channels is None or low_channels is None:
            raise ValueError(
                f"{owner}: the channel dimensions must be known, got input_shape={input_shape}."
            )
        for high_size, low_size in zip(spatial_shape(high_shape), spatial_shape(low_shape)):
            if high_size is not None and low_size is not None and low_size != 2 * high_size:
                raise ValueError(
                    f"{owner}: `low` must have twice the height and width of `high`, got "
                    f"high={high_shape} low={low_shape}."
                )
        reduced = max(1, low_channels // self.reduction)
        self.high_conv1, self.high_bn1 = self._conv_bn(high_channels, 3, "high_conv1")
        self.high_conv2, self.high_bn2 = self._conv_bn(low_channels, 1, "high_conv2")
        self.high_squeeze = self._conv(reduced, 1, "high_se_squeeze", activation="relu")
        self.high_excite = self._conv(low_channels, 1, "high_se_excite", activation="sigmoid")
        self.low_squeeze = self._conv(reduced, 1, "low_se_squeeze", activation="relu")
        self.low_excite = self._conv(low_channels, 1, "low_se_excite", activation="sigmoid")

        def with_channels(shape, channels):
            shape = list(shape)
            shape[channel_axis()] = channels
            return tuple(shape)

        def pooled(shape, channels):
            shape = list(with_channels(shape, channels))
            for axis in spatial_axes():
                shape[axis] = 1
            return tuple(shape)

        self._build_conv_bn(self.high_conv1, self.high_bn1, high_shape)
        self._build_conv_bn(self.high_conv2, self.high_bn2, high_shape)
        self.high_squeeze.build(pooled(low_shape, low_channels))
        self.low_squeeze.build(pooled(low_shape, low_channels))
        self.high_excite.build(pooled(low_shape, reduced))
        self.low_excite.build(pooled(low_shape, reduced))
        self._build_conv_bn(self.conv1, self.bn1, with_channels(low_shape, 2 * low_channels))
        self._build_conv_bn(self.conv2, self.bn2, with_channels(low_shape, self.filters))
        self.built = True

    @staticmethod
    def _build_conv_bn(conv, bn, input_shape):
        conv.build(input_shape)
        if bn is not None:
            bn.build(conv.compute_output_shape(input_shape))

    @staticmethod
    def _conv_bn_relu(x, conv, bn, training):
        x = conv(x)
        if bn is not None:
            x = bn(x, training=training)
        return ops.relu(x)

    def compute_gates(self, high, low, training=None):
        """The upsampled, projected ``high`` and the summed gate ``SE(h) + SE(low)`` in (0, 2)."""
        h = self._conv_bn_relu(high, self.high_conv1, self.high_bn1, training)
        h = self._conv_bn_relu(h, self.high_conv2, self.high_bn2, training)
        h = self.upsample(h)
        axes = spatial_axes()
        gate_high = self.high_excite(self.high_squeeze(ops.mean(h, axis=axes, keepdims=True)))
        gate_low = self.low_excite(self.low_squeeze(ops.mean(low, axis=axes, keepdims=True)))
        return h, gate_high + gate_low

    def call(self, inputs, training=None):
        high, low = inputs
        h, gate = self.compute_gates(high, low, training=training)
        x = ops.concatenate([h * gate, low], axis=channel_axis())
        x = self._conv_bn_relu(x, self.conv1, self.bn1, training)
        return self._conv_bn_relu(x, self.conv2, self.bn2, training)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape[1])
        shape[channel_axis()] = self.filters
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "reduction": self.reduction,
                "use_batchnorm": self.use_batchnorm,
                "interpolation": self.interpolation,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
