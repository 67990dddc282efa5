"""Evaluation of predicted label maps against references: metrics.json, per_case.csv, report.md.

:func:`evaluate_folders` matches prediction and reference files by case, scores every case with
the metric core (:mod:`keras_livseg.evaluation.metrics`, the LiTS rule book: liver is label >= 1,
tumor label 2) and writes, into ``out_dir``:

- ``metrics.json``: the summary (per-region means over cases and global Dice, slice-level metrics
  as the TAM-U-Net paper reports them, small/large strata, lesion detection summed over the
  dataset, tumor burden error, curve AUCs, stability of a training run), NaN written as ``null``;
- ``per_case.csv``: one row per case, every metric of :func:`~keras_livseg.evaluation.metrics.case_metrics`
  plus detection counts, the stratum Dice and the means of its detected lesions' metrics
  (``lesion_dice``, ``lesion_assd``, ...);
- ``per_lesion.csv``: one row per reference lesion: size, detection, and the LiTS per-lesion
  Dice, Jaccard, VOE, RVD, ASSD, RMSD and MSD of its match group when detected;
- ``report.md``: tables shaped like the papers' (class × model × Dice, IoU, F1, precision,
  recall, VOE, HD95; overall, small tumors, large tumors), the LiTS measures, lesion detection,
  and the figures (``figures/*.png``, see :mod:`keras_livseg.evaluation.plots`).

Policies, stated once:

- Scores are computed in the canonical orientation (both volumes reoriented alike), with the
  spacing from the **reference** header, as the LiTS script does.
- A prediction with no reference is listed (``unmatched_predictions``) and not scored; a
  reference with no prediction is listed (``missing_predictions``) and not scored either (score
  it as an empty prediction by writing one, if that is the protocol you need).
- Surfaces are found as the LiTS script finds them, by erosion with the 18-neighbourhood
  (``connectivity=2``, the default here); ``connectivity=1`` gives medpy's 6-neighbourhood.
- Empty masks: both empty gives Dice 1 and surface distances 0 (LiTS). Exactly one empty gives
  every surface distance a penalty, by default the diagonal of the volume's physical extent in
  mm (``EvaluationOptions.empty_surface``; ``"lits"`` for 9001, ``"nan"`` to leave them out), and
  the case **stays in the means**; ``volume.<region>.surface_penalized`` counts such cases.
  RVD with an empty reference is undefined (NaN, ``empty_rvd``): left out of the RVD mean and
  counted in ``rvd_undefined``.
- Per-lesion metrics (LiTS): for each detected lesion (IoU > 0.5 after merging), on its
  reference lesion(s) and merged predicted components; averaged over the detected lesions of the
  whole dataset (``lesion_segmentation`` in metrics.json).
- A prepared shard folder (``manifest.json``) as reference: only the cases of ``split`` are
  scored, from the source NIfTI files the manifest names.
- Training cases: given the training manifest of the model's run, every scored case that was in
  its train or val split (same resolved path or same SHA-256) is listed in
  ``scored_training_cases`` and flagged by a warning in report.md.
- Small versus large: lesions (3D components of the reference tumor) by equivalent-sphere
  diameter against ``threshold_mm`` (default 10 mm); slices (for the slice-level tables) by the
  equivalent-circle diameter of the reference tumor area in the slice.

Example:
    >>> summary = evaluate_folders("predictions", "data/LiTS", "eval")  # doctest: +SKIP
    >>> round(summary["volume"]["tumor"]["dice_global"], 3)  # doctest: +SKIP
    0.71
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from keras_livseg.data.atomic import atomic_path, atomic_write_json, atomic_write_text
from keras_livseg.data.cases import discover_cases
from keras_livseg.data.labels import CLASS_NAMES
from keras_livseg.data.volumes import (
    DataError,
    check_label_grids,
    load_label_image,
    read_array,
    to_canonical,
)
from keras_livseg.evaluation import metrics as core
from keras_livseg.evaluation.pairs import (  # noqa: F401  (re-exported: the report's inputs)
    MatchedCase,
    checked_labels,
    find_training_cases,
    is_manifest,
    load_pair,
    manifest_cases,
    match_cases,
    run_shards,
    training_manifest_for_model,
)

logger = logging.getLogger(__name__)

#: Columns of the papers' tables, in their order: (metrics.json key, header).
PAPER_COLUMNS = (
    ("dice", "Dice"), ("iou", "IoU"), ("f1", "F1"), ("precision", "Precision"),
    ("recall", "Recall"), ("voe", "VOE"), ("hd95", "HD95 (mm)"),
)
#: Columns of the LiTS table: (metrics.json key, header).
LITS_COLUMNS = (
    ("dice", "Dice per case"), ("dice_global", "Dice global"), ("voe", "VOE"), ("rvd", "RVD"),
    ("assd", "ASSD (mm)"), ("msd", "MSD (mm)"), ("hd95", "HD95 (mm)"),
)
#: Per-lesion metrics (LiTS), in metrics.json's ``lesion_segmentation`` and per_case.csv's
#: ``lesion_<key>``: (key, header).
LESION_COLUMNS = (
    ("dice", "Dice"), ("jaccard", "Jaccard"), ("voe", "VOE"), ("rvd", "RVD"),
    ("assd", "ASSD (mm)"), ("rmsd", "RMSD (mm)"), ("msd", "MSD (mm)"),
)
LESION_COLUMNS_KEYS = tuple(key for key, _ in LESION_COLUMNS) + ("rvd_lits",)
_VOLUME_METRICS = ("dice", "iou", "f1", "precision", "recall", "voe", "rvd", "assd", "msd", "hd95", "rmsd")


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
    """Settings of an evaluation (recorded in ``metrics.json``).

    Attributes:
        threshold_mm: Small/large cut on the equivalent diameter, mm (default 10).
        margin_mm: Neighbourhood of each lesion for the 3D stratum Dice, mm (default 5).
        iou_threshold: Lesion detection IoU rule (default 0.5, LiTS).
        connectivity: Surface neighbourhood of every surface distance: 2 (default), the LiTS
            script's 18-neighbourhood (``generate_binary_structure(3, 2)``), or 1, medpy's
            6-neighbourhood.
        label_map: Remapping of the reference labels, ``{source: class}``.
        empty_surface: Surface distances when exactly one mask is empty: ``"diagonal"``
            (default, the volume's extent diagonal in mm: no real prediction scores worse),
            ``"lits"`` (9001), ``"nan"`` (left out of the means) or a number of mm.
        empty_rvd: RVD when the reference is empty and the prediction is not (default NaN:
            undefined, left out of the RVD mean and counted in ``rvd_undefined``).

    Example:
        >>> EvaluationOptions().connectivity, EvaluationOptions().empty_surface
        (2, 'diagonal')
    """

    threshold_mm: float = core.SMALL_LESION_DIAMETER_MM
    margin_mm: float = 5.0
    iou_threshold: float = 0.5
    connectivity: int = core.LITS_CONNECTIVITY
    label_map: Mapping[int, int] | None = None
    empty_surface: float | str = "diagonal"
    empty_rvd: float = math.nan

    def __post_init__(self) -> None:
        if self.connectivity not in (1, 2):
            raise ValueError(
                f"connectivity={self.connectivity!r} must be 2 (the LiTS script's 18-neighbourhood) "
                "or 1 (medpy's 6-neighbourhood)."
            )
        core.resolve_empty_value(self.empty_surface, (1, 1, 1), 1.0)  # validates the policy

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["label_map"] = None if self.label_map is None else {str(k): v for k, v in self.label_map.items()}
        return out


@dataclasses.dataclass
class CaseScores:
    """Everything computed for one case."""

    row: dict[str, Any]
    detection: core.LesionDetection
    strata: dict[str, dict[str, Any]]
    slices: dict[str, list[dict[str, Any]]]


def score_case(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], options: EvaluationOptions = EvaluationOptions()
) -> CaseScores:
    """Every metric of one case (canonical arrays, slices on the last axis).

    Returns:
        A :class:`CaseScores`: the flat ``per_case.csv`` row (``case_metrics`` keys, detection
        counts, tumor burden, stratum Dice, and ``lesion_<metric>``: the mean of the LiTS
        per-lesion metrics over the case's detected lesions, NaN when none was detected), the
        detection result (its ``lesions`` hold the per-lesion metrics), the strata counts, and
        the slice-level records per region.

    Example:
        >>> ref = np.zeros((8, 8, 4), np.uint8); ref[2:6, 2:6] = 1; ref[3:5, 3:5, 1:3] = 2
        >>> score_case(ref, ref, (1.0, 1.0, 2.0)).row["tumor_dice"]
        1.0
    """
    row = core.case_metrics(
        pred, ref, spacing, connectivity=options.connectivity,
        empty_value=options.empty_surface, empty_rvd=options.empty_rvd,
    )
    detection = core.lesion_detection(
        pred, ref, spacing, iou_threshold=options.iou_threshold, connectivity=options.connectivity
    )
    strata = core.tumor_dice_by_stratum(
        pred, ref, spacing, threshold_mm=options.threshold_mm, margin_mm=options.margin_mm
    )
    slices = {
        region: core.slice_level_metrics(
            pred, ref, spacing, region, slice_axis=-1, connectivity=options.connectivity,
            threshold_mm=options.threshold_mm,
        )["slices"]
        for region in core.REGIONS
    }
    row.update(
        lesions_ref=detection.num_ref_lesions, lesions_pred=detection.num_pred_lesions,
        lesions_tp=detection.tp, lesions_fp=detection.fp, lesions_fn=detection.fn,
        tumor_burden_pred=detection.tumor_burden_pred, tumor_burden_ref=detection.tumor_burden_ref,
        tumor_burden_error=detection.tumor_burden_error,
        small_tumor_lesions=strata["small"]["n_lesions"], small_tumor_dice=strata["small"]["dice"],
        large_tumor_lesions=strata["large"]["n_lesions"], large_tumor_dice=strata["large"]["dice"],
    )
    lesion_means = core.mean_lesion_metrics([detection])
    row["lesions_detected_groups"] = lesion_means["n_detected"]
    row.update({f"lesion_{key}": lesion_means[key] for key in LESION_COLUMNS_KEYS})
    return CaseScores(row, detection, strata, slices)


def _mean_std(values: Iterable[float]) -> tuple[float, float, int, int]:
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    defined = array[np.isfinite(array)]
    if defined.size == 0:
        return math.nan, math.nan, 0, int(array.size)
    std = float(defined.std(ddof=1)) if defined.size > 1 else 0.0
    return float(defined.mean()), std, int(defined.size), int(array.size - defined.size)


def _slice_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_slices": len(records)}
    for key, _ in PAPER_COLUMNS:
        mean, std, n, undefined = _mean_std(rec[key] for rec in records)
        out[key], out[f"{key}_std"] = mean, std
        if key == "hd95":
            out["hd95_undefined_slices"] = undefined
    p, r = out["precision"], out["recall"]
    out["f1_of_means"] = (2 * p * r / (p + r)) if records and (p + r) > 0 else (0.0 if records else math.nan)
    return out


def summarize(scores: Sequence[CaseScores], options: EvaluationOptions = EvaluationOptions()) -> dict[str, Any]:
    """Dataset summary of :func:`score_case` results (the body of ``metrics.json``).

    Returns:
        Dict with ``volume`` (per region: mean and std over cases of every metric, the number of
        undefined values, and ``dice_global``), ``slice_level`` (``overall`` per region,
        ``small`` and ``large`` for the tumor), ``strata_3d``, ``detection`` (``iou`` and
        ``any_overlap`` rules, plus recall per size stratum), ``tumor_burden`` and
        ``lesion_segmentation`` (the LiTS per-lesion metrics averaged over the detected lesions
        of all cases, :func:`~keras_livseg.evaluation.metrics.mean_lesion_metrics`).
    """
    rows = [s.row for s in scores]
    volume: dict[str, Any] = {}
    for region in core.REGIONS:
        summary: dict[str, Any] = {"n_cases": len(rows)}
        for key in _VOLUME_METRICS:
            mean, std, _, undefined = _mean_std(row[f"{region}_{key}"] for row in rows)
            summary[key], summary[f"{key}_std"], summary[f"{key}_undefined"] = mean, std, undefined
        summary["dice_global"] = core.global_dice(rows, region)
        summary["empty_cases"] = {
            status: sum(1 for row in rows if row[f"{region}_empty"] == status) for status in ("both", "pred", "ref")
        }
        penalties = [row[f"{region}_surface_penalty_mm"] for row in rows if row[f"{region}_empty"] in ("pred", "ref")]
        summary["surface_penalized"] = len(penalties)
        summary["surface_penalty_mm"] = [float(v) for v in penalties]
        volume[region] = summary
    slice_level: dict[str, Any] = {"overall": {}, "small": {}, "large": {}}
    for region in core.REGIONS:
        records = [rec for s in scores for rec in s.slices[region]]
        slice_level["overall"][region] = _slice_summary(records)
        if region == "tumor":
            for stratum in ("small", "large"):
                slice_level[stratum][region] = _slice_summary([r for r in records if r["stratum"] == stratum])
    strata_3d = {}
    for stratum in ("small", "large"):
        inter = sum(s.strata[stratum]["intersection"] for s in scores)
        total = sum(s.strata[stratum]["pred_voxels"] + s.strata[stratum]["ref_voxels"] for s in scores)
        lesions = [rec for s in scores for rec in s.detection.lesions
                   if core.lesion_size_stratum(rec["equivalent_diameter_mm"], options.threshold_mm) == stratum]
        strata_3d[stratum] = {
            "n_lesions": sum(s.strata[stratum]["n_lesions"] for s in scores),
            "dice": 2.0 * inter / total if total else math.nan,
            "detection_recall": (sum(r["detected"] for r in lesions) / len(lesions)) if lesions else math.nan,
        }
    detections = [s.detection for s in scores]
    errors = np.asarray([d.tumor_burden_error for d in detections], dtype=np.float64)
    return {
        "n_cases": len(rows),
        "volume": volume,
        "slice_level": slice_level,
        "strata_3d": strata_3d,
        "detection": {
            "iou": core.detection_precision_recall(detections),
            "any_overlap": core.detection_precision_recall(detections, any_overlap=True),
            "iou_threshold": options.iou_threshold,
        },
        "tumor_burden": {
            "rmse": float(np.sqrt(np.mean(errors**2))) if errors.size else math.nan,
            "max_error": float(np.max(np.abs(errors))) if errors.size else math.nan,
        },
        "lesion_segmentation": core.mean_lesion_metrics(detections),
    }


def stratum_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Liver and tumour Dice per stratum (e.g. contrast phase): where a model does well and where not.

    Args:
        rows: Per-case rows of :func:`score_case` with a ``stratum`` key (cases without one count
            as ``"none"``).

    Returns:
        ``{stratum: {"n_cases", "liver_dice", "tumor_dice" (means per case), "tumor_dice_global",
        "tumor_free_cases"}}``, strata in sorted order.

    Example:
        >>> rows = [{"stratum": "portal", "liver_dice": 0.9, "tumor_dice": 1.0, "tumor_intersection": 0,
        ...          "tumor_pred_voxels": 0, "tumor_ref_voxels": 0}]
        >>> stratum_summary(rows)["portal"]["tumor_free_cases"]
        1
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row.get("stratum") or "none"), []).append(row)
    return {
        name: {
            "n_cases": len(members),
            "liver_dice": float(np.mean([r["liver_dice"] for r in members])),
            "tumor_dice": float(np.mean([r["tumor_dice"] for r in members])),
            "tumor_dice_global": core.global_dice(members, "tumor"),
            "tumor_free_cases": sum(1 for r in members if not r["tumor_ref_voxels"]),
        }
        for name, members in sorted(groups.items())
    }


# ---------------------------------------------------------------------------------------------
# Curves and training history
# ---------------------------------------------------------------------------------------------


def one_vs_rest_curves(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, Any]]:
    """ROC and precision–recall curves per class, one-vs-rest, from sampled voxels.

    Args:
        probabilities: ``[n, 3]`` class probabilities of ``n`` voxels.
        labels: ``[n]`` reference classes (0, 1, 2) of the same voxels.

    Returns:
        ``{class_name: {"fpr", "tpr", "precision", "recall" (lists), "auc_roc",
        "average_precision", "positives"}}``; a class without positives (or negatives) gets NaN
        areas and empty curves.

    Example:
        >>> p = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.2, 0.7]])
        >>> one_vs_rest_curves(p, np.array([0, 1, 2]))["tumor"]["auc_roc"]
        1.0
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).ravel()
    out = {}
    for index, name in enumerate(CLASS_NAMES):
        positive = labels == index
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            out[name] = {"fpr": [], "tpr": [], "precision": [], "recall": [],
                         "auc_roc": math.nan, "average_precision": math.nan, "positives": n_pos}
            continue
        scores = probabilities[:, index]
        order = np.argsort(-scores, kind="stable")
        sorted_scores, sorted_pos = scores[order], positive[order]
        # One point per distinct threshold: the last index of each run of equal scores.
        last = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
        tp = np.cumsum(sorted_pos)[last].astype(np.float64)
        fp = (last + 1 - tp).astype(np.float64)
        tpr, fpr = np.r_[0.0, tp / n_pos], np.r_[0.0, fp / n_neg]
        precision_curve, recall_curve = tp / (tp + fp), tp / n_pos
        average_precision = float(np.sum(np.diff(np.r_[0.0, recall_curve]) * precision_curve))
        out[name] = {
            "fpr": fpr.tolist(), "tpr": tpr.tolist(),
            "precision": precision_curve.tolist(), "recall": recall_curve.tolist(),
            "auc_roc": float(np.trapezoid(tpr, fpr)),
            "average_precision": average_precision, "positives": n_pos,
        }
    return out


def read_history(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a run's ``history.csv`` (Keras ``CSVLogger``) as float arrays.

    An epoch without a value (``NA``: not validated, ``training.validate_last``) reads as NaN.

    Raises:
        DataError: the file is missing or has no numeric rows.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "history.csv"
    if not path.is_file():
        raise DataError(f"history {path} does not exist; pass RUN/history.csv written by fit")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise DataError(f"{path} has no epochs yet; train at least one epoch first")
    columns = {}
    for name in rows[0]:
        cells = [row[name] for row in rows]
        try:
            columns[name] = np.asarray([np.nan if cell in ("NA", "", None) else float(cell) for cell in cells],
                                       dtype=np.float64)
        except (TypeError, ValueError):
            continue  # a non-numeric column (none in CSVLogger's output)
    return columns


def history_stability(history: Mapping[str, np.ndarray], last: int = 10) -> dict[str, Any]:
    """Coefficient of variation of every validation Dice column of a training history.

    Returns:
        ``{column: {"cv": all epochs, "cv_last": the last ``last`` epochs, "epochs", "best"}}``;
        columns with fewer than 2 epochs are left out.
    """
    out = {}
    for name, values in history.items():
        values = values[np.isfinite(values)]  # the validated epochs only
        if not (name.startswith("val_") and "dice" in name) or values.size < 2:
            continue
        out[name] = {
            "cv": core.coefficient_of_variation(values),
            "cv_last": core.coefficient_of_variation(values, last=max(min(last, values.size), 2)),
            "last_epochs": int(max(min(last, values.size), 2)),
            "epochs": int(values.size),
            "best": float(np.max(values)),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_per_case_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """One row per case; NaN written as an empty cell."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with atomic_path(path) as partial, partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _get(mapping: Mapping[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def paper_tables(entries: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The papers' Tables I–IV (and the LiTS and detection tables) for one or more models.

    Args:
        entries: ``(model_name, metrics)`` pairs, ``metrics`` as written to ``metrics.json``.

    Returns:
        Markdown: rows class × model, columns Dice, IoU, F1, precision, recall, VOE, HD95.
    """
    headers = ["Class", "Model"] + [h for _, h in PAPER_COLUMNS]
    threshold = _get(entries[0][1], "settings", "threshold_mm") if entries else None
    cut = f"{_number(threshold, 1)} mm" if threshold is not None else "the threshold"
    sections = [
        ("Table I. Overall segmentation, 3D per case (mean over cases)",
         [(region, ("volume", region)) for region in core.REGIONS]),
        ("Table II. Slice level, as the TAM-U-Net paper (mean over slices containing the class)",
         [(region, ("slice_level", "overall", region)) for region in core.REGIONS]),
        (f"Table III. Small tumors (slice level, equivalent diameter < {cut})",
         [("tumor", ("slice_level", "small", "tumor"))]),
        (f"Table IV. Large tumors (slice level, equivalent diameter >= {cut})",
         [("tumor", ("slice_level", "large", "tumor"))]),
    ]
    parts = []
    for title, selections in sections:
        rows = []
        for region, keys in selections:
            for name, metrics in entries:
                block = _get(metrics, *keys)
                rows.append([region, name] + [_number(_get(block, key)) for key, _ in PAPER_COLUMNS])
        parts.append(f"### {title}\n\n" + _table(headers, rows))
    strata_rows = [
        [stratum, name, _number(_get(m, "strata_3d", stratum, "n_lesions")),
         _number(_get(m, "strata_3d", stratum, "dice")),
         _number(_get(m, "strata_3d", stratum, "detection_recall"))]
        for stratum in ("small", "large") for name, m in entries
    ]
    parts.append(
        f"### Tumors by lesion size, 3D (equivalent-sphere diameter, cut at {cut})\n\n"
        + _table(["Stratum", "Model", "Lesions", "Dice (lesion neighbourhoods)", "Detection recall"], strata_rows)
    )
    lits_rows = [
        [region, name] + [_number(_get(m, "volume", region, key)) for key, _ in LITS_COLUMNS]
        for region in core.REGIONS for name, m in entries
    ]
    parts.append("### LiTS measures (3D)\n\n" + _table(["Class", "Model"] + [h for _, h in LITS_COLUMNS], lits_rows))
    lesion_rows = [
        [name, _number(_get(m, "lesion_segmentation", "n_detected"))]
        + [_number(_get(m, "lesion_segmentation", key)) for key, _ in LESION_COLUMNS]
        for name, m in entries
    ]
    parts.append(
        "### LiTS per-lesion segmentation (mean over detected lesions)\n\n"
        "Each detected lesion (IoU > 0.5 after merging) scored on its reference lesion(s) and merged "
        "predicted components, as the LiTS script does; misses count in detection recall only. "
        "RVD = (|P| - |G|) / |G|.\n\n"
        + _table(["Model", "Detected lesions"] + [h for _, h in LESION_COLUMNS], lesion_rows)
    )
    detection_rows = []
    for name, m in entries:
        for rule in ("iou", "any_overlap"):
            block = _get(m, "detection", rule)
            detection_rows.append(
                [name, "IoU > 0.5" if rule == "iou" else "any overlap"]
                + [_number(_get(block, key)) for key in ("tp", "fp", "fn", "precision", "recall", "f1")]
            )
    parts.append(
        "### Lesion detection (summed over the dataset)\n\n"
        + _table(["Model", "Rule", "TP", "FP", "FN", "Precision", "Recall", "F1"], detection_rows)
        + "\n\n"
        + _table(
            ["Model", "Tumor burden RMSE", "Tumor burden max error"],
            [[name, _number(_get(m, "tumor_burden", "rmse")), _number(_get(m, "tumor_burden", "max_error"))]
             for name, m in entries],
        )
    )
    return "\n\n".join(parts)


def render_report(metrics: Mapping[str, Any], compare: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> str:
    """``report.md`` for one evaluation (and the models of ``compare`` beside it)."""
    name = metrics.get("model", "model")
    entries = [(name, metrics)] + list(compare)
    settings = metrics.get("settings") or {}
    connectivity = settings.get("connectivity", core.LITS_CONNECTIVITY)
    surface = ("18-neighbourhood erosion, as the LiTS script" if connectivity == 2
               else "6-neighbourhood erosion, as medpy")
    policy = settings.get("empty_surface", "diagonal")
    policy_text = {
        "diagonal": "the diagonal of the volume's physical extent in mm (the largest possible distance)",
        "lits": f"the LiTS penalty {core.LITS_PENALTY:g} mm",
        "nan": "undefined (NaN): those cases are left out of the distance means",
    }.get(str(policy).lower(), f"{policy} mm")
    penalized = {region: _get(metrics, "volume", region, "surface_penalized") or 0 for region in core.REGIONS}
    split = metrics.get("split")
    lines = [f"# Evaluation: {name}", ""]
    training = metrics.get("scored_training_cases") or []
    if training:
        detail = metrics.get("training_overlap") or []
        by_split = {}
        for item in detail:
            by_split.setdefault(item["training_split"], []).append(item["case_id"])
        listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in by_split.items()) or ", ".join(training)
        lines += [
            f"> **WARNING: {len(training)} of the {metrics['n_cases']} scored case(s) were used to train "
            f"this model** ({listed}; training manifest `{metrics.get('training_manifest')}`). "
            "Their scores overstate how the model does on unseen patients.",
            "",
        ]
    lines += [
        f"{metrics['n_cases']} case(s) scored; predictions `{metrics.get('predictions')}`, "
        f"references `{metrics.get('references')}`" + (f" (split `{split}`)" if split else "") + ". "
        "Liver = label >= 1, tumor = label 2 (LiTS). Distances in mm from the reference spacing; "
        f"surfaces by {surface} (connectivity {connectivity}). Both masks empty: Dice 1, distances 0 "
        f"(LiTS). Exactly one mask empty: every surface distance is {policy_text}, and the case stays "
        f"in the means (liver: {penalized['liver']} case(s), tumor: {penalized['tumor']} case(s)). "
        "RVD = (|P| - |G|) / |G|; with an empty reference it is undefined and left out of the RVD mean "
        "(counted in metrics.json as `rvd_undefined`).",
        "",
        paper_tables(entries),
    ]
    by_stratum = metrics.get("by_stratum")
    if by_stratum:
        lines += ["", "### Dice by stratum (as the dataset or manifest names each case's)", "",
                  _table(["Stratum", "Cases", "Tumour-free", "Liver Dice (per case)", "Tumour Dice (per case)",
                          "Tumour Dice (global)"],
                         [[name, v["n_cases"], v["tumor_free_cases"], _number(v["liver_dice"]),
                           _number(v["tumor_dice"]), _number(v["tumor_dice_global"])] for name, v in by_stratum.items()])]
    curves = metrics.get("curves")
    if curves:
        lines += ["", "### Voxel-wise ROC and precision-recall (one-vs-rest, sampled voxels)", "",
                  _table(["Class", "AUC (ROC)", "Average precision", "Positives in sample"],
                         [[c, _number(v.get("auc_roc")), _number(v.get("average_precision")), v.get("positives")]
                          for c, v in curves.items()])]
    stability = metrics.get("stability")
    if stability:
        lines += ["", "### Training stability (coefficient of variation of validation Dice)", "",
                  _table(["Column", "Epochs", "CV (all)", "CV (last epochs)", "Best"],
                         [[c, v["epochs"], _number(v["cv"]), f"{_number(v['cv_last'])} ({v['last_epochs']})",
                           _number(v["best"])] for c, v in stability.items()])]
    figures = metrics.get("figures") or {}
    if figures:
        lines += ["", "### Figures", ""]
        lines += [f"![{title}]({path})" for title, path in figures.items()]
    unmatched, missing = metrics.get("unmatched_predictions") or [], metrics.get("missing_predictions") or []
    if unmatched or missing:
        lines += ["", "### Not scored", ""]
        lines += [f"- prediction without reference: `{p}`" for p in unmatched]
        lines += [f"- reference without prediction: case `{c}`" for c in missing]
    lines += ["", "Per-case values: `per_case.csv`; everything above: `metrics.json`.", ""]
    return "\n".join(lines)


def find_metrics_json(path: str | Path) -> Path:
    """``metrics.json`` of an evaluation folder, a run folder (its ``eval/``), or the file itself.

    Raises:
        FileNotFoundError: none found (the message lists where it looked).
    """
    path = Path(path)
    candidates = [path, path / "metrics.json", path / "eval" / "metrics.json"]
    candidates += sorted((path / "eval").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if (path / "eval").is_dir() else []
    for candidate in candidates:
        if candidate.is_file() and candidate.name == "metrics.json":
            return candidate
    raise FileNotFoundError(
        f"no metrics.json in {path} (looked at {path}/metrics.json and {path}/eval/); "
        "run python -m keras_livseg.evaluate for that model first"
    )


def load_compare(paths: Sequence[str | Path]) -> list[tuple[str, dict[str, Any]]]:
    """``(model_name, metrics)`` of each ``--compare`` evaluation or run folder."""
    entries = []
    for path in paths:
        found = find_metrics_json(path)
        metrics = json.loads(found.read_text())
        name = metrics.get("model") or found.parent.name
        entries.append((name, metrics))
    return entries


# ---------------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    out_dir: str | Path,
    *,
    options: EvaluationOptions = EvaluationOptions(),
    model_name: str | None = None,
    history: str | Path | None = None,
    probability_samples: tuple[np.ndarray, np.ndarray] | None = None,
    compare: Sequence[str | Path] = (),
    figures: bool = True,
    split: str | None = None,
    images: str | Path | None = None,
    training_manifest: str | Path | None = None,
) -> dict[str, Any]:
    """Score predicted label maps against references and write the report into ``out_dir``.

    Args:
        pred_dir: Folder of predicted label maps.
        ref_dir: The dataset (LiTS/MSD folder or ``.csv``), a folder of reference label maps, or a
            prepared shard folder (``manifest.json``; then ``split`` is required).
        out_dir: Output folder (created): ``metrics.json``, ``per_case.csv``, ``per_lesion.csv``,
            ``report.md``, ``figures/``.
        options: Scoring settings (:class:`EvaluationOptions`).
        model_name: Name in the tables (default: the prediction folder's name).
        history: A run's ``history.csv`` (or run folder) for training curves and stability.
        probability_samples: ``(probabilities [n, 3], reference labels [n])`` of sampled voxels
            for ROC and precision–recall curves (``evaluate --model`` collects them).
        compare: Evaluation or run folders whose ``metrics.json`` join the tables.
        figures: Draw the PNG figures (default True).
        split: With a shard folder as ``ref_dir``: the split whose cases are scored.
        images: Folder of the CT volumes for the overlays, when ``ref_dir`` brings none (a LiTS
            folder brings its ``volume-N`` files itself).
        training_manifest: The shard folder (or ``manifest.json``) the model was trained on:
            scored cases of its train/val splits are listed in ``scored_training_cases`` and
            flagged in report.md (default None: not checked).

    Returns:
        The summary written to ``metrics.json`` (NaN as ``None``).

    Raises:
        DataError: no case matches, a pair is on different grids, or ``split`` is missing from
            the manifest.

    Example:
        >>> evaluate_folders("eval/predictions", "data/LiTS", "eval")["n_cases"]  # doctest: +SKIP
        20
    """
    out_dir = Path(out_dir)
    matched, unmatched, missing = match_cases(pred_dir, ref_dir, images=images, split=split)
    compare_entries = load_compare(compare)  # before the long part: fail early on a bad path
    history_columns = read_history(history) if history is not None else None
    overlap = find_training_cases(matched, training_manifest) if training_manifest is not None else []
    out_dir.mkdir(parents=True, exist_ok=True)
    scores, rows, lesion_rows = [], [], []
    stratified = any(case.stratum for case in matched)
    for case in matched:
        pred, ref, spacing = load_pair(case, options.label_map)
        result = score_case(pred, ref, spacing, options)
        result.row = {"case_id": case.case_id, "prediction": str(case.prediction),
                      "reference": str(case.reference), **({"stratum": case.stratum} if stratified else {}),
                      **result.row}
        scores.append(result)
        rows.append(result.row)
        lesion_rows += [{"case_id": case.case_id, **record} for record in result.detection.lesions]
        logger.info("%s: liver Dice %.4f, tumor Dice %.4f", case.case_id,
                    result.row["liver_dice"], result.row["tumor_dice"])
        del pred, ref
    summary: dict[str, Any] = {
        "model": model_name or Path(pred_dir).name,
        "predictions": str(pred_dir),
        "references": str(ref_dir),
        "split": split,
        "settings": options.to_dict(),
        "cases": [case.case_id for case in matched],
        "unmatched_predictions": [str(p) for p in unmatched],
        "missing_predictions": missing,
        "training_manifest": None if training_manifest is None else str(training_manifest),
        "scored_training_cases": [item["case_id"] for item in overlap],
        "training_overlap": overlap,
        **summarize(scores, options),
    }
    if stratified:
        summary["by_stratum"] = stratum_summary(rows)
    curves = None
    if probability_samples is not None and len(probability_samples[1]):
        curves = one_vs_rest_curves(*probability_samples)
        summary["curves"] = {
            name: {k: v for k, v in c.items() if k in ("auc_roc", "average_precision", "positives")}
            for name, c in curves.items()
        }
        summary["curves_sampled_voxels"] = int(len(probability_samples[1]))
    if history_columns is not None:
        summary["stability"] = history_stability(history_columns)
        summary["history"] = str(history)
    if figures:
        from keras_livseg.evaluation import plots

        drawn = {}
        figure_dir = out_dir / "figures"
        if curves is not None:
            drawn.update(plots.plot_curves(curves, figure_dir))
        drawn.update(plots.plot_overlays(matched, rows, figure_dir, options.label_map))
        if history_columns is not None:
            drawn.update(plots.plot_history(history_columns, figure_dir / "training_curves.png",
                                            summary.get("stability")))
        summary["figures"] = {title: str(path.relative_to(out_dir)) for title, path in drawn.items()}
    summary = _json_ready(summary)
    write_per_case_csv(out_dir / "per_case.csv", rows)
    write_per_case_csv(out_dir / "per_lesion.csv", lesion_rows)
    atomic_write_json(out_dir / "metrics.json", summary)
    atomic_write_text(out_dir / "report.md", render_report(summary, compare_entries))
    logger.info("wrote %s, %s, %s", out_dir / "metrics.json", out_dir / "per_case.csv", out_dir / "report.md")
    return summary


def evaluate_model(
    model_path: str | Path | Sequence[str | Path],
    data: str | Path,
    out_dir: str | Path,
    *,
    options: EvaluationOptions = EvaluationOptions(),
    batch_size: int = 8,
    tta_flip: bool = False,
    postprocess: Any = "model",
    sample_voxels: int = 200_000,
    model_name: str | None = None,
    history: str | Path | None = None,
    compare: Sequence[str | Path] = (),
    figures: bool = True,
    progress: bool = True,
    split: str | None = None,
    training_manifest: str | Path | None = None,
) -> dict[str, Any]:
    """Predict a labelled dataset into ``out_dir/predictions``, then :func:`evaluate_folders`.

    While each case is in memory, a bounded random sample of voxel probabilities is kept
    (``sample_voxels`` over the whole dataset, spread over cases in equal shares) for the ROC and
    precision–recall curves.

    When the checkpoint belongs to a training run (``runs/<name>/checkpoints/*.keras`` beside
    ``runs/<name>/config.json``), the run's training manifest is found automatically and every
    scored case of its train or val split is flagged (``scored_training_cases`` in metrics.json,
    a warning in report.md).

    Args:
        model_path: ``.keras`` checkpoint or SavedModel (see
            :meth:`~keras_livseg.inference.SegmentationModel.load`), or several, whose averaged
            probabilities are scored (:meth:`~keras_livseg.inference.SegmentationModel.ensemble`).
        data: Labelled dataset (LiTS, MSD or ``.csv``), or a prepared shard folder
            (``manifest.json``): then only the cases of ``split`` are predicted and scored, from
            the source NIfTI files the manifest names.
        out_dir: Output folder.
        options: Scoring settings; ``options.label_map`` also remaps the references here.
        batch_size, tta_flip: As :func:`~keras_livseg.inference.predict_volume`.
        postprocess: A :class:`~keras_livseg.inference.PostProcessing`, ``None`` for none, or
            ``"model"`` (default): the model's own, as its run chose it on validation cases.
        sample_voxels: Voxels sampled for the curves over the dataset (default 200,000; 0: none).
        model_name: Name in the tables (default: the run or export name).
        history, compare, figures: As :func:`evaluate_folders`.
        progress: Progress bar on a terminal.
        split: The split of a shard folder to score (``"test"``, ``"val"`` or ``"train"``).
        training_manifest: The manifest the model was trained on (default: found from the run).

    Returns:
        The summary, as :func:`evaluate_folders`.

    Raises:
        DataError: ``split`` is missing from the manifest (the message names the available
            splits), or ``split`` is given for a dataset that is not a shard folder.

    Example:
        >>> evaluate_model("runs/tam/checkpoints/best.keras", "data/LiTS", "runs/tam/eval")  # doctest: +SKIP
        >>> evaluate_model("runs/tam/checkpoints/best.keras", "runs/tam/shards", "runs/tam/eval",
        ...                split="test")  # doctest: +SKIP
    """
    from keras_livseg.inference import PostProcessing, SegmentationModel, predict_paths
    from keras_livseg.inference.volume import resolve_postprocess

    out_dir = Path(out_dir)
    shards = run_shards(data)
    if shards is not None:
        logger.info("%s is a fit run: scoring the shards it trained on, %s", data, shards)
        data = shards
    if is_manifest(data):
        cases = manifest_cases(data, split)  # fails on a bad split before the model loads
        missing_images = [c.case_id for c in cases if not c.image.is_file()]
        if missing_images:
            raise DataError(
                f"{data}: the CT volumes of case(s) {', '.join(missing_images[:5])} do not exist any more; "
                "restore the source dataset the manifest names"
            )
        inputs: list[str | Path] = [c.image for c in cases]
    else:
        if split is not None:
            raise DataError(
                f"--split {split} needs a prepared shard folder holding manifest.json, but {data} has none; "
                "drop --split, or pass the folder prepare wrote (or the run folder of fit, which names its shards)"
            )
        cases = discover_cases(data, require_labels=True)
        inputs = [data]
    paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    if training_manifest is None:
        manifests = [m for m in (training_manifest_for_model(path) for path in paths) if m is not None]
        if len({Path(m).resolve() for m in manifests}) > 1:
            logger.warning("the ensemble's members trained on different data; training cases are checked against "
                           "%s only (pass --train-manifest to choose)", manifests[0])
        training_manifest = manifests[0] if manifests else None
    labels_of = {Path(c.image).resolve(): c.label for c in cases}
    check_label_grids(cases)  # a mask off its volume's grid is named now, not after predicting every case
    model = SegmentationModel.ensemble([SegmentationModel.load(path) for path in paths])
    postprocess = resolve_postprocess(model, postprocess)  # "model": what the model's run chose
    if postprocess is not None and postprocess != PostProcessing():
        logger.info("post-processing: %s", postprocess)
    per_case = int(math.ceil(sample_voxels / max(len(cases), 1))) if sample_voxels > 0 else 0
    sampled_p: list[np.ndarray] = []
    sampled_y: list[np.ndarray] = []

    def collect(case, prediction, record) -> None:
        label_path = record.label or labels_of.get(Path(record.input).resolve())
        if prediction.sample_indices is None or label_path is None:
            return
        label_nii = load_label_image(label_path, record.input, "segmentation")  # NIfTI, or a SEG of the series
        labels = to_canonical(
            checked_labels(read_array(label_nii, label_path, "segmentation"), options.label_map, label_path),
            label_nii.affine,
        )
        sampled_p.append(prediction.sample_probabilities.astype(np.float32))
        sampled_y.append(np.asarray(labels).reshape(-1)[prediction.sample_indices])

    pred_dir = out_dir / "predictions"
    predict_paths(
        model, inputs, pred_dir, batch_size=batch_size, tta_flip=tta_flip, postprocess=postprocess,
        progress=progress, sample_voxels=per_case, on_case=collect if per_case else None,
    )
    samples = (np.concatenate(sampled_p), np.concatenate(sampled_y)) if sampled_p else None
    return evaluate_folders(
        pred_dir, data, out_dir, options=options, model_name=model_name or model.name, history=history,
        probability_samples=samples, compare=compare, figures=figures, split=split,
        training_manifest=training_manifest,
    )
