"""The LiTS label map, its regions, and the bounding box of a mask: defined once, used everywhere.

The label map of every volume, shard, prediction and metric is LiTS's: 0 background, 1 liver,
2 tumour. Regions are sets of labels: the **liver** is the whole organ (labels 1 and 2: a tumour
lies inside the liver), the **tumour** is label 2. Training losses and metrics
(:mod:`keras_livseg.training`), the LiTS scoring (:mod:`keras_livseg.evaluation.metrics`),
post-processing, plots and the serving signature all read these names, so they cannot disagree.

NumPy only: the evaluation imports this without TensorFlow or Keras.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: Class names by label value.
CLASS_NAMES: tuple[str, str, str] = ("background", "liver", "tumor")
#: Number of classes of the label map.
NUM_CLASSES = len(CLASS_NAMES)
#: Liver means label >= 1 (liver including tumour), as LiTS scores it.
LIVER_MIN_LABEL = 1
#: Tumour means label == 2.
TUMOR_LABEL = 2
#: Named regions as the sets of labels they cover.
REGION_LABELS: dict[str, tuple[int, ...]] = {
    "background": (0,),
    "liver": (1, 2),
    "tumor": (2,),
}


def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
    """The smallest box holding ``mask``'s foreground, grown by ``margin`` voxels and clipped.

    Args:
        mask: boolean array of any rank.
        margin: voxels added on both sides, one number or one per axis.

    Returns:
        One ``slice`` per axis, or ``None`` when the mask is empty.

    Example:
        >>> mask = np.zeros((5, 6), bool); mask[1:3, 2] = True
        >>> bounding_box(mask), bounding_box(mask, margin=(1, 4))
        ((slice(1, 3, None), slice(2, 3, None)), (slice(0, 4, None), slice(0, 6, None)))
        >>> bounding_box(np.zeros((3, 3), bool)) is None
        True
    """
    mask = np.asarray(mask)
    margins = [int(margin)] * mask.ndim if np.isscalar(margin) else [int(m) for m in margin]
    if len(margins) != mask.ndim:
        raise ValueError(f"margin {margin!r} needs one value per axis of a {mask.ndim}D mask")
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=others) if others else mask)
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margins[axis], 0), min(int(hits[-1]) + 1 + margins[axis], mask.shape[axis])))
    return tuple(box)
