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

Submodules (everything public is re-exported here, so import from this package):

- :mod:`~keras_livseg.evaluation.metrics.overlap`: Dice, IoU, VOE, RVD, precision, recall, F1;
- :mod:`~keras_livseg.evaluation.metrics.surface`: surface distances (ASSD, MSD, HD95, RMSD);
- :mod:`~keras_livseg.evaluation.metrics.lesions`: lesion sizes, tumor burden, lesion detection
  and per-lesion metrics, tumor Dice per size stratum;
- :mod:`~keras_livseg.evaluation.metrics.aggregation`: per-case metrics, global Dice,
  slice-level metrics, coefficient of variation;
- :mod:`~keras_livseg.evaluation.metrics._common`: constants, input checks, region masks, the
  empty-mask penalty.

Example:

>>> import numpy as np
>>> ref = np.zeros((8, 8, 4), dtype=np.uint8); ref[2:6, 2:6, :] = 1; ref[3:5, 3:5, 1:3] = 2
>>> pred = ref.copy(); pred[3, 3, 1] = 1
>>> scores = case_metrics(pred, ref, spacing=(0.8, 0.8, 2.5))
>>> round(scores["liver_dice"], 4), round(scores["tumor_dice"], 4)
(1.0, 0.9333)
"""

from __future__ import annotations

import math  # noqa: F401  (the docstring examples run in this namespace: doctest.testmod)

import numpy as np  # noqa: F401  (likewise)

from keras_livseg.evaluation.metrics import _common, aggregation, lesions, overlap, surface
from keras_livseg.evaluation.metrics._common import (
    EMPTY_SURFACE_POLICIES,
    LITS_CONNECTIVITY,
    LITS_PENALTY,
    LIVER_MIN_LABEL,
    MEDPY_CONNECTIVITY,
    REGIONS,
    SMALL_LESION_DIAMETER_MM,
    TUMOR_LABEL,
    region_mask,
    resolve_empty_value,
    volume_diagonal_mm,
)
from keras_livseg.evaluation.metrics.aggregation import (
    case_metrics,
    coefficient_of_variation,
    global_dice,
    slice_level_metrics,
)
from keras_livseg.evaluation.metrics.lesions import (
    LesionDetection,
    detection_precision_recall,
    equivalent_diameter_mm,
    lesion_detection,
    lesion_segmentation_metrics,
    lesion_size_stratum,
    mean_lesion_metrics,
    tumor_burden,
    tumor_dice_by_stratum,
)
from keras_livseg.evaluation.metrics.overlap import (
    dice,
    f1,
    iou,
    jaccard,
    overlap_counts,
    overlap_from_counts,
    precision,
    recall,
    rvd,
    rvd_lits,
    voe,
)
from keras_livseg.evaluation.metrics.surface import (
    assd,
    average_surface_distance,
    hausdorff_distance,
    hd95,
    max_surface_distance,
    rmsd,
    surface_distances,
    surface_metrics,
)

#: The submodules' functions and classes, so that ``doctest.testmod`` of this package runs their
#: docstring examples too (it skips objects defined in other modules).
__test__ = {
    f"{module.__name__.rsplit('.', 1)[-1]}.{name}": value
    for module in (_common, overlap, surface, lesions, aggregation)
    for name, value in vars(module).items()
    if callable(value) and getattr(value, "__module__", None) == module.__name__
}

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
