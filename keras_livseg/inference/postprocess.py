"""Post-processing of predicted label maps: largest liver, lesions inside the liver, minimum size.

See :mod:`keras_livseg.inference` for the rules and their order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Mapping, Sequence

import cc3d
import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

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


#: Voxels per slab when labelling, counting or selecting components: bounded temporaries
#: (a whole-scan int32 label map is 1 GB at 512x512x1000; a slab's is 32 MB).
_SLAB_VOXELS = 8 * 2**20
#: Bytes of slab labels kept from the first labelling for the passes that select components:
#: labelling again cost about a quarter of post-processing when a model labelled most of a scan.
#: Past this, slabs are labelled again (memory stays bounded on a long scan).
_KEPT_LABEL_BYTES = 256 * 2**20


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``scipy.ndimage.label(mask)`` (3D, face connectivity), about twice as fast: int32 labels and their count.

    cc3d numbers components in the order of their first voxel in a C-ordered array, as
    ``ndimage.label`` does; the mask is made C-contiguous first so that the order is memory order.

    Example:
        >>> mask = np.zeros((1, 3, 3), bool); mask[0, 0, :2] = mask[0, 2, 2] = True
        >>> labels, count = _label(mask); count, labels[0].tolist()
        (2, [[1, 1, 0], [0, 0, 0], [0, 0, 2]])
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    labels, count = cc3d.connected_components(mask, connectivity=6, return_N=True, out_dtype=np.uint32)
    return labels.view(np.int32), int(count)  # at most one label a voxel: below 2**31 in a slab


def _slabs(shape: Sequence[int]) -> range:
    """Starts of slabs along the first axis (contiguous in a C-ordered array), each at most _SLAB_VOXELS."""
    step = max(1, _SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
    return range(0, shape[0], step) if shape[0] else range(0)


@dataclasses.dataclass
class _Components:
    """The 3D connected components (face connectivity) of a mask, found a slab of planes at a time.

    Each slab is labelled on its own; its components get consecutive ids after the previous
    slab's (0 is background), and components that meet across a slab boundary are merged as
    a graph. No label map of the whole mask is held beyond ``_KEPT_LABEL_BYTES``: :meth:`slab_labels`
    returns a kept slab's labels or labels it again (labelling is deterministic), and per-id tables
    turn its labels into per-component answers. Memory: one slab's labels and the kept ones, plus
    some 30 bytes per id (a prediction's components number in the thousands to the hundred
    thousands, not in the millions of voxels).

    Attributes:
        mask_of: ``(start, stop) -> array`` of those planes, non-zero where the mask is set.
        starts: The slabs' first planes (``starts.step`` planes each).
        offsets: Per slab, the id before its first component.
        component: Per id, its component's index (``component[0]`` is -1, background);
            components are numbered in the order of their first voxel in memory, as
            ``scipy.ndimage.label`` of the whole mask numbers them (minus one).
        sizes: Voxels per component.
        kept: Slab labels kept from the first labelling, by slab index.
    """

    mask_of: Callable[[int, int], np.ndarray]
    starts: range
    offsets: np.ndarray
    component: np.ndarray
    sizes: np.ndarray
    kept: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.sizes.size)

    def stop(self, start: int) -> int:
        return min(start + self.starts.step, self.starts.stop)

    def slab_labels(self, k: int) -> np.ndarray:
        """Slab ``k``'s own labels (int32, 0 background; id = label + ``offsets[k]``)."""
        if k in self.kept:
            return self.kept[k]
        start = self.starts[k]
        return _label(self.mask_of(start, self.stop(start)))[0]

    def slab_table(self, k: int, per_component: np.ndarray, background) -> np.ndarray:
        """``per_component``'s values indexed by slab ``k``'s labels: ``table[labels]`` is per voxel."""
        ids = self.component[self.offsets[k] + 1:self.offsets[k + 1] + 1]
        return np.concatenate([np.asarray([background], per_component.dtype), per_component[ids]])


def _find_components(mask_of: Callable[[int, int], np.ndarray], shape: Sequence[int],
                     on_slab: Callable[[int, int, np.ndarray, int], None] | None = None) -> _Components:
    """Label ``mask_of(0, shape[0])`` a slab at a time; see :class:`_Components`.

    ``on_slab(start, stop, labels, offset)`` sees each slab's labels once, for per-id statistics.

    Example:
        >>> mask = np.zeros((4, 3, 3), bool); mask[:, 1, 1] = True; mask[0, 0, 0] = True
        >>> found = _find_components(lambda a, b: mask[a:b], mask.shape)
        >>> found.count, found.sizes.tolist()
        (2, [1, 4])
    """
    starts = _slabs(shape)
    offsets, sizes, edges, kept, kept_bytes = [0], [], [], {}, 0
    last = None  # the previous slab's last plane, as ids
    for k, start in enumerate(starts):
        stop = min(start + starts.step, shape[0])
        labels, count = _label(mask_of(start, stop))
        offset = offsets[-1]
        # Over the labelled voxels only: 3x faster where most of the slab is background (a trained
        # model's box around the liver, lesions), a quarter slower where most is labelled.
        sizes.append(np.bincount(labels[labels > 0], minlength=count + 1)[1:].astype(np.int32))
        if last is not None:  # the two planes of the boundary: face neighbours pair up
            first = labels[0]
            both = (last > 0) & (first > 0)
            # Each pair once: a plane's worth of voxel pairs is a handful of distinct edges.
            keys = np.unique(last[both].astype(np.int64) * (count + 1) + first[both])
            edges.append(np.stack([keys // (count + 1), keys % (count + 1) + offset]))
        last = np.where(labels[-1] > 0, labels[-1] + offset, 0)
        if on_slab is not None:
            on_slab(start, stop, labels, offset)
        if kept_bytes + labels.nbytes <= _KEPT_LABEL_BYTES:
            kept[k] = labels
            kept_bytes += labels.nbytes
        offsets.append(offset + count)
    total = offsets[-1]
    pairs = np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), np.int64)
    graph = sparse.coo_matrix((np.ones(pairs.shape[1], np.float32), (pairs[0], pairs[1])), shape=(total + 1, total + 1))
    _, merged = csgraph.connected_components(graph, directed=False)
    merged = merged[1:]
    # Number components by their smallest id: ids run in the order of each slab's first voxels,
    # so that is the order of first voxels in the whole mask.
    first = np.full(merged.max() + 1 if total else 0, total, np.int32)
    np.minimum.at(first, merged, np.arange(total, dtype=np.int32))
    present = np.flatnonzero(first < total)
    rank = np.full(first.size, -1, np.int32)
    rank[present[np.argsort(first[present], kind="stable")]] = np.arange(present.size, dtype=np.int32)
    component = np.concatenate([np.asarray([-1], np.int32), rank[merged]])
    by_id = np.concatenate(sizes) if sizes else np.zeros(0, np.int32)
    voxels = np.bincount(component[1:], weights=by_id, minlength=present.size).astype(np.int64)
    return _Components(mask_of, starts, np.asarray(offsets), component, voxels, kept)


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


class _SlabBox:
    """The bounding box of a mask seen one slab of planes at a time (no whole-volume mask)."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.planes = np.zeros(shape[0], bool)
        self.across = np.zeros(tuple(shape[1:]), bool)

    def add(self, start: int, mask: np.ndarray) -> None:
        """Take in ``mask``, the planes from ``start`` on."""
        self.planes[start:start + mask.shape[0]] = mask.any(axis=tuple(range(1, mask.ndim)))
        self.across |= mask.any(axis=0)

    def box(self) -> tuple[slice, ...] | None:
        first = bounding_box(self.planes)
        return None if first is None else (*first, *bounding_box(self.across))


def _box_where(volume: np.ndarray, value: int) -> tuple[slice, ...] | None:
    """``bounding_box(volume == value)``, a slab at a time.

    Example:
        >>> volume = np.zeros((4, 5, 6), np.uint8); volume[1:3, 2, 3:5] = 2
        >>> _box_where(volume, 2)
        (slice(1, 3, None), slice(2, 3, None), slice(3, 5, None))
    """
    found = _SlabBox(volume.shape)
    starts = _slabs(volume.shape)
    for start in starts:
        found.add(start, volume[start:start + starts.step] == value)
    return found.box()


def _plane_runs(occupied: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive True values.

    Example:
        >>> _plane_runs(np.array([0, 1, 1, 0, 0, 1], bool))
        [(1, 3), (5, 6)]
    """
    edges = np.flatnonzero(np.diff(np.concatenate([[False], occupied, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _keep_one_component(view: np.ndarray, found: _Components, keep: int) -> tuple[slice, ...]:
    """Zero the labelled voxels of ``view`` outside component ``keep``, a slab at a time; the box around ``keep``."""
    kept_box = _SlabBox(view.shape)
    kept = np.arange(found.count) == keep
    for k, start in enumerate(found.starts):
        inside = found.slab_table(k, kept, False)[found.slab_labels(k)]
        slab = view[start:found.stop(start)]
        np.multiply(slab, inside, out=slab)  # every labelled voxel has a label: zero those outside ``keep``
        kept_box.add(start, inside)
    return kept_box.box()


def _keep_largest_component(volume: np.ndarray) -> tuple[slice, ...] | None:
    """Zero every 3D component of the liver (label >= 1) but the largest; the box around it, or None.

    No component crosses a plane (along the first axis) that holds no label, so each run of
    occupied planes is labelled on its own, in its own box. A model's stray voxels at the far
    ends of a long scan then cost their own small boxes, instead of one box spanning the scan
    (labelling is linear in the box). Ties go to the component that comes first in the array's
    order, as one labelling of the whole box would decide. Besides ``volume`` itself, memory
    holds slab-sized temporaries only (:class:`_Components`).
    """
    best = None  # (size, box, components, index) of the largest so far
    found = 0
    for start, stop in _plane_runs(volume.any(axis=tuple(range(1, volume.ndim)))):
        box = (slice(start, stop), *bounding_box(volume[start:stop].any(axis=0)))
        region = volume[box]
        components = _find_components(lambda a, b, region=region: region[a:b], region.shape)  # non-zero: liver or tumour
        largest = int(np.argmax(components.sizes))
        found += components.count
        if best is None or components.sizes[largest] > best[0]:
            beaten = best[1] if best is not None else None
            best = (components.sizes[largest], box, components, largest)
        else:
            beaten = box
        if beaten is not None:  # a run without the largest component: islands and background only
            volume[beaten] = 0
    if best is None:
        return None
    _, box, components, largest = best
    if found > 1:
        logger.debug("post-processing: removed %d liver islands", found - 1)
    if components.count == 1:  # the run's own box is the component's
        return box
    inner = _keep_one_component(volume[box], components, largest)
    return tuple(slice(outer.start + part.start, outer.start + part.stop) for outer, part in zip(box, inner))


def _face_dilated(mask: np.ndarray, window: tuple[slice, ...]) -> np.ndarray:
    """``ndimage.binary_dilation(mask)[window]`` (one voxel, face neighbours), computed in ``window`` only.

    The window ORed with its six face-shifted views: several times faster than dilating the
    whole ``mask``, of which only the window is needed. Outside ``mask`` counts as False.

    Example:
        >>> mask = np.zeros((3, 4, 4), bool); mask[1, 0, 0] = True
        >>> _face_dilated(mask, (slice(1, 3), slice(0, 2), slice(0, 2)))[:, :, 0].astype(int).tolist()
        [[1, 1], [1, 0]]
    """
    out = mask[window].copy()
    for axis, part in enumerate(window):
        for step in (-1, 1):  # out[i] |= mask[i + step] along this axis, where that exists
            first, last = max(part.start + step, 0), min(part.stop + step, mask.shape[axis])
            if first >= last:
                continue
            source, target = list(window), [slice(None)] * mask.ndim
            source[axis] = slice(first, last)
            target[axis] = slice(first - step - part.start, last - step - part.start)
            out[tuple(target)] |= mask[tuple(source)]
    return out


def _lesions(view: np.ndarray, at: tuple[slice, ...]) -> tuple[_Components, np.ndarray]:
    """The lesions (label 2) of ``view[at]`` as :class:`_Components`, and which of them touch parenchyma.

    A lesion touches parenchyma when one of its voxels has a face neighbour of label 1 in
    ``view``. Each slab is tested with the one plane of ``view`` on either side that a
    one-voxel dilation reaches, while it is labelled.
    """
    region = view[at]
    grown = [slice(max(a.start - 1, 0), min(a.stop + 1, n)) for a, n in zip(at[1:], view.shape[1:])]
    crop = tuple(slice(a.start - g.start, a.stop - g.start) for a, g in zip(at[1:], grown))  # ``at`` in ``grown``
    touching = []  # per slab, a bool per label

    def on_slab(start: int, stop: int, labels: np.ndarray, offset: int) -> None:
        low, high = max(at[0].start + start - 1, 0), min(at[0].start + stop + 1, view.shape[0])
        planes = slice(at[0].start + start - low, at[0].start + stop - low)
        near = _face_dilated(view[(slice(low, high), *grown)] == 1, (planes, *crop))
        hit = np.zeros(int(labels.max()) + 1, bool)
        # A table, not np.unique (no sort); lesion voxels only, a few per cent of the slab.
        hit[labels[near & (labels > 0)]] = True
        touching.append(hit[1:])

    lesions = _find_components(lambda a, b: region[a:b] == 2, region.shape, on_slab)
    touches = np.zeros(lesions.count, bool)
    touches[lesions.component[1:][np.concatenate(touching)]] = True
    return lesions, touches


def _near_liver(view: np.ndarray, at: tuple[slice, ...], lesions: _Components, candidates: np.ndarray,
                spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """Which of the ``candidates`` lesions (a bool per component) have a voxel within ``margin_mm`` of parenchyma.

    A slab at a time, and in the slab one piece of a lesion at a time: the distance transform
    runs in the piece's box grown by the margin (plus one voxel), which holds every parenchyma
    voxel near enough. Memory scales with the lesion, not the scan or the slab.
    """
    near = np.zeros(lesions.count, bool)
    grow = [int(np.ceil(margin_mm / s)) + 1 for s in spacing]
    pieces = np.arange(lesions.count)
    for k, start in enumerate(lesions.starts):
        mine = np.flatnonzero(lesions.slab_table(k, candidates, False))  # this slab's labels of candidates
        if mine.size == 0:
            continue
        labels = lesions.slab_labels(k)
        component = lesions.slab_table(k, pieces, -1)
        objects = ndimage.find_objects(labels)
        for label in mine:
            inner = objects[label - 1]
            if near[component[label]]:  # another piece of it was near
                continue
            own = [slice(a.start + b.start, a.start + b.stop)
                   for a, b in zip(at, (slice(start + inner[0].start, start + inner[0].stop), *inner[1:]))]
            box = tuple(slice(max(b.start - g, 0), min(b.stop + g, n)) for b, g, n in zip(own, grow, view.shape))
            parenchyma = view[box] == 1
            if not parenchyma.any():  # every parenchyma voxel is farther than the margin
                continue
            distance = ndimage.distance_transform_edt(~parenchyma, sampling=spacing)
            distance = distance[tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(own, box))]
            near[component[label]] = bool((distance[labels[inner] == label] <= margin_mm).any())
    return near


def postprocess_labels(
    labels: np.ndarray, spacing: Sequence[float], options: PostProcessing = PostProcessing()
) -> np.ndarray:
    """Clean a predicted label map in place (and return it); see the module docstring.

    Works inside the bounding box of the predicted liver, and there a slab of planes at a
    time (:class:`_Components`): besides ``labels`` itself, memory holds slab-sized
    temporaries and per-component tables, not a mask or label map of the whole scan.

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
    if options.largest_liver_component:
        box = _keep_largest_component(volume)  # the box around what is left
    else:
        box = bounding_box(volume)  # liver and tumour
    if box is None:
        return labels
    view = volume[box]  # a view: writes go to ``labels``
    min_voxels = max(options.min_lesion_voxels, 0)
    if options.min_lesion_mm3 > 0:
        min_voxels = max(min_voxels, int(math.ceil(options.min_lesion_mm3 / float(np.prod(spacing)) - 1e-9)))
    if not (options.tumor_in_liver or min_voxels > 1):
        return labels
    at = _box_where(view, 2)  # the lesions' box inside the liver's
    if at is None:
        return labels
    lesions, touches = _lesions(view, at)  # labelled once for both rules
    far = np.zeros(lesions.count, bool)
    if options.tumor_in_liver and not touches.all():
        far = ~touches & ~_near_liver(view, at, lesions, ~touches, spacing, options.liver_margin_mm)
        if far.any():
            logger.debug("post-processing: removing %d lesions beyond %.1f mm of the liver", far.sum(),
                         options.liver_margin_mm)
    small = (lesions.sizes < min_voxels) & ~far if min_voxels > 1 else np.zeros(lesions.count, bool)
    if small.any():
        logger.debug("post-processing: %d lesions under %d voxels become liver", small.sum(), min_voxels)
    if not (far.any() or small.any()):
        return labels
    value = np.where(far, 0, np.where(small, 1, 2)).astype(np.uint8)  # 2: unchanged
    region = view[at]
    for k, start in enumerate(lesions.starts):
        slab = region[start:lesions.stop(start)]
        lesion = lesions.slab_labels(k)
        slab[lesion > 0] = lesions.slab_table(k, value, 2)[lesion[lesion > 0]]
    return labels
