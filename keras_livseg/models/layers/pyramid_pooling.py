"""The pyramid pooling module of PSPNet (Zhao et al., CVPR 2017)."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from keras_livseg.models._utils import channel_axis, check_positive_int, spatial_axes, spatial_shape
from keras_livseg.models.layers._fast_kernels import TORCH_BN_EPSILON, FusedBatchNormalization

_OWNER = "PyramidPooling"


def adaptive_pool_matrix(size: int, bins: int) -> np.ndarray:
    """``(bins, size)`` averaging matrix of PyTorch's ``adaptive_avg_pool`` along one axis.

    Bin ``i`` averages the input positions ``floor(i * size / bins)`` up to
    ``ceil((i + 1) * size / bins)`` (exclusive), PyTorch's ``AdaptiveAvgPool2d`` rule:
    when ``size`` is not a multiple of ``bins`` the windows differ in length by one and
    neighbouring windows overlap (7 → 3 bins: positions 0-2, 2-4, 4-6). Two-dimensional
    adaptive pooling averages a rectangle, so it is this matrix applied to each axis.

    Example:

    >>> (3 * adaptive_pool_matrix(5, 2)).round(6).tolist()   # windows 0-2 and 2-4, 1/3 each
    [[1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]]
    """
    matrix = np.zeros((bins, size), "float64")
    for i in range(bins):
        start = (i * size) // bins
        end = -((-(i + 1) * size) // bins)  # ceil
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.astype("float32")


def align_corners_matrix(size: int, bins: int) -> np.ndarray:
    """``(size, bins)`` matrix of bilinear resizing from ``bins`` to ``size`` with corners aligned.

    PyTorch's ``F.interpolate(mode="bilinear", align_corners=True)`` (and Caffe's
    ``Interp`` layer of the original PSPNet): output ``j`` samples the input at
    ``j * (bins - 1) / (size - 1)``, linear between the two nearest bins, so the first
    and last outputs equal the first and last bins.

    Example:

    >>> (3 * align_corners_matrix(4, 2)).round(6).tolist()   # weights in thirds
    [[3.0, 0.0], [2.0, 1.0], [1.0, 2.0], [0.0, 3.0]]
    """
    matrix = np.zeros((size, bins), "float64")
    scale = (bins - 1) / (size - 1) if size > 1 else 0.0
    for j in range(size):
        source = j * scale
        low = min(int(np.floor(source)), bins - 1)
        high = min(low + 1, bins - 1)
        weight = source - low
        matrix[j, low] += 1.0 - weight
        matrix[j, high] += weight
    return matrix.astype("float32")


def _apply_separable(x, rows, cols):
    """``rows @ x @ cols.T`` over the spatial axes of a 4D tensor (either data format)."""
    rows = ops.cast(rows, x.dtype)
    cols = ops.cast(cols, x.dtype)
    if keras.config.image_data_format() == "channels_last":
        x = ops.einsum("ih,nhwc->niwc", rows, x)
        return ops.einsum("jw,niwc->nijc", cols, x)
    x = ops.einsum("ih,nchw->nciw", rows, x)
    return ops.einsum("jw,nciw->ncij", cols, x)


@keras.saving.register_keras_serializable(package="keras_livseg")
class PyramidPooling(layers.Layer):
    """Pyramid pooling module: pooled context at several bin sizes, concatenated to the input.

    Zhao, Shi, Qi, Wang, Jia, "Pyramid Scene Parsing Network" (CVPR 2017, arXiv
    1612.01105), Section 3.2, in the form of segmentation_models.pytorch's
    ``PSPModule``::

        for b in bins:                                       # 1, 2, 3, 6
            p_b = AdaptiveAvgPool(x, b x b)                  # PyTorch's floor/ceil windows
            p_b = ReLU(BN(Conv1x1(p_b)))                     # filters channels
            up_b = bilinear(p_b, H x W, align_corners=True)
        y = concat([up_1, up_2, up_3, up_6, x])              # channels: len(bins)·filters + C

    As in smp, the 1x1 branch has no batch normalization (its convolution has a bias):
    a batch norm over a single value per sample carries no information at batch size
    1 (PyTorch refuses it in training); the other branches have BN.

    Pooling and upsampling are computed exactly for any static map size, with no
    multiple-of-the-bins constraint: adaptive average pooling is separable, so each
    one is a small constant matrix per axis (:func:`adaptive_pool_matrix`,
    :func:`align_corners_matrix`) applied with ``keras.ops.einsum``; on a 30x30 map,
    3 bins average rows 0-9, 10-19, 20-29, and on 32x32 rows 0-10, 10-21, 21-31,
    exactly as ``torch.nn.AdaptiveAvgPool2d`` does. Batch norm uses PyTorch's
    momentum (0.1 running-average weight) and epsilon (1e-5, at TensorFlow's fused floor 1.001e-5), like the ResNet encoder.

    Args:
        bins: int sequence. Output sizes of the poolings. Defaults to ``(1, 2, 3, 6)``.
        filters: int or None. Channels of each branch. Defaults to ``None``: input
            channels ``// len(bins)`` (the paper's and smp's choice, 1/N of the input).
        **kwargs: standard ``keras.layers.Layer`` arguments.

    Input shape:
        4D image tensor with static height and width, ``(batch, H, W, C)``
        (channels_last) or ``(batch, C, H, W)`` (channels_first).

    Output shape:
        ``(batch, H, W, len(bins) * filters + C)``: the branches in ``bins`` order,
        then the input.

    Example:

    >>> import numpy as np
    >>> ppm = PyramidPooling(bins=(1, 2, 3, 6))
    >>> tuple(ppm(np.ones((2, 10, 10, 16), "float32")).shape)   # 4 branches of 16 // 4
    (2, 10, 10, 32)
    """

    def __init__(self, bins=(1, 2, 3, 6), filters: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(bins, int) or not isinstance(bins, (tuple, list)) or not bins:
            raise ValueError(
                f"{_OWNER}: `bins` must be a non-empty sequence of positive integers, got bins={bins!r}."
            )
        for size in bins:
            check_positive_int("bins entry", size, _OWNER)
        if len(set(bins)) != len(bins):
            raise ValueError(f"{_OWNER}: `bins` must not repeat a size, got bins={bins!r}.")
        if filters is not None:
            check_positive_int("filters", filters, _OWNER)
        self.bins = tuple(bins)
        self.filters = filters
        self.branch_convs = []
        self.branch_bns = []
        self.branch_relus = []
        self._pool_matrices = None
        self._upsample_matrices = None

    def _branch_filters(self, channels: int) -> int:
        if self.filters is not None:
            return self.filters
        filters = channels // len(self.bins)
        if filters < 1:
            raise ValueError(
                f"{_OWNER}: {channels} input channels cannot be split into {len(self.bins)} branches "
                f"(bins={self.bins!r}); pass filters explicitly."
            )
        return filters

    def build(self, input_shape):
        height, width = spatial_shape(input_shape)
        channels = input_shape[channel_axis()]
        if height is None or width is None or channels is None:
            raise ValueError(
                f"{_OWNER}: height, width and channels must be static, got input_shape={input_shape}."
            )
        filters = self._branch_filters(channels)
        data_format = keras.config.image_data_format()
        pooled_shape = list(input_shape)
        self.branch_convs, self.branch_bns, self.branch_relus = [], [], []
        self._pool_matrices, self._upsample_matrices = [], []
        for size in self.bins:
            batchnorm = size > 1
            conv = layers.Conv2D(
                filters, 1, use_bias=not batchnorm, kernel_initializer="he_uniform",
                data_format=data_format, dtype=self.dtype_policy, name=f"bin{size}_conv",
            )
            for axis in spatial_axes():
                pooled_shape[axis] = size
            conv.build(tuple(pooled_shape))
            out_shape = conv.compute_output_shape(tuple(pooled_shape))
            bn = None
            if batchnorm:
                bn = FusedBatchNormalization(
                    axis=channel_axis(), momentum=0.9, epsilon=TORCH_BN_EPSILON, dtype=self.dtype_policy,
                    name=f"bin{size}_bn",
                )
                bn.build(out_shape)
            self.branch_convs.append(conv)
            self.branch_bns.append(bn)
            self.branch_relus.append(layers.ReLU(dtype=self.dtype_policy, name=f"bin{size}_relu"))
            self._pool_matrices.append(
                (adaptive_pool_matrix(height, size), adaptive_pool_matrix(width, size))
            )
            self._upsample_matrices.append(
                (align_corners_matrix(height, size), align_corners_matrix(width, size))
            )
        self.built = True

    def call(self, inputs, training=None):
        branches = []
        for conv, bn, relu, pool, upsample in zip(
            self.branch_convs, self.branch_bns, self.branch_relus,
            self._pool_matrices, self._upsample_matrices,
        ):
            x = _apply_separable(inputs, *pool)  # (b, b) bins
            x = conv(x)
            if bn is not None:
                x = bn(x, training=training)
            x = relu(x)
            branches.append(_apply_separable(x, *upsample))  # back to (H, W)
        return ops.concatenate(branches + [inputs], axis=channel_axis())

    def compute_output_shape(self, input_shape):
        channels = input_shape[channel_axis()]
        shape = list(input_shape)
        shape[channel_axis()] = None if channels is None else (
            channels + len(self.bins) * self._branch_filters(channels)
        )
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update({"bins": list(self.bins), "filters": self.filters})
        return config
