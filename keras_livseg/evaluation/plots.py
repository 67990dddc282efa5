"""Figures of the evaluation report, drawn with matplotlib's Agg backend (no display needed).

- :func:`plot_curves`: ROC and precision–recall curves per class, one-vs-rest, with AUC.
- :func:`plot_overlays`: the best and worst cases by Dice, each on the slice with the most
  reference tumour (or liver): the windowed CT with the reference contours (solid) and the
  predicted ones (dashed), titled with the case, the slice and why both were chosen; one PNG per
  case and a grid of them.
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
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from keras_livseg.data.atomic import atomic_path
from keras_livseg.data.labels import LIVER_MIN_LABEL, TUMOR_LABEL

logger = logging.getLogger(__name__)

_WINDOW = (-200.0, 250.0)  # display window for the CT panels (HU), the training default
_CLASS_COLOURS = {"background": "tab:gray", "liver": "tab:green", "tumor": "tab:red"}
#: Contour colours: reference solid, prediction dashed.
_CONTOUR_COLOURS = {
    ("liver", "solid"): "lime", ("tumor", "solid"): "red",
    ("liver", "dashed"): "cyan", ("tumor", "dashed"): "yellow",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never open a window, works headless
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=110, bbox_inches="tight")
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
    # Fewer cases than both sides want: share them, the odd one to "best" (two cases: one each).
    best = list(reversed(order))[: min(per_side, (len(rows) + 1) // 2)]
    worst = [i for i in order[:per_side] if i not in best]
    return [("best", i) for i in best] + [("worst", i) for i in worst]


def overlay_slice(pred: np.ndarray, ref: np.ndarray) -> tuple[int, str]:
    """The axial slice (last axis) an overlay shows, and why it was chosen.

    In order of preference: the slice with the largest tumour area in the reference; else the
    largest predicted tumour area (a false alarm); else the largest liver area in the reference;
    else in the prediction; else the middle slice.

    Example:
        >>> ref = np.zeros((4, 4, 3), np.uint8); ref[1:3, 1:3, 2] = 2
        >>> overlay_slice(ref, ref)
        (2, 'largest tumour area in the reference')
    """
    for labels, test, reason in (
        (ref, lambda a: a == TUMOR_LABEL, "largest tumour area in the reference"),
        (pred, lambda a: a == TUMOR_LABEL, "largest predicted tumour area (no tumour in the reference)"),
        (ref, lambda a: a >= LIVER_MIN_LABEL, "largest liver area in the reference (no tumour)"),
        (pred, lambda a: a >= LIVER_MIN_LABEL, "largest predicted liver area (empty reference)"),
    ):
        area = test(labels).sum(axis=(0, 1))
        if area.any():
            return int(np.argmax(area)), reason
    return ref.shape[2] // 2, "middle slice (both masks empty)"


def _case_reason(side: str, row: Mapping[str, Any]) -> str:
    region = "tumour" if row.get("tumor_ref_voxels") else "liver"
    value = row.get("tumor_dice" if region == "tumour" else "liver_dice")
    score = f", Dice {value:.3f}" if value is not None and math.isfinite(value) else ""
    return f"{side} {region} Dice case{score}"


def _ct_slice(case: Any, k: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """The windowed CT slice ``k`` of a case in canonical orientation, or None without a CT."""
    from keras_livseg.data.volumes import load_nifti, read_array, to_canonical

    if getattr(case, "image", None) is None:
        return None
    image_nii = load_nifti(case.image)
    # ``shape`` is the reference's in canonical orientation: compare the CT's, reoriented alike
    # (a scan stored in another axis order, RAS say, has the same voxels in another shape).
    volume = to_canonical(read_array(image_nii, case.image), image_nii.affine)
    if tuple(volume.shape[:3]) != tuple(shape):
        logger.warning(
            "case %s: CT %s has shape %s but the reference %s (both reoriented); overlay drawn without the CT",
            case.case_id, case.image, tuple(volume.shape[:3]), tuple(shape),
        )
        return None
    return np.clip(np.asarray(volume[:, :, k], dtype=np.float32), *_WINDOW)


def _draw_overlay(axis, ct: np.ndarray | None, ref_slice: np.ndarray, pred_slice: np.ndarray, title: str) -> None:
    """CT (or black) with the reference contours (solid) and the predicted ones (dashed)."""
    background = ct if ct is not None else np.full(ref_slice.shape, _WINDOW[0], np.float32)
    # Canonical arrays run (posterior, patient-left): shown as they are, anterior is up and the
    # patient's right (the liver) on the image's left, the radiological view.
    axis.imshow(background, cmap="gray", vmin=_WINDOW[0], vmax=_WINDOW[1], origin="upper")
    for labels, style in ((ref_slice, "solid"), (pred_slice, "dashed")):
        for region, test in (("liver", labels >= LIVER_MIN_LABEL), ("tumor", labels == TUMOR_LABEL)):
            if test.any() and not test.all():
                colour = _CONTOUR_COLOURS[(region, style)]
                axis.contour(test.astype(np.float32), levels=[0.5], colors=[colour],
                             linewidths=1.2, linestyles=style)
    # Wrapped: side by side in overlays.png, long titles ("case 7, slice 63: largest tumour
    # area in the reference (worst tumour Dice case, Dice 0.024)") ran into each other.
    axis.set_title("\n".join(textwrap.wrap(title, 52)), fontsize=8)
    axis.axis("off")


def _legend_handles():
    from matplotlib.lines import Line2D

    return [
        Line2D([0], [0], color=_CONTOUR_COLOURS[(region, style)], linestyle=style, label=f"{who} {region}")
        for who, style in (("reference", "solid"), ("predicted", "dashed"))
        for region in ("liver", "tumor")
    ]


def plot_overlays(
    matched: Sequence[Any],
    rows: Sequence[Mapping[str, Any]],
    figure_dir: Path,
    label_map: Mapping[int, int] | None = None,
    per_side: int = 2,
) -> dict[str, Path]:
    """CT slices with the reference and predicted contours, for the best and worst cases.

    For each picked case (best and worst by tumour Dice, by liver Dice where the reference has
    no tumour) the slice with the largest reference tumour area (:func:`overlay_slice`) is shown
    with the CT in the window [-200, 250] HU, reference contours solid and predicted contours
    dashed (liver green/cyan, tumour red/yellow). A case without a CT (a plain folder of label
    maps, no ``--images``) is drawn on black. One PNG per case (``overlay_<side>_<case>.png``)
    plus the grid of all of them (``overlays.png``).

    Args:
        matched: :class:`~keras_livseg.evaluation.pairs.MatchedCase` list, aligned with ``rows``.
        rows: The per-case rows (``tumor_dice``, ``liver_dice``, ``tumor_ref_voxels``).
        figure_dir: Folder of the PNGs.
        label_map: Reference label remapping.
        per_side: Best and worst cases shown (default 2 each).

    Returns:
        ``{title: path}``: ``"Qualitative overlays"`` for the grid, and for each case its title,
        e.g. ``"case 7, slice 64: largest tumour area in the reference (worst tumour Dice case,
        Dice 0.412)"`` (empty when there is no case).
    """
    from keras_livseg.evaluation.pairs import load_pair

    if not matched:
        return {}
    plt = _pyplot()
    picks = _pick_cases(rows, per_side)
    written: dict[str, Path] = {}
    panels = []
    for side, index in picks:
        case = matched[index]
        pred, ref, _ = load_pair(case, label_map)
        k, why = overlay_slice(pred, ref)
        ct = _ct_slice(case, k, ref.shape)
        title = f"case {case.case_id}, slice {k}: {why} ({_case_reason(side, rows[index])})"
        if ct is None:
            title += " [no CT]"
        panels.append((title, ct, ref[:, :, k].copy(), pred[:, :, k].copy()))
        del pred, ref
        figure, axis = plt.subplots(figsize=(5.5, 5.8))
        _draw_overlay(axis, ct, panels[-1][2], panels[-1][3], title)
        axis.legend(handles=_legend_handles(), loc="lower center", bbox_to_anchor=(0.5, -0.12),
                    ncol=2, fontsize=7, frameon=False)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(case.case_id))
        written[title] = _save(figure, figure_dir / f"overlay_{side}_{safe}.png")
        plt.close(figure)
    columns = min(2, len(panels))
    grid_rows = int(math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(grid_rows, columns, figsize=(5.5 * columns, 5.2 * grid_rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (title, ct, ref_slice, pred_slice) in zip(axes.ravel(), panels):
        _draw_overlay(axis, ct, ref_slice, pred_slice, title)
    figure.legend(handles=_legend_handles(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    grid = _save(figure, figure_dir / "overlays.png")
    plt.close(figure)
    return {"Qualitative overlays": grid, **written}


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
            shown = np.isfinite(values)  # epochs without validation (training.validate_last) have none
            x, values = x[shown], values[shown]
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


def plot_dice_vs_speed(models: Sequence[Mapping[str, Any]], path: Path) -> dict[str, Path]:
    """Dice against training slices/s, one point per model and class, error bars over seeds.

    Args:
        models: ``compare``'s model entries: ``name``, ``speed["train_slices_per_s"]``,
            ``mean``/``spread`` metrics (``volume.<region>.dice``).
        path: The PNG.

    Returns:
        ``{"Dice against training speed": path}``, or ``{}`` when no model has a speed.
    """
    points = [m for m in models if (m.get("speed") or {}).get("train_slices_per_s")]
    if not points:
        return {}
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for axis, region in zip(axes, ("liver", "tumor")):
        for index, model in enumerate(points):
            mean = model["mean"]["volume"][region]["dice"]
            spread = (model.get("spread") or {}).get("volume", {}).get(region, {}).get("dice") or {}
            if mean is None:
                continue
            error = [[mean - spread.get("min", mean)], [spread.get("max", mean) - mean]]
            speed = model["speed"]["train_slices_per_s"]
            axis.errorbar(speed, mean, yerr=error, fmt="o", capsize=3, color=f"C{index}", label=model["name"])
            axis.annotate(model["name"], (speed, mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axis.set_xscale("log")
        axis.set_xlabel("training slices/s (this machine)")
        axis.set_ylabel(f"{region} Dice (mean per case; bars: range over seeds)")
        axis.set_title(f"{region}: Dice against training speed", fontsize=9)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)
    return {"Dice against training speed": path}


def plot_model_overlays(
    cases: Sequence[Any],
    predictions: Mapping[str, Mapping[str, Path]],
    path: Path,
    label_map: Mapping[int, int] | None = None,
    max_cases: int = 3,
) -> dict[str, Path]:
    """Every model's prediction side by side on the same slices: one row per case.

    The cases with the most reference tumour come first (up to ``max_cases``); each row shows
    the slice with the largest reference tumour area (:func:`overlay_slice`), the reference
    alone, then each model's contours (dashed) over the reference's (solid) on the CT.

    Args:
        cases: :class:`~keras_livseg.evaluation.pairs.MatchedCase` of the scored cases (the
            ``prediction`` field is not used; ``reference`` and ``image`` are).
        predictions: ``{model name: {case_id: predicted label map}}``.
        path: The PNG.
        label_map: Reference label remapping.
        max_cases: Rows at most.

    Returns:
        ``{title: path}``, or ``{}`` with no case.
    """
    from keras_livseg.evaluation.pairs import MatchedCase, load_pair

    if not cases or not predictions:
        return {}
    names = list(predictions)
    ranked = []
    for case in cases:
        _, ref, _ = load_pair(MatchedCase(case.case_id, case.reference, case.reference, case.image), label_map)
        ranked.append((int((ref == TUMOR_LABEL).sum()), int((ref >= LIVER_MIN_LABEL).sum()), case))
        del ref
    ranked.sort(key=lambda item: (-item[0], -item[1], str(item[2].case_id)))
    rows = []
    for _, _, case in ranked[:max_cases]:
        _, ref, _ = load_pair(MatchedCase(case.case_id, case.reference, case.reference, case.image), label_map)
        k, why = overlay_slice(ref, ref)
        ct = _ct_slice(case, k, ref.shape)
        panels = [("reference", ref[:, :, k].copy(), np.zeros_like(ref[:, :, k]))]
        for name in names:
            predicted = predictions[name].get(case.case_id)
            if predicted is None:
                continue
            pred, _, _ = load_pair(MatchedCase(case.case_id, Path(predicted), case.reference, case.image), label_map)
            panels.append((name, ref[:, :, k].copy(), pred[:, :, k].copy()))
            del pred
        rows.append((f"case {case.case_id}, slice {k}: {why}", ct, panels))
        del ref
    plt = _pyplot()
    columns = 1 + len(names)
    figure, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns, 3.5 * len(rows)), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for row_axes, (row_title, ct, panels) in zip(axes, rows):
        for axis, (name, ref_slice, pred_slice) in zip(row_axes, panels):
            _draw_overlay(axis, ct, ref_slice, pred_slice, name if name != "reference" else f"{row_title}\nreference")
    figure.legend(handles=_legend_handles(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    title = "Every model on the same slices"
    _save(figure, path)
    plt.close(figure)
    return {title: path}


def plot_attention(image: np.ndarray, mask: np.ndarray, maps: Mapping[str, Mapping[str, np.ndarray]],
                   path: Path, title: str = "") -> dict[str, Path]:
    """What each model attends to on one slice: one row per model, one column per kind of map.

    Args:
        image: ``[H, W, C]`` the model input (standardized; the middle channel is shown).
        mask: ``[H, W]`` its reference labels (contours on the first column).
        maps: ``{model: {map name: [H, W] in [0, 1]}}`` (gates, Grad-CAM tumour, Grad-CAM liver).
            Grad-CAM maps are drawn on [0, 1]; gate maps on their own range (stated in the title).
        path: The PNG.
        title: What the slice is (case, slice, why).

    Returns:
        ``{"What each model attends to": path}``, or ``{}`` without maps.
    """
    if not maps:
        return {}
    plt = _pyplot()
    kinds: list[str] = []
    for model_maps in maps.values():
        kinds += [k for k in model_maps if k not in kinds]
    ct = image[..., image.shape[-1] // 2]
    figure, axes = plt.subplots(len(maps), 1 + len(kinds), figsize=(2.8 * (1 + len(kinds)), 2.9 * len(maps)),
                                squeeze=False)
    for row, (name, model_maps) in zip(axes, maps.items()):
        for axis in row:
            axis.axis("off")
        row[0].imshow(ct, cmap="gray")
        for region, colour in (("liver", "lime"), ("tumor", "red")):
            test = mask >= LIVER_MIN_LABEL if region == "liver" else mask == TUMOR_LABEL
            if test.any() and not test.all():
                row[0].contour(test.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.0)
        row[0].set_title(f"{name}: CT, reference", fontsize=8)
        for axis, kind in zip(row[1:], kinds):
            if kind not in model_maps:
                continue
            value = np.asarray(model_maps[kind], np.float32)
            axis.imshow(ct, cmap="gray")
            if kind.startswith("Grad-CAM"):  # already scaled to [0, 1] per slice
                axis.imshow(value, cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0)
                axis.set_title(f"{name}: {kind}", fontsize=8)
            else:  # gates hover near 0.5; their own range shows where they open and close
                low, high = float(value.min()), float(value.max())
                axis.imshow(value, cmap="inferno", alpha=0.6, vmin=low, vmax=max(high, low + 1e-6))
                axis.set_title(f"{name}: {kind}\n(colours span {low:.2f}–{high:.2f})", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    _save(figure, path)
    plt.close(figure)
    return {"What each model attends to": path}
