"""LiTS-conformant segmentation metrics for liver and liver-tumor CT, in numpy and scipy only.

Everything here works on label maps or boolean masks already on the reference grid (same shape,
same voxel spacing); no TensorFlow, Keras or medpy at runtime, so the evaluation runs anywhere the
volumes can be read. The rule book is the LiTS challenge's scoring program
(PatrickChrist/lits-challenge-scoring, ``program/evaluate.py`` and
``program/helpers/calc_metric.py``):

* Liver means label >= 1 (liver including tumor), tumor means label == 2.
* Lesions are 3D connected components of the tumor mask (``scipy.ndimage.label``, face
  connectivity).
* Surface distances are in millimetres from the voxel spacing, and agree with
  ``medpy.metric.binary`` (``hd``, ``hd95``, ``asd``, ``assd``) to floating-point rounding.
* Per detected lesion (a match group of :func:`lesion_detection`), Dice, Jaccard, VOE, RVD, ASSD,
  RMSD and MSD are computed on the group's reference lesions and merged predicted components, as
  the LiTS script's ``compute_segmentation_scores`` does (:func:`lesion_segmentation_metrics`),
  and averaged over the detected lesions of the whole dataset (:func:`mean_lesion_metrics`).

Surface definition (``connectivity``): a mask's surface is the mask minus its binary erosion by
``scipy.ndimage.generate_binary_structure(ndim, connectivity)``.

==============  ====================================================================
connectivity    structuring element and who uses it
==============  ====================================================================
1 (``MEDPY``)   6-neighbourhood (faces): ``medpy.metric.binary``'s default. The
                default of every function in this module, whose names follow medpy's.
2 (``LITS``)    18-neighbourhood (faces and edges): the LiTS script's surface
                (``Surface.compute_contour``); more voxels count as surface. The
                default of the evaluation (:class:`~keras_livseg.evaluation.report.EvaluationOptions`
                and ``python -m keras_livseg.evaluate``), which scores as LiTS does.
==============  ====================================================================

Empty-mask policy (one table for every function, so that reports can count the cases apart):

=================  =====================  =========================  =========================
metric             both masks empty       prediction empty only      reference empty only
=================  =====================  =========================  =========================
dice, iou, f1      1.0 (LiTS)             0.0                        0.0
voe                0.0                    1.0                        1.0
precision          1.0                    0.0                        0.0
recall             1.0                    0.0                        0.0
rvd                0.0                    -1.0                       ``empty_rvd`` (NaN)
rvd_lits           0.0                    ``empty_rvd`` (NaN)        -1.0
assd, msd, hd95,   0.0                    penalty (``empty_value``)  penalty (``empty_value``)
rmsd (mm)
=================  =====================  =========================  =========================

Surface distances between an empty and a non-empty mask do not exist. Leaving them out of a mean
rewards exactly the worst predictions (a missed liver would not raise the mean ASSD), so they get
a penalty, chosen by the explicit policy argument ``empty_value`` (MONAI-style):

* ``"diagonal"`` (default): the diagonal of the volume's physical extent in mm,
  sqrt(sum((n_i * s_i)^2)) over the array's shape n and spacing s (:func:`volume_diagonal_mm`).
  No two voxels of the volume are farther apart, so the penalty is worse than any real
  prediction, yet stays on the scale of the volume (a mean over cases remains readable);
* ``"lits"``: ``LITS_PENALTY`` (9001 mm, the LiTS script's ``LARGE``), to reproduce the challenge;
* ``"nan"``: NaN, the old behaviour (undefined; reports then count them in ``*_undefined``);
* a number: that many mm.

RVD with an empty denominator (the reference for ``rvd``, the prediction for ``rvd_lits``) is
+infinity in the limit and no finite penalty is meaningful for a *signed* mean (it would cancel
under-segmentations). It is NaN by default (``empty_rvd``): reports leave it out of the RVD mean
and count it as ``rvd_undefined``; the case still counts, penalised, in Dice, VOE and every
surface distance. Pass ``empty_rvd=LITS_PENALTY`` to reproduce LiTS.

Example:

>>> import numpy as np
>>> ref = np.zeros((8, 8, 4), dtype=np.uint8); ref[2:6, 2:6, :] = 1; ref[3:5, 3:5, 1:3] = 2
>>> pred = ref.copy(); pred[3, 3, 1] = 1
>>> scores = case_metrics(pred, ref, spacing=(0.8, 0.8, 2.5))
>>> round(scores["liver_dice"], 4), round(scores["tumor_dice"], 4)
(1.0, 0.9333)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

logger = logging.getLogger(__name__)

#: Liver is every voxel with a label at least this (liver includes tumor, as in LiTS).
LIVER_MIN_LABEL = 1
#: The tumor label of the LiTS label map.
TUMOR_LABEL = 2
#: Regions scored by :func:`case_metrics` and :func:`slice_level_metrics`.
REGIONS = ("liver", "tumor")
#: The LiTS script's penalty (``LARGE``) for surface distances and RVD with an empty mask.
LITS_PENALTY = 9001.0
#: Surface neighbourhood of ``medpy.metric.binary`` (6-neighbourhood in 3D).
MEDPY_CONNECTIVITY = 1
#: Surface neighbourhood of the LiTS script (``generate_binary_structure(3, 2)``: 18-neighbourhood).
LITS_CONNECTIVITY = 2
#: Named policies for surface distances with exactly one empty mask (see the module docstring).
EMPTY_SURFACE_POLICIES = ("diagonal", "lits", "nan")
#: Default cut between small and large lesions, on the equivalent-sphere diameter in mm. Lesions
#: under 1 cm are the ones radiologists call "too small to characterize" and where automated
#: methods fail most; the LiTS benchmark paper uses the same 10 mm cut.
SMALL_LESION_DIAMETER_MM = 10.0


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _as_mask(mask: ArrayLike) -> NDArray[np.bool_]:
    """Returns ``mask`` as a boolean array (non-zero is foreground, as in medpy)."""
    array = np.asarray(mask)
    return array if array.dtype == np.bool_ else array != 0


def _check_pair(
    pred: ArrayLike, ref: ArrayLike, names: tuple[str, str] = ("pred", "ref")
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Converts a prediction and a reference to boolean masks of one shape."""
    pred_mask, ref_mask = _as_mask(pred), _as_mask(ref)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(
            f"{names[0]} has shape {pred_mask.shape} but {names[1]} has shape {ref_mask.shape}; "
            "resample the prediction onto the reference grid (same shape and spacing) "
            "before scoring."
        )
    if pred_mask.ndim == 0:
        raise ValueError(f"{names[0]} and {names[1]} are scalars; pass 2D or 3D masks.")
    return pred_mask, ref_mask


def _check_labels(
    pred_labels: ArrayLike, ref_labels: ArrayLike
) -> tuple[NDArray[Any], NDArray[Any]]:
    """Checks two label maps: same shape, values within the LiTS labels 0, 1, 2."""
    pred, ref = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred.shape != ref.shape:
        raise ValueError(
            f"pred_labels has shape {pred.shape} but ref_labels has shape {ref.shape}; "
            "resample the prediction onto the reference grid (same shape and spacing) "
            "before scoring."
        )
    if pred.ndim == 0:
        raise ValueError("pred_labels and ref_labels are scalars; pass 2D or 3D label maps.")
    for name, labels in (("pred_labels", pred), ("ref_labels", ref)):
        if labels.size and labels.dtype != np.bool_:
            low, high = labels.min(), labels.max()
            if low < 0 or high > TUMOR_LABEL:
                raise ValueError(
                    f"{name} holds values in [{low}, {high}] but labels must be 0 background, "
                    f"1 liver, {TUMOR_LABEL} tumor; remap other label maps first "
                    "(e.g. --label-map SRC:DST,...)."
                )
    return pred, ref


def _check_spacing(spacing: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    """Returns the voxel spacing in mm as ``ndim`` positive floats (a scalar means isotropic)."""
    try:
        values = np.asarray(spacing, dtype=np.float64).ravel()
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"spacing={spacing!r} is not a sequence of numbers; pass the voxel size in mm per "
            "array axis, e.g. nibabel's header.get_zooms()[:3]."
        ) from error
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim:
        raise ValueError(
            f"spacing={tuple(values.tolist())} has {values.size} values but the masks have "
            f"{ndim} axes; "
            f"pass one voxel size in mm per array axis (header.get_zooms()[:{ndim}])."
        )
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(
            f"spacing={tuple(values.tolist())} must hold finite positive voxel sizes in mm; "
            "check the NIfTI header's pixdim."
        )
    return tuple(float(v) for v in values)


def _check_connectivity(connectivity: int, ndim: int) -> int:
    if not isinstance(connectivity, (int, np.integer)) or not 1 <= connectivity <= ndim:
        raise ValueError(
            f"connectivity={connectivity!r} must be an integer in [1, {ndim}] for {ndim}D masks "
            "(1: face neighbours as in medpy's default, 2: the 18-neighbourhood of the LiTS "
            "script)."
        )
    return int(connectivity)


def volume_diagonal_mm(shape: Sequence[int], spacing: float | Sequence[float]) -> float:
    """Diagonal of a volume's physical extent in mm, sqrt(sum((n_i * s_i)^2)).

    No two voxel centres of the volume are farther apart, which makes it the default penalty
    for a surface distance between an empty and a non-empty mask.

    Args:
        shape: The array's shape ``[d0, d1, ...]``.
        spacing: Voxel size in mm per axis (a scalar for isotropic voxels).

    Returns:
        The diagonal in mm.

    Example:

    >>> volume_diagonal_mm((3, 4, 3), (1.0, 1.0, 4.0))  # sqrt(3² + 4² + 12²)
    13.0
    """
    sampling = _check_spacing(spacing, len(shape))
    return float(math.sqrt(sum((int(n) * s) ** 2 for n, s in zip(shape, sampling))))


def resolve_empty_value(
    empty_value: float | str, shape: Sequence[int], spacing: float | Sequence[float]
) -> float:
    """The surface distance in mm that a policy gives a pair with exactly one empty mask.

    Args:
        empty_value: ``"diagonal"`` (the volume's extent diagonal, :func:`volume_diagonal_mm`),
            ``"lits"`` (``LITS_PENALTY``, 9001 mm), ``"nan"`` (undefined), or a number of mm.
        shape: The masks' shape.
        spacing: Voxel size in mm per axis.

    Returns:
        The penalty in mm (NaN for ``"nan"``).

    Example:

    >>> resolve_empty_value("diagonal", (3, 4), 1.0), resolve_empty_value("lits", (3, 4), 1.0)
    (5.0, 9001.0)
    """
    if isinstance(empty_value, str):
        policy = empty_value.strip().lower()
        if policy == "diagonal":
            return volume_diagonal_mm(shape, spacing)
        if policy == "lits":
            return LITS_PENALTY
        if policy == "nan":
            return math.nan
        raise ValueError(
            f"empty_value={empty_value!r} is not a policy; use one of {EMPTY_SURFACE_POLICIES} "
            "or a number of mm."
        )
    try:
        value = float(empty_value)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"empty_value={empty_value!r} is neither a number of mm nor one of "
            f"{EMPTY_SURFACE_POLICIES}."
        ) from error
    if not math.isnan(value) and value < 0:
        raise ValueError(f"empty_value={value} must be a non-negative distance in mm (or NaN).")
    return value


def region_mask(labels: ArrayLike, region: str) -> NDArray[np.bool_]:
    """Boolean mask of a LiTS region in a label map.

    Args:
        labels: Integer label map (0 background, 1 liver, 2 tumor), any shape.
        region: ``"liver"`` (label >= 1, liver including tumor, as LiTS scores it) or
            ``"tumor"`` (label == 2).

    Returns:
        Boolean array of the same shape as ``labels``.

    Example:

    >>> region_mask(np.array([0, 1, 2]), "liver").tolist()
    [False, True, True]
    """
    array = np.asarray(labels)
    if region == "liver":
        return array >= LIVER_MIN_LABEL
    if region == "tumor":
        return array == TUMOR_LABEL
    raise ValueError(f"region={region!r} is not one of {REGIONS}.")


def _bounding_box(mask: NDArray[np.bool_], margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding ``mask``'s foreground, grown by ``margin`` voxels
    (clipped to the array), or None when the mask is empty."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=others) if others else mask)
        if hits.size == 0:
            return None
        start = max(int(hits[0]) - margin, 0)
        box.append(slice(start, min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _margin_box(mask: NDArray[np.bool_], margins: Sequence[int]) -> tuple[slice, ...] | None:
    """Like :func:`_bounding_box` with one margin per axis."""
    box = _bounding_box(mask)
    if box is None:
        return None
    return tuple(
        slice(max(s.start - m, 0), min(s.stop + m, n)) for s, m, n in zip(box, margins, mask.shape)
    )


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


# ---------------------------------------------------------------------------------------------
# Surface distances
# ---------------------------------------------------------------------------------------------


def _border(mask: NDArray[np.bool_], footprint: NDArray[np.bool_]) -> NDArray[np.bool_]:
    # medpy's surface: the mask minus its erosion; erosion treats outside the array as background
    # (border_value=0), so a mask touching the array edge has its surface there.
    return mask ^ ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def surface_distances(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing: float | Sequence[float],
    connectivity: int = 1,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Distances in mm from each surface voxel of one mask to the other mask's nearest one.

    Reproduces ``medpy.metric.binary.__surface_distances``: the surface is the mask minus its
    binary erosion by ``generate_binary_structure(ndim, connectivity)``, and distances come from
    ``distance_transform_edt`` with ``sampling=spacing``. Both masks are first cropped to their
    joint bounding box plus one voxel: every surface voxel lies inside it, the Euclidean distance
    transform is exact, and the erosion sees the same background, so the numbers are unchanged
    while a 512×512×800 volume costs only its foreground's box.

    Args:
        pred: Predicted mask, shape ``[d0, d1, ...]`` (2D or 3D); non-zero is foreground.
        ref: Reference mask of the same shape.
        spacing: Voxel size in mm per array axis (a scalar for isotropic voxels), in the arrays'
            axis order.
        connectivity: Neighbourhood of the erosion that defines the surface: 1 (faces, medpy's
            default) up to ``ndim``; the LiTS script's 18-neighbourhood is 2.

    Returns:
        ``(pred_to_ref, ref_to_pred)``: float64 arrays, one distance per surface voxel of ``pred``
        (resp. ``ref``), in C order. Both are empty when either mask is empty (no surface to
        measure against; the summary functions apply the empty-mask policy).

    Example:

    >>> pred = np.zeros((1, 1, 5), bool); pred[0, 0, [0, 3]] = True
    >>> ref = np.zeros((1, 1, 5), bool); ref[0, 0, 0] = True
    >>> [d.tolist() for d in surface_distances(pred, ref, spacing=(1.0, 1.0, 2.0))]
    [[0.0, 6.0], [0.0]]
    """
    p, r = _check_pair(pred, ref)
    sampling = _check_spacing(spacing, p.ndim)
    footprint = ndimage.generate_binary_structure(p.ndim, _check_connectivity(connectivity, p.ndim))
    if not p.any() or not r.any():
        empty = np.zeros(0, dtype=np.float64)
        return empty, empty.copy()
    box = _bounding_box(p | r, margin=1)
    p, r = p[box], r[box]
    p_border, r_border = _border(p, footprint), _border(r, footprint)
    # distance_transform_edt measures to the nearest zero, hence the inverted surfaces.
    pred_to_ref = ndimage.distance_transform_edt(~r_border, sampling=sampling)[p_border]
    ref_to_pred = ndimage.distance_transform_edt(~p_border, sampling=sampling)[r_border]
    return pred_to_ref.astype(np.float64, copy=False), ref_to_pred.astype(np.float64, copy=False)


def surface_metrics(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
    percentile: float = 95.0,
    empty_value: float | str = "diagonal",
) -> dict[str, float]:
    """All surface-distance metrics in mm from one pair of distance transforms.

    Args:
        pred: Predicted mask, shape ``[d0, d1, ...]``; non-zero is foreground.
        ref: Reference mask of the same shape.
        spacing: Voxel size in mm per array axis.
        connectivity: Surface neighbourhood, see :func:`surface_distances` (default 1, as medpy).
        percentile: Percentile for the robust Hausdorff distance (default 95).
        empty_value: Every distance when exactly one mask is empty: ``"diagonal"`` (default, the
            extent diagonal of the arrays passed), ``"lits"`` (9001), ``"nan"`` or a number of
            mm (see :func:`resolve_empty_value`). Both empty gives 0.0.

    Returns:
        Dict with ``assd`` (mean over the pooled surface voxels of both masks: medpy >= 0.5's
        ``assd`` and the LiTS script's / Heimann et al. 2009 definition), ``assd_mean_of_means``
        (the mean of the two directed mean distances, medpy 0.4's ``assd``; it weighs the smaller
        surface more), ``asd`` (directed mean from prediction to reference, medpy's
        ``asd(pred, ref)``), ``msd`` (maximum symmetric surface distance = Hausdorff distance),
        ``hd95`` and ``rmsd`` (root mean square over the pooled surface voxels, as LiTS).

    Example:

    >>> pred = np.zeros((1, 1, 5), bool); pred[0, 0, [0, 3]] = True
    >>> ref = np.zeros((1, 1, 5), bool); ref[0, 0, 0] = True
    >>> {k: round(v, 4) for k, v in surface_metrics(pred, ref, (1.0, 1.0, 2.0)).items()}
    {'assd': 2.0, 'assd_mean_of_means': 1.5, 'asd': 3.0, 'msd': 6.0, 'hd95': 5.4, 'rmsd': 3.4641}
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile={percentile} must lie in [0, 100] (95 for HD95).")
    p, r = _check_pair(pred, ref)
    pred_to_ref, ref_to_pred = surface_distances(p, r, spacing, connectivity)
    keys = ("assd", "assd_mean_of_means", "asd", "msd", "hd95", "rmsd")
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return {key: 0.0 for key in keys}
    if not p_any or not r_any:
        penalty = resolve_empty_value(empty_value, p.shape, spacing)
        return {key: penalty for key in keys}
    pooled = np.concatenate([pred_to_ref, ref_to_pred])
    return {
        "assd": float(pooled.mean()),
        "assd_mean_of_means": float(np.mean([pred_to_ref.mean(), ref_to_pred.mean()])),
        "asd": float(pred_to_ref.mean()),
        "msd": float(max(pred_to_ref.max(), ref_to_pred.max())),
        # medpy.hd95 takes np.percentile (linear interpolation) of the pooled distances.
        "hd95": float(np.percentile(pooled, percentile)),
        "rmsd": float(math.sqrt(np.mean(np.square(pooled)))),
    }


def assd(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
    pooled: bool = True,
    empty_value: float | str = "diagonal",
) -> float:
    """Average symmetric surface distance in mm.

    Args:
        pred: Predicted mask, shape ``[d0, d1, ...]``; non-zero is foreground.
        ref: Reference mask of the same shape.
        spacing: Voxel size in mm per array axis.
        connectivity: Surface neighbourhood (default 1, as medpy; 2 is the LiTS script's).
        pooled: True (default): the mean over all surface voxels of both masks, as
            ``medpy.metric.binary.assd`` (medpy >= 0.5) and the LiTS script's ``Surface`` class
            (Heimann et al. 2009). False: the mean of the two directed mean distances, as
            medpy 0.4's ``assd``.
        empty_value: Value when exactly one mask is empty (default ``"diagonal"``: the volume's
            extent diagonal in mm; see :func:`resolve_empty_value`); both empty gives 0.0.

    Returns:
        ASSD in mm.

    Example:

    >>> pred = np.zeros((1, 1, 5), bool); pred[0, 0, [0, 3]] = True
    >>> ref = np.zeros((1, 1, 5), bool); ref[0, 0, 0] = True
    >>> assd(pred, ref, (1.0, 1.0, 2.0)), assd(pred, ref, (1.0, 1.0, 2.0), pooled=False)
    (2.0, 1.5)
    """
    scores = surface_metrics(pred, ref, spacing, connectivity=connectivity, empty_value=empty_value)
    return scores["assd"] if pooled else scores["assd_mean_of_means"]


def average_surface_distance(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
    empty_value: float | str = "diagonal",
) -> float:
    """Directed mean surface distance from ``pred`` to ``ref`` in mm (medpy's ``asd(pred, ref)``).

    Args:
        pred: Predicted mask, shape ``[d0, d1, ...]``; non-zero is foreground.
        ref: Reference mask of the same shape.
        spacing: Voxel size in mm per array axis.
        connectivity: Surface neighbourhood (default 1).
        empty_value: Value when exactly one mask is empty (default ``"diagonal"``: the volume's
            extent diagonal in mm; see :func:`resolve_empty_value`); both empty gives 0.0.

    Returns:
        Mean distance in mm of ``pred``'s surface voxels to ``ref``'s surface.

    Example:

    >>> pred = np.zeros((1, 1, 5), bool); pred[0, 0, [0, 3]] = True
    >>> ref = np.zeros((1, 1, 5), bool); ref[0, 0, 0] = True
    >>> average_surface_distance(pred, ref, (1.0, 1.0, 2.0))
    3.0
    """
    return surface_metrics(
        pred, ref, spacing, connectivity=connectivity, empty_value=empty_value
    )["asd"]


def max_surface_distance(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
    empty_value: float | str = "diagonal",
) -> float:
    """Maximum symmetric surface distance (Hausdorff distance) in mm, as ``medpy.hd``.

    Args:
        pred: Predicted mask, shape ``[d0, d1, ...]``; non-zero is foreground.
        ref: Reference mask of the same shape.
        spacing: Voxel size in mm per array axis.
        connectivity: Surface neighbourhood (default 1).
        empty_value: Value when exactly one mask is empty (default ``"diagonal"``: the volume's
            extent diagonal in mm; see :func:`resolve_empty_value`); both empty gives 0.0.

    Returns:
        Hausdorff distance in mm.

    Example:

    >>> pred = np.zeros((1, 1, 5), bool); pred[0, 0, [0, 3]] = True
    >>> ref = np.zeros((1, 1, 5), bool); ref[0, 0, 0] = True
    >>> max_surface_distance(pred, ref, (1.0, 1.0, 2.0))
    6.0
    """
    return surface_metrics(
        pred, ref, spacing, connectivity=connectivity, empty_value=empty_value
    )["msd"]


hausdorff_distance = max_surface_distance


def hd95(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
    percentile: float = 95.0,
    empty_value: float | str = "diagonal",
) -> float:
    """95th-percentile Hausdorff distance in mm, as ``medpy.metric.binary.hd95``.

    The percentile (linear interpolation) of the pooled distances of both surfaces.

    Args:
        pred: Predicted mask, shape ``[d0, d1, ...]``; non-zero is foreground.
        ref: Reference mask of the same shape.
        spacing: Voxel size in mm per array axis.
        connectivity: Surface neighbourhood (default 1).
        percentile: Percentile in [0, 100] (default 95).
        empty_value: Value when exactly one mask is empty (default ``"diagonal"``: the volume's
            extent diagonal in mm; see :func:`resolve_empty_value`); both empty gives 0.0.

    Returns:
        HD95 in mm.

    Example:

    >>> pred = np.zeros((1, 1, 5), bool); pred[0, 0, [0, 3]] = True
    >>> ref = np.zeros((1, 1, 5), bool); ref[0, 0, 0] = True
    >>> round(hd95(pred, ref, (1.0, 1.0, 2.0)), 6)
    5.4
    """
    return surface_metrics(
        pred,
        ref,
        spacing,
        connectivity=connectivity,
        percentile=percentile,
        empty_value=empty_value,
    )["hd95"]


def rmsd(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
    empty_value: float | str = "diagonal",
) -> float:
    """Root-mean-square symmetric surface distance in mm, over the pooled surface voxels (LiTS).

    Args:
        pred: Predicted mask, shape ``[d0, d1, ...]``; non-zero is foreground.
        ref: Reference mask of the same shape.
        spacing: Voxel size in mm per array axis.
        connectivity: Surface neighbourhood (default 1; 2 reproduces the LiTS script).
        empty_value: Value when exactly one mask is empty (default ``"diagonal"``: the volume's
            extent diagonal in mm; see :func:`resolve_empty_value`); both empty gives 0.0.

    Returns:
        RMSD in mm.

    Example:

    >>> pred = np.zeros((1, 1, 5), bool); pred[0, 0, [0, 3]] = True
    >>> ref = np.zeros((1, 1, 5), bool); ref[0, 0, 0] = True
    >>> round(rmsd(pred, ref, (1.0, 1.0, 2.0)) ** 2, 6)
    12.0
    """
    return surface_metrics(
        pred, ref, spacing, connectivity=connectivity, empty_value=empty_value
    )["rmsd"]


# ---------------------------------------------------------------------------------------------
# Per case and global
# ---------------------------------------------------------------------------------------------


def _empty_status(n_pred: int, n_ref: int) -> str:
    if n_pred == 0 and n_ref == 0:
        return "both"
    if n_pred == 0:
        return "pred"
    if n_ref == 0:
        return "ref"
    return "none"


def case_metrics(
    pred_labels: ArrayLike,
    ref_labels: ArrayLike,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
    percentile: float = 95.0,
    empty_value: float | str = "diagonal",
    empty_rvd: float = math.nan,
) -> dict[str, Any]:
    """Liver and tumor metrics of one case, as a flat dict ready for ``per_case.csv``.

    Liver is label >= 1, tumor label == 2. Keys are ``"<region>_<metric>"`` for region in
    ``liver``/``tumor`` and metric in ``dice, iou, voe, rvd, rvd_lits, precision, recall, f1``
    (see :func:`overlap_from_counts`) and ``assd, assd_mean_of_means, asd, msd, hd95, rmsd`` in
    mm (see :func:`surface_metrics`), plus the counts ``<region>_intersection``,
    ``<region>_pred_voxels``, ``<region>_ref_voxels`` (for :func:`global_dice`), the volumes
    ``<region>_pred_volume_ml`` and ``<region>_ref_volume_ml``, and ``<region>_empty``:
    ``"none"``, ``"both"``, ``"pred"`` or ``"ref"``, which mask was empty, so that a report can
    count the cases whose surface distances are the ``empty_value`` penalty, and
    ``<region>_surface_penalty_mm``: that penalty when it was applied, else 0.0.

    Empty masks (module docstring): both empty gives Dice 1 and distances 0, as LiTS; exactly
    one empty gives every surface distance the ``empty_value`` penalty (default: the diagonal of
    the volume's physical extent), so that the case stays in the means.

    Args:
        pred_labels: Predicted label map, shape ``[d0, d1, d2]`` on the reference grid.
        ref_labels: Reference label map of the same shape (0 background, 1 liver, 2 tumor).
        spacing: Voxel size in mm per array axis (LiTS takes it from the reference header).
        connectivity: Surface neighbourhood (default 1 as medpy; 2 as the LiTS script).
        percentile: Percentile for ``hd95`` (default 95).
        empty_value: Surface-distance policy when exactly one mask is empty: ``"diagonal"``
            (default), ``"lits"`` (9001), ``"nan"`` or a number of mm
            (:func:`resolve_empty_value`).
        empty_rvd: RVD (resp. LiTS RVD) when the reference (resp. prediction) is empty and the
            other mask is not (default NaN: undefined, left out of a mean and counted).

    Returns:
        Dict of floats, ints and the two ``_empty`` strings.

    Example:

    >>> ref = np.zeros((4, 4, 2), np.uint8); ref[1:3, 1:3, :] = 1; ref[1, 1, 0] = 2
    >>> scores = case_metrics(ref, ref, spacing=(1.0, 1.0, 3.0))
    >>> scores["tumor_dice"], scores["liver_hd95"], scores["tumor_ref_volume_ml"]
    (1.0, 0.0, 0.003)
    >>> missed = case_metrics(np.where(ref == 2, 1, ref), ref, spacing=(1.0, 1.0, 3.0))
    >>> missed["tumor_empty"], round(missed["tumor_msd"], 4)  # sqrt(4² + 4² + 6²)
    ('pred', 8.2462)
    """
    pred, ref = _check_labels(pred_labels, ref_labels)
    sampling = _check_spacing(spacing, ref.ndim)
    penalty = resolve_empty_value(empty_value, ref.shape, sampling)
    voxel_ml = float(np.prod(sampling)) / 1000.0
    scores: dict[str, Any] = {}
    for region in REGIONS:
        p, r = region_mask(pred, region), region_mask(ref, region)
        intersection, n_pred, n_ref = overlap_counts(p, r)
        overlap = overlap_from_counts(intersection, n_pred, n_ref, empty_value=empty_rvd)
        surface = surface_metrics(
            p,
            r,
            sampling,
            connectivity=connectivity,
            percentile=percentile,
            empty_value=penalty,
        )
        for name, value in {**overlap, **surface}.items():
            scores[f"{region}_{name}"] = value
        scores[f"{region}_intersection"] = intersection
        scores[f"{region}_pred_voxels"] = n_pred
        scores[f"{region}_ref_voxels"] = n_ref
        scores[f"{region}_pred_volume_ml"] = n_pred * voxel_ml
        scores[f"{region}_ref_volume_ml"] = n_ref * voxel_ml
        scores[f"{region}_empty"] = _empty_status(n_pred, n_ref)
        scores[f"{region}_surface_penalty_mm"] = (
            penalty if scores[f"{region}_empty"] in ("pred", "ref") else 0.0
        )
    return scores


def global_dice(cases: Iterable[Mapping[str, Any]], region: str = "tumor") -> float:
    """Dataset-wide Dice 2·Σ|P ∩ G| / Σ(|P| + |G|) from summed counts (LiTS "Dice global").

    Unlike the mean of per-case Dice, large lesions weigh by their size and a case without
    tumor in either mask adds nothing instead of a 1.0.

    Args:
        cases: Dicts from :func:`case_metrics` (or any mapping with ``<region>_intersection``,
            ``<region>_pred_voxels`` and ``<region>_ref_voxels``).
        region: ``"liver"`` or ``"tumor"`` (default).

    Returns:
        Global Dice in [0, 1]; 1.0 when every mask of every case is empty.

    Example:

    >>> cases = [{"tumor_intersection": 100, "tumor_pred_voxels": 100, "tumor_ref_voxels": 100},
    ...          {"tumor_intersection": 0, "tumor_pred_voxels": 0, "tumor_ref_voxels": 10}]
    >>> round(global_dice(cases), 4)
    0.9524
    """
    if region not in REGIONS:
        raise ValueError(f"region={region!r} is not one of {REGIONS}.")
    keys = (f"{region}_intersection", f"{region}_pred_voxels", f"{region}_ref_voxels")
    intersection = total = 0
    for index, case in enumerate(cases):
        missing = [key for key in keys if key not in case]
        if missing:
            raise ValueError(
                f"case {index} lacks {missing}; pass the dicts returned by case_metrics()."
            )
        intersection += int(case[keys[0]])
        total += int(case[keys[1]]) + int(case[keys[2]])
    return 1.0 if total == 0 else 2.0 * intersection / total


# ---------------------------------------------------------------------------------------------
# Lesion detection
# ---------------------------------------------------------------------------------------------


def equivalent_diameter_mm(volume_mm3: float) -> float:
    """Diameter in mm of the sphere with the given volume, (6V/π)^(1/3).

    Example:

    >>> round(equivalent_diameter_mm(4 / 3 * math.pi * 5.0**3), 6)
    10.0
    """
    if not volume_mm3 >= 0:
        raise ValueError(f"volume_mm3={volume_mm3} must be a non-negative volume in mm³.")
    return float((6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0))


def lesion_size_stratum(
    equivalent_diameter_mm: float, threshold_mm: float = SMALL_LESION_DIAMETER_MM
) -> str:
    """Size stratum of a lesion: ``"small"`` below ``threshold_mm``, ``"large"`` from it on.

    Args:
        equivalent_diameter_mm: The lesion's equivalent-sphere diameter (6V/π)^(1/3) in mm.
        threshold_mm: Cut in mm (default 10 mm); a lesion exactly at the cut is large.

    Returns:
        ``"small"`` or ``"large"``.

    Example:

    >>> lesion_size_stratum(9.99), lesion_size_stratum(10.0), lesion_size_stratum(4.0, 3.0)
    ('small', 'large', 'large')
    """
    if not (math.isfinite(threshold_mm) and threshold_mm > 0):
        raise ValueError(
            f"threshold_mm={threshold_mm} must be a positive diameter in mm (e.g. 10)."
        )
    if not (math.isfinite(equivalent_diameter_mm) and equivalent_diameter_mm >= 0):
        raise ValueError(
            f"equivalent_diameter_mm={equivalent_diameter_mm} must be a finite non-negative "
            "diameter in mm."
        )
    return "small" if equivalent_diameter_mm < threshold_mm else "large"


def tumor_burden(labels: ArrayLike) -> float:
    """Tumor burden: tumor voxels / liver voxels (liver including tumor), as LiTS.

    A label map without liver has no tumor either (tumor is part of the liver label), so its
    burden is 0.0: a missed liver then shows up as a full-size burden error instead of dropping
    out of the average (LiTS assigns its 9001 penalty there).

    Args:
        labels: Label map, any shape (0 background, 1 liver, 2 tumor).

    Returns:
        Burden in [0, 1].

    Example:

    >>> tumor_burden([0, 1, 1, 1, 2])
    0.25
    """
    array = np.asarray(labels)
    liver = int(np.count_nonzero(array >= LIVER_MIN_LABEL))
    return int(np.count_nonzero(array == TUMOR_LABEL)) / liver if liver else 0.0


@dataclasses.dataclass
class LesionDetection:
    """Lesion detection result of one case (see :func:`lesion_detection`).

    Attributes:
        tp: Reference lesions detected (IoU rule).
        fp: Predicted lesions not part of a detected match group.
        fn: Reference lesions missed (IoU rule).
        tp_any_overlap: Reference lesions touched by any predicted tumor voxel.
        fp_any_overlap: Predicted lesions touching no reference lesion.
        fn_any_overlap: Reference lesions touched by no predicted lesion.
        num_ref_lesions: Connected components of the reference tumor.
        num_pred_lesions: Connected components of the predicted tumor.
        lesions: One record per reference lesion (see :func:`lesion_detection`).
        tumor_burden_pred: Predicted tumor volume / predicted liver volume.
        tumor_burden_ref: Reference tumor volume / reference liver volume.
        iou_threshold: The IoU a match group had to exceed.
        detected_lesions: One record per detected match group, with its segmentation metrics
            (see :func:`lesion_segmentation_metrics`); empty when they were not computed.
    """

    tp: int
    fp: int
    fn: int
    tp_any_overlap: int
    fp_any_overlap: int
    fn_any_overlap: int
    num_ref_lesions: int
    num_pred_lesions: int
    lesions: list[dict[str, Any]]
    tumor_burden_pred: float
    tumor_burden_ref: float
    iou_threshold: float
    detected_lesions: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def tumor_burden_error(self) -> float:
        """Predicted minus reference tumor burden (LiTS reports its RMSE and maximum)."""
        return self.tumor_burden_pred - self.tumor_burden_ref

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (records included)."""
        out = dataclasses.asdict(self)
        out["tumor_burden_error"] = self.tumor_burden_error
        return out


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, node: int) -> int:
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def _best_partner(
    keys: NDArray[np.int64], partners: NDArray[np.int64], counts: NDArray[np.int64]
) -> dict[int, int]:
    """For each key, the partner with the largest count (ties: the lowest partner label)."""
    order = np.lexsort((partners, -counts, keys))
    keys, partners = keys[order], partners[order]
    first = np.ones(keys.size, dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return dict(zip(keys[first].tolist(), partners[first].tolist()))


#: Per-lesion segmentation metrics of the LiTS script (``compute_segmentation_scores``).
_LESION_SEGMENTATION_KEYS = ("dice", "jaccard", "voe", "rvd", "rvd_lits", "assd", "rmsd", "msd")


def _group_segmentation_scores(
    ref_cc: NDArray[Any],
    pred_cc: NDArray[Any],
    ref_members: Sequence[int],
    pred_members: Sequence[int],
    boxes: Sequence[tuple[slice, ...]],
    sampling: tuple[float, ...],
    connectivity: int,
) -> dict[str, float]:
    """LiTS per-lesion metrics of one match group: its reference lesions against its merged
    predicted components, on their joint bounding box (the LiTS script crops likewise; the
    crop holds both masks whole, so the erosion and the distances are unchanged)."""
    box = tuple(
        slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes))
        for axis in range(ref_cc.ndim)
    )
    r = np.isin(ref_cc[box], ref_members)
    p = np.isin(pred_cc[box], pred_members)
    overlap = overlap_from_counts(*overlap_counts(p, r))
    surface = surface_metrics(p, r, sampling, connectivity=connectivity)
    return {
        "dice": overlap["dice"],
        "jaccard": overlap["iou"],
        "voe": overlap["voe"],
        "rvd": overlap["rvd"],
        "rvd_lits": overlap["rvd_lits"],
        "assd": surface["assd"],
        "rmsd": surface["rmsd"],
        "msd": surface["msd"],
    }


def lesion_detection(
    pred_labels: ArrayLike,
    ref_labels: ArrayLike,
    spacing: float | Sequence[float],
    *,
    iou_threshold: float = 0.5,
    connectivity: int = MEDPY_CONNECTIVITY,
    lesion_metrics: bool = True,
) -> LesionDetection:
    """Lesion-level detection in the spirit of the LiTS script, with its merge handling.

    Lesions are the 3D connected components of label 2 (``scipy.ndimage.label``, face
    connectivity) in prediction and reference. Matching rule, with merges:

    1. Every predicted lesion is linked to the reference lesion it overlaps most, and every
       reference lesion to the predicted lesion it overlaps most (ties: the lower label).
    2. Lesions joined by these links form a *match group*: one prediction spanning two reference
       lesions (each of which it overlaps most) merges them, as LiTS merges reference lesions
       connected by a prediction; several predictions that cover parts of one reference lesion
       merge into one prediction, as LiTS merges predictions connected by a reference.
    3. A group is detected when IoU(union of its predicted lesions, union of its reference
       lesions) > ``iou_threshold``. Every reference lesion in a detected group counts as a true
       positive (a merge of two reference lesions detects both, as LiTS's merge count); the
       other reference lesions are false negatives; every predicted lesion outside a detected
       group is a false positive (including a poorly overlapping one, which LiTS also counts).

    The any-overlap variant counts a reference lesion as detected when any predicted tumor voxel
    touches it, and a predicted lesion as false positive when it touches no reference lesion.
    Sum TP, FP and FN over the dataset before computing precision and recall
    (:func:`detection_precision_recall`).

    Args:
        pred_labels: Predicted label map, shape ``[d0, d1, d2]`` on the reference grid.
        ref_labels: Reference label map of the same shape (0 background, 1 liver, 2 tumor).
        spacing: Voxel size in mm per array axis.
        iou_threshold: IoU a match group must exceed, in [0, 1) (default 0.5, as LiTS).
        connectivity: Surface neighbourhood of the per-lesion surface distances (default 1 as
            medpy; ``LITS_CONNECTIVITY`` = 2 as the LiTS script).
        lesion_metrics: Compute the per-lesion segmentation metrics of detected lesions
            (default True; False skips the surface distances).

    Returns:
        A :class:`LesionDetection`. Each of its ``lesions`` records describes one reference
        lesion (in ``scipy.ndimage.label`` order): ``lesion`` (its label), ``volume_voxels``,
        ``volume_ml``, ``equivalent_diameter_mm`` ((6V/π)^(1/3)), ``detected`` (IoU rule),
        ``detected_any_overlap``, ``group`` (match group id), ``group_ref_lesions`` (how many
        reference lesions share the group; > 1 for a merge), ``iou`` and ``dice`` (of the group's
        predicted and reference unions; 0.0 for a lesion no prediction touches), and the LiTS
        per-lesion segmentation metrics of its group ``jaccard``, ``voe``, ``rvd``, ``rvd_lits``,
        ``assd``, ``rmsd``, ``msd`` (mm) when it is detected (NaN when it is not, or when
        ``lesion_metrics`` is False: LiTS scores the segmentation of detected lesions only, misses
        count in detection recall). ``detected_lesions`` holds one record per detected group
        (:func:`lesion_segmentation_metrics`).

    Example:

    >>> ref = np.zeros((10, 10, 3), np.uint8); ref[1:9, 1:9, :] = 1; ref[2:4, 2:4, :] = 2
    >>> pred = ref.copy(); pred[6:8, 6:8, :] = 2
    >>> result = lesion_detection(pred, ref, spacing=(1.0, 1.0, 2.0))
    >>> result.tp, result.fp, result.fn, result.lesions[0]["volume_ml"]
    (1, 1, 0, 0.024)
    """
    pred, ref = _check_labels(pred_labels, ref_labels)
    sampling = _check_spacing(spacing, ref.ndim)
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(
            f"iou_threshold={iou_threshold} must lie in [0, 1); LiTS uses 0.5 (IoU > 0.5)."
        )
    connectivity = _check_connectivity(connectivity, ref.ndim)
    voxel_mm3 = float(np.prod(sampling))
    burden_pred, burden_ref = tumor_burden(pred), tumor_burden(ref)

    pred_tumor, ref_tumor = pred == TUMOR_LABEL, ref == TUMOR_LABEL
    # Components lie inside the tumors' joint bounding box, so labelling the crop is exact.
    box = _bounding_box(pred_tumor | ref_tumor)
    if box is None:
        return LesionDetection(0, 0, 0, 0, 0, 0, 0, 0, [], burden_pred, burden_ref, iou_threshold)
    ref_cc, n_ref = ndimage.label(ref_tumor[box])
    pred_cc, n_pred = ndimage.label(pred_tumor[box])
    ref_sizes = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)

    # Sparse overlap table: one row per (reference lesion, predicted lesion) pair that touches.
    both = (ref_cc > 0) & (pred_cc > 0)
    codes = ref_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both]
    pair_codes, pair_counts = np.unique(codes, return_counts=True)
    pair_ref, pair_pred = pair_codes // (n_pred + 1), pair_codes % (n_pred + 1)
    pair_counts = pair_counts.astype(np.int64)

    # Nodes: reference lesion g -> g - 1, predicted lesion p -> n_ref + p - 1.
    groups = _UnionFind(n_ref + n_pred)
    for g, p in _best_partner(pair_ref, pair_pred, pair_counts).items():
        groups.union(g - 1, n_ref + p - 1)
    for p, g in _best_partner(pair_pred, pair_ref, pair_counts).items():
        groups.union(n_ref + p - 1, g - 1)
    root_of_ref = [groups.find(g) for g in range(n_ref)]
    root_of_pred = [groups.find(n_ref + p) for p in range(n_pred)]

    group_ref_voxels: dict[int, int] = {}
    group_ref_count: dict[int, int] = {}
    group_pred_voxels: dict[int, int] = {}
    group_intersection: dict[int, int] = {}
    for g, root in enumerate(root_of_ref):
        group_ref_voxels[root] = group_ref_voxels.get(root, 0) + int(ref_sizes[g + 1])
        group_ref_count[root] = group_ref_count.get(root, 0) + 1
    for p, root in enumerate(root_of_pred):
        group_pred_voxels[root] = group_pred_voxels.get(root, 0) + int(pred_sizes[p + 1])
    for g, p, count in zip(pair_ref.tolist(), pair_pred.tolist(), pair_counts.tolist()):
        # Overlap between lesions of different groups is not the group's; it only enlarges them.
        if root_of_ref[g - 1] == root_of_pred[p - 1]:
            root = root_of_ref[g - 1]
            group_intersection[root] = group_intersection.get(root, 0) + count

    group_iou: dict[int, float] = {}
    group_dice: dict[int, float] = {}
    for root, ref_voxels in group_ref_voxels.items():
        inter, pred_voxels = group_intersection.get(root, 0), group_pred_voxels.get(root, 0)
        group_iou[root] = inter / (ref_voxels + pred_voxels - inter)
        group_dice[root] = 2.0 * inter / (ref_voxels + pred_voxels)
    detected_roots = {root for root, value in group_iou.items() if value > iou_threshold}
    group_ids = {root: index for index, root in enumerate(sorted(group_ref_voxels))}

    group_scores: dict[int, dict[str, Any]] = {}
    if lesion_metrics and detected_roots:
        ref_objects, pred_objects = ndimage.find_objects(ref_cc), ndimage.find_objects(pred_cc)
        for root in sorted(detected_roots):
            members_ref = [g + 1 for g, r in enumerate(root_of_ref) if r == root]
            members_pred = [p + 1 for p, r in enumerate(root_of_pred) if r == root]
            group_scores[root] = {
                "group": group_ids[root],
                "ref_lesions": members_ref,
                "pred_lesions": members_pred,
                **_group_segmentation_scores(
                    ref_cc, pred_cc, members_ref, members_pred,
                    [ref_objects[g - 1] for g in members_ref]
                    + [pred_objects[p - 1] for p in members_pred],
                    sampling, connectivity,
                ),
            }

    touched_ref = set(pair_ref.tolist())
    lesions = []
    for g in range(1, n_ref + 1):
        root = root_of_ref[g - 1]
        volume_mm3 = int(ref_sizes[g]) * voxel_mm3
        lesions.append(
            {
                "lesion": g,
                "volume_voxels": int(ref_sizes[g]),
                "volume_ml": volume_mm3 / 1000.0,
                "equivalent_diameter_mm": equivalent_diameter_mm(volume_mm3),
                "detected": root in detected_roots,
                "detected_any_overlap": g in touched_ref,
                "group": group_ids[root],
                "group_ref_lesions": group_ref_count[root],
                "iou": group_iou[root],
                "dice": group_dice[root],
                **{
                    key: group_scores[root][key] if root in group_scores else math.nan
                    for key in _LESION_SEGMENTATION_KEYS
                    if key != "dice"
                },
            }
        )
    tp = sum(1 for record in lesions if record["detected"])
    fp = sum(1 for root in root_of_pred if root not in detected_roots)
    tp_any = len(touched_ref)
    fp_any = n_pred - len(set(pair_pred.tolist()))
    logger.debug("lesion detection: %d reference, %d predicted, TP=%d FP=%d", n_ref, n_pred, tp, fp)
    return LesionDetection(
        tp=tp,
        fp=fp,
        fn=n_ref - tp,
        tp_any_overlap=tp_any,
        fp_any_overlap=fp_any,
        fn_any_overlap=n_ref - tp_any,
        num_ref_lesions=int(n_ref),
        num_pred_lesions=int(n_pred),
        lesions=lesions,
        tumor_burden_pred=burden_pred,
        tumor_burden_ref=burden_ref,
        iou_threshold=float(iou_threshold),
        detected_lesions=[group_scores[root] for root in sorted(group_scores, key=group_ids.get)],
    )


def lesion_segmentation_metrics(
    pred_labels: ArrayLike,
    ref_labels: ArrayLike,
    spacing: float | Sequence[float],
    *,
    iou_threshold: float = 0.5,
    connectivity: int = MEDPY_CONNECTIVITY,
) -> list[dict[str, Any]]:
    """Segmentation metrics of each detected lesion, as the LiTS script's per-lesion scores.

    Lesions are matched as in :func:`lesion_detection`; for each detected match group the
    metrics compare the group's reference lesion(s) with its merged predicted components, as
    LiTS's ``compute_segmentation_scores`` does on the relabelled masks of ``detect_lesions``.
    Two reference lesions merged by one prediction form one group and give one record (LiTS
    relabels them as one object), so a mean over these records is LiTS's mean over detected
    lesions. Both masks of a detected group are non-empty, so no empty-mask policy applies.

    Args:
        pred_labels: Predicted label map, shape ``[d0, d1, d2]`` on the reference grid.
        ref_labels: Reference label map of the same shape (0 background, 1 liver, 2 tumor).
        spacing: Voxel size in mm per array axis.
        iou_threshold: IoU a group must exceed to be detected (default 0.5, as LiTS).
        connectivity: Surface neighbourhood (default 1 as medpy; 2 as the LiTS script).

    Returns:
        One dict per detected group: ``group``, ``ref_lesions`` and ``pred_lesions`` (component
        labels in ``scipy.ndimage.label`` order), ``dice``, ``jaccard``, ``voe`` = 1 − Jaccard,
        ``rvd`` = (|P| − |G|)/|G|, ``rvd_lits`` = (|G| − |P|)/|P| (the script's
        ``medpy.ravd(ref, pred)``), and ``assd``, ``rmsd``, ``msd`` in mm.

    Example:

    >>> ref = np.zeros((10, 10, 3), np.uint8); ref[2:4, 2:4, :] = 2; ref[6:8, 6:8, :] = 2
    >>> pred = np.zeros_like(ref); pred[2:4, 2:5, :] = 2   # first found, 50 % too large
    >>> [round(r["dice"], 4) for r in lesion_segmentation_metrics(pred, ref, 1.0)]
    [0.8]
    """
    return lesion_detection(
        pred_labels, ref_labels, spacing, iou_threshold=iou_threshold, connectivity=connectivity
    ).detected_lesions


def mean_lesion_metrics(results: Iterable[LesionDetection]) -> dict[str, Any]:
    """Per-lesion segmentation metrics averaged over the detected lesions of a dataset (LiTS).

    LiTS appends every detected lesion's scores of every volume to one list and averages it, so
    a case with many detected lesions weighs more than one with a single lesion.

    Args:
        results: One :class:`LesionDetection` per case.

    Returns:
        Dict with ``n_detected`` (detected match groups, the records averaged),
        ``n_detected_ref_lesions`` (reference lesions in them), and for each of ``dice``,
        ``jaccard``, ``voe``, ``rvd``, ``rvd_lits``, ``assd``, ``rmsd``, ``msd`` its mean and
        ``<key>_std`` (sample std); NaN when no lesion was detected.

    Example:

    >>> a = LesionDetection(1, 0, 0, 1, 0, 0, 1, 1, [], 0.1, 0.1, 0.5,
    ...                     [{"ref_lesions": [1], "dice": 0.8, "msd": 2.0}])
    >>> b = LesionDetection(1, 0, 1, 1, 0, 1, 2, 1, [], 0.1, 0.1, 0.5,
    ...                     [{"ref_lesions": [1], "dice": 0.6, "msd": 4.0}])
    >>> out = mean_lesion_metrics([a, b])
    >>> out["n_detected"], round(out["dice"], 4), out["msd"]
    (2, 0.7, 3.0)
    """
    records = [record for result in results for record in result.detected_lesions]
    out: dict[str, Any] = {
        "n_detected": len(records),
        "n_detected_ref_lesions": sum(len(record.get("ref_lesions", [1])) for record in records),
    }
    for key in _LESION_SEGMENTATION_KEYS:
        values = np.asarray([record.get(key, math.nan) for record in records], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[key] = float(values.mean()) if values.size else math.nan
        out[f"{key}_std"] = float(values.std(ddof=1)) if values.size > 1 else (
            0.0 if values.size else math.nan
        )
    return out


def detection_precision_recall(
    results: Iterable[LesionDetection], *, any_overlap: bool = False
) -> dict[str, float]:
    """Dataset-level lesion precision and recall from TP, FP and FN summed over the cases (LiTS).

    Args:
        results: One :class:`LesionDetection` per case.
        any_overlap: Use the any-overlap counts instead of the IoU rule (default False).

    Returns:
        Dict with ``tp``, ``fp``, ``fn``, ``precision``, ``recall`` and ``f1``; with no lesion in
        either, all three scores are 1.0, and a score whose denominator is zero otherwise is 0.0.

    Example:

    >>> a = LesionDetection(2, 1, 1, 3, 0, 0, 3, 3, [], 0.1, 0.1, 0.5)
    >>> {k: round(v, 4) for k, v in detection_precision_recall([a, a]).items()}
    ... # doctest: +NORMALIZE_WHITESPACE
    {'tp': 4, 'fp': 2, 'fn': 2, 'precision': 0.6667, 'recall': 0.6667, 'f1': 0.6667}
    """
    tp = fp = fn = 0
    for result in results:
        if any_overlap:
            tp += result.tp_any_overlap
            fp += result.fp_any_overlap
            fn += result.fn_any_overlap
        else:
            tp, fp, fn = tp + result.tp, fp + result.fp, fn + result.fn
    if tp + fp + fn == 0:
        return {"tp": 0, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    precision_value = tp / (tp + fp) if tp + fp else 0.0
    recall_value = tp / (tp + fn) if tp + fn else 0.0
    f1_value = 2.0 * tp / (2 * tp + fp + fn)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision_value,
        "recall": recall_value,
        "f1": f1_value,
    }


# ---------------------------------------------------------------------------------------------
# Small versus large tumors
# ---------------------------------------------------------------------------------------------


def tumor_dice_by_stratum(
    pred_labels: ArrayLike,
    ref_labels: ArrayLike,
    spacing: float | Sequence[float],
    *,
    threshold_mm: float = SMALL_LESION_DIAMETER_MM,
    margin_mm: float = 5.0,
) -> dict[str, dict[str, Any]]:
    """Tumor Dice per lesion-size stratum, each lesion scored in its own neighbourhood.

    Each reference lesion (3D component of label 2) goes to a stratum by its equivalent
    diameter (:func:`lesion_size_stratum`). Every voxel within ``margin_mm`` of a reference lesion
    belongs to the neighbourhood of the *nearest* reference lesion (a Voronoi split, so two
    nearby lesions of different strata never share a voxel). A stratum's score compares the
    predicted tumor inside its lesions' neighbourhoods with its reference lesions.

    Why per lesion rather than by each case's largest lesion: LiTS livers are often multifocal,
    a large lesion next to several small ones; assigning whole cases by their largest lesion
    would file nearly every small lesion under "large" and hide exactly the small-lesion misses
    the strata exist to show. The cost: a false positive farther than ``margin_mm`` from every
    reference lesion belongs to no stratum (it still counts in the overall tumor Dice and as a
    detection false positive).

    Args:
        pred_labels: Predicted label map, shape ``[d0, d1, d2]`` on the reference grid.
        ref_labels: Reference label map of the same shape.
        spacing: Voxel size in mm per array axis.
        threshold_mm: Equivalent-diameter cut between small and large (default 10 mm).
        margin_mm: Neighbourhood radius in mm around each reference lesion (default 5 mm, enough
            to hold a boundary error of a few voxels at LiTS in-plane resolution).

    Returns:
        ``{"small": {...}, "large": {...}}``, each with ``n_lesions``, ``intersection``,
        ``pred_voxels``, ``ref_voxels`` (sum them over cases for a dataset-level stratum Dice) and
        ``dice`` (NaN when the case has no lesion in the stratum: nothing to score).

    Example:

    >>> ref = np.zeros((30, 30, 4), np.uint8); ref[...] = 1
    >>> ref[2:4, 2:4, 1:3] = 2          # 8 voxels of 1 mm³: small
    >>> ref[10:25, 10:25, :] = 2        # 900 voxels of 1 mm³: large
    >>> pred = ref.copy(); pred[2:4, 2:4, 1:3] = 1  # the small lesion missed
    >>> strata = tumor_dice_by_stratum(pred, ref, spacing=1.0)
    >>> strata["small"]["dice"], strata["large"]["dice"]
    (0.0, 1.0)
    """
    pred, ref = _check_labels(pred_labels, ref_labels)
    sampling = _check_spacing(spacing, ref.ndim)
    if not (math.isfinite(margin_mm) and margin_mm >= 0):
        raise ValueError(f"margin_mm={margin_mm} must be a finite non-negative distance in mm.")
    lesion_size_stratum(0.0, threshold_mm)  # validates threshold_mm
    strata: dict[str, dict[str, Any]] = {
        name: {
            "n_lesions": 0,
            "intersection": 0,
            "pred_voxels": 0,
            "ref_voxels": 0,
            "dice": math.nan,
        }
        for name in ("small", "large")
    }
    ref_tumor = ref == TUMOR_LABEL
    # Every voxel within margin_mm of a lesion lies within ceil(margin / spacing) voxels per axis.
    margins = [int(math.ceil(margin_mm / s)) for s in sampling]
    box = _margin_box(ref_tumor, margins)
    if box is None:
        return strata
    ref_cc, n_ref = ndimage.label(ref_tumor[box])
    pred_tumor = pred[box] == TUMOR_LABEL
    sizes = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)
    voxel_mm3 = float(np.prod(sampling))
    stratum_of = np.zeros(n_ref + 1, dtype=np.int8)  # 0 small, 1 large (index 0 unused)
    for g in range(1, n_ref + 1):
        name = lesion_size_stratum(equivalent_diameter_mm(int(sizes[g]) * voxel_mm3), threshold_mm)
        stratum_of[g] = 0 if name == "small" else 1
        strata[name]["n_lesions"] += 1
    distance, indices = ndimage.distance_transform_edt(
        ~ref_tumor[box], sampling=sampling, return_indices=True
    )
    nearest = ref_cc[tuple(indices)]
    del indices
    # Ties in distance are broken by scipy's choice of nearest voxel: deterministic, and harmless.
    near_stratum = np.where(distance <= margin_mm, stratum_of[nearest], -1)
    for code, name in ((0, "small"), (1, "large")):
        if strata[name]["n_lesions"] == 0:
            continue
        region = near_stratum == code
        ref_s = region & (ref_cc > 0)
        pred_s = region & pred_tumor
        inter, n_pred, n_ref_vox = overlap_counts(pred_s, ref_s)
        strata[name].update(
            intersection=inter,
            pred_voxels=n_pred,
            ref_voxels=n_ref_vox,
            dice=2.0 * inter / (n_pred + n_ref_vox),
        )
    return strata


# ---------------------------------------------------------------------------------------------
# Slice level (as the TAM-U-Net paper reports)
# ---------------------------------------------------------------------------------------------


def slice_level_metrics(
    pred_labels: ArrayLike,
    ref_labels: ArrayLike,
    spacing: float | Sequence[float],
    region: str,
    *,
    slice_axis: int = -1,
    connectivity: int = 1,
    percentile: float = 95.0,
    threshold_mm: float = SMALL_LESION_DIAMETER_MM,
) -> dict[str, Any]:
    """2D metrics per slice, averaged over the slices whose reference contains the region.

    The TAM-U-Net paper (Khimta et al., Section IV, Tables I–III) reports Dice, IoU, F1,
    precision, recall, VOE and HD95 per 2D slice averaged over the slices that contain the
    structure (149 tumor slices; 117 "small" and 32 "large"). This reproduces that protocol on
    whole volumes: slices with the region in the reference are scored in 2D with the in-plane
    spacing; slices where only the prediction has it are not averaged (they are false alarms the
    3D metrics and lesion detection count) but are counted in ``n_false_positive_slices``.

    Per slice, F1 over pixels equals Dice, so ``f1`` equals ``dice``; the paper's F1 differs from
    its Dice, so it was evidently aggregated otherwise. ``f1_of_means`` gives the harmonic mean of
    the averaged precision and recall, the likeliest reading. HD95 is undefined on a slice with an
    empty prediction: such slices are left out of the ``hd95`` mean and counted in
    ``hd95_undefined_slices``.

    Args:
        pred_labels: Predicted label map, shape ``[d0, d1, d2]`` on the reference grid.
        ref_labels: Reference label map of the same shape.
        spacing: Voxel size in mm per array axis (3 values).
        region: ``"liver"`` (label >= 1) or ``"tumor"`` (label == 2).
        slice_axis: Axis along which slices are taken (default -1: NIfTI arrays hold axial
            slices on the last axis).
        connectivity: In-plane surface neighbourhood for HD95, 1 or 2 (default 1).
        percentile: Percentile for HD95 (default 95).
        threshold_mm: Cut for each slice's ``stratum`` from the reference area's equivalent
            circle diameter sqrt(4A/π) (default 10 mm), to split the tables as the paper does.

    Returns:
        Dict with ``region``, ``n_slices`` (slices with the region in the reference),
        ``n_false_positive_slices``, the means ``dice``, ``iou``, ``f1``, ``precision``,
        ``recall``, ``voe``, ``hd95`` (mm), ``f1_of_means``, ``hd95_undefined_slices``, and
        ``slices``: one record per scored slice with ``index``, ``ref_area_mm2``,
        ``equivalent_diameter_mm``, ``stratum`` and its metrics. Means are NaN when no slice
        contains the region.

    Example:

    >>> ref = np.zeros((6, 6, 3), np.uint8); ref[1:5, 1:5, :2] = 2
    >>> pred = ref.copy(); pred[1:3, 1:5, 1] = 0
    >>> out = slice_level_metrics(pred, ref, (1.0, 1.0, 2.0), "tumor")
    >>> out["n_slices"], round(out["dice"], 4), round(out["recall"], 4)
    (2, 0.8333, 0.75)
    """
    pred, ref = _check_labels(pred_labels, ref_labels)
    if ref.ndim != 3:
        raise ValueError(f"slice_level_metrics needs 3D label maps, got shape {ref.shape}.")
    sampling = _check_spacing(spacing, 3)
    if not -3 <= slice_axis < 3:
        raise ValueError(f"slice_axis={slice_axis} must be an axis of a 3D volume (-3..2).")
    axis = slice_axis % 3
    in_plane = tuple(s for a, s in enumerate(sampling) if a != axis)
    pixel_mm2 = in_plane[0] * in_plane[1]
    pred_mask = np.moveaxis(region_mask(pred, region), axis, 0)
    ref_mask = np.moveaxis(region_mask(ref, region), axis, 0)
    ref_slices = np.flatnonzero(ref_mask.any(axis=(1, 2)))
    pred_slices = np.flatnonzero(pred_mask.any(axis=(1, 2)))
    records = []
    for index in ref_slices.tolist():
        p, r = pred_mask[index], ref_mask[index]
        counts = overlap_counts(p, r)
        scores = overlap_from_counts(*counts)
        # The paper's protocol: HD95 of a slice without prediction is undefined, not penalised
        # (counted in hd95_undefined_slices instead).
        distance = surface_metrics(
            p, r, in_plane, connectivity=connectivity, percentile=percentile, empty_value="nan"
        )["hd95"]
        area = counts[2] * pixel_mm2
        diameter = math.sqrt(4.0 * area / math.pi)
        records.append(
            {
                "index": int(index),
                "ref_area_mm2": area,
                "equivalent_diameter_mm": diameter,
                "stratum": lesion_size_stratum(diameter, threshold_mm),
                **{k: scores[k] for k in ("dice", "iou", "f1", "precision", "recall", "voe")},
                "hd95": distance,
            }
        )
    summary: dict[str, Any] = {
        "region": region,
        "n_slices": len(records),
        "n_false_positive_slices": int(np.setdiff1d(pred_slices, ref_slices).size),
    }
    for key in ("dice", "iou", "f1", "precision", "recall", "voe"):
        summary[key] = float(np.mean([rec[key] for rec in records])) if records else math.nan
    defined = [rec["hd95"] for rec in records if not math.isnan(rec["hd95"])]
    summary["hd95"] = float(np.mean(defined)) if defined else math.nan
    summary["hd95_undefined_slices"] = len(records) - len(defined)
    p_mean, r_mean = summary["precision"], summary["recall"]
    if not records:
        summary["f1_of_means"] = math.nan
    elif p_mean + r_mean > 0:
        summary["f1_of_means"] = 2.0 * p_mean * r_mean / (p_mean + r_mean)
    else:
        summary["f1_of_means"] = 0.0
    summary["slices"] = records
    return summary


# ---------------------------------------------------------------------------------------------
# Stability
# ---------------------------------------------------------------------------------------------


def coefficient_of_variation(
    values: ArrayLike, *, ddof: int = 1, last: int | None = None
) -> float:
    """Coefficient of variation std / mean, e.g. of validation Dice across a run's epochs.

    The TAM-U-Net paper's stability analysis compares how much validation Dice varies across
    epochs; a lower CV means steadier convergence.

    Args:
        values: One value per epoch, 1D (e.g. the ``val_dice`` column of ``history.csv``).
        ddof: Delta degrees of freedom of the standard deviation (default 1, the sample std).
        last: Use only the last ``last`` epochs (default None: all), to measure the plateau
            rather than the warm-up.

    Returns:
        The CV (unitless); NaN when the mean is 0.

    Example:

    >>> round(coefficient_of_variation([0.8, 0.9, 1.0]), 6)
    0.111111
    """
    array = np.asarray(values, dtype=np.float64).ravel()
    if last is not None:
        if last < 1:
            raise ValueError(f"last={last} must be a positive number of epochs (or None for all).")
        array = array[-last:]
    if array.size <= ddof:
        raise ValueError(
            f"coefficient_of_variation needs more than ddof={ddof} values, got {array.size}; "
            "pass one value per epoch of a run with several epochs."
        )
    if not np.all(np.isfinite(array)):
        bad = array[~np.isfinite(array)].tolist()
        raise ValueError(f"values hold non-finite entries {bad}; drop those epochs first.")
    mean = float(array.mean())
    if mean == 0.0:
        logger.warning("coefficient_of_variation: the mean is 0, so the CV is undefined (NaN).")
        return math.nan
    return float(array.std(ddof=ddof) / abs(mean))


__all__ = [
    "LITS_PENALTY",
    "LesionDetection",
    "REGIONS",
    "SMALL_LESION_DIAMETER_MM",
    "assd",
    "average_surface_distance",
    "case_metrics",
    "coefficient_of_variation",
    "detection_precision_recall",
    "dice",
    "equivalent_diameter_mm",
    "f1",
    "global_dice",
    "hausdorff_distance",
    "hd95",
    "iou",
    "jaccard",
    "LITS_CONNECTIVITY",
    "MEDPY_CONNECTIVITY",
    "EMPTY_SURFACE_POLICIES",
    "lesion_detection",
    "lesion_segmentation_metrics",
    "lesion_size_stratum",
    "mean_lesion_metrics",
    "resolve_empty_value",
    "volume_diagonal_mm",
    "max_surface_distance",
    "overlap_counts",
    "overlap_from_counts",
    "precision",
    "recall",
    "region_mask",
    "rmsd",
    "rvd",
    "rvd_lits",
    "slice_level_metrics",
    "surface_distances",
    "surface_metrics",
    "tumor_burden",
    "tumor_dice_by_stratum",
    "voe",
]
