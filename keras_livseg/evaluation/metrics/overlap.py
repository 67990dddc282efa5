"""Voxel-overlap metrics of two masks: Dice, IoU (Jaccard), VOE, RVD, precision, recall, F1.

Every function takes a prediction and a reference mask of one shape ``[d0, d1, ...]`` (any
number of axes; non-zero is foreground) and returns a float, or, for :func:`overlap_counts`,
the voxel counts ``(|P ∩ G|, |P|, |G|)`` from which :func:`overlap_from_counts` derives them
all (a dict of floats). Voxel spacing cancels out, so none of them takes it.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from keras_livseg.evaluation.metrics._common import _check_pair


# ---------------------------------------------------------------------------------------------
# Overlap metrics
# ---------------------------------------------------------------------------------------------


def overlap_counts(pred: ArrayLike, ref: ArrayLike) -> tuple[int, int, int]:
    """Voxel counts from which every overlap metric (and the global Dice) follows.

    Args:
        pred: Predicted mask, any shape; non-zero is foreground.
        ref: Reference mask of the same shape.

    Returns:
        ``(intersection, pred_voxels, ref_voxels)``: |P ∩ G|, |P| and |G|.

    Example:

    >>> overlap_counts([1, 1, 0, 0], [0, 1, 1, 0])
    (1, 2, 2)
    """
    p, r = _check_pair(pred, ref)
    return int(np.count_nonzero(p & r)), int(np.count_nonzero(p)), int(np.count_nonzero(r))


def overlap_from_counts(
    intersection: int,
    pred_voxels: int,
    ref_voxels: int,
    *,
    empty_score: float = 1.0,
    empty_value: float = math.nan,
) -> dict[str, float]:
    """All overlap metrics from the three voxel counts, with the module's empty-mask policy.

    Args:
        intersection: |P ∩ G|.
        pred_voxels: |P|.
        ref_voxels: |G|.
        empty_score: Dice, IoU, F1, precision and recall when both masks are empty (default 1.0,
            LiTS's convention for a case without tumor in either mask).
        empty_value: RVD (resp. LiTS RVD) when its denominator, the reference (resp. prediction)
            volume, is zero while the other is not (default NaN).

    Returns:
        Dict with ``dice``, ``iou``, ``voe``, ``rvd``, ``rvd_lits``, ``precision``, ``recall``,
        ``f1``.

    Example:

    >>> {k: round(v, 4) for k, v in overlap_from_counts(2, 5, 4).items()}
    ... # doctest: +NORMALIZE_WHITESPACE
    {'dice': 0.4444, 'iou': 0.2857, 'voe': 0.7143, 'rvd': 0.25, 'rvd_lits': -0.2,
     'precision': 0.4, 'recall': 0.5, 'f1': 0.4444}
    """
    tp, n_pred, n_ref = int(intersection), int(pred_voxels), int(ref_voxels)
    if tp < 0 or tp > min(n_pred, n_ref):
        raise ValueError(
            f"intersection={tp} must lie in [0, min(pred_voxels={n_pred}, ref_voxels={n_ref})]."
        )
    if n_pred == 0 and n_ref == 0:
        return {
            "dice": float(empty_score),
            "iou": float(empty_score),
            "voe": 1.0 - float(empty_score),
            "rvd": 0.0,
            "rvd_lits": 0.0,
            "precision": float(empty_score),
            "recall": float(empty_score),
            "f1": float(empty_score),
        }
    union = n_pred + n_ref - tp
    dice_value = 2.0 * tp / (n_pred + n_ref)
    iou_value = tp / union
    # A miss (empty prediction) or a pure false alarm (empty reference) earns no credit.
    precision_value = tp / n_pred if n_pred else 0.0
    recall_value = tp / n_ref if n_ref else 0.0
    return {
        "dice": dice_value,
        "iou": iou_value,
        "voe": 1.0 - iou_value,
        "rvd": (n_pred - n_ref) / n_ref if n_ref else float(empty_value),
        "rvd_lits": (n_ref - n_pred) / n_pred if n_pred else float(empty_value),
        "precision": precision_value,
        "recall": recall_value,
        # F1 = 2PR / (P + R) = 2TP / (2TP + FP + FN): on voxels it is the Dice coefficient.
        "f1": dice_value,
    }


def dice(pred: ArrayLike, ref: ArrayLike, *, empty_score: float = 1.0) -> float:
    """Dice similarity coefficient 2|P ∩ G| / (|P| + |G|).

    Args:
        pred: Predicted mask, any shape (e.g. ``[depth, height, width]``); non-zero is foreground.
        ref: Reference mask of the same shape.
        empty_score: Value when both masks are empty (default 1.0, as LiTS scores a case with no
            tumor in prediction and reference).

    Returns:
        Dice in [0, 1].

    Example:

    >>> round(dice([1, 1, 1, 0], [0, 1, 1, 1]), 4)
    0.6667
    >>> dice([0, 0], [0, 0])
    1.0
    """
    return overlap_from_counts(*overlap_counts(pred, ref), empty_score=empty_score)["dice"]


def iou(pred: ArrayLike, ref: ArrayLike, *, empty_score: float = 1.0) -> float:
    """Intersection over union (Jaccard index) |P ∩ G| / |P ∪ G|.

    Args:
        pred: Predicted mask, any shape; non-zero is foreground.
        ref: Reference mask of the same shape.
        empty_score: Value when both masks are empty (default 1.0).

    Returns:
        IoU in [0, 1].

    Example:

    >>> iou([1, 1, 1, 0], [0, 1, 1, 1])
    0.5
    """
    return overlap_from_counts(*overlap_counts(pred, ref), empty_score=empty_score)["iou"]


jaccard = iou


def voe(pred: ArrayLike, ref: ArrayLike) -> float:
    """Volumetric overlap error 1 − IoU (0.0 when both masks are empty).

    Args:
        pred: Predicted mask, any shape; non-zero is foreground.
        ref: Reference mask of the same shape.

    Returns:
        VOE in [0, 1].

    Example:

    >>> voe([1, 1, 1, 0], [0, 1, 1, 1])
    0.5
    """
    return overlap_from_counts(*overlap_counts(pred, ref))["voe"]


def rvd(
    pred: ArrayLike, ref: ArrayLike, *, lits_convention: bool = False, empty_value: float = math.nan
) -> float:
    """Relative volume difference.

    By default the usual convention (|P| − |G|) / |G|: positive for over-segmentation, equal to
    ``medpy.metric.binary.ravd(pred, ref)``. The LiTS script calls ``medpy.ravd(ref, pred)``,
    which is (|G| − |P|) / |P|: the opposite sign *and* the prediction's volume as denominator;
    ``lits_convention=True`` returns that (see also :func:`rvd_lits`). Voxel spacing cancels out.

    Args:
        pred: Predicted mask, any shape; non-zero is foreground.
        ref: Reference mask of the same shape.
        lits_convention: Return the LiTS script's (|G| − |P|) / |P| instead (default False).
        empty_value: Value when the denominator's mask is empty and the other is not (default NaN;
            ``LITS_PENALTY`` reproduces LiTS). Both empty gives 0.0.

    Returns:
        The relative volume difference (unbounded; 0 is a perfect volume).

    Example:

    >>> rvd([1, 1, 1, 0, 0], [1, 1, 0, 0, 0])
    0.5
    >>> round(rvd([1, 1, 1, 0, 0], [1, 1, 0, 0, 0], lits_convention=True), 4)
    -0.3333
    """
    scores = overlap_from_counts(*overlap_counts(pred, ref), empty_value=empty_value)
    return scores["rvd_lits"] if lits_convention else scores["rvd"]


def rvd_lits(pred: ArrayLike, ref: ArrayLike, *, empty_value: float = math.nan) -> float:
    """The LiTS script's relative volume difference ``medpy.ravd(ref, pred)`` = (|G| − |P|)/|P|.

    Args:
        pred: Predicted mask, any shape; non-zero is foreground.
        ref: Reference mask of the same shape.
        empty_value: Value when the prediction is empty and the reference is not (default NaN).

    Returns:
        (|G| − |P|) / |P|; negative for over-segmentation.

    Example:

    >>> rvd_lits([1, 1, 1, 1, 0], [1, 1, 0, 0, 0])
    -0.5
    """
    return rvd(pred, ref, lits_convention=True, empty_value=empty_value)


def precision(pred: ArrayLike, ref: ArrayLike, *, empty_score: float = 1.0) -> float:
    """Voxel precision |P ∩ G| / |P| (0.0 for an empty prediction of a non-empty reference).

    Args:
        pred: Predicted mask, any shape; non-zero is foreground.
        ref: Reference mask of the same shape.
        empty_score: Value when both masks are empty (default 1.0).

    Returns:
        Precision in [0, 1].

    Example:

    >>> precision([1, 1, 1, 1], [1, 0, 0, 0])
    0.25
    """
    return overlap_from_counts(*overlap_counts(pred, ref), empty_score=empty_score)["precision"]


def recall(pred: ArrayLike, ref: ArrayLike, *, empty_score: float = 1.0) -> float:
    """Voxel recall (sensitivity) |P ∩ G| / |G| (0.0 for a prediction of an empty reference).

    Args:
        pred: Predicted mask, any shape; non-zero is foreground.
        ref: Reference mask of the same shape.
        empty_score: Value when both masks are empty (default 1.0).

    Returns:
        Recall in [0, 1].

    Example:

    >>> recall([1, 0, 0, 0], [1, 1, 0, 0])
    0.5
    """
    return overlap_from_counts(*overlap_counts(pred, ref), empty_score=empty_score)["recall"]


def f1(pred: ArrayLike, ref: ArrayLike, *, empty_score: float = 1.0) -> float:
    """Voxel F1 score 2PR / (P + R), which equals the Dice coefficient on binary masks.

    Args:
        pred: Predicted mask, any shape; non-zero is foreground.
        ref: Reference mask of the same shape.
        empty_score: Value when both masks are empty (default 1.0).

    Returns:
        F1 in [0, 1].

    Example:

    >>> round(f1([1, 0, 0, 0], [1, 1, 0, 0]), 4)
    0.6667
    """
    return overlap_from_counts(*overlap_counts(pred, ref), empty_score=empty_score)["f1"]
