"""Surface distances in mm between two masks: ASSD, ASD, MSD (Hausdorff), HD95, RMSD.

Masks are ``[d0, d1, ...]`` (2D or 3D; non-zero is foreground) of one shape, with a voxel
spacing in mm per axis. :func:`surface_distances` returns the two directed distance arrays
(float64, one value per surface voxel, shape ``[n_surface_voxels]``); :func:`surface_metrics`
summarises them into a dict of floats, and the other functions return one of its entries. A
pair with exactly one empty mask gets the ``empty_value`` penalty (see
:func:`~keras_livseg.evaluation.metrics.resolve_empty_value`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from keras_livseg.evaluation.metrics._common import (
    bounding_box,
    _check_connectivity,
    _check_pair,
    _check_spacing,
    resolve_empty_value,
)


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
    box = bounding_box(p | r, margin=1)
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
