"""Metrics that combine the others per case, per slice and over cases or epochs.

- :func:`case_metrics`: liver and tumor overlap and surface metrics of one pair of label maps
  ``[d0, d1, d2]``, as one flat dict (a ``per_case.csv`` row);
- :func:`global_dice`: the dataset-wide Dice from the summed voxel counts of those dicts;
- :func:`slice_level_metrics`: 2D metrics per slice ``[d_i, d_j]`` of a volume, averaged over the
  slices that contain the region;
- :func:`coefficient_of_variation`: std / mean of a 1D series (e.g. validation Dice per epoch).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from keras_livseg.evaluation.metrics._common import (
    REGIONS,
    SMALL_LESION_DIAMETER_MM,
    _check_labels,
    _check_spacing,
    region_mask,
    resolve_empty_value,
)
from keras_livseg.evaluation.metrics.lesions import lesion_size_stratum
from keras_livseg.evaluation.metrics.overlap import overlap_counts, overlap_from_counts
from keras_livseg.evaluation.metrics.surface import surface_metrics

logger = logging.getLogger(__name__)


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
