"""U-Net (the baseline) and TAM-U-Net (Khimta, Vedant, Suganya) as functional Keras models."""

from __future__ import annotations

import logging
from typing import Iterable

import keras
from keras import layers

from keras_livseg.models._heads import check_head, ct_input, probabilities
from keras_livseg.models._utils import (
    channel_axis,
    check_input_shape,
    check_positive_int,
    check_rate,
)
from keras_livseg.models.layers.tumor_attention import TumorAttention

logger = logging.getLogger(__name__)

UPSAMPLING_MODES = ("nearest", "bilinear")
TAM_STAGE_GROUPS = ("encoder", "bottleneck", "decoder")


def _conv_relu(x, filters: int, kernel_size: int, batchnorm: bool, name: str):
    """Conv → (BN) → ReLU; the convolution drops its bias when BN follows."""
    data_format = keras.config.image_data_format()
    x = layers.Conv2D(
        filters, kernel_size, padding="same", use_bias=not batchnorm,
        kernel_initializer="he_normal", data_format=data_format, name=f"{name}_conv",
    )(x)
    if batchnorm:
        x = layers.BatchNormalization(axis=channel_axis(), name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def expand_tam_stages(tam_stages: Iterable[str], depth: int) -> tuple[str, ...]:
    """Expand stage groups into block names, in network order.

    ``"encoder"`` → ``encoder1..encoder{depth}``, ``"decoder"`` → ``decoder{depth}..decoder1``
    (block 1 is the full-resolution one); single block names pass through.

    Example:

    >>> expand_tam_stages(("encoder", "bottleneck"), depth=2)
    ('encoder1', 'encoder2', 'bottleneck')
    """
    order = (
        [f"encoder{i}" for i in range(1, depth + 1)]
        + ["bottleneck"]
        + [f"decoder{i}" for i in range(depth, 0, -1)]
    )
    if isinstance(tam_stages, str):
        tam_stages = (tam_stages,)
    wanted = set()
    for stage in tam_stages:
        if stage in ("encoder", "decoder"):
            wanted.update(b for b in order if b.startswith(stage))
        elif stage in order:
            wanted.add(stage)
        else:
            raise ValueError(
                f"`tam_stages` entries must be one of {TAM_STAGE_GROUPS} or a block name in "
                f"{tuple(order)}, got {stage!r}."
            )
    return tuple(b for b in order if b in wanted)


def _build_unet(
    *,
    input_shape,
    num_classes: int,
    filters: int,
    depth: int,
    batchnorm: bool,
    dropout: float,
    upsampling: str,
    head: str,
    tam_stages: tuple[str, ...],
    tam_mode: str,
    name: str,
) -> keras.Model:
    owner = name
    check_positive_int("filters", filters, owner)
    check_positive_int("depth", depth, owner)
    check_rate("dropout", dropout, owner)
    check_head(head, num_classes, owner)
    if upsampling not in UPSAMPLING_MODES:
        raise ValueError(
            f"{owner}: `upsampling` must be one of {UPSAMPLING_MODES}, got upsampling={upsampling!r}."
        )
    check_input_shape(input_shape, 2**depth, owner, f"{depth} max-pool halvings need 2**depth={2**depth}")
    data_format = keras.config.image_data_format()

    def maybe_tam(x, block):
        if block in tam_stages:
            x = TumorAttention(mode=tam_mode, name=f"{block}_tam")(x)
        return x

    # Functional model: encoder (x0 → x_depth), bottleneck, decoder (u_depth → u1), head.
    inputs = ct_input(input_shape)
    x = inputs
    skips = []
    for level in range(1, depth + 1):
        level_filters = filters * 2 ** (level - 1)
        x = _conv_relu(x, level_filters, 3, batchnorm, f"encoder{level}_1")
        x = _conv_relu(x, level_filters, 3, batchnorm, f"encoder{level}_2")
        x = maybe_tam(x, f"encoder{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, data_format=data_format, name=f"encoder{level}_pool")(x)

    x = _conv_relu(x, filters * 2**depth, 3, batchnorm, "bottleneck_1")
    x = _conv_relu(x, filters * 2**depth, 3, batchnorm, "bottleneck_2")
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    x = maybe_tam(x, "bottleneck")

    for level in range(depth, 0, -1):
        level_filters = filters * 2 ** (level - 1)
        x = layers.UpSampling2D(
            2, interpolation=upsampling, data_format=data_format, name=f"decoder{level}_upsample"
        )(x)
        x = _conv_relu(x, level_filters, 2, batchnorm, f"decoder{level}_up")
        x = layers.Concatenate(axis=channel_axis(), name=f"decoder{level}_concat")(
            [skips[level - 1], x]
        )
        x = _conv_relu(x, level_filters, 3, batchnorm, f"decoder{level}_1")
        x = _conv_relu(x, level_filters, 3, batchnorm, f"decoder{level}_2")
        x = maybe_tam(x, f"decoder{level}")

    logits = layers.Conv2D(num_classes, 1, data_format=data_format, name="logits")(x)
    outputs = probabilities(logits, head)
    model = keras.Model(inputs, outputs, name=name)
    logger.debug("built %s with %d parameters", name, model.count_params())
    return model


def build_unet(
    input_shape=(256, 256, 1),
    num_classes: int = 3,
    filters: int = 64,
    depth: int = 4,
    batchnorm: bool = False,
    dropout: float = 0.0,
    upsampling: str = "nearest",
    head: str = "softmax",
    name: str = "unet",
) -> keras.Model:
    """The U-Net baseline of the TAM-U-Net paper (Section III-B).

    Encoder block: Conv3x3-ReLU-Conv3x3-ReLU-MaxPool, ``filters·2^(i-1)`` channels at
    level ``i``; a bottleneck of two Conv3x3-ReLU with ``filters·2^depth`` channels;
    decoder block: Upsample(2x)-Conv2x2-ReLU (the "up-convolution" halving channels),
    skip concatenation, Conv3x3-ReLU twice; a 1x1 convolution to ``num_classes``
    logits and a softmax (or per-class sigmoid) computed in float32.

    Defaults follow the paper: depth 4, 64 base filters, no batch norm and no dropout
    (the paper's blocks have neither; turn BN on for faster, steadier training of deep
    configurations, dropout on for small datasets, applied after the bottleneck as in
    Ronneberger et al.).

    Args:
        input_shape: ``(height, width, channels)`` (``(C, H, W)`` under
            channels_first). Height and width must be multiples of ``2**depth``; the
            error names the nearest valid size. ``channels`` is 1 for single slices,
            more for 2.5D stacks. Defaults to ``(256, 256, 1)``.
        num_classes: int. Output channels (0 background, 1 liver, 2 tumor). Defaults to 3.
        filters: int. Base filters of the first level. Defaults to 64.
        depth: int. Number of encoder (and decoder) blocks. Defaults to 4.
        batchnorm: bool. BatchNorm after every 3x3/2x2 convolution. Defaults to False.
        dropout: float in [0, 1). Dropout after the bottleneck. Defaults to 0.
        upsampling: ``"nearest"`` (default) or ``"bilinear"``.
        head: ``"softmax"`` (default, classes exclusive) or ``"sigmoid"`` (per-class,
            for the paper's binary BCE variant).
        name: model name. Defaults to ``"unet"``.

    Returns:
        A ``keras.Model`` with input ``"ct_slices"`` ``(batch, H, W, C)`` float32 and
        output ``"probabilities"`` ``(batch, H, W, num_classes)`` float32.

    Example:

    >>> model = build_unet(input_shape=(32, 32, 1), filters=4, depth=2)
    >>> tuple(model.output.shape)
    (None, 32, 32, 3)
    """
    return _build_unet(
        input_shape=input_shape, num_classes=num_classes, filters=filters, depth=depth,
        batchnorm=batchnorm, dropout=dropout, upsampling=upsampling, head=head,
        tam_stages=(), tam_mode="channel", name=name,
    )


def build_tam_unet(
    input_shape=(256, 256, 1),
    num_classes: int = 3,
    filters: int = 64,
    depth: int = 4,
    batchnorm: bool = False,
    dropout: float = 0.0,
    upsampling: str = "nearest",
    head: str = "softmax",
    tam_stages=TAM_STAGE_GROUPS,
    tam_mode: str = "channel",
    name: str = "tam_unet",
) -> keras.Model:
    """TAM-U-Net: :func:`build_unet` with a Tumor Attention Module after its blocks.

    Khimta, Vedant, Suganya place the TAM "at multiple points in both the encoding
    and decoding stages"; by default one follows every encoder block (before the max
    pool, so the skip connection carries gated features too), the bottleneck and
    every decoder block. The network is otherwise identical to :func:`build_unet`, so
    the two differ by exactly the TAM parameters (``C² + C`` each in ``"channel"``
    mode, ``C + 1`` in ``"spatial"`` mode).

    Args:
        input_shape, num_classes, filters, depth, batchnorm, dropout, upsampling,
        head: as in :func:`build_unet`.
        tam_stages: which blocks carry a TAM: any of ``"encoder"``, ``"bottleneck"``,
            ``"decoder"`` and/or block names ``"encoder1"``..``"encoder{depth}"``,
            ``"decoder1"``..``"decoder{depth}"`` (1 = full resolution). Defaults to all.
        tam_mode: ``"channel"`` (default: the paper's equation, C gates) or
            ``"spatial"`` (one gate map per block); see :class:`TumorAttention`.
        name: model name. Defaults to ``"tam_unet"``.

    Returns:
        A ``keras.Model``, input ``"ct_slices"``, output ``"probabilities"`` float32.

    Example:

    >>> model = build_tam_unet(input_shape=(32, 32, 1), filters=4, depth=2)
    >>> [layer.name for layer in model.layers if "tam" in layer.name][:2]
    ['encoder1_tam', 'encoder2_tam']
    """
    if tam_mode not in ("channel", "spatial"):
        raise ValueError(
            f"{name}: `tam_mode` must be 'channel' or 'spatial', got tam_mode={tam_mode!r}."
        )
    check_positive_int("depth", depth, name)
    return _build_unet(
        input_shape=input_shape, num_classes=num_classes, filters=filters, depth=depth,
        batchnorm=batchnorm, dropout=dropout, upsampling=upsampling, head=head,
        tam_stages=expand_tam_stages(tam_stages, depth), tam_mode=tam_mode, name=name,
    )
