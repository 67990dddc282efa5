"""Figures of the evaluation report, drawn with matplotlib's Agg backend (no display needed).

- :func:`plot_curves`: ROC and precision–recall curves per class, one-vs-rest, with AUC.
- :func:`plot_overlays`: a qualitative grid, one row per case (best and worst by Dice), columns
  CT, CT + ground truth, CT + prediction, on the slice with the most reference tumor (or liver).
- :func:`plot_history`: training curves from a run's ``history.csv`` (loss, Dice, IoU, accuracy
  per epoch), with the coefficient of variation of validation Dice in the legend.

Each returns ``{title: path}`` of what it wrote.

Example:
    >>> from keras_livseg.evaluation import plots, report
    >>> history = report.read_history("runs/tam/history.csv")  # doctest: +SKIP
    >>> plots.plot_history(history, Path("eval/figures/training_curves.png"))  # doctest: +SKIP
    {'Training curves': PosixPath('eval/figures/training_curves.png')}
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_WINDOW = (-200.0, 250.0)  # display window for the CT panels (HU), the training default
_CLASS_COLOURS = {"background": "tab:gray", "liver": "tab:green", "tumor": "tab:red"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never open a window, works headless
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.partial.png")
    figure.savefig(temporary, dpi=110, bbox_inches="tight")
    temporary.replace(path)
    return path


def plot_curves(curves: Mapping[str, Mapping[str, Any]], figure_dir: Path) -> dict[str, Path]:
    """ROC and precision–recall curves, one line per class.

    Args:
        curves: Output of :func:`keras_livseg.evaluation.report.one_vs_rest_curves`.
        figure_dir: Folder of the PNGs (``roc_curves.png``, ``pr_curves.png``).

    Returns:
        ``{"ROC curves": path, "Precision-recall curves": path}``.
    """
    plt = _pyplot()
    written = {}
    for title, filename, x_key, y_key, area_key, axes_labels in (
        ("ROC curves", "roc_curves.png", "fpr", "tpr", "auc_roc", ("false positive rate", "true positive rate")),
        ("Precision-recall curves", "pr_curves.png", "recall", "precision", "average_precision",
         ("recall", "precision")),
    ):
        figure, axes = plt.subplots(figsize=(5, 4.5))
        for name, curve in curves.items():
            if not curve.get(x_key):
                continue
            area = curve[area_key]
            label = f"{name} ({'AUC' if area_key == 'auc_roc' else 'AP'} {area:.3f})"
            axes.plot(curve[x_key], curve[y_key], label=label, color=_CLASS_COLOURS.get(name))
        if x_key == "fpr":
            axes.plot([0, 1], [0, 1], linestyle=":", color="black", linewidth=0.8)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel(axes_labels[0])
        axes.set_ylabel(axes_labels[1])
        axes.set_title(f"{title} (one-vs-rest, voxels)")
        axes.legend(loc="lower right" if x_key == "fpr" else "lower left")
        written[title] = _save(figure, figure_dir / filename)
        plt.close(figure)
    return written


def _pick_cases(rows: Sequence[Mapping[str, Any]], per_side: int) -> list[tuple[str, int]]:
    """(label, row index) of the best and worst cases by tumor Dice where the reference has tumor,
    by liver Dice otherwise."""
    def score(row):
        key = "tumor_dice" if row.get("tumor_ref_voxels", 0) else "liver_dice"
        value = row.get(key, math.nan)
        return -1.0 if value is None or not math.isfinite(value) else float(value)

    order = sorted(range(len(rows)), key=lambda i: score(rows[i]))
    best = list(reversed(order))[:per_side]
    worst = [i for i in order[:per_side] if i not in best]
    return [("best", i) for i in best] + [("worst", i) for i in worst]


def plot_overlays(
    matched: Sequence[Any],
    rows: Sequence[Mapping[str, Any]],
    figure_dir: Path,
    label_map: Mapping[int, int] | None = None,
    per_side: int = 2,
) -> dict[str, Path]:
    """Qualitative grid: CT, CT + ground truth, CT + prediction for the best and worst cases.

    Args:
        matched: :class:`~keras_livseg.evaluation.report.MatchedCase` list, aligned with ``rows``.
        rows: The per-case rows (``tumor_dice``, ``liver_dice``, ``tumor_ref_voxels``).
        figure_dir: Folder of ``overlays.png``.
        label_map: Reference label remapping.
        per_side: Best and worst cases shown (default 2 each).

    Returns:
        ``{"Qualitative overlays": path}`` (empty when there is no case).
    """
    from keras_livseg.data.volumes import load_nifti, read_array, to_canonical
    from keras_livseg.evaluation.report import load_pair

    if not matched:
        return {}
    plt = _pyplot()
    picks = _pick_cases(rows, per_side)
    figure, axes = plt.subplots(len(picks), 3, figsize=(9, 3 * len(picks)), squeeze=False)
    colours = np.array([[0, 0, 0, 0], [0.1, 0.8, 0.2, 0.35], [1.0, 0.1, 0.1, 0.6]], dtype=np.float32)
    for row_axes, (side, index) in zip(axes, picks):
        case = matched[index]
        pred, ref, _ = load_pair(case, label_map)
        tumor_area = (ref == 2).sum(axis=(0, 1))
        area = tumor_area if tumor_area.any() else (ref >= 1).sum(axis=(0, 1))
        k = int(np.argmax(area)) if area.any() else ref.shape[2] // 2
        if case.image is not None:
            image_nii = load_nifti(case.image)
            ct = to_canonical(read_array(image_nii, case.image), image_nii.affine)[:, :, k]
            ct = np.clip(ct.astype(np.float32), *_WINDOW)
        else:
            ct = np.zeros(ref.shape[:2], np.float32)
        dice = rows[index].get("tumor_dice") if rows[index].get("tumor_ref_voxels") else rows[index].get("liver_dice")
        titles = (f"{side}: case {case.case_id}, slice {k}", "ground truth",
                  f"prediction (Dice {dice:.3f})" if dice is not None and math.isfinite(dice) else "prediction")
        for axis, overlay, title in zip(row_axes, (None, ref[:, :, k], pred[:, :, k]), titles):
            axis.imshow(ct, cmap="gray", vmin=_WINDOW[0], vmax=_WINDOW[1])
            if overlay is not None:
                axis.imshow(colours[np.clip(overlay, 0, 2)], interpolation="nearest")
            axis.set_title(title, fontsize=9)
            axis.axis("off")
        del pred, ref
    figure.suptitle("green: liver, red: tumor", fontsize=9)
    path = _save(figure, figure_dir / "overlays.png")
    plt.close(figure)
    return {"Qualitative overlays": path}


def plot_history(
    history: Mapping[str, np.ndarray], path: Path, stability: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Training curves per epoch: loss, Dice, IoU and accuracy panels (those present).

    Args:
        history: Columns of ``history.csv`` (see :func:`~keras_livseg.evaluation.report.read_history`).
        path: The PNG to write.
        stability: ``{column: {"cv": ...}}`` to quote the CV of validation Dice in the legend.

    Returns:
        ``{"Training curves": path}``.
    """
    plt = _pyplot()
    families = [
        ("loss", lambda n: n.endswith("loss")),
        ("Dice", lambda n: "dice" in n),
        ("IoU", lambda n: "iou" in n),
        ("accuracy", lambda n: "accuracy" in n),
    ]
    panels = [(title, [n for n in history if match(n) and n != "epoch"]) for title, match in families]
    panels = [(title, names) for title, names in panels if names]
    if not panels:
        logger.warning("history has no loss, Dice, IoU or accuracy column (%s); no training curves", list(history))
        return {}
    epochs = history.get("epoch")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, (title, names) in zip(axes[0], panels):
        for name in names:
            values = history[name]
            x = (epochs + 1) if epochs is not None and epochs.size == values.size else np.arange(1, values.size + 1)
            label = name
            if stability and name in stability and stability[name].get("cv") is not None:
                label += f" (CV {stability[name]['cv']:.3f})"
            axis.plot(x, values, marker="o", markersize=2, label=label,
                      linestyle="--" if name.startswith("val_") else "-")
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.legend(fontsize=7)
    written = _save(figure, path)
    plt.close(figure)
    return {"Training curves": written}
