"""Enhanced PAN (Swapna, Sujatha): EfficientNet-B0 encoder, SE, ASPP, FPA and GAU decoder."""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path

import keras
from keras import layers

from keras_livseg.models._heads import check_head, ct_input, probabilities
from keras_livseg.models._utils import check_input_shape, check_positive_int, check_rate
from keras_livseg.models.layers import (
    ASPP,
    FeaturePyramidAttention,
    GlobalAttentionUpsample,
    SqueezeExcitation,
)
from keras_livseg.models.layers._fast_kernels import FusedBatchNormalization, SwishActivation

logger = logging.getLogger(__name__)

#: EfficientNet-B0 layers tapped for the pyramid, strides 4, 8, 16, 32 (24, 40, 112, 320 channels);
#: at output_stride=16 the last one is at stride 16 too.
PYRAMID_TAPS = {
    "P2": "block2b_add",
    "P3": "block3b_add",
    "P4": "block5c_add",
    "P5": "block7a_project_bn",
}
ENCODER_NAME = "efficientnetb0_encoder"
#: First layer after keras.applications' Rescaling(1/255) + Normalization preprocessing.
STEM_ENTRY = "stem_conv_pad"
IMAGENET_NOTOP_FILE = "efficientnetb0_notop.h5"
IMAGENET_NOTOP_URL = "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5"
#: 32: keras.applications' network as is. 16: block6a's stride becomes dilation 2 (see
#: :func:`build_efficientnet_encoder`), smp's ``encoder_output_stride=16``.
OUTPUT_STRIDES = (16, 32)
#: "smp": our reading (SE on the skips only); "paper": Algorithm 1's order (SE on every
#: level, so P5 passes SE before ASPP). See :func:`build_effb0_pan`.
DECODERS = ("smp", "paper")


def imagenet_weights_path() -> Path:
    """Where ``encoder_weights="imagenet"`` looks: ``$KERAS_HOME/models/efficientnetb0_notop.h5``.

    ``KERAS_HOME`` defaults to ``~/.keras``, the cache ``keras.applications`` itself uses.
    """
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "models" / IMAGENET_NOTOP_FILE


#: keras.applications' MD5 of the no-top file (``WEIGHTS_HASHES["b0"][1]``), checked after a download.
IMAGENET_NOTOP_MD5 = "50bc09e76180e00e4465e1a485ddc09d"
DOWNLOAD_TIMEOUT_S = 20.0


def download_imagenet_weights(path: Path) -> Path | None:
    """Fetch the no-top file into Keras's own cache (``keras.utils.get_file``) at ``path``.

    Returns the file, or None (logged) when it cannot be downloaded: no network, a proxy
    refusing, a hash mismatch. Sockets time out after ``DOWNLOAD_TIMEOUT_S`` so an offline
    machine answers in seconds, not minutes.
    """
    import socket

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        fetched = keras.utils.get_file(IMAGENET_NOTOP_FILE, IMAGENET_NOTOP_URL, cache_dir=str(path.parent.parent),
                                       cache_subdir=path.parent.name, file_hash=IMAGENET_NOTOP_MD5)
    except Exception as error:  # URLError, HTTPError, timeouts, hash mismatch: all mean "not here"
        logger.info("could not download %s: %s", IMAGENET_NOTOP_URL, error)
        return None
    finally:
        socket.setdefaulttimeout(previous)
    return Path(fetched)


def _resolve_weights(encoder_weights) -> Path | None:
    if encoder_weights is None:
        return None
    if encoder_weights == "imagenet":
        path = imagenet_weights_path()
        if path.is_file():  # Keras's cache, or a file placed there by hand
            return path
        fetched = download_imagenet_weights(path)
        if fetched is None or not fetched.is_file():
            raise FileNotFoundError(
                f"encoder_weights='imagenet' needs the Keras EfficientNetB0 no-top weights file "
                f"{IMAGENET_NOTOP_FILE!r} in the folder {str(path.parent)!r} (looked for {str(path)!r}) and it "
                f"could not be downloaded from {IMAGENET_NOTOP_URL}: download it on a machine with a network "
                f"and copy it to {str(path)!r}, pass its path as encoder_weights, or use "
                f"encoder_weights=None to train from scratch."
            )
        return fetched
    if isinstance(encoder_weights, (str, os.PathLike)):
        path = Path(encoder_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"encoder_weights={str(encoder_weights)!r}: no such file; pass the path of a Keras "
                f"EfficientNetB0 include_top=False weights file (.h5 or .weights.h5), 'imagenet', or None."
            )
        return path
    raise ValueError(
        f"`encoder_weights` must be None, 'imagenet' or a path to an EfficientNetB0 no-top weights "
        f"file, got encoder_weights={encoder_weights!r}."
    )


def use_fast_kernels(model: keras.Model) -> int:
    """Give ``model``'s BatchNormalization and swish layers faster TensorFlow kernels.

    Every ``BatchNormalization`` becomes a :class:`FusedBatchNormalization` and every
    ``Activation("swish")`` a :class:`SwishActivation`: same names, configs and
    weights, same outputs up to float rounding; on TensorFlow, BN runs as one
    ``FusedBatchNormV3`` (Keras 3 runs ~10 unfused ops forward and more backward)
    and swish's gradient as one XLA-fused kernel (six ops in ``tf.nn.silu``). These
    were ~23 % and ~10 % of EfficientNet-B0-PAN's train-step op time on CPU (see
    docs/perf-effb0_pan.md). The subclasses add no state, so the class of the
    existing layer objects is switched in place and the functional graph that
    keras.applications built stays as it is. Returns how many layers changed.
    """
    count = 0
    for layer in model.layers:
        if type(layer) is layers.BatchNormalization:
            layer.__class__ = FusedBatchNormalization
        elif type(layer) is layers.Activation and layer.activation is keras.activations.silu:
            layer.__class__ = SwishActivation
        else:
            continue
        count += 1
    return count


def _dilate_past(config: dict, output_stride: int) -> list[str]:
    """Turn the strides of ``config`` (a functional model's) beyond ``output_stride`` into dilation.

    The first convolution whose stride would take the network past ``output_stride``
    keeps stride 1; it and every later convolution with a kernel larger than 1x1 get
    the dilation that stride would have had (smp's ``replace_strides_with_dilation``
    on the last stage; a 1x1 kernel is unaffected by dilation). keras.applications
    pads strided convolutions explicitly (``<conv>_pad`` + "valid"); that padding
    becomes the symmetric ``dilation * (k - 1) / 2`` of a "same" dilated convolution,
    so the layers, their names and their weights stay as they are. Edits ``config``
    in place and returns the names of the dilated convolutions.
    """
    for layer in config["layers"]:
        # The recorded input shapes are the stride-32 ones: let each layer build on
        # its new input when the graph is rebuilt.
        layer.pop("build_config", None)
    layer_configs = {layer["config"]["name"]: layer["config"] for layer in config["layers"]}
    stride, dilation, dilated = 1, 1, []
    for layer in config["layers"]:  # a functional config lists its layers in graph order
        if layer["class_name"] not in ("Conv2D", "DepthwiseConv2D"):
            continue
        conv = layer["config"]
        step = tuple(conv["strides"])[0]
        if step > 1 and stride * step > output_stride:
            conv["strides"] = (1, 1)
            dilation *= step
        else:
            stride *= step
        kernel_size = tuple(conv["kernel_size"])[0]
        if dilation == 1 or kernel_size == 1:
            continue
        conv["dilation_rate"] = (dilation, dilation)
        if conv["padding"] == "valid":
            pad = layer_configs.get(f"{conv['name']}_pad")
            if pad is None:  # a keras.applications change this module must follow
                raise RuntimeError(
                    f"unexpected EfficientNetB0 layout: no padding layer before {conv['name']!r}"
                )
            half = dilation * (kernel_size - 1) // 2
            pad["padding"] = ((half, half), (half, half))
        dilated.append(conv["name"])
    return dilated


def build_efficientnet_encoder(input_shape, output_stride: int = 32) -> keras.Model:
    """EfficientNet-B0 from ``keras.applications`` without its input preprocessing.

    ``keras.applications.EfficientNetB0`` starts with ``Rescaling(1/255)`` and
    ``Normalization``, made for 0–255 RGB; fed standardized CT they would silently
    shrink it 255×. The encoder returned here is the same network cut at
    ``stem_conv_pad``: its input goes straight into the stem convolution, and it
    outputs the pyramid ``[P2, P3, P4, P5]`` (strides 4, 8, 16, 32; 24, 40, 112, 320
    channels). The MBConv blocks keep their own squeeze-and-excitation. Its
    BatchNormalization and swish layers are the drop-in subclasses of
    :func:`use_fast_kernels` (same weights and outputs, fused TensorFlow kernels).

    ``output_stride=16`` keeps P5 at 1/16, as smp's ``encoder_output_stride=16``
    does: block6a's depthwise convolution (the last stride-2 layer) gets stride 1,
    and it and the depthwise convolutions of block6b–6d and block7a get dilation 2
    (the stride they no longer have; ``block6a_dwconv_pad`` pads them 4 pixels on
    every side, "same" for a dilated 5x5). The network is rebuilt from its config
    with these changes, so every layer keeps its name and weight shapes and
    :func:`load_encoder_weights` loads stride-32 weight files unchanged. This is
    smp's ``make_dilated`` on its ``timm-efficientnet-b0`` encoder, whose 1/32 stage is
    block6a–7a; like smp, block6a's own kernel is dilated too (torchvision, timm and
    DeepLab keep the formerly strided convolution at dilation 1, the exact à-trous
    equivalent of the stride-32 network).

    Args:
        input_shape: ``(H, W, C)`` (``(C, H, W)`` under channels_first), any C.
        output_stride: 32 (default) or 16, the stride of P5.

    Returns:
        A functional ``keras.Model`` named ``"efficientnetb0_encoder"``.

    Example:

    >>> encoder = build_efficientnet_encoder((64, 64, 1))
    >>> [tuple(t.shape[1:]) for t in encoder.outputs]
    [(16, 16, 24), (8, 8, 40), (4, 4, 112), (2, 2, 320)]
    >>> [tuple(t.shape[1:3]) for t in build_efficientnet_encoder((64, 64, 1), output_stride=16).outputs]
    [(16, 16), (8, 8), (4, 4), (4, 4)]
    """
    if type(output_stride) is not int or output_stride not in OUTPUT_STRIDES:  # 16.0 and True too
        raise ValueError(
            f"{ENCODER_NAME}: `output_stride` must be one of {OUTPUT_STRIDES}, got "
            f"output_stride={output_stride!r}."
        )
    with warnings.catch_warnings():
        # keras.applications warns for channel counts other than 1 or 3 (2.5D stacks).
        warnings.filterwarnings("ignore", message="This model usually expects 1 or 3 input channels")
        base = keras.applications.EfficientNetB0(
            include_top=False, weights=None, input_shape=tuple(input_shape)
        )
    use_fast_kernels(base)  # BN and swish layers: same layers, fused TF kernels
    stem_entry = base.get_layer(STEM_ENTRY).input
    preprocessing = base.layers[1 : base.layers.index(base.get_layer(STEM_ENTRY))]
    if any(type(layer).__name__ not in ("Rescaling", "Normalization") for layer in preprocessing):
        raise RuntimeError(  # a keras.applications change this module must follow
            f"unexpected EfficientNetB0 layout: {[layer.name for layer in base.layers[:5]]}"
        )
    taps = [base.get_layer(layer_name).output for layer_name in PYRAMID_TAPS.values()]
    # A functional model from an intermediate tensor: Keras clones the graph from
    # stem_conv_pad on behind a fresh input, so Rescaling/Normalization and the head
    # after block7a are not part of it (and the layers are built once, which matters
    # under JAX, where every new variable shape compiles its initializer).
    encoder = keras.Model(stem_entry, taps, name=ENCODER_NAME)
    if output_stride == 32:
        return encoder
    # Built layers cannot change their stride; the functional config can. One more
    # build of the graph (new random weights, like the first), at output_stride=16 only.
    config = copy.deepcopy(encoder.get_config())
    dilated = _dilate_past(config, output_stride)
    logger.debug("output_stride=%d: dilated %s", output_stride, dilated)
    return keras.Model.from_config(config)


def load_encoder_weights(encoder: keras.Model, encoder_weights) -> None:
    """Load EfficientNetB0 no-top weights (path or ``"imagenet"``) into ``encoder``.

    The file is read by a reference ``keras.applications.EfficientNetB0`` with 3
    input channels, so any file that model accepts works (the official legacy
    ``.h5`` or a ``.weights.h5`` saved by Keras 3); then every encoder layer takes
    the weights of the layer with the same name. The file's ``Normalization``
    statistics are not used (the encoder has no preprocessing; feed standardized CT).

    Input channels: 3 uses the stem kernel as is; 1 sums the stem kernel over its 3
    input channels, which gives exactly the response the RGB network has to a gray
    image replicated into R, G and B. Other channel counts cannot take the weights.

    Raises:
        FileNotFoundError: the file (or, for "imagenet", the cached file) is missing.
        ValueError: bad ``encoder_weights`` or an input with neither 1 nor 3 channels.
    """
    path = _resolve_weights(encoder_weights)
    if path is None:
        return
    stem_kernel = encoder.get_layer("stem_conv").kernel
    channels = stem_kernel.shape[2]
    if channels not in (1, 3):
        raise ValueError(
            f"encoder_weights={str(encoder_weights)!r} are for 3-channel input; the input has "
            f"{channels} channels. Use 1 (single slice) or 3 (three adjacent slices), or "
            f"encoder_weights=None."
        )
    reference = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(64, 64, 3)
    )
    reference.load_weights(str(path))
    copied = 0
    for layer in encoder.layers:
        if not layer.weights:
            continue
        values = reference.get_layer(layer.name).get_weights()
        if layer.name == "stem_conv" and channels == 1:
            values = [values[0].sum(axis=2, keepdims=True)]
        layer.set_weights(values)
        copied += 1
    logger.info("loaded EfficientNetB0 weights from %s into %d layers", path, copied)


def build_effb0_pan(
    input_shape=(256, 256, 1),
    num_classes: int = 3,
    decoder_filters: int = 64,
    se_ratio: int = 4,
    aspp_rates=(6, 12, 18),
    aspp_dropout: float = 0.1,
    output_stride: int = 32,
    decoder: str = "smp",
    encoder_weights=None,
    encoder_trainable: bool = True,
    head: str = "softmax",
    name: str = "effb0_pan",
) -> keras.Model:
    """Enhanced Pyramid Attention Network with an EfficientNet-B0 encoder.

    Swapna, Sujatha, "Medical Image Segmentation with Pyramid Attention Networks and a
    Case Study on Liver Tumors" (Section 3, Algorithm 1), with the PAN decoder of Li
    et al. 2018 (arXiv 1805.10180) as segmentation_models.pytorch (smp) builds it.
    The paper's text leaves the wiring open; the default reading, ``decoder="smp"``
    (scales at ``output_stride=16`` in brackets)::

        P2, P3, P4, P5 = encoder(x)                       # 1/4, 1/8, 1/16, 1/32 [1/16]
        P2, P3, P4 = SE(P2), SE(P3), SE(P4)               # channel attention on skips
        c5 = ASPP(P5)                                     # rates 6, 12, 18 + image pool
        d5 = c5 + FPA(c5)                                 # 1/32 [1/16], residual
        d4 = GAU([P4, d5])                                # 1/16 (adds d5 upsampled x2 [x1])
        d3 = GAU([P3, d4])                                # 1/8
        d2 = GAU([P2, d3])                                # 1/4
        probabilities = softmax(upsample4(Conv1x1(d2)))   # 1/1, float32

    ``decoder="paper"`` is Algorithm 1's own order where it differs from ours.
    Algorithm 1 is a chain: Step 2 ``F = EfficientNet-B0(I')``, Step 3 ``F' = SE(F)``,
    Step 4 ASPP (rates 6, 12, 18), Step 5 pyramid attention, Step 6 a 1x1
    convolution and softmax/sigmoid; "attention maps ... weight the feature maps from
    each encoder layer" (end of Section 3) is PAN's GAU on the skips. So SE acts on
    the encoder's features, the deepest included, *before* ASPP; ours leaves P5 to
    ASPP (EfficientNet's MBConv blocks, block7a included, end in an SE of their own).
    ``"paper"`` adds that one block, ``P5 = SE(P5)`` (``se_p5``) before ASPP,
    +51,600 parameters at the defaults, and is otherwise the same. Both readings
    keep PAN's FPA on ASPP's output and GAU's sigmoid gate: read literally, Step 5
    (``A = Softmax(W_att * F')``, ``F'' = A · F'``) takes F' rather than ASPP's output
    (ASPP would feed nothing) and a softmax, which over 64 channels would scale the
    gated branch by ~1/64; Section 3.2's bins 1, 2, 3, 6, concatenated skips and
    transposed convolutions describe PSPNet and U-Net, not the paper's model.
    Elsewhere the paper is too vague to differ (its ASPP concatenates "Y_1..Y_4",
    ours DeepLab's five branches) or agrees (its 1x1 head; smp's head is 3x3).

    ``output_stride=32`` (default) is keras.applications' EfficientNet-B0 as is: P5,
    ASPP and FPA at 1/32, 8x8 at 256 px, where the off-centre taps of ASPP's rate-12
    and rate-18 branches can only read padding: those branches are 1x1 convolutions
    in effect (see :class:`ASPP`). ``output_stride=16`` is smp's ``encoder_output_stride=16`` (its
    default): block6a has stride 1, and it and every later depthwise convolution
    dilation 2 (see :func:`build_efficientnet_encoder`), so P5 is at 1/16 (16x16 at
    256 px, rates 6 and 12 live, 18 still the centre tap only) and the first GAU
    adds d5 to P4 at the same resolution. Same layers, parameters and weight files.
    Measured at 256x256x1, batch 8, Adam, float32, on 2 shared CPU cores (median of
    6 steps, 3 alternating rounds): 0.54 s per train step at 32 against 0.81 s at 16
    (first, tracing step ~17 s both; building 0.7 s against 1.3 s, the encoder is
    built twice), 1.19 against 2.21 forward GFLOPs per slice, 4,384,182 parameters
    both. The default stays 32: the paper does not state a stride (if it ran smp's
    PAN, it ran at 16), stride 16 costs ~1.5x per step and ~1.9x the FLOPs, and the
    recorded benchmarks, recipes and checkpoints of this project are at 32.
    Choose 16 for the most faithful smp-like PAN or when ASPP's large rates matter.

    The encoder is ``keras.applications.EfficientNetB0`` without its
    ``Rescaling(1/255)``/``Normalization`` preprocessing (see
    :func:`build_efficientnet_encoder`): standardized CT reaches the stem as is. No
    batch norm follows a global pooling anywhere, so training at batch size 1 works.

    Args:
        input_shape: ``(H, W, C)``; H and W multiples of ``output_stride`` (what the
            encoder downsamples by; the error names the nearest one); C = 1 (a slice)
            or 3 (three adjacent slices), or any C without pretrained weights.
            Defaults to ``(256, 256, 1)``.
        num_classes: int. Defaults to 3 (background, liver, tumor).
        decoder_filters: int. Channels of ASPP, FPA and GAU. Defaults to 64.
        se_ratio: int. SE reduction ratio on the skips (24, 40, 112 channels; 320 on
            P5 with ``decoder="paper"``), at most 24. Defaults to 4.
        aspp_rates: dilation rates. Defaults to ``(6, 12, 18)``.
        aspp_dropout: float in [0, 1). Defaults to 0.1.
        output_stride: 32 (default) or 16, the stride of P5 (see above).
        decoder: ``"smp"`` (default, SE on the skips) or ``"paper"`` (SE on P5 too,
            before ASPP, as Algorithm 1 orders it; see above).
        encoder_weights: ``None`` (default, random init), ``"imagenet"`` (read from
            Keras's cache ``~/.keras/models/efficientnetb0_notop.h5``, downloaded into it by
            ``keras.utils.get_file`` when missing and a network is at hand) or a path
            to an EfficientNetB0 no-top weights file, for either output stride. See
            :func:`load_encoder_weights`.
        encoder_trainable: bool. False freezes the encoder. Defaults to True.
        head: ``"softmax"`` (default) or ``"sigmoid"`` (per-class).
        name: model name. Defaults to ``"effb0_pan"``.

    Returns:
        A ``keras.Model``: input ``"ct_slices"`` ``(batch, H, W, C)`` float32, output
        ``"probabilities"`` ``(batch, H, W, num_classes)`` float32.

    Example:

    >>> model = build_effb0_pan(input_shape=(64, 64, 1), decoder_filters=8)
    >>> tuple(model.output.shape)
    (None, 64, 64, 3)
    >>> model = build_effb0_pan(input_shape=(48, 48, 1), decoder_filters=8, output_stride=16,
    ...                         decoder="paper")
    >>> tuple(model.get_layer("efficientnetb0_encoder").outputs[3].shape), tuple(model.output.shape)
    ((None, 3, 3, 320), (None, 48, 48, 3))
    """
    owner = name
    check_head(head, num_classes, owner)
    check_positive_int("decoder_filters", decoder_filters, owner)
    check_positive_int("se_ratio", se_ratio, owner)
    check_rate("aspp_dropout", aspp_dropout, owner)
    if type(output_stride) is not int or output_stride not in OUTPUT_STRIDES:  # 16.0 and True too
        raise ValueError(
            f"{owner}: `output_stride` must be 16 (block6a dilated, P5 at 1/16, as smp's PAN) or 32 "
            f"(keras.applications' EfficientNet-B0 as is), got output_stride={output_stride!r}."
        )
    if decoder not in DECODERS:
        raise ValueError(
            f"{owner}: `decoder` must be one of {DECODERS} ('smp': SE on the skips; 'paper': SE on "
            f"every level, P5 too, before ASPP), got decoder={decoder!r}."
        )
    check_input_shape(
        input_shape, output_stride, owner,
        f"EfficientNet-B0 with output_stride={output_stride} downsamples {output_stride}x",
    )
    if encoder_weights is not None:
        _resolve_weights(encoder_weights)  # fail before building anything
    data_format = keras.config.image_data_format()

    # Layers.
    encoder = build_efficientnet_encoder(input_shape, output_stride=output_stride)
    load_encoder_weights(encoder, encoder_weights)
    encoder.trainable = bool(encoder_trainable)

    # Functional model.
    inputs = ct_input(input_shape)
    p2, p3, p4, p5 = encoder(inputs)
    p2 = SqueezeExcitation(se_ratio, name="se_p2")(p2)  # 1/4
    p3 = SqueezeExcitation(se_ratio, name="se_p3")(p3)  # 1/8
    p4 = SqueezeExcitation(se_ratio, name="se_p4")(p4)  # 1/16
    if decoder == "paper":
        p5 = SqueezeExcitation(se_ratio, name="se_p5")(p5)  # Algorithm 1: Step 3 (SE) before Step 4 (ASPP)
    c5 = ASPP(decoder_filters, rates=aspp_rates, dropout=aspp_dropout, name="aspp")(p5)  # 1/output_stride
    d5 = layers.Add(name="fpa_residual")(
        [c5, FeaturePyramidAttention(decoder_filters, name="fpa")(c5)]
    )  # 1/output_stride
    d4 = GlobalAttentionUpsample(decoder_filters, name="gau_p4")([p4, d5])  # 1/16 (d5 upsampled x2, or x1)
    d3 = GlobalAttentionUpsample(decoder_filters, name="gau_p3")([p3, d4])  # 1/8
    d2 = GlobalAttentionUpsample(decoder_filters, name="gau_p2")([p2, d3])  # 1/4
    logits = layers.Conv2D(num_classes, 1, data_format=data_format, name="logits")(d2)
    logits = layers.UpSampling2D(
        4, interpolation="bilinear", data_format=data_format, name="logits_upsample"
    )(logits)  # 1/1
    outputs = probabilities(logits, head)
    return keras.Model(inputs, outputs, name=name)
