"""Conv-BatchNorm-ReLU, the unit the ASPP, FPA and GAU layers are assembled from."""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_livseg.models._utils import channel_axis
from keras_livseg.models.layers._fast_kernels import FusedBatchNormalization


def _live_taps(kernel_size: int, rate: int, size) -> tuple[int, int, int]:
    """Taps of one axis of a "same" stride-1 dilated kernel that can reach a map of ``size``.

    Returns ``(first, last, pad_before)``: taps ``first..last`` have offsets
    ``tap * rate - pad_before`` with magnitude below ``size``; the others read only
    the zero padding, for every output position.
    """
    pad_before = rate * (kernel_size - 1) // 2  # TF/Keras "same": the odd extra pixel goes after
    live = [t for t in range(kernel_size) if abs(t * rate - pad_before) < size]
    if not live:  # only possible with an even kernel; the caller falls back to ops.conv
        return None, None, pad_before
    return live[0], live[-1], pad_before


def dilated_conv_same(inputs, kernel, dilation_rate: int, data_format=None):
    """A "same"-padded, stride-1 dilated convolution written without dilation.

    Equal to ``keras.ops.conv(inputs, kernel, padding="same",
    dilation_rate=dilation_rate)`` (up to float summation order), computed as:

    - taps that fall in the zero padding for every output pixel (offset >= the map
      size, e.g. every off-centre tap of a rate-12 or rate-18 3x3 kernel on the 8x8
      map ASPP sees at stride 32) are dropped; their weights get a zero gradient,
      exactly as in the dilated convolution;
    - the remaining taps become channels (one shifted, zero-filled copy of the
      input per tap, concatenated) followed by a single 1x1 convolution with the
      matching slice of ``kernel``; with only the centre tap left that is just the
      1x1 convolution.

    Why: TensorFlow's ``tf.nn.convolution`` runs every dilated convolution as
    ``SpaceToBatchND`` → convolution → ``BatchToSpaceND``; on a small map with a
    large rate it pads the map to a multiple of the rate and convolves mostly
    zeros (rate 18 on 8x8: a 54x54 padded map, 45x the work), and its backward is
    as slow. Needs static height and width; otherwise it falls back to
    ``keras.ops.conv``.

    Args:
        inputs: 4D tensor.
        kernel: ``(kh, kw, in_channels, filters)``.
        dilation_rate: int.
        data_format: ``"channels_last"``/``"channels_first"``; default: Keras'.

    Returns:
        The convolution, same spatial size as ``inputs``, ``filters`` channels.
    """
    data_format = data_format or keras.config.image_data_format()
    if data_format == "channels_last":
        h_axis, w_axis, c_axis = 1, 2, 3
    else:
        h_axis, w_axis, c_axis = 2, 3, 1
    height, width = inputs.shape[h_axis], inputs.shape[w_axis]
    kh, kw = kernel.shape[0], kernel.shape[1]
    h0 = w0 = None
    if height is not None and width is not None:
        h0, h1, pad_top = _live_taps(kh, dilation_rate, height)
        w0, w1, pad_left = _live_taps(kw, dilation_rate, width)
    if h0 is None or w0 is None:
        return ops.conv(inputs, kernel, padding="same", dilation_rate=dilation_rate, data_format=data_format)
    kernel = kernel[h0 : h1 + 1, w0 : w1 + 1]
    if h0 == h1 and w0 == w1 and h0 * dilation_rate == pad_top and w0 * dilation_rate == pad_left:
        return ops.conv(inputs, kernel, padding="valid", data_format=data_format)  # centre tap: 1x1
    # Offsets of the live taps, and the padding they need.
    rows = [t * dilation_rate - pad_top for t in range(h0, h1 + 1)]
    cols = [t * dilation_rate - pad_left for t in range(w0, w1 + 1)]
    patches = []
    for dy in rows:
        for dx in cols:
            # Output pixel (i, j) reads input (i + dy, j + dx): crop the part of the
            # input that is read, zero-pad it back to the map size. (Slice's gradient is
            # a Pad and Pad's a Slice, both cheap; slices of one padded map would make
            # TF's StridedSliceGrad write a whole padded map per tap.)
            patch = inputs
            if dy or dx:
                index = [slice(None)] * 4
                index[h_axis] = slice(max(0, dy), height + min(0, dy))
                index[w_axis] = slice(max(0, dx), width + min(0, dx))
                pad = [[0, 0]] * 4
                pad[h_axis] = [max(0, -dy), max(0, dy)]
                pad[w_axis] = [max(0, -dx), max(0, dx)]
                patch = ops.pad(inputs[tuple(index)], pad)
            patches.append(patch)
    columns = patches[0] if len(patches) == 1 else ops.concatenate(patches, axis=c_axis)
    kernel = ops.reshape(kernel, (1, 1, len(patches) * inputs.shape[c_axis], kernel.shape[-1]))
    return ops.conv(columns, kernel, padding="valid", data_format=data_format)


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
            FusedBatchNormalization(axis=channel_axis(), dtype=self.dtype_policy, name="bn")
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

    #: Run dilated convolutions through :func:`dilated_conv_same` (False: ``self.conv``,
    #: the plain Keras path; tests compare the two).
    dilated_as_taps = True

    def call(self, inputs, training=None):
        if self.dilation_rate > 1 and self.dilated_as_taps:
            # Same weights and result as self.conv(inputs), without TF's SpaceToBatch
            # dilated convolution (see dilated_conv_same).
            kernel = ops.cast(self.conv.kernel, self.compute_dtype)
            x = dilated_conv_same(inputs, kernel, self.dilation_rate, self.conv.data_format)
            if self.conv.use_bias:
                x = ops.add(x, ops.reshape(ops.cast(self.conv.bias, self.compute_dtype), self._bias_shape()))
        else:
            x = self.conv(inputs)
        if self.bn is not None:
            x = self.bn(x, training=training)
        if self.relu is not None:
            x = self.relu(x)
        return x

    def _bias_shape(self):
        return (1, 1, 1, self.filters) if self.conv.data_format == "channels_last" else (1, self.filters, 1, 1)

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
