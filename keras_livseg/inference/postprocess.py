"""Post-processing of predicted label maps: largest liver, lesions inside the liver, minimum size.

See :mod:`keras_livseg.inference` for the rules and their order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from keras_livseg.data.labels import bounding_box


logger = logging.getLogger(__name__)

#: Default minimum lesion volume kept by post-processing (mm³), see :mod:`keras_livseg.inference`.
DEFAULT_MIN_LESION_MM3 = 10.0
#: Default distance (mm) from the liver parenchyma within which tumor is kept.
DEFAULT_LIVER_MARGIN_MM = 5.0


@dataclasses.dataclass(frozen=True)
class PostProcessing:
    """Which clean-up steps :func:`postprocess_labels` applies (see the module docstring).

    Attributes:
        largest_liver_component: Keep only the largest 3D component of label >= 1 (default True).
        tumor_in_liver: Drop lesions farther than ``liver_margin_mm`` from label 1 (default True).
        liver_margin_mm: The dilation of the liver parenchyma, in mm (default 5).
        min_lesion_mm3: Tumor components below this volume in mm³ become liver (default 10;
            0 disables).
        min_lesion_voxels: The same rule counted in voxels (default 0: off); both apply.

    Example:
        >>> PostProcessing.disabled().largest_liver_component
        False
    """

    largest_liver_component: bool = True
    tumor_in_liver: bool = True
    liver_margin_mm: float = DEFAULT_LIVER_MARGIN_MM
    min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3
    min_lesion_voxels: int = 0

    def __post_init__(self) -> None:
        for name in ("liver_margin_mm", "min_lesion_mm3"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} must be a finite non-negative number (e.g. 10).")
        if self.min_lesion_voxels < 0:
            raise ValueError(f"min_lesion_voxels={self.min_lesion_voxels} must be >= 0.")

    @classmethod
    def disabled(cls) -> "PostProcessing":
        """No post-processing at all (``--no-postprocess``)."""
        return cls(False, False, 0.0, 0.0, 0)

    def to_dict(self) -> dict[str, float | int | bool]:
        """The settings as JSON values (``preprocessing.json``'s ``postprocessing`` entry)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> "PostProcessing":
        """Read :meth:`to_dict`'s output; other keys (e.g. how it was chosen) are ignored.

        Example:
            >>> PostProcessing.from_dict({"min_lesion_mm3": 524.0, "chosen_on": {}}).min_lesion_mm3
            524.0
        """
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    @property
    def enabled(self) -> bool:
        return bool(
            self.largest_liver_component or self.tumor_in_liver
            or self.min_lesion_mm3 > 0 or self.min_lesion_voxels > 0
        )


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components in the narrowest integer type that holds their count (memory)."""
    try:
        return ndimage.label(mask, output=np.uint16)  # half of int32 over a whole scan
    except RuntimeError:  # more than 65,535 components
        return ndimage.label(mask)


#: Voxels per slab when counting or selecting components: bounded temporaries (np.bincount
#: casts its input to int64, 8 bytes a voxel, which over a whole scan is gigabytes).
_SLAB_VOXELS = 8 * 2**20


def _slabs(shape: Sequence[int]) -> range:
    """Starts of slabs along the first axis (contiguous in a C-ordered array), each at most _SLAB_VOXELS."""
    step = max(1, _SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
    return range(0, shape[0], step) if shape[0] else range(0)


def _component_sizes(components: np.ndarray, count: int) -> np.ndarray:
    """Voxels per component label 1..count (index 0 holds 0), counted a slab at a time.

    Only labelled voxels are counted: the box around the liver is mostly background, and
    picking the labelled voxels out costs less than counting every voxel (np.bincount widens
    each to int64 first).
    """
    sizes = np.zeros(count + 1, np.int64)
    starts = _slabs(components.shape)
    for start in starts:
        slab = components[start:start + starts.step]
        sizes += np.bincount(slab[slab > 0], minlength=count + 1)
    return sizes


def _set_where(view: np.ndarray, components: np.ndarray, chosen: np.ndarray, value: int) -> None:
    """``view[components in chosen] = value``, through a lookup table, a slab at a time."""
    table = np.zeros(int(components.max()) + 1, bool)
    table[chosen] = True
    starts = _slabs(view.shape)
    for start in starts:
        slab = view[start:start + starts.step]
        slab[table[components[start:start + starts.step]]] = value


def _in_memory_order(labels: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, tuple[float, ...]]:
    """``labels`` (a view) and ``spacing`` with the axes permuted so that the array is C-ordered where it can be.

    ``predict`` keeps labels slice-major under their ``[rows, cols, slices]`` shape; labelling
    components and selecting them on that layout as if it were C-ordered cost a third more.
    Components and distances do not depend on the order of the axes.
    """
    if not labels.flags.c_contiguous and labels.ndim == 3:
        slices_first = labels.transpose(2, 0, 1)
        if slices_first.flags.c_contiguous:
            return slices_first, (spacing[2], spacing[0], spacing[1])
    return labels, spacing


def _plane_runs(occupied: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive True values.

    Example:
        >>> _plane_runs(np.array([0, 1, 1, 0, 0, 1], bool))
        [(1, 3), (5, 6)]
    """
    edges = np.flatnonzero(np.diff(np.concatenate([[False], occupied, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _keep_largest_component(volume: np.ndarray, liver: np.ndarray) -> tuple[slice, ...] | None:
    """Zero every 3D component of ``liver`` (label >= 1) but the largest; the box around it, or None.

    No component crosses a plane (along the first axis) that holds no label, so each run of
    occupied planes is labelled on its own, in its own box. A model's stray voxels at the far
    ends of a long scan then cost their own small boxes, instead of one box spanning the scan
    (labelling is linear in the box). Ties go to the component that comes first in the array's
    order, as one labelling of the whole box would decide.
    """
    best = None  # (size, box, components, label) of the largest so far
    found = 0
    for start, stop in _plane_runs(liver.any(axis=tuple(range(1, liver.ndim)))):
        box = (slice(start, stop), *bounding_box(liver[start:stop].any(axis=0)))
        components, count = _label(liver[box])
        sizes = _component_sizes(components, count)  # background's entry is 0
        largest = int(np.argmax(sizes))
        found += count
        if best is None or sizes[largest] > best[0]:
            beaten = best[1] if best is not None else None
            best = (sizes[largest], box, components, largest)
        else:
            beaten = box
        if beaten is not None:  # a run without the largest component: islands only
            volume[beaten][liver[beaten]] = 0
    if best is None:
        return None
    _, box, components, largest = best
    inside = components == largest
    if found > 1:
        volume[box][liver[box] & ~inside] = 0
        logger.debug("post-processing: removed %d liver islands", found - 1)
    inner = bounding_box(inside)
    return tuple(slice(outer.start + part.start, outer.start + part.stop) for outer, part in zip(box, inner))


def _lesions_away_from_liver(view: np.ndarray, lesions: np.ndarray, count: int, spacing: Sequence[float],
                             margin_mm: float) -> np.ndarray:
    """Labels (of ``lesions``' components) of the lesions farther than ``margin_mm`` from the liver parenchyma.

    Judged per lesion, by its nearest voxel: a large lesion inside the liver keeps its
    centre however far that is from parenchyma. Lesions touching parenchyma (the usual
    case) are kept without computing any distance, and that test runs only in the box around
    all lesions; for the others the distance transform runs in the lesion's box grown by
    ``margin_mm``, which holds every parenchyma voxel that could be near enough (memory scales
    with the lesion, not the scan).
    """
    parenchyma = view == 1
    if not parenchyma.any():
        return np.arange(1, count + 1)
    # One voxel around the lesions' box is all a one-voxel dilation can reach.
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in bounding_box(lesions > 0))
    near_lesions = lesions[box]
    touching = np.unique(near_lesions[ndimage.binary_dilation(parenchyma[box]) & (near_lesions > 0)])
    detached = np.setdiff1d(np.arange(1, count + 1), touching)
    if detached.size == 0:
        return detached
    grow = [int(np.ceil(margin_mm / s)) + 1 for s in spacing]
    objects = ndimage.find_objects(lesions)
    far = []
    for index in detached:
        box = tuple(slice(max(b.start - g, 0), b.stop + g) for b, g in zip(objects[index - 1], grow))
        near = parenchyma[box]
        # No parenchyma in the grown box: every parenchyma voxel is farther than the margin.
        if not near.any() or ndimage.distance_transform_edt(~near, sampling=spacing)[lesions[box] == index].min() > margin_mm:
            far.append(index)
    return np.asarray(far, dtype=np.int64)


def postprocess_labels(
    labels: np.ndarray, spacing: Sequence[float], options: PostProcessing = PostProcessing()
) -> np.ndarray:
    """Clean a predicted label map in place (and return it); see the module docstring.

    Works inside the bounding box of the predicted liver, so its temporary arrays scale with
    the liver, not with the scan.

    Args:
        labels: uint8 ``[rows, cols, slices]`` (0 background, 1 liver, 2 tumor), modified.
        spacing: Voxel size in mm per axis.
        options: The steps to apply.

    Returns:
        ``labels``.

    Example:
        >>> labels = np.zeros((9, 9, 3), np.uint8); labels[1:5, 1:5] = 1; labels[7, 7, 1] = 1
        >>> int(postprocess_labels(labels, (1.0, 1.0, 1.0))[7, 7, 1])
        0
    """
    spacing = tuple(float(s) for s in spacing)
    volume, spacing = _in_memory_order(labels, spacing)  # a view: writes go to ``labels``
    liver = volume >= 1
    if options.largest_liver_component:
        box = _keep_largest_component(volume, liver)  # the box around what is left
    else:
        box = bounding_box(liver)
    del liver
    if box is None:
        return labels
    view = volume[box]  # a view: writes go to ``labels``
    min_voxels = max(options.min_lesion_voxels, 0)
    if options.min_lesion_mm3 > 0:
        min_voxels = max(min_voxels, int(math.ceil(options.min_lesion_mm3 / float(np.prod(spacing)) - 1e-9)))
    if not ((options.tumor_in_liver or min_voxels > 1) and (view == 2).any()):
        return labels
    # The lesions' components, labelled once for both rules (dropping some leaves the others' labels).
    lesions, count = _label(view == 2)
    far = np.zeros(0, np.int64)
    if options.tumor_in_liver:
        far = _lesions_away_from_liver(view, lesions, count, spacing, options.liver_margin_mm)
        if far.size:
            _set_where(view, lesions, far, 0)
            logger.debug("post-processing: removed %d lesions beyond %.1f mm of the liver", far.size,
                         options.liver_margin_mm)
    if min_voxels > 1:
        sizes = _component_sizes(lesions, count)
        small = np.setdiff1d(np.flatnonzero(sizes < min_voxels), np.concatenate([[0], far]))
        if small.size:
            _set_where(view, lesions, small, 1)
            logger.debug("post-processing: %d lesions under %d voxels became liver", small.size, min_voxels)
    return labels
