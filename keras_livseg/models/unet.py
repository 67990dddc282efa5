"""U-Net (the baseline) and three attention variants as functional Keras models.

- :func:`build_unet`: the U-Net baseline of the TAM-U-Net paper.
- :func:`build_tam_unet`: TAM-U-Net (Khimta, Vedant, Suganya), a TAM after the blocks.
- :func:`build_attention_unet`: Attention U-Net (Oktay et al. 2018), gated skips.
- :func:`build_unet_cbam`: U-Net with CBAM (Woo et al. 2018) after the blocks.

All four share one encoder/decoder (:func:`_build_unet`); a variant only says what
follows each block and what gates each skip connection.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import keras
from keras import layers

from keras_livseg.models._heads import check_head, ct_input, probabilities
from keras_livseg.models._utils import (
    check_choice,
    channel_axis,
    check_input_shape,
    check_positive_int,
    check_rate,
)
from keras_livseg.models.layers._fast_kernels import FusedBatchNormalization
from keras_livseg.models.layers.attention_gate import AttentionGate
from keras_livseg.models.layers.cbam import CBAM
from keras_livseg.models.layers.tumor_attention import TumorAttention

logger = logging.getLogger(__name__)

UPSAMPLING_MODES = ("nearest", "bilinear")
TAM_STAGE_GROUPS = ("encoder", "bottleneck", "decoder")

# (features, block name such as "encoder2") -> features: what follows a block.
BlockAttention = Callable[[keras.KerasTensor, str], keras.KerasTensor]
# (skip, gating signal at the skip's resolution, level) -> skip: what gates a skip connection.
SkipGate = Callable[[keras.KerasTensor, keras.KerasTensor, int], keras.KerasTensor]


def _conv_relu(x, filters: int, kernel_size: int, batchnorm: bool, name: str):
    """Conv → (BN) → ReLU; the convolution drops its bias when BN follows."""
    data_format = keras.config.image_data_format()
    x = layers.Conv2D(
        filters, kernel_size, padding="same", use_bias=not batchnorm,
        kernel_initializer="he_normal", data_format=data_format, name=f"{name}_conv",
    )(x)
    if batchnorm:
        # Keras' BatchNormalization with TensorFlow's fused kernel (same weights and outputs):
        # BN then costs ~10 % of a base-16 TAM-U-Net step at 128 px, a fraction of the unfused ops'.
        x = FusedBatchNormalization(axis=channel_axis(), name=f"{name}_bn")(x)
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
    name: str,
    block_attention: BlockAttention | None = None,
    skip_gate: SkipGate | None = None,
) -> keras.Model:
    """The shared U-Net: ``block_attention`` follows every encoder block, the
    bottleneck and every decoder block; ``skip_gate`` gates each skip connection with
    the decoder's up-convolution output. Without them: the plain U-Net."""
    owner = name
    check_positive_int("filters", filters, owner)
    check_positive_int("depth", depth, owner)
    check_rate("dropout", dropout, owner)
    check_head(head, num_classes, owner)
    check_choice("upsampling", upsampling, UPSAMPLING_MODES, owner)
    check_input_shape(input_shape, 2**depth, owner, f"{depth} max-pool halvings need 2**depth={2**depth}")
    data_format = keras.config.image_data_format()

    def attend(x, block):
        return block_attention(x, block) if block_attention is not None else x

    # Functional model: encoder (x0 → x_depth), bottleneck, decoder (u_depth → u1), head.
    inputs = ct_input(input_shape)
    x = inputs
    skips = []
    for level in range(1, depth + 1):
        level_filters = filters * 2 ** (level - 1)
        x = _conv_relu(x, level_filters, 3, batchnorm, f"encoder{level}_1")
        x = _conv_relu(x, level_filters, 3, batchnorm, f"encoder{level}_2")
        x = attend(x, f"encoder{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, data_format=data_format, name=f"encoder{level}_pool")(x)

    x = _conv_relu(x, filters * 2**depth, 3, batchnorm, "bottleneck_1")
    x = _conv_relu(x, filters * 2**depth, 3, batchnorm, "bottleneck_2")
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    x = attend(x, "bottleneck")

    for level in range(depth, 0, -1):
        level_filters = filters * 2 ** (level - 1)
        x = layers.UpSampling2D(
            2, interpolation=upsampling, data_format=data_format, name=f"decoder{level}_upsample"
        )(x)
        x = _conv_relu(x, level_filters, 2, batchnorm, f"decoder{level}_up")
        skip = skips[level - 1]
        if skip_gate is not None:
            skip = skip_gate(skip, x, level)
        x = layers.Concatenate(axis=channel_axis(), name=f"decoder{level}_concat")([skip, x])
        x = _conv_relu(x, level_filters, 3, batchnorm, f"decoder{level}_1")
        x = _conv_relu(x, level_filters, 3, batchnorm, f"decoder{level}_2")
        x = attend(x, f"decoder{level}")

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
        batchnorm=batchnorm, dropout=dropout, upsampling=upsampling, head=head, name=name,
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
    stages = expand_tam_stages(tam_stages, depth)

    def tam(x, block):
        if block not in stages:
            return x
        return TumorAttention(mode=tam_mode, name=f"{block}_tam")(x)

    return _build_unet(
        input_shape=input_shape, num_classes=num_classes, filters=filters, depth=depth,
        batchnorm=batchnorm, dropout=dropout, upsampling=upsampling, head=head, name=name,
        block_attention=tam,
    )


def build_attention_unet(
    input_shape=(256, 256, 1),
    num_classes: int = 3,
    filters: int = 64,
    depth: int = 4,
    batchnorm: bool = False,
    dropout: float = 0.0,
    upsampling: str = "nearest",
    head: str = "softmax",
    name: str = "attention_unet",
) -> keras.Model:
    """Attention U-Net: :func:`build_unet` with an additive attention gate on every skip.

    Oktay, Schlemper, Le Folgoc, Lee, Heinrich, Misawa, Mori, McDonagh, Hammerla,
    Kainz, Glocker, Rueckert, 2018, "Attention U-Net: Learning Where to Look for the
    Pancreas" (MIDL 2018, arXiv 1804.03999). At decoder level ``l`` the skip ``x_l``
    (the output of ``encoder{l}``) is multiplied by
    ``alpha = sigmoid(psi(relu(W_x x_l + W_g g + b_g)) + b_psi)`` before the
    concatenation (:class:`AttentionGate`, layer ``decoder{l}_gate``, with
    ``F_int = max(1, filters·2^(l-1) // 2)`` intermediate channels). The network is
    otherwise :func:`build_unet`, layer for layer and name for name, so the two differ
    by exactly the gate parameters, ``2·C·F_int + 2·F_int + 1`` per level with
    ``C = filters·2^(l-1)``.

    Where the gating signal enters: we follow MONAI's ``AttentionUnet``, not Oktay's
    reference code. ``g`` is the output of ``decoder{l}_up``, the up-convolution of the
    coarser decoder level (or of the bottleneck), which is already at ``x_l``'s
    resolution, so ``W_x`` and ``W_g`` are 1x1 convolutions and ``alpha`` is computed at
    full skip resolution. Oktay computes ``W_x`` with a 2x2 stride-2 convolution, adds
    ``W_g g`` at the coarser resolution and upsamples ``alpha`` bilinearly. We chose
    MONAI's layout because (1) ``alpha`` is aligned pixel for pixel with the skip and
    the CT slice, not a bilinearly upsampled half-resolution map, which is what we
    draw as an overlay; (2) it reuses the up-convolution the U-Net computes anyway, so
    the gate adds nothing but its three projections and the comparison with
    :func:`build_unet` is exact; (3) a reference exists to cross-check. The cost is
    that the gate's 1x1 convolutions run on 4x as many pixels as Oktay's, small next
    to the 3x3 convolutions of the same level.

    Other deviations from the paper: 2D slices (the paper is 3D) on the baseline
    U-Net of :func:`build_unet` (no batch norm by default; Upsample + Conv2x2
    up-convolution); every level is gated, the full-resolution skip included (Oktay's
    code leaves level 1 ungated; MONAI gates all); no deep supervision; no 1x1
    conv-BN-ReLU after the gate (Oktay's code) and no batch norm inside it (MONAI):
    the gate is the paper's equation alone.

    Args:
        input_shape, num_classes, filters, depth, batchnorm, dropout, upsampling,
        head: as in :func:`build_unet`.
        name: model name. Defaults to ``"attention_unet"``.

    Returns:
        A ``keras.Model``, input ``"ct_slices"``, output ``"probabilities"`` float32.
        The gate maps: ``model.get_layer("decoder1_gate").compute_attention(inputs)``
        on that layer's ``[skip, gating]`` inputs.

    Example:

    >>> model = build_attention_unet(input_shape=(32, 32, 1), filters=4, depth=2)
    >>> [layer.name for layer in model.layers if isinstance(layer, AttentionGate)]
    ['decoder2_gate', 'decoder1_gate']
    >>> tuple(model.output.shape)
    (None, 32, 32, 3)
    """

    def gate(skip, gating, level):
        inter_channels = max(1, filters * 2 ** (level - 1) // 2)
        return AttentionGate(inter_channels=inter_channels, name=f"decoder{level}_gate")([skip, gating])

    return _build_unet(
        input_shape=input_shape, num_classes=num_classes, filters=filters, depth=depth,
        batchnorm=batchnorm, dropout=dropout, upsampling=upsampling, head=head, name=name,
        skip_gate=gate,
    )


def build_unet_cbam(
    input_shape=(256, 256, 1),
    num_classes: int = 3,
    filters: int = 64,
    depth: int = 4,
    batchnorm: bool = False,
    dropout: float = 0.0,
    upsampling: str = "nearest",
    head: str = "softmax",
    cbam_ratio: int = 16,
    cbam_kernel_size: int = 7,
    name: str = "unet_cbam",
) -> keras.Model:
    """U-Net with CBAM: :func:`build_unet` with a CBAM after every block.

    Woo, Park, Lee, Kweon, 2018, "CBAM: Convolutional Block Attention Module" (ECCV
    2018, arXiv 1807.06521). A :class:`CBAM` (channel attention from a shared MLP over
    the average- and max-pooled features, then spatial attention from a
    ``cbam_kernel_size`` convolution over the channel-wise average and max maps)
    follows every encoder block (before the max pool, so the skip connection carries
    refined features too), the bottleneck and every decoder block, where TAM-U-Net has
    its TAM; the layers are named ``encoder{l}_cbam``, ``bottleneck_cbam``,
    ``decoder{l}_cbam``. The network is otherwise :func:`build_unet`, so the two differ
    by exactly the CBAM parameters, ``2·C·h + h + C + 2·k² + 1`` per block with
    ``h = max(1, C // cbam_ratio)``.

    Deviations from the paper: Woo et al. put CBAM inside ResNet blocks (on the
    residual branch) for classification and detection; they have no U-Net, so we place
    it as TAM-U-Net places its TAM. The MLP's hidden width is guarded to at least 1
    (a 64-filter U-Net has 64 channels at level 1, 4 hidden units at r = 16; tiny test
    configurations have fewer channels than r). The spatial convolution has a bias
    and no batch norm, as in the paper's Eq. 3 (the authors' code adds a BN).

    Args:
        input_shape, num_classes, filters, depth, batchnorm, dropout, upsampling,
        head: as in :func:`build_unet`.
        cbam_ratio: int. Reduction ratio ``r`` of the channel MLP. Defaults to ``16``.
        cbam_kernel_size: int, odd. Kernel size of the spatial attention. Defaults
            to ``7``.
        name: model name. Defaults to ``"unet_cbam"``.

    Returns:
        A ``keras.Model``, input ``"ct_slices"``, output ``"probabilities"`` float32.
        The spatial maps: ``model.get_layer("decoder1_cbam").compute_attention(features)``
        on that layer's input.

    Example:

    >>> model = build_unet_cbam(input_shape=(32, 32, 1), filters=4, depth=2)
    >>> [layer.name for layer in model.layers if isinstance(layer, CBAM)][:3]
    ['encoder1_cbam', 'encoder2_cbam', 'bottleneck_cbam']
    >>> tuple(model.output.shape)
    (None, 32, 32, 3)
    """
    check_positive_int("cbam_ratio", cbam_ratio, name)
    check_positive_int("cbam_kernel_size", cbam_kernel_size, name)
    if cbam_kernel_size % 2 == 0:
        raise ValueError(
            f"{name}: `cbam_kernel_size` must be odd so the spatial map stays centred, got "
            f"cbam_kernel_size={cbam_kernel_size}; use {cbam_kernel_size + 1}."
        )

    def cbam(x, block):
        return CBAM(ratio=cbam_ratio, kernel_size=cbam_kernel_size, name=f"{block}_cbam")(x)

    return _build_unet(
        input_shape=input_shape, num_classes=num_classes, filters=filters, depth=depth,
        batchnorm=batchnorm, dropout=dropout, upsampling=upsampling, head=head, name=name,
        block_attention=cbam,
    )
