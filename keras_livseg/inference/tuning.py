"""Post-processing chosen on validation volumes, as nnU-Net chooses its own after training.

A model trained for a few minutes leaves small false lesions: a few voxels of gallbladder or
vessel called tumour. In a tumour-free case LiTS scores any such voxel as tumour Dice 0, and
the case stays in the mean. The minimum lesion size that removes them without removing real
lesions depends on the model and the data, so :func:`choose_min_lesion_size` measures it on
the validation cases: it predicts each volume once, applies every candidate size to a copy,
and keeps the size with the best mean per-case tumour Dice (the LiTS ranking score). A
larger size than the default is kept only where it scores strictly higher; ties keep the
smaller. Liver Dice does not depend on it (a removed lesion becomes liver).

``fit`` runs it after training when the recipe has validation cases and records the choice
in the run's ``preprocessing.json`` (key ``postprocessing``), which the export copies into the
SavedModel; ``predict`` and ``evaluate`` then apply it unless told otherwise
(``--min-lesion-mm3``). The held-out test scores of the run use it too, and never chose it.

Example:
    >>> choice = choose_min_lesion_size(model, manifest_cases("shards/", "val"))  # doctest: +SKIP
    >>> choice.postprocessing.min_lesion_mm3  # doctest: +SKIP
    904.8
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from keras_livseg.data.cases import CaseFiles
from keras_livseg.data.labels import TUMOR_LABEL
from keras_livseg.data.volumes import load_case
from keras_livseg.inference.postprocess import PostProcessing, postprocess_labels
from keras_livseg.inference.predictor import SegmentationModel
from keras_livseg.inference.volume import predict_volume

logger = logging.getLogger(__name__)

#: Candidate minimum lesion sizes, as the diameter (mm) of a sphere of that volume. LiTS calls
#: lesions under 10 mm small; radiologists report lesions from about 5 mm.
CANDIDATE_DIAMETERS_MM = (6.0, 8.0, 10.0, 12.0, 15.0)


def sphere_mm3(diameter_mm: float) -> float:
    """Volume of a sphere of ``diameter_mm``.

    Example:
        >>> round(sphere_mm3(10.0), 1)
        523.6
    """
    return math.pi * diameter_mm**3 / 6.0


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total  # both empty: 1, as LiTS


@dataclasses.dataclass(frozen=True)
class PostProcessingChoice:
    """What :func:`choose_min_lesion_size` measured and chose.

    Attributes:
        postprocessing: ``base`` with the chosen ``min_lesion_mm3``.
        cases: The validation cases scored.
        scores: One row per candidate: ``min_lesion_mm3``, ``diameter_mm`` (of the equal
            sphere), ``tumor_dice`` (mean per case) and ``tumor_dice_global``.
    """

    postprocessing: PostProcessing
    cases: list[str]
    scores: list[dict[str, float]]

    @property
    def default_score(self) -> float:
        return self.scores[0]["tumor_dice"]

    @property
    def chosen_score(self) -> float:
        return next(s["tumor_dice"] for s in self.scores if s["min_lesion_mm3"] == self.postprocessing.min_lesion_mm3)

    def to_dict(self) -> dict[str, Any]:
        """The ``postprocessing`` entry of ``preprocessing.json``."""
        return {**self.postprocessing.to_dict(), "chosen_on": {"cases": self.cases, "scores": self.scores,
                                                               "criterion": "mean per-case tumour Dice"}}

    def summary(self) -> str:
        """One line for the log."""
        chosen = self.postprocessing.min_lesion_mm3
        if chosen == self.scores[0]["min_lesion_mm3"]:
            return (f"post-processing on {len(self.cases)} validation volume(s): the default minimum lesion size "
                    f"({chosen:g} mm³) scored best (tumour Dice {self.default_score:.3f}); kept")
        diameter = next(s["diameter_mm"] for s in self.scores if s["min_lesion_mm3"] == chosen)
        return (f"post-processing chosen on {len(self.cases)} validation volume(s): lesions under {chosen:.0f} mm³ "
                f"(a {diameter:g} mm sphere) become liver; validation tumour Dice {self.default_score:.3f} -> "
                f"{self.chosen_score:.3f} (mean per case)")


def choose_min_lesion_size(
    model: SegmentationModel,
    cases: Sequence[CaseFiles],
    base: PostProcessing | None = None,
    diameters_mm: Sequence[float] = CANDIDATE_DIAMETERS_MM,
    label_map: Mapping[int, int] | None = None,
    batch_size: int = 8,
) -> PostProcessingChoice:
    """Score ``base`` and each candidate minimum lesion size on labelled cases; keep the best.

    Args:
        model: The trained model.
        cases: Labelled validation cases (never the ones the figures are quoted on).
        base: The other post-processing steps, and the default size, the first candidate
            (default :class:`PostProcessing()`).
        diameters_mm: Candidate sizes, as sphere diameters in mm (default
            :data:`CANDIDATE_DIAMETERS_MM`).
        label_map: Remapping of the references' label values, as ``prepare`` used.
        batch_size: Slices per forward pass.

    Returns:
        A :class:`PostProcessingChoice`.

    Raises:
        ValueError: no case, or a case without a label map.
    """
    base = base or PostProcessing()
    if not cases:
        raise ValueError("choosing the post-processing needs at least one labelled validation case")
    unlabelled = [c.case_id for c in cases if c.label is None]
    if unlabelled:
        raise ValueError(f"validation case(s) {', '.join(unlabelled[:3])} have no label map to choose the post-processing on")
    candidates = [(base.min_lesion_mm3, round((6.0 * base.min_lesion_mm3 / math.pi) ** (1 / 3), 1))]
    candidates += [(round(sphere_mm3(d), 1), float(d)) for d in diameters_mm if sphere_mm3(d) > base.min_lesion_mm3]
    # Everything but the size once per case; then only the size step, on copies.
    without_size = dataclasses.replace(base, min_lesion_mm3=0.0, min_lesion_voxels=0)
    size_only = dataclasses.replace(PostProcessing.disabled(), min_lesion_voxels=base.min_lesion_voxels)
    per_case: list[list[tuple[float, int, int]]] = [[] for _ in candidates]  # (dice, intersection, sizes)
    for files in cases:
        case = load_case(files, label_map=label_map)
        labels = predict_volume(model, case, batch_size=batch_size, postprocess=without_size, progress=False).labels
        reference = case.labels == TUMOR_LABEL
        for row, (mm3, _) in enumerate(candidates):
            trial = labels.copy()
            postprocess_labels(trial, case.spacing, dataclasses.replace(size_only, min_lesion_mm3=mm3))
            tumour = trial == TUMOR_LABEL
            per_case[row].append((_dice(tumour, reference), int(np.logical_and(tumour, reference).sum()),
                                  int(tumour.sum()) + int(reference.sum())))
    scores = []
    for (mm3, diameter), rows in zip(candidates, per_case):
        sizes = sum(r[2] for r in rows)
        scores.append({"min_lesion_mm3": float(mm3), "diameter_mm": diameter,
                       "tumor_dice": float(np.mean([r[0] for r in rows])),
                       "tumor_dice_global": 2.0 * sum(r[1] for r in rows) / sizes if sizes else 1.0})
    best = scores[0]
    for row in scores[1:]:  # strictly better only: a tie keeps the smaller size
        if row["tumor_dice"] > best["tumor_dice"] + 1e-9:
            best = row
    chosen = dataclasses.replace(base, min_lesion_mm3=best["min_lesion_mm3"])
    return PostProcessingChoice(chosen, [c.case_id for c in cases], scores)
