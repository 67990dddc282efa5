"""Stateful segmentation metrics that accumulate pixel counts over a whole epoch.

Each metric keeps running totals of true positives, false positives and false
negatives (and, where needed, correct/total pixels) across every batch of an
epoch and computes its score from the totals in ``result()``. That is the
*global* score LiTS reports as "Dice global", and it differs from the mean of
per-batch scores, which over-weights batches with little tumor. Keras resets
the totals at the start of each epoch (and of each evaluation).

Regions follow LiTS semantics (classes 0 background, 1 liver, 2 tumor):

- ``"liver"`` → label ∈ {1, 2} (liver including tumor), predicted liver is
  argmax ∈ {1, 2};
- ``"tumor"`` → label == 2;
- ``"background"`` → label == 0;
- an ``int`` class id → exactly that label (e.g. ``1`` is liver parenchyma only).

**Empty policy.** When a region is empty in both prediction and truth over the
whole epoch, Dice, IoU, precision and recall are ``empty_score`` (1.0 by
default: nothing to find and nothing found is a perfect answer, as LiTS scores
a case without tumor). When only one side is empty the score is 0.

**Heads.** ``head="softmax"`` (default): ``y_pred`` ``[B, H, W, 3]`` (probabilities
or logits) is decoded by argmax. ``head="sigmoid"``: ``y_pred`` ``[B, H, W, C]``
with one channel per region named by ``channels`` (default ``("liver", "tumor")``)
is thresholded at ``threshold`` (0.5) per channel and decoded to a label map:
2 where the tumor channel is on, else 1 where the liver channel is on, else 0;
a ``"background"`` channel is ignored. All metrics then score that label map.

Labels ``y_true``: integer masks ``[B, H, W]`` or ``[B, H, W, 1]`` (int or float),
or one-hot ``[B, H, W, 3]``. ``sample_weight`` (optional): ``[B]``, ``[B, H, W]``
or ``[B, H, W, 1]`` weights that multiply each pixel's count.

Counts are float32 variables: exact up to 2**24 pixels per update, and beyond
that their relative rounding error (~1e-7) is far below any score difference
that matters. ``keras.ops`` only, so the metrics run under every backend.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import keras
from keras import ops

from keras_livseg.training.losses import (
    NUM_CLASSES,
    _check_channels,
    _region_ids,
    label_map,
    region_mask,
    sparse_labels,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DiceScore",
    "IoUScore",
    "MeanIoU",
    "PixelAccuracy",
    "PrecisionScore",
    "RecallScore",
    "default_metrics",
    "region_counts",
    "score_from_counts",
]

_SCORES = ("dice", "iou", "precision", "recall")


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------


def _decode(y_true, y_pred, head, channels, threshold):
    """(true labels, predicted labels), both int32 ``[B, H, W]``."""
    y_pred = ops.convert_to_tensor(y_pred)
    if head == "sigmoid" and y_pred.shape[-1] != len(channels):
        raise ValueError(
            f"y_pred has {y_pred.shape[-1]} channels but channels={tuple(channels)} "
            "names one region per sigmoid channel; make them agree."
        )
    true_labels = sparse_labels(y_true, NUM_CLASSES)
    pred_labels = label_map(y_pred, head=head, channels=channels, threshold=threshold)
    return true_labels, pred_labels


def _pixel_weights(sample_weight, labels):
    """Float32 per-pixel weights broadcast to the shape of ``labels`` ``[B, H, W]``."""
    if sample_weight is None:
        return ops.ones_like(labels, dtype="float32")
    weights = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    if len(weights.shape) == 4 and weights.shape[-1] == 1:
        weights = ops.squeeze(weights, axis=-1)
    while len(weights.shape) < len(labels.shape):
        weights = ops.expand_dims(weights, axis=-1)  # [B] -> [B, 1, 1]
    return ops.broadcast_to(weights, ops.shape(labels))


def region_counts(true_labels, pred_labels, region, weights=None):
    """Weighted (TP, FP, FN) of a region between two integer label maps.

    Args:
        true_labels: ``int`` labels ``[B, H, W]``.
        pred_labels: ``int`` predicted labels ``[B, H, W]``.
        region: ``"liver"``, ``"tumor"``, ``"background"`` or an ``int`` class id.
        weights: optional float32 per-pixel weights ``[B, H, W]``.

    Returns:
        Three float32 scalars ``(tp, fp, fn)``.

    Example:

    >>> import numpy as np
    >>> t = np.array([[[0, 1], [2, 2]]]); p = np.array([[[1, 1], [2, 0]]])
    >>> [float(c) for c in region_counts(t, p, "liver")]
    [2.0, 1.0, 1.0]
    """
    truth = ops.cast(region_mask(true_labels, region), "float32")
    pred = ops.cast(region_mask(pred_labels, region), "float32")
    if weights is not None:
        truth, pred_w = truth * weights, pred * weights
    else:
        pred_w = pred
    tp = ops.sum(truth * pred)
    fp = ops.sum(pred_w) - tp
    fn = ops.sum(truth) - tp
    return tp, fp, fn


def score_from_counts(tp, fp, fn, score: str = "dice", empty_score: float = 1.0):
    """Dice, IoU, precision or recall from (possibly accumulated) counts.

    ``dice = 2TP / (2TP + FP + FN)``, ``iou = TP / (TP + FP + FN)``,
    ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``. When the region is
    empty in both truth and prediction (TP = FP = FN = 0) the result is
    ``empty_score``; a zero denominator otherwise gives 0.

    Args:
        tp: true positives (scalar or any shape).
        fp: false positives.
        fn: false negatives.
        score: ``"dice"``, ``"iou"``, ``"precision"`` or ``"recall"``.
        empty_score: the value for an empty-in-both region. Defaults to 1.0.

    Returns:
        A float32 tensor of the shape of the counts.

    Example:

    >>> round(float(score_from_counts(2.0, 1.0, 1.0, "dice")), 4)  # 4 / 6
    0.6667
    >>> float(score_from_counts(0.0, 0.0, 0.0, "dice"))
    1.0
    """
    if score not in _SCORES:
        raise ValueError(f"score={score!r} is not supported; use one of {_SCORES}.")
    tp, fp, fn = (ops.cast(ops.convert_to_tensor(c), "float32") for c in (tp, fp, fn))
    numerator = {"dice": 2.0 * tp, "iou": tp, "precision": tp, "recall": tp}[score]
    denominator = {
        "dice": 2.0 * tp + fp + fn,
        "iou": tp + fp + fn,
        "precision": tp + fp,
        "recall": tp + fn,
    }[score]
    value = ops.divide_no_nan(numerator, denominator)
    empty = ops.equal(tp + fp + fn, 0.0)
    return ops.where(empty, ops.cast(empty_score, "float32"), value)


def _check_empty_score(empty_score, allow_none=False):
    if empty_score is None and allow_none:
        return None
    if not isinstance(empty_score, (int, float)) or not math.isfinite(empty_score):
        hint = ", or None to leave empty classes out of the mean" if allow_none else ""
        raise ValueError(
            f"empty_score must be a finite number such as 1.0 or 0.0{hint}, got "
            f"empty_score={empty_score!r}."
        )
    return float(empty_score)


# ---------------------------------------------------------------------------
# Stateful metrics
# ---------------------------------------------------------------------------


class _DecodingMetric(keras.metrics.Metric):
    """Shared head/threshold handling for the metrics below."""

    def __init__(self, head="softmax", channels=("liver", "tumor"), threshold=0.5,
                 name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.channels = list(_check_channels(channels, head))
        self.head = head
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(
                f"threshold must be a finite number, got threshold={threshold!r}; use 0.5 "
                "for sigmoid probabilities or 0.0 for logits."
            )
        self.threshold = float(threshold)

    def _labels(self, y_true, y_pred, sample_weight):
        true_labels, pred_labels = _decode(
            y_true, y_pred, self.head, self.channels, self.threshold
        )
        return true_labels, pred_labels, _pixel_weights(sample_weight, true_labels)

    def get_config(self):
        config = super().get_config()
        config.update(head=self.head, channels=list(self.channels), threshold=self.threshold)
        return config


class _RegionMetric(_DecodingMetric):
    """Accumulates TP/FP/FN of one region; subclasses pick the score."""

    _score = "dice"

    def __init__(self, region="liver", name=None, *, head="softmax",
                 channels=("liver", "tumor"), threshold=0.5, empty_score=1.0, dtype=None):
        _region_ids(region)  # validates
        if name is None:
            prefix = region if isinstance(region, str) else f"class{region}"
            name = f"{prefix}_{self._score}"
        super().__init__(head=head, channels=channels, threshold=threshold,
                         name=name, dtype=dtype)
        self.region = region
        self.empty_score = _check_empty_score(empty_score)
        self.true_positives = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="true_positives")
        self.false_positives = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="false_positives")
        self.false_negatives = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="false_negatives")

    def update_state(self, y_true, y_pred, sample_weight=None):
        true_labels, pred_labels, weights = self._labels(y_true, y_pred, sample_weight)
        tp, fp, fn = region_counts(true_labels, pred_labels, self.region, weights)
        self.true_positives.assign_add(tp)
        self.false_positives.assign_add(fp)
        self.false_negatives.assign_add(fn)

    def result(self):
        return score_from_counts(self.true_positives, self.false_positives,
                                 self.false_negatives, self._score, self.empty_score)

    def get_config(self):
        config = super().get_config()
        config.update(region=self.region, empty_score=self.empty_score)
        return config


@keras.saving.register_keras_serializable(package="keras_livseg")
class DiceScore(_RegionMetric):
    """Epoch-global Dice ``2TP / (2TP + FP + FN)`` of one region.

    Args:
        region: ``"liver"`` (label ∈ {1, 2}), ``"tumor"`` (label 2),
            ``"background"`` (label 0) or an ``int`` class id (exactly that
            label). Defaults to ``"liver"``.
        name: the name in Keras logs. Defaults to ``"<region>_dice"``
            (``"class<id>_dice"`` for an int region), so validation logs
            read ``val_liver_dice``.
        head: ``"softmax"`` (argmax) or ``"sigmoid"`` (per-channel threshold;
            see the module docstring). Defaults to ``"softmax"``.
        channels: sigmoid head only: the region of each channel. Defaults to
            ``("liver", "tumor")``.
        threshold: sigmoid head only: a channel is on above it. Defaults to 0.5.
        empty_score: the score when the region is empty in both prediction and
            truth over the epoch. Defaults to 1.0.
        dtype: metric dtype. Defaults to ``None`` (floatx).

    Shapes:
        ``y_true``: ``[B, H, W]`` or ``[B, H, W, 1]`` labels; ``y_pred``:
        ``[B, H, W, C]``; ``result()``: a float32 scalar.

    Example:

    >>> m = DiceScore("tumor")
    >>> import numpy as np
    >>> y_true = np.array([[[0, 2], [2, 1]]])                  # 3 liver, 2 tumor pixels
    >>> y_pred = np.eye(3, dtype="float32")[np.array([[[2, 2], [0, 1]]])]
    >>> m.update_state(y_true, y_pred)                         # tumor: TP 1, FP 1, FN 1
    >>> float(m.result())                                      # 2 / (2 + 1 + 1)
    0.5
    """

    _score = "dice"


@keras.saving.register_keras_serializable(package="keras_livseg")
class IoUScore(_RegionMetric):
    """Epoch-global IoU (Jaccard) ``TP / (TP + FP + FN)`` of one region.

    Args:
        region: ``"liver"`` (label ∈ {1, 2}), ``"tumor"`` (label 2),
            ``"background"`` (label 0) or an ``int`` class id (exactly that
            label). Defaults to ``"liver"``.
        name: the name in Keras logs. Defaults to ``"<region>_iou"``
            (``"class<id>_iou"`` for an int region), so validation logs
            read ``val_liver_iou``.
        head: ``"softmax"`` (argmax) or ``"sigmoid"`` (per-channel threshold;
            see the module docstring). Defaults to ``"softmax"``.
        channels: sigmoid head only: the region of each channel. Defaults to
            ``("liver", "tumor")``.
        threshold: sigmoid head only: a channel is on above it. Defaults to 0.5.
        empty_score: the score when the region is empty in both prediction and
            truth over the epoch. Defaults to 1.0.
        dtype: metric dtype. Defaults to ``None`` (floatx).

    Shapes:
        ``y_true``: ``[B, H, W]`` or ``[B, H, W, 1]`` labels; ``y_pred``:
        ``[B, H, W, C]``; ``result()``: a float32 scalar.

    Example:

    >>> m = IoUScore("liver")
    >>> import numpy as np
    >>> y_true = np.array([[[0, 2], [2, 1]]])                  # 3 liver, 2 tumor pixels
    >>> y_pred = np.eye(3, dtype="float32")[np.array([[[2, 2], [0, 1]]])]
    >>> m.update_state(y_true, y_pred)                         # liver: TP 2, FP 1, FN 1
    >>> float(m.result())                                      # 2 / 4
    0.5
    """

    _score = "iou"


@keras.saving.register_keras_serializable(package="keras_livseg")
class PrecisionScore(_RegionMetric):
    """Epoch-global precision ``TP / (TP + FP)`` of one region (tumor by default).

    Args:
        region: ``"liver"`` (label ∈ {1, 2}), ``"tumor"`` (label 2),
            ``"background"`` (label 0) or an ``int`` class id (exactly that
            label). Defaults to ``"tumor"``.
        name: the name in Keras logs. Defaults to ``"<region>_precision"``
            (``"class<id>_precision"`` for an int region), so validation logs
            read ``val_tumor_precision``.
        head: ``"softmax"`` (argmax) or ``"sigmoid"`` (per-channel threshold;
            see the module docstring). Defaults to ``"softmax"``.
        channels: sigmoid head only: the region of each channel. Defaults to
            ``("liver", "tumor")``.
        threshold: sigmoid head only: a channel is on above it. Defaults to 0.5.
        empty_score: the score when the region is empty in both prediction and
            truth over the epoch. Defaults to 1.0.
        dtype: metric dtype. Defaults to ``None`` (floatx).

    Shapes:
        ``y_true``: ``[B, H, W]`` or ``[B, H, W, 1]`` labels; ``y_pred``:
        ``[B, H, W, C]``; ``result()``: a float32 scalar.

    Example:

    >>> m = PrecisionScore()                                   # "tumor_precision"
    >>> import numpy as np
    >>> y_true = np.array([[[0, 2], [2, 1]]])                  # 3 liver, 2 tumor pixels
    >>> y_pred = np.eye(3, dtype="float32")[np.array([[[2, 2], [0, 1]]])]
    >>> m.update_state(y_true, y_pred)                         # tumor: TP 1, FP 1
    >>> float(m.result())
    0.5
    """

    _score = "precision"

    def __init__(self, region="tumor", name=None, **kwargs):
        super().__init__(region, name, **kwargs)


@keras.saving.register_keras_serializable(package="keras_livseg")
class RecallScore(_RegionMetric):
    """Epoch-global recall (sensitivity) ``TP / (TP + FN)`` of one region (tumor by default).

    Args:
        region: ``"liver"`` (label ∈ {1, 2}), ``"tumor"`` (label 2),
            ``"background"`` (label 0) or an ``int`` class id (exactly that
            label). Defaults to ``"tumor"``.
        name: the name in Keras logs. Defaults to ``"<region>_recall"``
            (``"class<id>_recall"`` for an int region), so validation logs
            read ``val_tumor_recall``.
        head: ``"softmax"`` (argmax) or ``"sigmoid"`` (per-channel threshold;
            see the module docstring). Defaults to ``"softmax"``.
        channels: sigmoid head only: the region of each channel. Defaults to
            ``("liver", "tumor")``.
        threshold: sigmoid head only: a channel is on above it. Defaults to 0.5.
        empty_score: the score when the region is empty in both prediction and
            truth over the epoch. Defaults to 1.0.
        dtype: metric dtype. Defaults to ``None`` (floatx).

    Shapes:
        ``y_true``: ``[B, H, W]`` or ``[B, H, W, 1]`` labels; ``y_pred``:
        ``[B, H, W, C]``; ``result()``: a float32 scalar.

    Example:

    >>> m = RecallScore()                                      # "tumor_recall"
    >>> import numpy as np
    >>> y_true = np.array([[[0, 2], [2, 1]]])                  # 3 liver, 2 tumor pixels
    >>> y_pred = np.eye(3, dtype="float32")[np.array([[[2, 2], [0, 1]]])]
    >>> m.update_state(y_true, y_pred)                         # tumor: TP 1, FN 1
    >>> float(m.result())
    0.5
    """

    _score = "recall"

    def __init__(self, region="tumor", name=None, **kwargs):
        super().__init__(region, name, **kwargs)


@keras.saving.register_keras_serializable(package="keras_livseg")
class MeanIoU(_DecodingMetric):
    """Mean over the classes 0, 1, 2 of the epoch-global IoU of each *exact* class.

    Unlike the region metrics, class 1 here is liver parenchyma only (label == 1),
    the usual definition of mIoU (the PAN paper's metric). Takes probabilities,
    unlike ``keras.metrics.MeanIoU`` which wants labels.

    Args:
        num_classes: number of classes. Defaults to 3.
        name: the metric's name. Defaults to ``"mean_iou"``.
        head: ``"softmax"`` or ``"sigmoid"`` (see the module docstring).
            Defaults to ``"softmax"``.
        channels: sigmoid head only: the region of each channel.
        threshold: sigmoid head only. Defaults to 0.5.
        empty_score: IoU of a class empty in both prediction and truth over the
            epoch (1.0 by default), or ``None`` to leave such a class out of the
            mean (as ``keras.metrics.MeanIoU`` does).
        dtype: metric dtype. Defaults to ``None``.

    Shapes:
        ``y_true``: ``[B, H, W]`` or ``[B, H, W, 1]``; ``y_pred``: ``[B, H, W, C]``;
        ``result()``: a float32 scalar.

    Example:

    >>> import numpy as np
    >>> m = MeanIoU()
    >>> y_true = np.array([[[0, 2], [2, 1]]])
    >>> y_pred = np.eye(3, dtype="float32")[np.array([[[2, 2], [0, 1]]])]
    >>> m.update_state(y_true, y_pred)    # IoU 0: 0/2, 1: 1/1, 2: 1/3
    >>> round(float(m.result()), 4)       # (0 + 1 + 1/3) / 3
    0.4444
    """

    def __init__(self, num_classes=NUM_CLASSES, name="mean_iou", *, head="softmax",
                 channels=("liver", "tumor"), threshold=0.5, empty_score=1.0, dtype=None):
        if num_classes != NUM_CLASSES:
            raise ValueError(
                f"num_classes={num_classes!r} is not supported; the LiTS label map has "
                f"{NUM_CLASSES} classes (background, liver, tumor)."
            )
        super().__init__(head=head, channels=channels, threshold=threshold,
                         name=name, dtype=dtype)
        self.num_classes = num_classes
        self.empty_score = _check_empty_score(empty_score, allow_none=True)
        shape = (num_classes,)
        self.true_positives = self.add_variable(
            shape=shape, initializer="zeros", dtype="float32", name="true_positives")
        self.false_positives = self.add_variable(
            shape=shape, initializer="zeros", dtype="float32", name="false_positives")
        self.false_negatives = self.add_variable(
            shape=shape, initializer="zeros", dtype="float32", name="false_negatives")

    def update_state(self, y_true, y_pred, sample_weight=None):
        true_labels, pred_labels, weights = self._labels(y_true, y_pred, sample_weight)
        truth = ops.one_hot(true_labels, self.num_classes, dtype="float32")
        pred = ops.one_hot(pred_labels, self.num_classes, dtype="float32")
        weights = ops.expand_dims(weights, axis=-1)
        axes = (0, 1, 2)
        tp = ops.sum(truth * pred * weights, axis=axes)
        self.true_positives.assign_add(tp)
        self.false_positives.assign_add(ops.sum(pred * weights, axis=axes) - tp)
        self.false_negatives.assign_add(ops.sum(truth * weights, axis=axes) - tp)

    def result(self):
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        if self.empty_score is not None:
            return ops.mean(score_from_counts(tp, fp, fn, "iou", self.empty_score))
        present = ops.cast(ops.greater(tp + fp + fn, 0.0), "float32")
        iou = score_from_counts(tp, fp, fn, "iou", 0.0)
        return ops.divide_no_nan(ops.sum(iou * present), ops.sum(present))

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, empty_score=self.empty_score)
        return config


@keras.saving.register_keras_serializable(package="keras_livseg")
class PixelAccuracy(_DecodingMetric):
    """Epoch-global fraction of pixels whose predicted class equals the label.

    Args:
        name: the metric's name. Defaults to ``"pixel_accuracy"``.
        head: ``"softmax"`` or ``"sigmoid"``. Defaults to ``"softmax"``.
        channels: sigmoid head only: the region of each channel.
        threshold: sigmoid head only. Defaults to 0.5.
        dtype: metric dtype. Defaults to ``None``.

    Shapes:
        ``y_true``: ``[B, H, W]`` or ``[B, H, W, 1]``; ``y_pred``: ``[B, H, W, C]``;
        ``result()``: a float32 scalar (0 before any update).

    Example:

    >>> import numpy as np
    >>> m = PixelAccuracy()
    >>> y_true = np.array([[[0, 2], [2, 1]]])
    >>> y_pred = np.eye(3, dtype="float32")[np.array([[[2, 2], [0, 1]]])]
    >>> m.update_state(y_true, y_pred)
    >>> float(m.result())                 # 2 of 4 pixels right
    0.5
    """

    def __init__(self, name="pixel_accuracy", *, head="softmax",
                 channels=("liver", "tumor"), threshold=0.5, dtype=None):
        super().__init__(head=head, channels=channels, threshold=threshold,
                         name=name, dtype=dtype)
        self.correct = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="correct")
        self.total = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        true_labels, pred_labels, weights = self._labels(y_true, y_pred, sample_weight)
        hit = ops.cast(ops.equal(true_labels, pred_labels), "float32")
        self.correct.assign_add(ops.sum(hit * weights))
        self.total.assign_add(ops.sum(weights))

    def result(self):
        return ops.divide_no_nan(self.correct, self.total)


def default_metrics(head: str = "softmax", channels: Sequence[str] = ("liver", "tumor"),
                    threshold: float = 0.5) -> list:
    """The full metric set for ``model.compile(metrics=...)``, in log order.

    Logs read ``liver_dice``, ``tumor_dice``, ``liver_iou``, ``tumor_iou``,
    ``mean_iou``, ``tumor_precision``, ``tumor_recall``, ``pixel_accuracy``
    (prefixed ``val_`` on validation data).

    Args:
        head: ``"softmax"`` or ``"sigmoid"``. Defaults to ``"softmax"``.
        channels: sigmoid head only: the region of each channel.
        threshold: sigmoid head only. Defaults to 0.5.

    Returns:
        A new list of fresh metric objects (each call makes new state).

    Example:

    >>> [m.name for m in default_metrics()][:2]
    ['liver_dice', 'tumor_dice']
    """
    decode = dict(head=head, channels=tuple(channels), threshold=threshold)
    return [
        DiceScore("liver", **decode),
        DiceScore("tumor", **decode),
        IoUScore("liver", **decode),
        IoUScore("tumor", **decode),
        MeanIoU(**decode),
        PrecisionScore("tumor", **decode),
        RecallScore("tumor", **decode),
        PixelAccuracy(**decode),
    ]

