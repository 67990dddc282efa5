"""The additive attention gate of Attention U-Net (Oktay et al., MIDL 2018)."""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_livseg.models._utils import channel_axis, check_positive_int, spatial_shape


@keras.saving.register_keras_serializable(package="keras_livseg")
class AttentionGate(layers.Layer):
    """Additive attention gate: scale a skip connection by a map computed with a gating signal.

    The additive attention of Oktay et al. 2018, "Attention U-Net: Learning Where to Look for the
    Pancreas" (arXiv 1804.03999); called on ``[x, g]``::

        q     = psi^T · ReLU(W_x^T · x + W_g^T · g + b_g) + b_psi     (1x1 convolutions)
        alpha = sigmoid(q)                                           # (batch, H, W, 1)
        x_hat = alpha ⊙ x

    ``x`` is the skip connection (encoder features) and ``g`` the gating signal from
    the coarser decoder level, both at the skip's resolution: as in MONAI's
    ``AttentionUnet``, ``g`` is upsampled (by the decoder's up-convolution) before the
    gate, so ``W_x`` is a 1x1 convolution and ``alpha`` needs no resampling. Oktay's
    reference code instead computes ``W_x`` with a strided convolution at ``g``'s
    resolution and upsamples ``alpha`` bilinearly; see :func:`build_attention_unet`
    for why we do not. ``W_x`` has no bias (``b_g`` is the one bias of the sum), and
    there is no batch normalization inside the gate (MONAI adds one after each of the
    three projections): the gate follows the paper's equation, and its map does not
    depend on batch statistics.

    Args:
        inter_channels: int or None. Channels ``F_int`` of the intermediate map
            (the width of ``W_x`` and ``W_g``). ``None`` (default) takes half the
            skip's channels, at least 1, as in Oktay's code and MONAI.
        **kwargs: standard ``keras.layers.Layer`` arguments.

    Input shape:
        A list ``[x, g]`` of 4D tensors with the same height and width:
        ``x`` ``(batch, H, W, C_x)``, ``g`` ``(batch, H, W, C_g)`` (channels_last) or
        the channels_first equivalents.

    Output shape:
        The shape of ``x``.

    Example:

    >>> import numpy as np
    >>> gate = AttentionGate(inter_channels=2)
    >>> x, g = np.ones((2, 8, 8, 4), "float32"), np.ones((2, 8, 8, 6), "float32")
    >>> tuple(gate([x, g]).shape)
    (2, 8, 8, 4)
    >>> tuple(gate.compute_attention([x, g]).shape)   # alpha, one map per pixel
    (2, 8, 8, 1)
    """

    def __init__(self, inter_channels: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if inter_channels is not None:
            check_positive_int("inter_channels", inter_channels, "AttentionGate")
        self.inter_channels = inter_channels
        self.skip_projection = None
        self.gating_projection = None
        self.psi = None

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2 or not isinstance(
            input_shape[0], (list, tuple)
        ):
            raise ValueError(
                f"AttentionGate: expects a list [x, g] of two 4D tensors (skip, gating signal), "
                f"got input_shape={input_shape}."
            )
        skip_shape, gating_shape = (tuple(s) for s in input_shape)
        skip_size, gating_size = spatial_shape(skip_shape), spatial_shape(gating_shape)
        if None not in skip_size + gating_size and skip_size != gating_size:
            raise ValueError(
                f"AttentionGate: the skip x and the gating signal g must have the same height and "
                f"width (upsample g first), got x={skip_shape} g={gating_shape}."
            )
        skip_channels = skip_shape[channel_axis()]
        if skip_channels is None or gating_shape[channel_axis()] is None:
            raise ValueError(
                f"AttentionGate: the channel dimensions must be known, got x={skip_shape} "
                f"g={gating_shape}."
            )
        inter = self.inter_channels or max(1, skip_channels // 2)
        data_format = keras.config.image_data_format()
        policy = self.dtype_policy
        self.skip_projection = layers.Conv2D(
            inter, 1, use_bias=False, data_format=data_format, dtype=policy, name="skip_projection"
        )
        self.gating_projection = layers.Conv2D(
            inter, 1, use_bias=True, data_format=data_format, dtype=policy, name="gating_projection"
        )
        self.psi = layers.Conv2D(1, 1, use_bias=True, data_format=data_format, dtype=policy, name="psi")
        self.skip_projection.build(skip_shape)
        self.gating_projection.build(gating_shape)
        inter_shape = list(skip_shape)
        inter_shape[channel_axis()] = inter
        self.psi.build(tuple(inter_shape))
        self.built = True

    def compute_attention(self, inputs):
        """The gate map ``alpha``: ``(batch, H, W, 1)`` (channels_last) in [0, 1]."""
        skip, gating = inputs
        if not self.built:
            self.build([tuple(skip.shape), tuple(gating.shape)])
        joint = ops.relu(self.skip_projection(skip) + self.gating_projection(gating))
        return ops.sigmoid(self.psi(joint))

    def call(self, inputs):
        return inputs[0] * self.compute_attention(inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update({"inter_channels": self.inter_channels})
        return config
