"""Constants, input checks and helpers shared by the metric modules.

- The LiTS labels and regions (``LIVER_MIN_LABEL``, ``TUMOR_LABEL``, ``REGIONS``), the penalties
  and connectivities (``LITS_PENALTY``, ``MEDPY_CONNECTIVITY``, ``LITS_CONNECTIVITY``,
  ``EMPTY_SURFACE_POLICIES``) and the small-lesion cut (``SMALL_LESION_DIAMETER_MM``);
- checks that turn inputs into boolean masks ``[d0, d1, ...]`` of one shape, label maps of the
  labels 0, 1, 2, spacings (one float in mm per axis) and connectivities;
- :func:`region_mask` (label map -> boolean mask of the same shape), bounding boxes (a tuple of
  one ``slice`` per axis), :func:`volume_diagonal_mm` and :func:`resolve_empty_value` (floats
  in mm).

Used by :mod:`.overlap`, :mod:`.surface`, :mod:`.lesions` and :mod:`.aggregation`; imports none
of them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

# The label map's definitions (liver is label >= 1, tumor label 2) and the bounding box live in
# data/labels.py, shared with training, inference and serving.
from keras_livseg.data.labels import LIVER_MIN_LABEL, TUMOR_LABEL, bounding_box  # noqa: F401

#: Regions scored by :func:`case_metrics` and :func:`slice_level_metrics`.
REGIONS = ("liver", "tumor")
#: The LiTS script's penalty (``LARGE``) for surface distances and RVD with an empty mask.
LITS_PENALTY = 9001.0
#: Surface neighbourhood of ``medpy.metric.binary`` (6-neighbourhood in 3D).
MEDPY_CONNECTIVITY = 1
#: Surface neighbourhood of the LiTS script (``generate_binary_structure(3, 2)``: 18-neighbourhood).
LITS_CONNECTIVITY = 2
#: Named policies for surface distances with exactly one empty mask (see the docstring of
#: :mod:`keras_livseg.evaluation.metrics`).
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
