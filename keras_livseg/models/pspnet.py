"""PSPNet (Zhao et al. 2017) on the shared ResNet-18/34 encoder, as smp builds it."""

from __future__ import annotations

import logging

import keras
from keras import layers

from keras_livseg.models._heads import check_head, ct_input, probabilities
from keras_livseg.models._utils import channel_axis, check_choice, check_input_shape, check_positive_int, check_rate
from keras_livseg.models.layers._fast_kernels import TORCH_BN_EPSILON, FusedBatchNormalization
from keras_livseg.models.layers.pyramid_pooling import PyramidPooling
from keras_livseg.models.resnet_encoder import (
    ENCODERS,
    OUTPUT_STRIDES,
    RESNET_BLOCKS,
    STAGE_FILTERS,
    build_resnet_encoder,
)

logger = logging.getLogger(__name__)

ENCODER_DEPTHS = (3, 4, 5)


def feature_stride(encoder_depth: int, output_stride: int) -> int:
    """Stride of the feature map the pyramid pools: ``min(2**encoder_depth, output_stride)``.

    >>> feature_stride(3, 32), feature_stride(5, 8), feature_stride(4, 32)
    (8, 8, 16)
    """
    return min(2**encoder_depth, output_stride)


def build_pspnet(
    input_shape=(256, 256, 1),
    num_classes: int = 3,
    encoder: str = "resnet34",
    encoder_depth: int = 3,
    output_stride: int = 32,
    psp_filters: int = 512,
    psp_dropout: float = 0.2,
    bins=(1, 2, 3, 6),
    head: str = "softmax",
    name: str = "pspnet",
) -> keras.Model:
    """PSPNet with a ResNet-18/34 encoder, layer for layer as segmentation_models.pytorch 0.6.

    Zhao, Shi, Qi, Wang, Jia, "Pyramid Scene Parsing Network" (CVPR 2017, arXiv
    1612.01105), in the form of smp's ``PSPNet``::

        f = encoder(x)[encoder_depth]                 # P3: 1/8, 128 channels (default)
        y = PyramidPooling(bins=(1, 2, 3, 6))(f)      # concat(4 x C/4 branches, f): 2C
        y = Dropout2d(ReLU(BN(Conv1x1(y))))           # psp_filters (512) channels
        logits = upsample(Conv3x3(y), stride)         # bilinear, back to 1/1
        probabilities = softmax(logits)               # float32

    The encoder is cut after stage ``encoder_depth`` (its later stages are not
    built), and with ``output_stride`` below ``2**encoder_depth`` its last stages
    are dilated instead of strided:

    - smp's default, ``encoder_depth=3`` (the default here): ResNet up to its second
      stage, features at 1/8, no dilation, 128 channels into the pyramid (x8
      upsampling at the end).
    - The paper's, ``encoder_depth=5, output_stride=8``: the whole ResNet with its
      last two stages dilated (rates 2 and 4), features at 1/8, 512 channels
      (smp: ``PSPNet(encoder_depth=5, output_stride=8)``).
    - ``encoder_depth=4``/``5`` with ``output_stride=32``: features at 1/16, 1/32.

    Where this (and smp) differ from the paper, and why:

    - ResNet-18/34 BasicBlocks, not the paper's dilated ResNet-50/101 with its
      three-convolution deep stem; the paper's deep-supervision auxiliary loss on
      stage 4 is not built (smp's ``aux_params`` classification head is a different
      thing and is off by default).
    - The paper follows the pyramid with a 3x3 Conv-BN-ReLU (512) before the
      classifier; smp uses a 1x1 one, and its classifier is 3x3. Kept as smp.
    - The pyramid pooling is exactly PyTorch's adaptive average pooling (floor/ceil
      windows) with align-corners bilinear upsampling, for any map size (see
      :class:`PyramidPooling`). The final upsampling is Keras' bilinear
      ``UpSampling2D`` (half-pixel centres), where smp aligns corners: same cost,
      the logits differ by a sub-pixel shift near the borders.
    - With ``encoder_depth=3`` smp still creates the ResNet's last two stages and
      counts their parameters (``sum(p.numel() for p in model.parameters())``),
      though its forward pass never runs them; this model does not have them.

    Args:
        input_shape: ``(H, W, C)`` (``(C, H, W)`` under channels_first), any C; H and W
            multiples of the feature stride ``min(2**encoder_depth, output_stride)``
            (8 by default; the error names the nearest valid size). Defaults to
            ``(256, 256, 1)``.
        num_classes: int. Defaults to 3 (background, liver, tumor).
        encoder: ``"resnet34"`` (default) or ``"resnet18"``.
        encoder_depth: 3 (default), 4 or 5: the encoder stage whose output is pooled.
        output_stride: 32 (default, no dilation), 16 or 8: dilate the stages that
            would go below this stride.
        psp_filters: int. Channels after the pyramid. Defaults to 512.
        psp_dropout: float in [0, 1). Channel (2D) dropout after it. Defaults to 0.2.
        bins: pooling sizes of the pyramid. Defaults to ``(1, 2, 3, 6)``.
        head: ``"softmax"`` (default) or ``"sigmoid"`` (per-class).
        name: model name. Defaults to ``"pspnet"``.

    Returns:
        A ``keras.Model``: input ``"ct_slices"`` ``(batch, H, W, C)`` float32, output
        ``"probabilities"`` ``(batch, H, W, num_classes)`` float32.

    Example:

    >>> model = build_pspnet(input_shape=(32, 32, 1), encoder="resnet18", psp_filters=16)
    >>> tuple(model.output.shape)
    (None, 32, 32, 3)
    """
    owner = name
    check_head(head, num_classes, owner)
    check_choice("encoder", encoder, ENCODERS, owner)
    check_choice("encoder_depth", encoder_depth, ENCODER_DEPTHS, owner)
    check_choice("output_stride", output_stride, OUTPUT_STRIDES, owner)
    check_positive_int("psp_filters", psp_filters, owner)
    check_rate("psp_dropout", psp_dropout, owner)
    pyramid = PyramidPooling(bins=bins, name="pyramid_pooling")  # checks bins
    stride = feature_stride(encoder_depth, output_stride)
    check_input_shape(
        input_shape, stride, owner,
        f"encoder_depth={encoder_depth} with output_stride={output_stride} pools features at 1/{stride}",
    )
    data_format = keras.config.image_data_format()

    # Layers: the ResNet, cut after stage `encoder_depth` (P1..P{depth}; stages past
    # the stride are dilated, stages past the depth are left out of the model).
    full = build_resnet_encoder(
        input_shape, blocks=RESNET_BLOCKS[encoder], filters=STAGE_FILTERS,
        output_stride=stride, name=f"{encoder}_encoder",
    )
    resnet = keras.Model(full.inputs, full.outputs[:encoder_depth], name=full.name)

    # Functional model.
    inputs = ct_input(input_shape)
    features = resnet(inputs)[-1]  # 1/stride
    x = pyramid(features)
    x = layers.Conv2D(
        psp_filters, 1, use_bias=False, kernel_initializer="he_uniform", data_format=data_format,
        name="psp_conv",
    )(x)
    x = FusedBatchNormalization(axis=channel_axis(), momentum=0.9, epsilon=TORCH_BN_EPSILON, name="psp_bn")(x)
    x = layers.ReLU(name="psp_relu")(x)
    if psp_dropout:
        x = layers.SpatialDropout2D(psp_dropout, data_format=data_format, name="psp_dropout")(x)
    logits = layers.Conv2D(num_classes, 3, padding="same", data_format=data_format, name="logits")(x)
    logits = layers.UpSampling2D(
        stride, interpolation="bilinear", data_format=data_format, name="logits_upsample"
    )(logits)  # 1/1
    outputs = probabilities(logits, head)
    model = keras.Model(inputs, outputs, name=name)
    logger.debug("built %s with %d parameters", name, model.count_params())
    return model
