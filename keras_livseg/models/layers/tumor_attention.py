"""The Tumor Attention Module (TAM) of TAM-U-Net (Khimta, Vedant, Suganya)."""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_livseg.models._utils import channel_axis, check_choice

_MODES = ("channel", "spatial")


@keras.saving.register_keras_serializable(package="keras_livseg")
class TumorAttention(layers.Layer):
    """Tumor Attention Module: a sigmoid gate from a 1x1 convolution, ``A ⊙ F``.

    Implements Section III-C of "TAM-U-Net: A Tumor Attention-Based U-Net for Liver
    Tumor Segmentation in CT Images" (Khimta, Vedant, Suganya)::

        F' = W_a * F + b_a        (1x1 convolution)
        A  = sigmoid(F')
        F_TAM = A ⊙ F

    The paper's ``W_a * F`` on ``F ∈ R^{C×H×W}`` keeps C channels, so by default
    (``mode="channel"``) ``A`` has C channels: a separate spatial gate per channel,
    ``C*C + C`` parameters. ``mode="spatial"`` computes a single map (1 output
    channel, ``C + 1`` parameters) broadcast over all channels, the reading of the
    paper's figure ("pixel-wise importance").

    Args:
        mode: str. ``"channel"`` (default, C gates) or ``"spatial"`` (one gate map).
        kernel_initializer: initializer of ``W_a``. Defaults to ``"glorot_uniform"``.
        bias_initializer: initializer of ``b_a``. Defaults to ``"zeros"``, so a fresh
            module starts near ``A = 0.5``.
        **kwargs: standard ``keras.layers.Layer`` arguments (``name``, ``dtype``...).

    Input shape:
        ``(batch, height, width, channels)`` (channels_last) or
        ``(batch, channels, height, width)`` (channels_first).

    Output shape:
        Same as the input.

    Example:

    >>> import numpy as np
    >>> tam = TumorAttention(kernel_initializer="zeros")
    >>> features = np.ones((2, 8, 8, 4), "float32")
    >>> float(tam(features)[0, 0, 0, 0])   # A = sigmoid(0) = 0.5
    0.5
    >>> tuple(tam.compute_attention(features).shape)
    (2, 8, 8, 4)
    """

    def __init__(
        self,
        mode: str = "channel",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_choice("mode", mode, _MODES, "TumorAttention")
        self.mode = mode
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.supports_masking = True
        self.gate = None

    def build(self, input_shape):
        channels = input_shape[channel_axis()]
        if channels is None:
            raise ValueError(
                f"TumorAttention: the channel dimension must be known, got input_shape={input_shape}."
            )
        self.gate = layers.Conv2D(
            filters=channels if self.mode == "channel" else 1,
            kernel_size=1,
            use_bias=True,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            data_format=keras.config.image_data_format(),
            dtype=self.dtype_policy,
            name="gate",
        )
        self.gate.build(input_shape)
        self.built = True

    def compute_attention(self, inputs):
        """The gate ``A = sigmoid(W_a * F + b_a)``: ``(..., C)`` or ``(..., 1)`` in [0, 1]."""
        if not self.built:
            self.build(tuple(inputs.shape))
        return ops.sigmoid(self.gate(inputs))

    def call(self, inputs):
        return inputs * self.compute_attention(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "mode": self.mode,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config
