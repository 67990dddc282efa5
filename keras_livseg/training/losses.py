"""Segmentation losses: cross-entropy + soft Dice, for softmax and sigmoid heads.

Classes follow the LiTS label map: 0 background, 1 liver, 2 tumor. Two heads
are supported:

- **softmax** (``CombinedCEDiceLoss``): ``y_pred`` is ``[B, H, W, 3]``, one
  channel per class, summing to 1 (or logits with ``from_logits=True``).
- **sigmoid** (``BCEDiceLoss``): ``y_pred`` is ``[B, H, W, C]``, one independent
  binary channel per *region*; the regions nest as in LiTS, so the ``"liver"``
  channel's target is ``label >= 1`` (liver including tumor) and the ``"tumor"``
  channel's target is ``label == 2``.

The TAM-U-Net paper trains with ``λ1·CE + λ2·Dice``; the Dice term is what keeps
the tiny tumor class from being drowned by background pixels.

Everything here uses ``keras.ops`` only, so it runs under the TensorFlow, JAX and
PyTorch backends. Dice sums are computed in float32 whatever the input dtype:
under ``mixed_float16`` a sum over a batch of 256×256 slices passes float16's
maximum (65504), and the default smoothing (1e-5) is below float16's smallest
normal number, so float16 arithmetic would give ``inf`` or ``0/0``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import keras
from keras import ops

from keras_livseg.data.labels import NUM_CLASSES, REGION_LABELS

logger = logging.getLogger(__name__)

__all__ = [
    "REGIONS",
    "NUM_CLASSES",
    "BCEDiceLoss",
    "CombinedCEDiceLoss",
    "binary_cross_entropy",
    "cross_entropy",
    "label_map",
    "region_mask",
    "soft_dice",
    "soft_tversky",
    "sparse_labels",
]

# The LiTS label map's class count and regions (liver = labels 1 and 2), defined once.
REGIONS = REGION_LABELS


# ---------------------------------------------------------------------------
# Label helpers (shared with metrics.py)
# ---------------------------------------------------------------------------


def sparse_labels(y_true, num_channels: int):
    """Integer class labels ``[B, H, W]`` from any accepted ``y_true`` layout.

    Accepted layouts: ``[B, H, W]`` integer masks, ``[B, H, W, 1]`` masks, or a
    one-hot ``[B, H, W, num_channels]`` tensor (when ``num_channels > 1``); any
    int or float dtype (float labels are rounded, so 2.0 and 1.9999 are tumor).

    Args:
        y_true: the labels, rank 3 or 4.
        num_channels: the number of channels of the matching ``y_pred``; a rank-4
            ``y_true`` whose last axis has this size (> 1) is read as one-hot.

    Returns:
        An ``int32`` tensor ``[B, H, W]``.

    Raises:
        ValueError: if the rank or the last axis fits none of the layouts.

    Example:

    >>> import numpy as np
    >>> tuple(sparse_labels(np.array([[[0, 2]]]), num_channels=3).shape)
    (1, 1, 2)
    """
    y_true = ops.convert_to_tensor(y_true)
    rank = len(y_true.shape)
    if rank == 4:
        last = y_true.shape[-1]
        if last == 1:
            y_true = ops.squeeze(y_true, axis=-1)
        elif last == num_channels and num_channels > 1:
            return ops.cast(ops.argmax(y_true, axis=-1), "int32")
        else:
            raise ValueError(
                f"y_true has shape {tuple(y_true.shape)}: a rank-4 label tensor must "
                f"end in 1 (a mask) or {num_channels} (one-hot). Pass integer masks "
                "[B, H, W] or [B, H, W, 1]."
            )
    elif rank != 3:
        raise ValueError(
            f"y_true has rank {rank} (shape {tuple(y_true.shape)}); expected integer "
            "masks [B, H, W] or [B, H, W, 1]."
        )
    if "float" in str(y_true.dtype):
        # Labels that went through a float pipeline (e.g. resize) may be 1.9999.
        y_true = ops.round(y_true)
    return ops.cast(y_true, "int32")


def region_mask(labels, region):
    """Boolean mask of a region in an integer label map.

    Args:
        labels: ``int`` label map of any shape.
        region: ``"background"`` → ``{0}``, ``"liver"`` → ``{1, 2}``,
            ``"tumor"`` → ``{2}``, or an ``int`` class id (exactly that label).

    Returns:
        A boolean tensor of the shape of ``labels``.

    Example:

    >>> import numpy as np
    >>> np.asarray(region_mask(np.array([0, 1, 2]), "liver")).tolist()
    [False, True, True]
    """
    ids = _region_ids(region)
    mask = ops.equal(labels, ids[0])
    for class_id in ids[1:]:
        mask = ops.logical_or(mask, ops.equal(labels, class_id))
    return mask


def label_map(y_pred, head: str = "softmax", channels: Sequence[str] = ("liver", "tumor"),
              threshold: float = 0.5):
    """Predicted integer label map ``[B, H, W]`` from a model's output.

    For a softmax head this is the argmax. For a sigmoid head the per-channel
    binary masks (``p > threshold``) are decoded with LiTS nesting: 2 where the
    ``"tumor"`` channel is on, else 1 where the ``"liver"`` channel is on, else 0.
    A ``"background"`` channel, if present, does not take part in the decoding.

    Args:
        y_pred: ``[B, H, W, C]`` probabilities (or logits, for softmax).
        head: ``"softmax"`` or ``"sigmoid"``.
        channels: for the sigmoid head, the region of each channel, in order.
        threshold: for the sigmoid head, the probability above which a channel
            is on (use 0.0 for logits).

    Returns:
        An ``int32`` tensor ``[B, H, W]`` with values in {0, 1, 2}.

    Example:

    >>> import numpy as np
    >>> p = np.array([[[[0.9, 0.8], [0.7, 0.2], [0.1, 0.1]]]])  # [1, 1, 3, 2]
    >>> np.asarray(label_map(p, head="sigmoid")).tolist()
    [[[2, 1, 0]]]
    """
    y_pred = ops.convert_to_tensor(y_pred)
    if head == "softmax":
        return ops.cast(ops.argmax(y_pred, axis=-1), "int32")
    channels = _check_channels(channels, head)
    on = ops.greater(ops.cast(y_pred, "float32"), threshold)
    labels = ops.zeros(ops.shape(y_pred)[:-1], dtype="int32")
    # Liver first, then tumor on top: tumor wins where both are on.
    for region, value in (("liver", 1), ("tumor", 2)):
        if region in channels:
            labels = ops.where(on[..., channels.index(region)], value, labels)
    return labels


def _region_ids(region) -> tuple[int, ...]:
    if isinstance(region, str):
        if region not in REGIONS:
            raise ValueError(
                f"Unknown region {region!r}; use one of {sorted(REGIONS)} or an int "
                f"class id in 0..{NUM_CLASSES - 1}."
            )
        return REGIONS[region]
    if isinstance(region, bool) or not isinstance(region, int) or not 0 <= region < NUM_CLASSES:
        raise ValueError(
            f"region={region!r} is not a region name or a class id; use one of "
            f"{sorted(REGIONS)} or an int in 0..{NUM_CLASSES - 1}."
        )
    return (region,)


def _check_channels(channels, head) -> tuple[str, ...]:
    if head not in ("softmax", "sigmoid"):
        raise ValueError(f"head={head!r} is not supported; use 'softmax' or 'sigmoid'.")
    channels = tuple(channels)
    bad = [c for c in channels if c not in REGIONS]
    if not channels or bad or len(set(channels)) != len(channels):
        raise ValueError(
            f"channels={channels!r} must be distinct region names from "
            f"{sorted(REGIONS)}, one per output channel, e.g. ('liver', 'tumor')."
        )
    return channels


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------


def _scored_channels(y_true_onehot, y_pred, classes: Sequence[int] | None):
    """Targets and probabilities in float32, reduced to the ``classes`` channels (all when ``None``)."""
    y_true_onehot = ops.cast(y_true_onehot, "float32")
    y_pred = ops.cast(y_pred, "float32")
    if classes is not None:
        index = ops.convert_to_tensor(list(classes), dtype="int32")
        y_true_onehot = ops.take(y_true_onehot, index, axis=-1)
        y_pred = ops.take(y_pred, index, axis=-1)
    return y_true_onehot, y_pred


def soft_dice(y_true_onehot, y_pred, classes: Sequence[int] | None = None,
              smooth: float = 1e-5):
    """Batch-level soft Dice per class, in float32.

    ``dice_c = (2·Σ y_c·p_c + smooth) / (Σ y_c + Σ p_c + smooth)``, each sum taken
    over the whole batch and all pixels at once (not per image), so a slice
    without tumor does not produce a noisy 0-or-1 Dice of its own.

    Args:
        y_true_onehot: ``[B, H, W, C]`` binary targets (one-hot or per-region).
        y_pred: ``[B, H, W, C]`` probabilities.
        classes: channel indices to score; all channels when ``None``.
        smooth: added to numerator and denominator; makes a class that is empty
            in both target and prediction score 1 and keeps gradients finite.

    Returns:
        A float32 tensor ``[len(classes)]`` of Dice coefficients in [0, 1].

    Example:

    >>> import numpy as np
    >>> t = np.array([[[[0, 1], [1, 0]]]], "float32")   # [1, 1, 2, 2]
    >>> p = np.array([[[[0.5, 0.5], [1, 0]]]], "float32")
    >>> [round(float(d), 4) for d in soft_dice(t, p, smooth=0.0)]
    [0.8, 0.6667]
    """
    y_true_onehot, y_pred = _scored_channels(y_true_onehot, y_pred, classes)
    axes = tuple(range(len(y_pred.shape) - 1))  # everything but the channel axis
    intersection = ops.sum(y_true_onehot * y_pred, axis=axes)
    total = ops.sum(y_true_onehot, axis=axes) + ops.sum(y_pred, axis=axes)
    return (2.0 * intersection + smooth) / (total + smooth)


def soft_tversky(y_true_onehot, y_pred, classes: Sequence[int] | None = None,
                 fn_weight: float | Sequence[float] = 0.5, smooth: float = 1e-5):
    """Batch-level soft Tversky index per class, in float32 (Salehi et al. 2017).

    ``TI_c = (TP_c + smooth) / (TP_c + (1 − β)·FP_c + β·FN_c + smooth)`` with
    ``TP = Σ y·p``, ``FP = Σ (1 − y)·p``, ``FN = Σ y·(1 − p)`` over the whole batch
    and all pixels, and ``β = fn_weight``. ``β = 0.5`` is the soft Dice
    (``soft_dice``); ``β > 0.5`` charges a missed voxel more than a false one,
    which pushes a model that under-segments (high precision, low recall)
    towards recall.

    Args:
        y_true_onehot: ``[B, H, W, C]`` binary targets.
        y_pred: ``[B, H, W, C]`` probabilities.
        classes: channel indices to score; all channels when ``None``.
        fn_weight: β in [0, 1], the weight of false negatives: one for every
            class, or one per scored class. Defaults to 0.5.
        smooth: added to numerator and denominator. Defaults to 1e-5.

    Returns:
        A float32 tensor ``[len(classes)]`` in [0, 1].

    Example:

    >>> import numpy as np
    >>> t = np.array([[[[1], [1], [0], [0]]]], "float32")  # [1, 1, 4, 1]: 2 true voxels
    >>> p = np.array([[[[1], [0], [0], [0]]]], "float32")  # finds one of them
    >>> [round(float(d), 4) for d in soft_tversky(t, p, fn_weight=0.5, smooth=0.0)]  # Dice 2/3
    [0.6667]
    >>> [round(float(d), 4) for d in soft_tversky(t, p, fn_weight=0.8, smooth=0.0)]  # 1 / (1 + 0.8)
    [0.5556]
    """
    y_true_onehot, y_pred = _scored_channels(y_true_onehot, y_pred, classes)
    axes = tuple(range(len(y_pred.shape) - 1))
    true_positive = ops.sum(y_true_onehot * y_pred, axis=axes)
    false_positive = ops.sum(y_pred, axis=axes) - true_positive
    false_negative = ops.sum(y_true_onehot, axis=axes) - true_positive
    beta = ops.convert_to_tensor(fn_weight, dtype="float32")
    return (true_positive + smooth) / (true_positive + (1.0 - beta) * false_positive + beta * false_negative + smooth)


def cross_entropy(labels, y_pred, class_weights: Sequence[float] | None = None,
                  from_logits: bool = False):
    """Per-pixel categorical cross-entropy from integer labels, in float32.

    Args:
        labels: ``int`` label map ``[B, H, W]``.
        y_pred: ``[B, H, W, C]`` softmax probabilities, or logits.
        class_weights: optional per-class weights ``[C]``; each pixel's CE is
            multiplied by the weight of its true class.
        from_logits: whether ``y_pred`` holds logits.

    Returns:
        A float32 tensor ``[B, H, W]``.

    Example:

    >>> import numpy as np
    >>> p = np.array([[[[0.5, 0.5, 0.0]]]], "float32")
    >>> round(float(cross_entropy(np.array([[[1]]]), p)[0, 0, 0]), 4)  # -log 0.5
    0.6931
    """
    y_pred = ops.cast(y_pred, "float32")
    num_classes = y_pred.shape[-1]
    onehot = ops.one_hot(labels, num_classes, dtype="float32")
    if from_logits:
        log_p = ops.log_softmax(y_pred, axis=-1)
    else:
        # Clipping keeps log(0) (a confidently wrong pixel) finite.
        eps = keras.config.epsilon()
        log_p = ops.log(ops.clip(y_pred, eps, 1.0 - eps))
    ce = -ops.sum(onehot * log_p, axis=-1)
    if class_weights is not None:
        weights = ops.convert_to_tensor(list(class_weights), dtype="float32")
        ce = ce * ops.take(weights, labels)
    return ce


def binary_cross_entropy(targets, y_pred, from_logits: bool = False):
    """Per-pixel binary cross-entropy averaged over channels, in float32.

    Args:
        targets: ``[B, H, W, C]`` binary targets.
        y_pred: ``[B, H, W, C]`` sigmoid probabilities, or logits.
        from_logits: whether ``y_pred`` holds logits.

    Returns:
        A float32 tensor ``[B, H, W]``.

    Example:

    >>> import numpy as np
    >>> t = np.ones((1, 1, 1, 2), "float32")
    >>> round(float(binary_cross_entropy(t, 0.5 * t)[0, 0, 0]), 4)
    0.6931
    """
    targets = ops.cast(targets, "float32")
    y_pred = ops.cast(y_pred, "float32")
    bce = ops.binary_crossentropy(targets, y_pred, from_logits=from_logits)
    return ops.mean(bce, axis=-1)


# ---------------------------------------------------------------------------
# Loss classes
# ---------------------------------------------------------------------------


def _check_weight(name, value):
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}.")
    return float(value)


def _check_smooth(smooth):
    if not isinstance(smooth, (int, float)) or not math.isfinite(smooth) or smooth < 0:
        raise ValueError(
            f"smooth must be a finite number >= 0, got smooth={smooth!r}; "
            "the default 1e-5 suits float32 sums."
        )
    return float(smooth)


@keras.saving.register_keras_serializable(package="keras_livseg")
class CombinedCEDiceLoss(keras.losses.Loss):
    """``ce_weight·CE + dice_weight·(1 − soft Dice)`` for a softmax head.

    The Dice term is the mean over ``dice_classes`` (liver and tumor by default)
    of the soft Dice of each class channel (channel 1 is liver parenchyma,
    channel 2 tumor, as in the label map). It is **batch-level**: intersection
    and sums are taken over all images and pixels of the batch per class, then
    averaged over classes. Why: most CT slices contain no tumor, and a per-image
    soft Dice on such a slice is ``smooth / (Σp + smooth)`` — close to 0 for any
    tiny predicted mass, so per-image averaging adds a large, noisy term that
    pushes the tumor channel to exactly zero. Summing over the batch first scores
    what the epoch metric (global Dice) scores. Dice is computed in float32 (the
    inputs are cast) so it is safe under ``mixed_float16``.

    The loss returns per-pixel values ``[B, H, W]`` (``ce_weight·CE_pixel +
    dice_weight·dice_loss``, the batch Dice broadcast), so the default
    ``"sum_over_batch_size"`` reduction gives ``ce_weight·mean(CE) +
    dice_weight·(1 − Dice)``. A ``sample_weight`` multiplies those per-pixel
    values, so it weights the CE pixels and scales the Dice term by the mean
    weight; use ``class_weights`` for class balancing.

    Args:
        ce_weight: λ1, weight of the cross-entropy term (>= 0). Defaults to 1.0.
        dice_weight: λ2, weight of the Dice term (>= 0). Defaults to 1.0.
        class_weights: optional per-class CE weights, one per output channel,
            e.g. ``(1.0, 1.0, 5.0)`` to up-weight tumor pixels. Defaults to
            ``None`` (unweighted mean CE).
        fn_weights: optional Tversky false-negative weights β, one per entry of
            ``dice_classes``, e.g. ``(0.5, 0.7)`` to charge missed tumor voxels
            more than false ones (``soft_tversky``); the overlap term is then
            ``1 − mean Tversky index``. ``None`` (the default) is the soft Dice,
            as is 0.5 for every class.
        dice_classes: channel indices the Dice term averages over. Defaults to
            ``(1, 2)`` (liver, tumor); background is left out because its Dice is
            always near 1 and would dilute the signal.
        smooth: Dice smoothing (>= 0). Defaults to 1e-5.
        from_logits: whether ``y_pred`` holds logits rather than softmax
            probabilities. Defaults to ``False``.
        reduction: Keras reduction. Defaults to ``"sum_over_batch_size"``.
        name: loss name. Defaults to ``"combined_ce_dice"``.
        dtype: Keras loss dtype (inputs are cast to it before ``call``; the
            computation itself is float32 regardless). Defaults to ``None``.

    Shapes:
        ``y_true``: integer masks ``[B, H, W]`` or ``[B, H, W, 1]`` (int or
        float), or one-hot ``[B, H, W, C]``. ``y_pred``: ``[B, H, W, C]``.

    Example:

    >>> import numpy as np
    >>> loss = CombinedCEDiceLoss(ce_weight=1.0, dice_weight=1.0)
    >>> y_true = np.array([[[0, 1], [2, 1]]])                 # [1, 2, 2]
    >>> y_pred = np.eye(3, dtype="float32")[y_true]          # perfect prediction
    >>> round(float(loss(y_true, y_pred)), 4)
    0.0
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        class_weights: Sequence[float] | None = None,
        dice_classes: Sequence[int] = (1, 2),
        smooth: float = 1e-5,
        from_logits: bool = False,
        reduction: str | None = "sum_over_batch_size",
        name: str = "combined_ce_dice",
        fn_weights: Sequence[float] | None = None,
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.ce_weight = _check_weight("ce_weight", ce_weight)
        self.dice_weight = _check_weight("dice_weight", dice_weight)
        if class_weights is not None:
            class_weights = [_check_weight("class_weights[i]", w) for w in class_weights]
            if not class_weights:
                raise ValueError("class_weights is empty; pass one weight per class or None.")
        self.class_weights = class_weights
        dice_classes = [int(c) for c in dice_classes]
        if not dice_classes or any(c < 0 for c in dice_classes):
            raise ValueError(
                f"dice_classes must be non-empty channel indices >= 0, got "
                f"dice_classes={dice_classes!r}; e.g. (1, 2) for liver and tumor."
            )
        self.dice_classes = dice_classes
        if fn_weights is not None:
            numbers = isinstance(fn_weights, (list, tuple)) and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in fn_weights)
            fn_weights = [float(w) for w in fn_weights] if numbers else fn_weights
            if not numbers or len(fn_weights) != len(dice_classes) or not all(0.0 <= w <= 1.0 for w in fn_weights):
                raise ValueError(
                    f"fn_weights must hold one number in [0, 1] per Dice class ({len(dice_classes)}: "
                    f"{dice_classes}), got fn_weights={fn_weights!r}; e.g. (0.5, 0.7) for liver and tumor."
                )
        self.fn_weights = fn_weights
        self.smooth = _check_smooth(smooth)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        num_classes = y_pred.shape[-1]
        if self.class_weights is not None and len(self.class_weights) != num_classes:
            raise ValueError(
                f"class_weights has {len(self.class_weights)} entries but y_pred has "
                f"{num_classes} channels; pass one weight per channel."
            )
        if max(self.dice_classes) >= num_classes:
            raise ValueError(
                f"dice_classes={self.dice_classes} names a channel >= {num_classes}, the "
                "number of channels of y_pred."
            )
        labels = sparse_labels(y_true, num_classes)
        y_pred = ops.cast(y_pred, "float32")
        ce = cross_entropy(labels, y_pred, self.class_weights, self.from_logits)
        probs = ops.softmax(y_pred, axis=-1) if self.from_logits else y_pred
        onehot = ops.one_hot(labels, num_classes, dtype="float32")
        if self.fn_weights is None:
            overlap = soft_dice(onehot, probs, self.dice_classes, self.smooth)
        else:
            overlap = soft_tversky(onehot, probs, self.dice_classes, self.fn_weights, self.smooth)
        return self.ce_weight * ce + self.dice_weight * (1.0 - ops.mean(overlap))

    def get_config(self):
        config = super().get_config()
        config.update(
            ce_weight=self.ce_weight,
            dice_weight=self.dice_weight,
            class_weights=self.class_weights,
            dice_classes=list(self.dice_classes),
            fn_weights=self.fn_weights,
            smooth=self.smooth,
            from_logits=self.from_logits,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_livseg")
class BCEDiceLoss(keras.losses.Loss):
    """``bce_weight·BCE + dice_weight·(1 − soft Dice)`` for a per-region sigmoid head.

    Each output channel is an independent binary map of one region; its target
    is derived from the integer labels with LiTS nesting:

    - ``"liver"`` channel: ``label >= 1`` (liver including tumor),
    - ``"tumor"`` channel: ``label == 2``,
    - ``"background"`` channel: ``label == 0``.

    ``channels`` gives the region of each channel in order; the default
    ``("liver", "tumor")`` means a 2-channel head. The Dice term is batch-level
    (sums over batch and pixels per channel, then the mean over channels; see
    ``CombinedCEDiceLoss`` for why) and computed in float32.

    Args:
        bce_weight: weight of the binary cross-entropy term (>= 0). Defaults to 1.0.
        dice_weight: weight of the Dice term (>= 0). Defaults to 1.0.
        channels: the region of each output channel. Defaults to
            ``("liver", "tumor")``.
        dice_channels: channel indices the Dice term averages over; all channels
            when ``None`` (the default).
        smooth: Dice smoothing (>= 0). Defaults to 1e-5.
        from_logits: whether ``y_pred`` holds logits. Defaults to ``False``.
        reduction: Keras reduction. Defaults to ``"sum_over_batch_size"``.
        name: loss name. Defaults to ``"bce_dice"``.
        dtype: Keras loss dtype. Defaults to ``None``.

    Shapes:
        ``y_true``: integer masks ``[B, H, W]`` or ``[B, H, W, 1]``.
        ``y_pred``: ``[B, H, W, len(channels)]``. Returns ``[B, H, W]``.

    Example:

    >>> import numpy as np
    >>> y_true = np.array([[[0, 1], [2, 1]]])                   # [1, 2, 2]
    >>> y_pred = np.stack([y_true >= 1, y_true == 2], -1).astype("float32")
    >>> round(float(BCEDiceLoss()(y_true, y_pred)), 4)
    0.0
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        channels: Sequence[str] = ("liver", "tumor"),
        dice_channels: Sequence[int] | None = None,
        smooth: float = 1e-5,
        from_logits: bool = False,
        reduction: str | None = "sum_over_batch_size",
        name: str = "bce_dice",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.bce_weight = _check_weight("bce_weight", bce_weight)
        self.dice_weight = _check_weight("dice_weight", dice_weight)
        self.channels = list(_check_channels(channels, "sigmoid"))
        if dice_channels is not None:
            dice_channels = [int(c) for c in dice_channels]
            if not dice_channels or any(not 0 <= c < len(self.channels) for c in dice_channels):
                raise ValueError(
                    f"dice_channels={dice_channels!r} must be non-empty indices into "
                    f"channels={self.channels} (0..{len(self.channels) - 1}), or None."
                )
        self.dice_channels = dice_channels
        self.smooth = _check_smooth(smooth)
        self.from_logits = bool(from_logits)

    def targets(self, y_true):
        """Per-channel binary targets ``[B, H, W, len(channels)]`` (float32) from labels."""
        labels = sparse_labels(y_true, num_channels=1)
        return ops.stack(
            [ops.cast(region_mask(labels, region), "float32") for region in self.channels],
            axis=-1,
        )

    def call(self, y_true, y_pred):
        if y_pred.shape[-1] != len(self.channels):
            raise ValueError(
                f"y_pred has {y_pred.shape[-1]} channels but channels={self.channels} "
                "names one region per channel; make them agree."
            )
        targets = self.targets(y_true)
        y_pred = ops.cast(y_pred, "float32")
        bce = binary_cross_entropy(targets, y_pred, self.from_logits)
        probs = ops.sigmoid(y_pred) if self.from_logits else y_pred
        dice = ops.mean(soft_dice(targets, probs, self.dice_channels, self.smooth))
        return self.bce_weight * bce + self.dice_weight * (1.0 - dice)

    def get_config(self):
        config = super().get_config()
        config.update(
            bce_weight=self.bce_weight,
            dice_weight=self.dice_weight,
            channels=list(self.channels),
            dice_channels=self.dice_channels,
            smooth=self.smooth,
            from_logits=self.from_logits,
        )
        return config
