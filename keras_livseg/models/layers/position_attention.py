"""The Position-wise Attention Block (PAB) of MA-Net (Fan et al., IEEE Access 2020)."""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_livseg.models._utils import channel_axis, check_choice, check_positive_int

VARIANTS = ("smp", "danet")


@keras.saving.register_keras_serializable(package="keras_livseg")
class PositionAttention(layers.Layer):
    """Position-wise Attention Block: self-attention over the H·W positions of a map.

    Fan, Wang, Li, Wang, "MA-Net: A Multi-Scale Attention Network for Liver and Tumor
    Segmentation", IEEE Access 8 (2020), as segmentation_models.pytorch
    (smp) 0.6 builds it (``PABBlock``; smp's layer names in brackets). With
    ``N = H·W`` positions, ``P = key_channels``::

        Q = Conv1x1(F)            # (N, P)   [center_conv]
        K = Conv1x1(F)            # (N, P)   [top_conv]
        V = Conv3x3(F)            # (N, C)   [bottom_conv]
        E = Q Kᵀ                  # (N, N)   E[i, j] = q_i · k_j
        A = softmax(E)            # see `variant`
        F' = Conv3x3(F + γ · arrange(A V))             [out_conv]

    ``variant`` picks how ``A``, ``γ`` and ``arrange`` are read:

    - ``"smp"`` (default), smp's code exactly: one softmax over all ``N²`` entries of
      ``E`` together (so the whole map, not each row, sums to 1), no ``γ`` (``γ = 1``),
      and ``arrange`` takes the ``(N, C)`` product's memory as a ``(C, H, W)`` tensor
      (smp's ``reshape`` without a transpose: channels and positions are mixed).
      As the rows of ``A`` sum to ``1/N`` on average, the attention term starts about
      ``N`` times smaller than the input. The weights are interchangeable with smp's.
    - ``"danet"``, the position attention module of DANet (Fu et al., CVPR 2019,
      "Dual Attention Network for Scene Segmentation") the paper builds its PAB on:
      a softmax per query position (each row of ``A`` sums to 1), ``arrange`` puts
      output position ``i`` back at pixel ``i``, and a learned scalar ``γ`` starts
      at 0, so a fresh block is ``Conv3x3(F)`` and attention is learned in gradually
      (in the first training step ``γ`` gets a gradient, Q, K and V none).

    Both need ``N²`` attention entries per image (kept in float32 under mixed
    precision): 4,096 for the 8x8 map at stride 32 of a 256x256 slice, 65,536 at
    512x512; the memory grows with the fourth power of the side.

    Args:
        key_channels: int. Channels ``P`` of the query and key (smp's
            ``pab_channels``). Defaults to ``64``.
        variant: str. ``"smp"`` (default) or ``"danet"``, see above.
        kernel_initializer: initializer of the four convolutions. Defaults to
            ``"he_uniform"`` (smp: Kaiming uniform, fan-in, ReLU gain); biases start at 0.
        **kwargs: standard ``keras.layers.Layer`` arguments.

    Input shape:
        ``(batch, H, W, C)`` (channels_last) or ``(batch, C, H, W)``; C must be known.

    Output shape:
        Same as the input.

    Example:

    >>> import numpy as np
    >>> pab = PositionAttention(key_channels=4)
    >>> features = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32")
    >>> tuple(pab(features).shape)
    (2, 8, 8, 16)
    >>> attention = keras.ops.convert_to_numpy(pab.compute_attention(features))
    >>> attention.shape, round(float(attention[0].sum()), 4)   # smp: the whole map sums to 1
    ((2, 64, 64), 1.0)
    """

    def __init__(
        self,
        key_channels: int = 64,
        variant: str = "smp",
        kernel_initializer="he_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.key_channels = check_positive_int("key_channels", key_channels, "PositionAttention")
        check_choice("variant", variant, VARIANTS, "PositionAttention")
        self.variant = variant
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.data_format = keras.config.image_data_format()
        self.query_conv = self._conv(key_channels, 1, "query")
        self.key_conv = self._conv(key_channels, 1, "key")
        self.value_conv = None
        self.out_conv = None
        self.gamma = None
        self._channels = None

    def _conv(self, filters: int, kernel_size: int, name: str):
        return layers.Conv2D(
            filters, kernel_size, padding="same", kernel_initializer=self.kernel_initializer,
            data_format=self.data_format, dtype=self.dtype_policy, name=name,
        )

    def build(self, input_shape):
        channels = input_shape[channel_axis()]
        if channels is None:
            raise ValueError(
                f"PositionAttention: the channel dimension must be known, got "
                f"input_shape={input_shape}."
            )
        self._channels = channels
        self.value_conv = self._conv(channels, 3, "value")
        self.out_conv = self._conv(channels, 3, "out")
        for conv in (self.query_conv, self.key_conv, self.value_conv, self.out_conv):
            conv.build(input_shape)
        if self.variant == "danet":
            self.gamma = self.add_weight(shape=(), initializer="zeros", name="gamma")
        self.built = True

    def _positions(self, tensor):
        """``(batch, H, W, c)`` or ``(batch, c, H, W)`` → ``(batch, N, c)``, row-major."""
        channels = tensor.shape[channel_axis()]
        if self.data_format == "channels_last":
            return ops.reshape(tensor, (-1, self._num_positions(tensor), channels))
        flat = ops.reshape(tensor, (-1, channels, self._num_positions(tensor)))
        return ops.transpose(flat, (0, 2, 1))

    def _spatial(self, tensor):
        shape = ops.shape(tensor)
        return (shape[1], shape[2]) if self.data_format == "channels_last" else (shape[2], shape[3])

    def _num_positions(self, tensor):
        height, width = self._spatial(tensor)
        return height * width

    def compute_attention(self, inputs):
        """The attention map ``A``: ``(batch, N, N)`` float32, row ``i`` for query ``i``."""
        if not self.built:
            self.build(tuple(inputs.shape))
        queries = ops.cast(self._positions(self.query_conv(inputs)), "float32")
        keys = ops.cast(self._positions(self.key_conv(inputs)), "float32")
        energy = ops.matmul(queries, ops.transpose(keys, (0, 2, 1)))  # (batch, N, N)
        if self.variant == "danet":
            return ops.softmax(energy, axis=-1)
        # smp normalizes the flattened N² map as one distribution.
        positions = ops.shape(energy)[1]
        flat = ops.softmax(ops.reshape(energy, (-1, positions * positions)), axis=-1)
        return ops.reshape(flat, (-1, positions, positions))

    def call(self, inputs):
        attention = self.compute_attention(inputs)
        values = ops.cast(self._positions(self.value_conv(inputs)), "float32")
        context = ops.matmul(attention, values)  # (batch, N, C)
        height, width = self._spatial(inputs)
        channels = self._channels
        if self.variant == "smp":
            # smp's reshape of the (N, C) product straight to (C, H, W).
            context = ops.reshape(context, (-1, channels, height, width))
            if self.data_format == "channels_last":
                context = ops.transpose(context, (0, 2, 3, 1))
        elif self.data_format == "channels_last":
            context = ops.reshape(context, (-1, height, width, channels))
        else:
            context = ops.reshape(ops.transpose(context, (0, 2, 1)), (-1, channels, height, width))
        context = ops.cast(context, self.compute_dtype)
        if self.gamma is not None:
            context = ops.cast(self.gamma, self.compute_dtype) * context
        return self.out_conv(inputs + context)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "key_channels": self.key_channels,
                "variant": self.variant,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
