"""LinkNet (Chaurasia, Culurciello 2017) on the shared ResNet-18/34 encoder, as smp builds it."""

from __future__ import annotations

import logging

import keras
from keras import layers

from keras_livseg.models._heads import check_head, ct_input, probabilities
from keras_livseg.models._utils import channel_axis, check_choice, check_input_shape
from keras_livseg.models.layers._fast_kernels import TORCH_BN_EPSILON, FusedBatchNormalization
from keras_livseg.models.resnet_encoder import ENCODERS, RESNET_BLOCKS, STAGE_FILTERS, build_resnet_encoder

logger = logging.getLogger(__name__)

OUTPUT_STRIDE = 32
#: Channels of the last decoder block (smp's ``prefinal_channels``).
PREFINAL_FILTERS = 32


def _bn(name: str):
    # PyTorch's BatchNorm2d momentum (0.1 running-average weight), its eps at the fused floor, as the encoder.
    return FusedBatchNormalization(axis=channel_axis(), momentum=0.9, epsilon=TORCH_BN_EPSILON, name=name)


def _conv_bn_relu(x, filters: int, name: str):
    """Conv1x1 (no bias) → BN → ReLU: smp's ``Conv2dReLU(kernel_size=1)``."""
    x = layers.Conv2D(
        filters, 1, use_bias=False, kernel_initializer="he_uniform",
        data_format=keras.config.image_data_format(), name=f"{name}_conv",
    )(x)
    x = _bn(f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def decoder_block(x, filters: int, name: str, skip=None):
    """LinkNet decoder block: Conv1x1 (C → C/4), FullConv 4x4/2 (C/4, x2 up), Conv1x1 (C/4 → filters).

    Each convolution is followed by BN and ReLU; the transposed convolution keeps its
    bias (as in smp's ``TransposeX2``), the 1x1 convolutions have none. The result is
    added to ``skip``, the encoder feature of the same size, when given.
    """
    reduced = x.shape[channel_axis()] // 4
    x = _conv_bn_relu(x, reduced, f"{name}_reduce")
    x = layers.Conv2DTranspose(
        reduced, 4, strides=2, padding="same", kernel_initializer="he_uniform",
        data_format=keras.config.image_data_format(), name=f"{name}_fullconv",
    )(x)
    x = _bn(f"{name}_fullconv_bn")(x)
    x = layers.ReLU(name=f"{name}_fullconv_relu")(x)
    x = _conv_bn_relu(x, filters, f"{name}_expand")
    if skip is not None:
        x = layers.Add(name=f"{name}_skip_add")([x, skip])
    return x


def linknet_decoder(p1, p2, p3, p4, p5):
    """The decoder from the pyramid ``P1..P5`` to the 32-channel full-resolution features."""
    d4 = decoder_block(p5, p4.shape[channel_axis()], "decoder4", skip=p4)  # 1/16
    d3 = decoder_block(d4, p3.shape[channel_axis()], "decoder3", skip=p3)  # 1/8
    d2 = decoder_block(d3, p2.shape[channel_axis()], "decoder2", skip=p2)  # 1/4
    d1 = decoder_block(d2, p1.shape[channel_axis()], "decoder1", skip=p1)  # 1/2
    return decoder_block(d1, PREFINAL_FILTERS, "final_block")  # 1/1


def build_linknet(
    input_shape=(256, 256, 1),
    num_classes: int = 3,
    encoder: str = "resnet34",
    head: str = "softmax",
    name: str = "linknet",
) -> keras.Model:
    """LinkNet with a ResNet-18/34 encoder, layer for layer as segmentation_models.pytorch 0.6.

    Chaurasia, Culurciello, "LinkNet: Exploiting Encoder Representations for Efficient
    Semantic Segmentation" (VCIP 2017, arXiv 1707.03718), in the form of smp's
    ``Linknet`` (``encoder_depth=5``, ``decoder_use_norm="batchnorm"``)::

        P1, P2, P3, P4, P5 = encoder(x)          # 1/2 (stem), 1/4, 1/8, 1/16, 1/32
        d4 = decoder4(P5) + P4                   # 512 → 256, 1/16
        d3 = decoder3(d4) + P3                   # 256 → 128, 1/8
        d2 = decoder2(d3) + P2                   # 128 → 64,  1/4
        d1 = decoder1(d2) + P1                   # 64 → 64,   1/2
        f  = final_block(d1)                     # 64 → 32,   1/1
        probabilities = softmax(Conv1x1(f))      # float32

    Every block is Conv1x1-BN-ReLU (C → C/4), FullConv4x4/2-BN-ReLU (x2 up),
    Conv1x1-BN-ReLU (C/4 → out) (:func:`decoder_block`); the decoder adds, the
    U-Net concatenates, which is what keeps LinkNet light.

    Where this (and smp) differ from the paper, and why:

    - The paper's full convolution is 3x3 (stride 2, output padding 1); smp's is
      4x4, stride 2, padding 1, which doubles the size exactly and overlaps every
      output pixel evenly. Kept as smp so that the two time the same network.
    - The paper adds encoder blocks 1-3 only and ends with FullConv3x3/2 (32),
      Conv3x3 (32) and FullConv2x2/2 (classes); smp adds the stem output (P1) too,
      and ends with a fifth decoder block (64 → 32, x2 up) and a 1x1 convolution.
    - ResNet-34 by default (smp's default; the paper uses ResNet-18, ``encoder=
      "resnet18"``). No pretrained weights (no network here); smp's
      ``encoder_weights=None`` is the equal comparison.
    - The Keras "same" padding of the encoder's stride-2 layers is asymmetric
      (PyTorch pads both sides): same layers and parameters, features shifted by
      up to a pixel.

    Args:
        input_shape: ``(H, W, C)`` (``(C, H, W)`` under channels_first), any C; H and W
            multiples of 32 (the encoder's output stride; the error names the nearest
            valid size). Defaults to ``(256, 256, 1)``.
        num_classes: int. Defaults to 3 (background, liver, tumor).
        encoder: ``"resnet34"`` (default) or ``"resnet18"``.
        head: ``"softmax"`` (default) or ``"sigmoid"`` (per-class).
        name: model name. Defaults to ``"linknet"``.

    Returns:
        A ``keras.Model``: input ``"ct_slices"`` ``(batch, H, W, C)`` float32, output
        ``"probabilities"`` ``(batch, H, W, num_classes)`` float32.

    Example:

    >>> model = build_linknet(input_shape=(64, 64, 1), encoder="resnet18")
    >>> tuple(model.output.shape)
    (None, 64, 64, 3)
    """
    owner = name
    check_head(head, num_classes, owner)
    check_choice("encoder", encoder, ENCODERS, owner)
    check_input_shape(input_shape, OUTPUT_STRIDE, owner, "the ResNet encoder reaches stride 32")

    # Layers.
    resnet = build_resnet_encoder(
        input_shape, blocks=RESNET_BLOCKS[encoder], filters=STAGE_FILTERS,
        output_stride=OUTPUT_STRIDE, name=f"{encoder}_encoder",
    )

    # Functional model.
    inputs = ct_input(input_shape)
    p1, p2, p3, p4, p5 = resnet(inputs)
    features = linknet_decoder(p1, p2, p3, p4, p5)
    logits = layers.Conv2D(
        num_classes, 1, data_format=keras.config.image_data_format(), name="logits"
    )(features)
    outputs = probabilities(logits, head)
    model = keras.Model(inputs, outputs, name=name)
    logger.debug("built %s with %d parameters", name, model.count_params())
    return model
