"""DeepLabV3+ and SegFormer from keras-cv, behind the project's model contract (extra ``[cv]``).

keras-cv is optional and slow to import, so it is imported inside the builders (and
inside the layers' ``build()``), never when this module is: importing
``keras_livseg.models`` stays cheap and works without it. Without keras-cv, building
either model raises ``keras_livseg.models.MissingExtraError`` (an ``ImportError`` and
a ``ValueError``), whose message says ``pip install "keras_livseg[cv]"``.

Each model is ``ct_slices → <keras-cv network, logits> → probabilities``. The keras-cv
network sits inside one layer of this module (:class:`KerasCVDeepLabV3Plus`,
:class:`KerasCVSegFormer`) that rebuilds it from its own arguments when a ``.keras`` file
is loaded, so what is changed here (logits instead of keras-cv's softmax) survives a
reload, and the file never depends on keras-cv's ``get_config()`` of its inner layers
(some do not round-trip in keras-cv 0.9.0: ``HierarchicalTransformerEncoder``'s has no
``sr_ratio`` and keys its ``__init__`` does not take).

keras-cv 0.9.0 hard-codes channels_last in these networks (``BatchNormalization(axis=3)``,
``Concatenate(axis=3)``, ``Dense`` over the last axis, ``Resizing`` made inside ``call()``),
so both builders refuse ``keras.config.image_data_format() == "channels_first"``.
"""

from __future__ import annotations

import contextlib
import importlib

import keras
from keras import layers

from keras_livseg.models._heads import check_head, ct_input, probabilities
from keras_livseg.models._utils import (
    check_input_shape,
    check_positive_int,
    check_rate,
    nearest_multiple,
)

INSTALL_HINT = 'pip install "keras_livseg[cv]"'
#: Both networks reach stride 32 (ResNetV2's P5, MiT's fourth stage).
OUTPUT_STRIDE = 32
#: keras-cv's MiT cannot infer its shapes when the last stage is 1x1 (a 32x32 input).
SEGFORMER_MIN_SIZE = 64
#: Attention heads per MiT stage, fixed in keras-cv's MiTBackbone (as in the paper's B0-B5).
MIT_NUM_HEADS = (1, 2, 5, 8)
#: The channels of keras-cv ResNetV2's 7x7 stem (fixed in keras-cv).
RESNET_STEM_FILTERS = 64
BLOCK_TYPES = ("basic_block", "block")


def import_keras_cv():
    """Import and return ``keras_cv``, or raise ``MissingExtraError`` saying how to install it.

    ``keras_livseg.models.MissingExtraError`` is both an ``ImportError`` and a
    ``ValueError`` (the commands print it as one line). It is imported here, not at the
    top: ``keras_livseg.models`` imports this module before it defines the class.
    """
    try:
        return importlib.import_module("keras_cv")
    except ImportError as error:
        from keras_livseg.models import MissingExtraError

        raise MissingExtraError(
            f"the models 'deeplabv3plus' and 'segformer' are built with keras-cv, which could not be "
            f"imported ({error}); install the extra with: {INSTALL_HINT}"
        ) from error


@contextlib.contextmanager
def _keras_cv_defaults(dtype_policy):
    """channels_last and ``dtype_policy`` as the global defaults while keras-cv builds its layers.

    keras-cv creates its layers with the global defaults; scoping them here makes a
    layer of this module build the same network when it is built again on loading,
    whatever the global policy is then.
    """
    previous_policy = keras.config.dtype_policy()
    previous_format = keras.config.image_data_format()
    keras.config.set_dtype_policy(dtype_policy)
    keras.config.set_image_data_format("channels_last")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous_policy)
        keras.config.set_image_data_format(previous_format)


def _check_channels_last(owner: str) -> None:
    if keras.config.image_data_format() != "channels_last":
        raise ValueError(
            f"{owner}: keras-cv's networks are channels_last only (BatchNormalization(axis=3) and "
            f"Concatenate(axis=3) are fixed in keras-cv 0.9.0), got image_data_format="
            f"{keras.config.image_data_format()!r}; call "
            f"keras.config.set_image_data_format('channels_last') first."
        )


def _check_int_tuple(name: str, value, owner: str, length: int | None = None, minimum: int = 1) -> tuple[int, ...]:
    """``value`` as a tuple of ints >= ``minimum`` (``length`` of them, or at least one), else ValueError quoting it."""
    if not isinstance(value, (tuple, list)) or len(value) != (length or len(value)) or not value or any(
        isinstance(item, bool) or not isinstance(item, int) or item < minimum for item in value
    ):
        count = length or "one or more"
        raise ValueError(f"{owner}: `{name}` must be {count} integers >= {minimum}, got {name}={value!r}.")
    return tuple(value)


# ---------------------------------------------------------------------------- DeepLabV3+


class _KerasCVNetwork(layers.Layer):
    """What both wrappers share: ``self.network`` (built in ``build()``) gives logits, channels last."""

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:3]) + (self.num_classes,)


@keras.saving.register_keras_serializable(package="keras_livseg")
class KerasCVDeepLabV3Plus(_KerasCVNetwork):
    """keras-cv's ``DeepLabV3Plus`` on a ``ResNetV2Backbone``, as one layer that outputs logits.

    The network is keras-cv's, built in ``build()`` from this layer's arguments (never
    from a preset: those download). Its segmentation head is keras-cv's default head
    (1x1 conv + BN + ReLU, 4x bilinear upsampling, 1x1 classifier in float32) with
    ``decoder_filters`` channels and without the final softmax, so the layer returns
    logits. Channels_last only.

    Args:
        num_classes: int. Output channels (logits).
        backbone_filters: 4 ints. ResNetV2 stack widths (a bottleneck ``"block"``
            outputs 4x its width).
        backbone_blocks: 4 ints >= 2. Residual blocks per stack.
        backbone_block_type: ``"basic_block"`` (ResNet-18/34 style) or ``"block"``
            (bottleneck, ResNet-50 style).
        aspp_filters: int. Channels of each ASPP branch and of its projection.
        aspp_rates: ints. Dilation rates of the 3x3 ASPP branches.
        aspp_dropout: float in [0, 1). Dropout after the ASPP projection.
        low_level_filters: int. Channels of the 1x1 projection of the stride-4 features.
        decoder_filters: int. Channels of the head's 1x1 conv.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``).

    Shapes:
        Input ``(batch, H, W, C)``, H and W multiples of 32. Output
        ``(batch, H, W, num_classes)``: logits (float32, keras-cv's classifier dtype).

    Example:

    >>> layer = KerasCVDeepLabV3Plus(3, (64, 8, 8, 8), (2, 2, 2, 2), "basic_block", 8, (6, 12), 0.0, 4, 8)
    >>> tuple(layer(keras.ops.zeros((1, 32, 32, 1))).shape)
    (1, 32, 32, 3)
    """

    def __init__(
        self,
        num_classes: int,
        backbone_filters,
        backbone_blocks,
        backbone_block_type: str,
        aspp_filters: int,
        aspp_rates,
        aspp_dropout: float,
        low_level_filters: int,
        decoder_filters: int,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.backbone_filters = tuple(backbone_filters)
        self.backbone_blocks = tuple(backbone_blocks)
        self.backbone_block_type = backbone_block_type
        self.aspp_filters = aspp_filters
        self.aspp_rates = tuple(aspp_rates)
        self.aspp_dropout = aspp_dropout
        self.low_level_filters = low_level_filters
        self.decoder_filters = decoder_filters

    def build(self, input_shape):
        keras_cv = import_keras_cv()
        with _keras_cv_defaults(self.dtype_policy):
            backbone = keras_cv.models.ResNetV2Backbone(
                stackwise_filters=list(self.backbone_filters),
                stackwise_blocks=list(self.backbone_blocks),
                stackwise_strides=[1, 2, 2, 2],  # P2..P5 at strides 4..32: the 8x upsampling needs it
                include_rescaling=False,  # standardized CT, not 0-255 RGB
                input_shape=tuple(input_shape[1:]),
                block_type=self.backbone_block_type,
                name="resnetv2_backbone",
            )
            aspp = keras_cv.layers.SpatialPyramidPooling(
                dilation_rates=list(self.aspp_rates),
                num_channels=self.aspp_filters,
                dropout=self.aspp_dropout,
                name="aspp",
            )
            # keras-cv's default head, less its softmax: this layer returns logits.
            head = keras.Sequential(
                [
                    layers.Conv2D(self.decoder_filters, 1, use_bias=False, name="segmentation_head_conv"),
                    layers.BatchNormalization(name="segmentation_head_norm"),
                    layers.ReLU(name="segmentation_head_relu"),
                    layers.UpSampling2D(4, interpolation="bilinear", name="segmentation_head_upsampling"),
                    layers.Conv2D(
                        self.num_classes, 1, use_bias=False, dtype="float32", name="segmentation_output"
                    ),
                ],
                name="segmentation_head",
            )
            self.network = keras_cv.models.DeepLabV3Plus(
                backbone=backbone,
                num_classes=self.num_classes,
                projection_filters=self.low_level_filters,
                spatial_pyramid_pooling=aspp,
                segmentation_head=head,
                name="keras_cv_deeplabv3plus",
            )
        # keras-cv keeps the whole backbone as an attribute, so its final BatchNormalization
        # (after P5, unused by DeepLabV3+) stays among the weights: frozen, it is not
        # handed to the optimizer, which would warn that it has no gradient.
        backbone.get_layer("post_bn").trainable = False
        self.built = True

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            backbone_filters=self.backbone_filters,
            backbone_blocks=self.backbone_blocks,
            backbone_block_type=self.backbone_block_type,
            aspp_filters=self.aspp_filters,
            aspp_rates=self.aspp_rates,
            aspp_dropout=self.aspp_dropout,
            low_level_filters=self.low_level_filters,
            decoder_filters=self.decoder_filters,
        )
        return config


def build_deeplabv3plus(
    input_shape=(256, 256, 1),
    num_classes: int = 3,
    backbone_filters=(64, 128, 256, 512),
    backbone_blocks=(2, 2, 2, 2),
    backbone_block_type: str = "basic_block",
    aspp_filters: int = 256,
    aspp_rates=(6, 12, 18),
    aspp_dropout: float = 0.0,
    low_level_filters: int = 48,
    decoder_filters: int = 256,
    head: str = "softmax",
    name: str = "deeplabv3plus",
) -> keras.Model:
    """DeepLabV3+ (keras-cv) on a ResNet-18-V2-like backbone, trained from scratch.

    Chen, Zhu, Papandreou, Schroff, Adam, 2018, "Encoder-Decoder with Atrous Separable
    Convolution for Semantic Image Segmentation" (ECCV), as keras-cv 0.9.0 implements it
    (``keras_cv.models.DeepLabV3Plus`` on ``keras_cv.models.ResNetV2Backbone``; He et al.
    2016, "Identity Mappings in Deep Residual Networks")::

        P2, P5 = resnetv2(x)                                   # 1/4, 1/32
        a5 = ASPP(P5)                                          # 1x1, 3x3 at rates 6/12/18, image pool
        d2 = concat(upsample8(a5), ConvBNReLU1x1(P2))          # 1/4
        logits = Conv1x1(upsample4(ConvBNReLU1x1(d2)))         # 1/1
        probabilities = softmax(logits)                        # float32

    Where this deviates from the paper, and why:

    - No pretrained weights: every keras-cv preset and named backbone downloads, and there
      is no network here; the backbone is built from ``backbone_*`` and starts random
      (no ``Rescaling(1/255)``: CT arrives standardized).
    - Output stride 32, not 16: keras-cv upsamples the encoder output by a fixed 8x onto
      the stride-4 features, so the backbone is not dilated.
    - keras-cv's ASPP and decoder use plain convolutions, not atrous separable ones;
      its decoder is one 1x1 conv (``decoder_filters``) where the paper has two 3x3, and
      the classifier runs after the 4x upsampling. ResNetV2 (pre-activation), not
      Xception. The ASPP image-pooling branch has a BatchNormalization after the
      global pooling: at batch size 1 in training it outputs its beta only.
    - keras-cv's softmax is dropped (the head is rebuilt without it) so the project's
      float32 head (``softmax`` or ``sigmoid``) applies.

    Args:
        input_shape: ``(H, W, C)``; H and W multiples of 32 (the error names the nearest
            one); any C. channels_last only. Defaults to ``(256, 256, 1)``.
        num_classes: int. Defaults to 3 (background, liver, tumor).
        backbone_filters: 4 ints, ResNetV2 stack widths; with ``"basic_block"`` the first
            must be 64 (the stem's width, added as identity). Defaults to
            ``(64, 128, 256, 512)`` (ResNet-18).
        backbone_blocks: 4 ints >= 2 (keras-cv gives a one-block stack's first and last
            block the same name). Defaults to ``(2, 2, 2, 2)`` (ResNet-18).
        backbone_block_type: ``"basic_block"`` (default, ResNet-18/34) or ``"block"``
            (bottleneck, ResNet-50/101/152).
        aspp_filters: int. Channels of the ASPP. Defaults to 256.
        aspp_rates: dilation rates of the ASPP. Defaults to ``(6, 12, 18)``.
        aspp_dropout: float in [0, 1) after the ASPP. Defaults to 0.0 (keras-cv's).
        low_level_filters: int. Projection of the stride-4 features. Defaults to 48.
        decoder_filters: int. Channels of the decoder conv. Defaults to 256.
        head: ``"softmax"`` (default) or ``"sigmoid"`` (per-class).
        name: model name. Defaults to ``"deeplabv3plus"``.

    Returns:
        A ``keras.Model``: input ``"ct_slices"`` ``(batch, H, W, C)`` float32, output
        ``"probabilities"`` ``(batch, H, W, num_classes)`` float32.

    Raises:
        MissingExtraError: keras-cv is not installed (``pip install "keras_livseg[cv]"``).
        ValueError: a bad option or input size, or channels_first.

    Example:

    >>> model = build_deeplabv3plus(input_shape=(32, 32, 1), backbone_filters=(64, 8, 8, 8),
    ...                             aspp_filters=8, low_level_filters=4, decoder_filters=8)
    >>> tuple(model.output.shape), model.output.dtype
    ((None, 32, 32, 3), 'float32')
    """
    owner = name
    check_head(head, num_classes, owner)
    _check_channels_last(owner)
    backbone_filters = _check_int_tuple("backbone_filters", backbone_filters, owner, length=4)
    backbone_blocks = _check_int_tuple("backbone_blocks", backbone_blocks, owner, length=4, minimum=2)
    if backbone_block_type not in BLOCK_TYPES:
        raise ValueError(
            f"{owner}: `backbone_block_type` must be one of {BLOCK_TYPES}, got "
            f"backbone_block_type={backbone_block_type!r}."
        )
    if backbone_block_type == "basic_block" and backbone_filters[0] != RESNET_STEM_FILTERS:
        raise ValueError(
            f"{owner}: with backbone_block_type='basic_block' the first stack adds the "
            f"{RESNET_STEM_FILTERS}-channel stem as its shortcut, so backbone_filters[0] must be "
            f"{RESNET_STEM_FILTERS}, got backbone_filters={backbone_filters!r}."
        )
    check_positive_int("aspp_filters", aspp_filters, owner)
    aspp_rates = _check_int_tuple("aspp_rates", aspp_rates, owner)
    check_rate("aspp_dropout", aspp_dropout, owner)
    check_positive_int("low_level_filters", low_level_filters, owner)
    check_positive_int("decoder_filters", decoder_filters, owner)
    check_input_shape(
        input_shape, OUTPUT_STRIDE, owner,
        "keras-cv's DeepLabV3+ upsamples ResNetV2's stride-32 features 8x onto its stride-4 ones",
    )
    import_keras_cv()  # fail here, before any layer exists

    # Layers.
    network = KerasCVDeepLabV3Plus(
        num_classes=num_classes,
        backbone_filters=backbone_filters,
        backbone_blocks=backbone_blocks,
        backbone_block_type=backbone_block_type,
        aspp_filters=aspp_filters,
        aspp_rates=aspp_rates,
        aspp_dropout=float(aspp_dropout),
        low_level_filters=low_level_filters,
        decoder_filters=decoder_filters,
        name="deeplabv3plus_logits",
    )

    # Functional model.
    inputs = ct_input(input_shape)
    logits = network(inputs)  # 1/1
    outputs = probabilities(logits, head)
    return keras.Model(inputs, outputs, name=name)


# ---------------------------------------------------------------------------- SegFormer


@keras.saving.register_keras_serializable(package="keras_livseg")
class KerasCVSegFormer(_KerasCVNetwork):
    """keras-cv's ``SegFormer`` on a ``MiTBackbone``, as one layer that outputs logits.

    The network is keras-cv's, built in ``build()`` from this layer's arguments (never
    from a preset: those download). keras-cv fixes a softmax on its classifier and then
    resizes the probabilities to the input size; here the classifier's activation is
    set to linear once the network is built, so the bilinear resize acts on logits (as
    in the paper's implementation) and the layer returns logits. Channels_last only.

    Args:
        num_classes: int. Output channels (logits).
        embedding_dims: 4 ints. MiT stage widths, divisible by (1, 2, 5, 8) heads.
        depths: 4 ints. Transformer blocks per stage.
        decoder_filters: int. Channels of the all-MLP decoder.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``).

    Shapes:
        Input ``(batch, S, S, C)``, square, S a multiple of 32 and at least 64. Output
        ``(batch, S, S, num_classes)``: logits.

    Example:

    >>> layer = KerasCVSegFormer(3, (8, 16, 40, 64), (1, 1, 1, 1), 16)
    >>> tuple(layer(keras.ops.zeros((1, 64, 64, 1))).shape)
    (1, 64, 64, 3)
    """

    def __init__(self, num_classes: int, embedding_dims, depths, decoder_filters: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.embedding_dims = tuple(embedding_dims)
        self.depths = tuple(depths)
        self.decoder_filters = decoder_filters

    def build(self, input_shape):
        keras_cv = import_keras_cv()
        with _keras_cv_defaults(self.dtype_policy):
            backbone = keras_cv.models.MiTBackbone(
                include_rescaling=False,  # standardized CT, not 0-255 RGB
                depths=list(self.depths),
                embedding_dims=list(self.embedding_dims),
                input_shape=tuple(input_shape[1:]),
                name="mit_backbone",
            )
            self.network = keras_cv.models.SegFormer(
                backbone=backbone,
                num_classes=self.num_classes,
                projection_filters=self.decoder_filters,
                name="keras_cv_segformer",
            )
        classifier = self.network.layers[-2]  # ... Dropout, Conv2D(softmax), Resizing
        if not (isinstance(classifier, layers.Conv2D) and classifier.filters == self.num_classes):
            raise RuntimeError(  # a keras-cv change this module must follow
                f"unexpected keras-cv SegFormer layout: {[layer.name for layer in self.network.layers[-3:]]}"
            )
        classifier.activation = keras.activations.linear  # logits, resized; the model's head follows
        self.built = True

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            embedding_dims=self.embedding_dims,
            depths=self.depths,
            decoder_filters=self.decoder_filters,
        )
        return config


def _check_segformer_size(input_shape, owner: str) -> None:
    height, width, _ = check_input_shape(
        input_shape, OUTPUT_STRIDE, owner, "MiT's fourth stage is at stride 32"
    )
    for label, size in (("height", height), ("width", width)):
        if size < SEGFORMER_MIN_SIZE:
            raise ValueError(
                f"{owner}: input {label} {size} is below {SEGFORMER_MIN_SIZE} (keras-cv's MiT cannot "
                f"infer the shapes of a 1x1 last stage); the nearest valid {label} is "
                f"{SEGFORMER_MIN_SIZE} (resize or pad to it)."
            )
    if height != width:
        side = max(height, width)
        raise ValueError(
            f"{owner}: input must be square (keras-cv's MiT attention reshapes N tokens to "
            f"sqrt(N) x sqrt(N)), got height {height} and width {width}; the nearest valid size is "
            f"{side}x{side} (pad to it)."
        )


def build_segformer(
    input_shape=(256, 256, 1),
    num_classes: int = 3,
    embedding_dims=(32, 64, 160, 256),
    depths=(2, 2, 2, 2),
    decoder_filters: int = 256,
    head: str = "softmax",
    name: str = "segformer",
) -> keras.Model:
    """SegFormer (keras-cv) with a MiT-B0-like encoder, trained from scratch.

    Xie, Wang, Yu, Anandkumar, Alvarez, Luo, 2021, "SegFormer: Simple and Efficient Design
    for Semantic Segmentation with Transformers" (NeurIPS), as keras-cv 0.9.0 implements it
    (``keras_cv.models.SegFormer`` on ``keras_cv.models.MiTBackbone``)::

        F1, F2, F3, F4 = mit(x)                                # 1/4, 1/8, 1/16, 1/32
        Fi = resize_to_F1(Linear(Fi))                          # decoder_filters each
        d = Dropout(ConvBNReLU1x1(concat(F4, F3, F2, F1)))     # 1/4
        logits = resize_to_input(Conv1x1(d))                   # 1/1, bilinear
        probabilities = softmax(logits)                        # float32

    Where this deviates from the paper, and why:

    - No pretrained weights (ImageNet-1k MiT): every keras-cv preset downloads, and
      there is no network here. MiT is built from ``embedding_dims``/``depths``
      (defaults: MiT-B0) and starts random; no ``Rescaling(1/255)``.
    - keras-cv fixes heads (1, 2, 5, 8), reduction ratios (8, 4, 2, 1), MLP ratio 4 and
      stochastic depth 0.1; its attention takes square inputs only. Its GELU is the tanh
      approximation; its patch-embedding, reduction and stage LayerNorms use epsilon 1e-3
      (the paper's code: exact GELU, epsilon 1e-5, 1e-5 and 1e-6).
    - keras-cv's classifier softmax is switched to linear, so the bilinear resize acts on
      logits (as the paper's code does) and the project's float32 head follows.
    - keras-cv 0.9.0's efficient attention reshapes the token sequence for its spatial
      reduction as if it were channels-first (``transpose`` then ``reshape`` to
      ``(B, H, W, C)``), so the reduction convolution sees the tokens in another order
      than the paper's; kept as keras-cv has it (it is still a learned reduction).

    Args:
        input_shape: ``(S, S, C)``: square, S a multiple of 32 and at least 64 (the error
            names the nearest valid size); any C. channels_last only. Defaults to
            ``(256, 256, 1)``.
        num_classes: int. Defaults to 3 (background, liver, tumor).
        embedding_dims: 4 ints, MiT stage widths, each divisible by its stage's heads
            (1, 2, 5, 8). Defaults to ``(32, 64, 160, 256)`` (MiT-B0).
        depths: 4 ints, transformer blocks per stage. Defaults to ``(2, 2, 2, 2)`` (B0).
        decoder_filters: int. Channels of the all-MLP decoder. Defaults to 256 (B0's).
        head: ``"softmax"`` (default) or ``"sigmoid"`` (per-class).
        name: model name. Defaults to ``"segformer"``.

    Returns:
        A ``keras.Model``: input ``"ct_slices"`` ``(batch, S, S, C)`` float32, output
        ``"probabilities"`` ``(batch, S, S, num_classes)`` float32.

    Raises:
        MissingExtraError: keras-cv is not installed (``pip install "keras_livseg[cv]"``).
        ValueError: a bad option or input size, or channels_first.

    Example:

    >>> model = build_segformer(input_shape=(64, 64, 1), embedding_dims=(8, 16, 40, 64),
    ...                         depths=(1, 1, 1, 1), decoder_filters=16)
    >>> tuple(model.output.shape), model.output.dtype
    ((None, 64, 64, 3), 'float32')
    """
    owner = name
    check_head(head, num_classes, owner)
    _check_channels_last(owner)
    embedding_dims = _check_int_tuple("embedding_dims", embedding_dims, owner, length=4)
    depths = _check_int_tuple("depths", depths, owner, length=4)
    for stage, (dim, heads) in enumerate(zip(embedding_dims, MIT_NUM_HEADS)):
        if dim % heads:
            raise ValueError(
                f"{owner}: embedding_dims[{stage}] must be divisible by the {heads} attention heads "
                f"keras-cv gives stage {stage + 1}, got embedding_dims={embedding_dims!r} (try "
                f"{nearest_multiple(dim, heads)})."
            )
    check_positive_int("decoder_filters", decoder_filters, owner)
    _check_segformer_size(input_shape, owner)
    import_keras_cv()  # fail here, before any layer exists

    # Layers.
    network = KerasCVSegFormer(
        num_classes=num_classes,
        embedding_dims=embedding_dims,
        depths=depths,
        decoder_filters=decoder_filters,
        name="segformer_logits",
    )

    # Functional model.
    inputs = ct_input(input_shape)
    logits = network(inputs)  # 1/1
    outputs = probabilities(logits, head)
    return keras.Model(inputs, outputs, name=name)
