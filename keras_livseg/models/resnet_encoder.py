"""A ResNet-18/34 encoder with named pyramid outputs, shared by LinkNet, PSPNet and MA-Net.

The three networks of the Enhanced PAN paper's comparison all sit on a ResNet
encoder in segmentation_models.pytorch (smp), the implementation most papers
compare against; this is the same network (torchvision's ``BasicBlock`` ResNet, He
et al. 2016, "Deep Residual Learning for Image Recognition") in Keras, layer for
layer, so that our models and smp's can be timed and compared on equal terms.
"""

from __future__ import annotations

import keras
from keras import layers

from keras_livseg.models._utils import channel_axis, check_choice, check_input_shape, check_positive_int
from keras_livseg.models.layers._fast_kernels import TORCH_BN_EPSILON, FusedBatchNormalization

#: Blocks per stage of the two BasicBlock ResNets.
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
ENCODERS = tuple(RESNET_BLOCKS)
STAGE_FILTERS = (64, 128, 256, 512)
#: Pyramid output names, with their strides at output_stride=32.
PYRAMID = ("P1", "P2", "P3", "P4", "P5")  # 1/2 (stem), 1/4, 1/8, 1/16, 1/32
OUTPUT_STRIDES = (8, 16, 32)


def _bn(name: str):
    # Same layer and weights as keras.layers.BatchNormalization; one fused kernel on TF.
    # momentum as torchvision's default (0.1 running-average weight).
    return FusedBatchNormalization(axis=channel_axis(), momentum=0.9, epsilon=TORCH_BN_EPSILON, name=name)


def _conv(filters: int, kernel_size: int, strides: int, dilation: int, name: str):
    return layers.Conv2D(
        filters, kernel_size, strides=strides, dilation_rate=dilation, padding="same", use_bias=False,
        kernel_initializer="he_normal", data_format=keras.config.image_data_format(), name=name,
    )


def basic_block(x, filters: int, strides: int, dilation: int, name: str):
    """ResNet BasicBlock: Conv3x3(stride)-BN-ReLU-Conv3x3-BN, plus the shortcut, then ReLU.

    The shortcut is a 1x1 convolution (with the block's stride) and BN when the shape
    changes, the identity otherwise (torchvision's option B).
    """
    shortcut = x
    if strides != 1 or x.shape[channel_axis()] != filters:
        shortcut = _conv(filters, 1, strides, 1, f"{name}_downsample_conv")(x)
        shortcut = _bn(f"{name}_downsample_bn")(shortcut)
    y = _conv(filters, 3, strides, dilation, f"{name}_conv1")(x)
    y = _bn(f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(filters, 3, 1, dilation, f"{name}_conv2")(y)
    y = _bn(f"{name}_bn2")(y)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def build_resnet_encoder(
    input_shape,
    blocks=RESNET_BLOCKS["resnet34"],
    filters=STAGE_FILTERS,
    output_stride: int = 32,
    name: str = "resnet_encoder",
) -> keras.Model:
    """A BasicBlock ResNet (18 or 34) returning the pyramid ``[P1, P2, P3, P4, P5]``.

    Stem Conv7x7/2-BN-ReLU (P1, 1/2, 64 channels), MaxPool3x3/2, then four stages of
    BasicBlocks with ``filters`` channels: P2 (1/4), P3 (1/8), P4 (1/16), P5 (1/32).
    With ``output_stride`` 16 or 8 the last one or two stages keep their resolution
    and dilate their convolutions instead (rate 2, then 4), as smp's and
    DeepLab's dilated encoders do; their outputs keep the names P4 and P5.

    Args:
        input_shape: ``(H, W, C)`` (``(C, H, W)`` under channels_first), any C; H and W
            multiples of ``output_stride``.
        blocks: BasicBlocks per stage. Defaults to ResNet-34's ``(3, 4, 6, 3)``;
            ``(2, 2, 2, 2)`` is ResNet-18.
        filters: channels per stage. Defaults to ``(64, 128, 256, 512)``; the stem
            has ``filters[0]`` channels.
        output_stride: 32 (default), 16 or 8.
        name: model name.

    Returns:
        A functional ``keras.Model`` with five outputs, the pyramid P1..P5.

    Example:

    >>> encoder = build_resnet_encoder((64, 64, 1), blocks=(1, 1, 1, 1), filters=(4, 8, 16, 32))
    >>> [tuple(t.shape[1:]) for t in encoder.outputs]
    [(32, 32, 4), (16, 16, 4), (8, 8, 8), (4, 4, 16), (2, 2, 32)]
    """
    owner = name
    blocks, filters = tuple(blocks), tuple(filters)
    if len(blocks) != 4 or len(filters) != 4:
        raise ValueError(f"{owner}: `blocks` and `filters` need 4 entries (one per stage), got "
                         f"blocks={blocks!r} filters={filters!r}.")
    for value in blocks + filters:
        check_positive_int("blocks/filters entry", value, owner)
    check_choice("output_stride", output_stride, OUTPUT_STRIDES, owner)
    check_input_shape(input_shape, output_stride, owner, f"the encoder's output stride is {output_stride}")
    data_format = keras.config.image_data_format()

    inputs = keras.Input(shape=tuple(input_shape), name=f"{name}_input")
    x = _conv(filters[0], 7, 2, 1, "stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    p1 = layers.ReLU(name="stem_relu")(x)  # 1/2
    x = layers.MaxPooling2D(3, strides=2, padding="same", data_format=data_format, name="stem_pool")(p1)  # 1/4

    pyramid = [p1]
    stride, dilation = 4, 1
    for stage, (count, stage_filters) in enumerate(zip(blocks, filters), start=1):
        first_stride = 1 if stage == 1 else 2
        if first_stride == 2 and stride * 2 > output_stride:
            # Dilate instead of striding: every 3x3 convolution of the stage at the new
            # rate, as smp's make_dilated does (torchvision's BasicBlock refuses dilation).
            first_stride, dilation = 1, dilation * 2
        else:
            stride *= first_stride
        for index in range(count):
            x = basic_block(x, stage_filters, first_stride if index == 0 else 1, dilation,
                            name=f"layer{stage}_{index}")
        pyramid.append(x)
    return keras.Model(inputs, pyramid, name=name)
