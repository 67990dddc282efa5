"""Lesion-level metrics: lesion sizes, tumor burden, detection, per-lesion segmentation.

Lesions are the 3D connected components of the tumor label (2) of label maps ``[d0, d1, d2]``
on the reference grid. Computes equivalent diameters and size strata (floats in mm, ``"small"``
/ ``"large"``), the tumor burden (a float in [0, 1]), LiTS-style detection with merges
(:func:`lesion_detection`, a :class:`LesionDetection` per case), the per-lesion segmentation
metrics of detected lesions and their dataset means, dataset-level detection precision and
recall, and the tumor Dice per size stratum (:func:`tumor_dice_by_stratum`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from keras_livseg.evaluation.metrics._common import (
    LIVER_MIN_LABEL,
    MEDPY_CONNECTIVITY,
    SMALL_LESION_DIAMETER_MM,
    TUMOR_LABEL,
    bounding_box,
    _check_connectivity,
    _check_labels,
    _check_spacing,
)
from keras_livseg.evaluation.metrics.overlap import overlap_counts, overlap_from_counts
from keras_livseg.evaluation.metrics.surface import surface_metrics

logger = logging.getLogger(__name__)


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
    box = bounding_box(pred_tumor | ref_tumor)
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
    box = bounding_box(ref_tumor, margins)
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
