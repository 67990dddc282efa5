"""MA-Net (Fan et al. 2020) on the shared ResNet encoder, as segmentation_models.pytorch has it."""

from __future__ import annotations

import logging

import keras
from keras import layers

from keras_livseg.models._heads import check_head, ct_input, probabilities
from keras_livseg.models._utils import channel_axis, check_choice, check_input_shape, check_positive_int
from keras_livseg.models.layers._fast_kernels import TORCH_BN_EPSILON, FusedBatchNormalization
from keras_livseg.models.layers.multiscale_fusion_attention import (
    INTERPOLATIONS,
    MultiscaleFusionAttention,
)
from keras_livseg.models.layers.position_attention import VARIANTS, PositionAttention
from keras_livseg.models.resnet_encoder import ENCODERS, RESNET_BLOCKS, build_resnet_encoder

logger = logging.getLogger(__name__)

DECODER_CHANNELS = (256, 128, 64, 32, 16)
OUTPUT_STRIDE = 32


def _conv_bn_relu(x, filters: int, batchnorm: bool, name: str):
    """smp's ``Conv2dReLU``: Conv3x3 (bias only without BN) → BN (PyTorch's) → ReLU."""
    x = layers.Conv2D(
        filters, 3, padding="same", use_bias=not batchnorm, kernel_initializer="he_uniform",
        data_format=keras.config.image_data_format(), name=f"{name}_conv",
    )(x)
    if batchnorm:
        x = FusedBatchNormalization(
            axis=channel_axis(), momentum=0.9, epsilon=TORCH_BN_EPSILON, name=f"{name}_bn"
        )(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _check_options(owner, encoder, decoder_channels, pab_variant, decoder_interpolation):
    check_choice("encoder", encoder, ENCODERS, owner)
    check_choice("pab_variant", pab_variant, VARIANTS, owner)
    check_choice("decoder_interpolation", decoder_interpolation, INTERPOLATIONS, owner)
    if not isinstance(decoder_channels, (list, tuple)) or len(decoder_channels) != 5:
        raise ValueError(
            f"{owner}: `decoder_channels` must be 5 positive integers, one per decoder block "
            f"(1/16, 1/8, 1/4, 1/2, 1/1), got decoder_channels={decoder_channels!r}."
        )
    for value in decoder_channels:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{owner}: `decoder_channels` must be 5 positive integers, got "
                f"decoder_channels={tuple(decoder_channels)!r}."
            )


def build_manet(
    input_shape=(256, 256, 1),
    num_classes: int = 3,
    encoder: str = "resnet34",
    decoder_channels=DECODER_CHANNELS,
    pab_channels: int = 64,
    pab_variant: str = "smp",
    reduction: int = 16,
    decoder_batchnorm: bool = True,
    decoder_interpolation: str = "nearest",
    head: str = "softmax",
    name: str = "manet",
) -> keras.Model:
    """MA-Net: a ResNet encoder, a Position-wise Attention Block, and MFAB decoder stages.

    Fan, Wang, Li, Wang, "MA-Net: A Multi-Scale Attention Network for Liver and Tumor
    Segmentation", IEEE Access 8 (2020), doi:10.1109/ACCESS.2020.3025372; built layer
    for layer as segmentation_models.pytorch (smp) 0.6 builds ``smp.MAnet``::

        P1, P2, P3, P4, P5 = encoder(x)                # 1/2, 1/4, 1/8, 1/16, 1/32
        c5 = PAB(P5)                                   # 1/32   center_pab   [decoder.center]
        d4 = MFAB([c5, P4])                            # 1/16   decoder4_mfab [decoder.blocks.0]
        d3 = MFAB([d4, P3])                            # 1/8    decoder3_mfab
        d2 = MFAB([d3, P2])                            # 1/4    decoder2_mfab
        d1 = MFAB([d2, P1])                            # 1/2    decoder1_mfab [decoder.blocks.3]
        d0 = ConvBNReLU3x3²(upsample2x(d1))            # 1/1    decoder0_*    [decoder.blocks.4]
        probabilities = softmax(Conv3x3(d0))           # 1/1    logits        [segmentation_head]

    The encoder is the shared BasicBlock ResNet-34 (or -18) of
    :func:`~keras_livseg.models.resnet_encoder.build_resnet_encoder`, called as a
    sub-model named ``"resnet34_encoder"``; the PAB is a
    :class:`~keras_livseg.models.layers.position_attention.PositionAttention`, each
    MFAB a :class:`~keras_livseg.models.layers.multiscale_fusion_attention.MultiscaleFusionAttention`.
    With the default options the trainable weights correspond one to one, in shape,
    to ``smp.MAnet("resnet34", encoder_weights=None, in_channels=C, classes=num_classes)``
    (31,777,651 parameters for C = 1), and with smp's weights copied in, the
    decoder and head compute smp's logits (the tests check it where smp is installed).

    Where we follow smp rather than the paper, or differ from both:

    - PAB (``pab_variant="smp"``): smp's attention, not the paper's: one softmax over
      the whole ``N x N`` map instead of one per position, no learned scale ``γ``,
      and smp's reshape of the attended values (see ``PositionAttention``);
      query/key have a fixed ``pab_channels`` (64), not ``C/8``; the value and the
      final convolution are 3x3. ``pab_variant="danet"`` keeps smp's layers but
      computes the attention as the DANet block the paper builds on (per-position
      softmax, ``γ`` starting at 0).
    - PAB memory: ``(H/32 · W/32)²`` attention entries per image, 4,096 on a
      256x256 slice (8x8 map), 65,536 at 512x512; it grows as the side to the fourth.
    - MFAB (see ``MultiscaleFusionAttention``), decoder widths (256, 128, 64, 32, 16),
      the fifth, skip-less decoder block at full resolution and the 3x3 head: smp's.
    - No pretrained encoder (smp defaults to ImageNet weights): there is no network
      here. Decoder convolutions start as smp's (Kaiming uniform, zero bias), the
      head Glorot uniform.
    - Batch norm as PyTorch's everywhere (momentum 0.1), but epsilon 1.001e-5 for
      1e-5: the least TensorFlow's fused batch norm kernel takes.
    - smp's ``encoder_depth`` is fixed at 5: inputs must be multiples of 32.
    - The head ends in a float32 softmax (or per-class sigmoid); smp returns logits.
    - The encoder pads its stride-2 convolutions and max pool the TensorFlow way
      ("same": the extra pixel after), torchvision symmetrically; torchvision/smp
      encoder weights copied in give shifted features, so only the decoder and head
      reproduce smp's numbers.

    Args:
        input_shape: ``(H, W, C)`` (``(C, H, W)`` under channels_first); H and W
            multiples of 32 (the error names the nearest); C = 1 (a slice), 3 (2.5D)
            or any. Defaults to ``(256, 256, 1)``.
        num_classes: int. Defaults to 3 (background, liver, tumor).
        encoder: ``"resnet34"`` (default, smp's) or ``"resnet18"``.
        decoder_channels: 5 ints, output channels of the decoder blocks at 1/16,
            1/8, 1/4, 1/2 and 1/1. Defaults to ``(256, 128, 64, 32, 16)``.
        pab_channels: int. Query/key channels of the PAB (smp's
            ``decoder_pab_channels``). Defaults to 64.
        pab_variant: ``"smp"`` (default) or ``"danet"``; see above.
        reduction: int. SE reduction ratio in the MFABs. Defaults to 16.
        decoder_batchnorm: bool. BN in the decoder's ConvReLU units (smp's
            ``decoder_use_norm``). Defaults to True.
        decoder_interpolation: ``"nearest"`` (default) or ``"bilinear"`` 2x upsampling
            in the decoder (smp's ``decoder_interpolation``).
        head: ``"softmax"`` (default) or ``"sigmoid"`` (per-class).
        name: model name. Defaults to ``"manet"``.

    Returns:
        A ``keras.Model``: input ``"ct_slices"`` ``(batch, H, W, C)`` float32, output
        ``"probabilities"`` ``(batch, H, W, num_classes)`` float32.

    Example:

    >>> model = build_manet(input_shape=(64, 64, 1), encoder="resnet18",
    ...                     decoder_channels=(16, 8, 8, 8, 4), pab_channels=4)
    >>> tuple(model.output.shape)
    (None, 64, 64, 3)
    >>> [layer.name for layer in model.layers][2:4]
    ['center_pab', 'decoder4_mfab']
    """
    owner = name
    check_head(head, num_classes, owner)
    _check_options(owner, encoder, decoder_channels, pab_variant, decoder_interpolation)
    check_positive_int("pab_channels", pab_channels, owner)
    check_positive_int("reduction", reduction, owner)
    check_input_shape(input_shape, OUTPUT_STRIDE, owner, "the ResNet encoder reaches stride 32")
    data_format = keras.config.image_data_format()
    mfab_options = {
        "reduction": reduction,
        "use_batchnorm": bool(decoder_batchnorm),
        "interpolation": decoder_interpolation,
    }

    # Layers.
    resnet = build_resnet_encoder(
        input_shape, blocks=RESNET_BLOCKS[encoder], name=f"{encoder}_encoder"
    )

    # Functional model: encoder, PAB on the deepest features, MFAB decoder, head.
    inputs = ct_input(input_shape)
    p1, p2, p3, p4, p5 = resnet(inputs)
    x = PositionAttention(pab_channels, variant=pab_variant, name="center_pab")(p5)  # 1/32
    for level, skip, filters in zip((4, 3, 2, 1), (p4, p3, p2, p1), decoder_channels):
        x = MultiscaleFusionAttention(filters, **mfab_options, name=f"decoder{level}_mfab")(
            [x, skip]
        )  # 1/16, 1/8, 1/4, 1/2
    x = layers.UpSampling2D(
        2, interpolation=decoder_interpolation, data_format=data_format, name="decoder0_upsample"
    )(x)  # 1/1
    x = _conv_bn_relu(x, decoder_channels[4], decoder_batchnorm, "decoder0_1")
    x = _conv_bn_relu(x, decoder_channels[4], decoder_batchnorm, "decoder0_2")
    logits = layers.Conv2D(
        num_classes, 3, padding="same", data_format=data_format, name="logits"
    )(x)
    outputs = probabilities(logits, head)
    model = keras.Model(inputs, outputs, name=name)
    logger.debug("built %s with %d parameters", name, model.count_params())
    return model
