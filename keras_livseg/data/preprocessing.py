"""CT preprocessing, defined once: HU window, resize, 2.5D context, standardization.

The same steps run in four places: ``prepare`` (NumPy, writing shards), the tf.data
pipeline (TensorFlow, standardizing parsed slices), the exported SavedModel (TensorFlow,
raw HU in) and ``predict`` (NumPy). Train/serve skew is the classic bug of this field, so
both implementations live side by side in this module and a test feeds one raw slice
through every path and compares.

Order of the steps, for raw HU slices ``[rows, cols, K]``:

1. ``window_hu``: clip to the HU window (default [-200, 250], as H-DenseUNet on LiTS). This
   also removes out-of-field padding (-1024 / -3024) and metal.
2. ``resize``: bilinear to the model size (labels: nearest). The NumPy version reproduces
   ``tf.image.resize`` (half-pixel centres, no antialiasing) to float rounding.
   With ``spacing_mm`` set (nnU-Net's approach, in-plane only), each slice is first
   resampled to that pixel spacing from its own header spacing, then centre-cropped or
   padded (with the window's low end, i.e. air) to the model size: a model then always sees
   the same millimetres per pixel, so a liver scanned at 0.57 mm and one at 3 mm have the
   same size in pixels. The field of view is ``image_size × spacing_mm``. This resampling is
   antialiased (a triangle filter as wide as the reduction, ``tf.image.resize(antialias=True)``,
   reproduced in NumPy): a 0.57 mm scan brought to 3 mm averages its pixels instead of picking
   every fifth, so its noise and texture look like those of a coarser scan. Predictions go back
   through the inverse (crop undone with background, pad removed, bilinear back to the
   slice's own size).
3. ``standardize``: ``(x - mean) / std``. By default mean and std are the statistics of the
   windowed foreground (label > 0) voxels of the training cases, as in nnU-Net's CT
   normalization; ``normalization="volume"`` uses each volume's own windowed statistics and
   ``"none"`` only rescales the window to [-1, 1].

The 2.5D context (``context`` slices as channels) takes the slices next to the centre one, or,
with ``context_mm`` set, the slices nearest to that many millimetres apart: a model trained on
4.5 mm slices and shown a 1.6 mm scan would otherwise see neighbours three times closer than
it learnt from (through-plane, the same mismatch that ``spacing_mm`` removes in-plane). The
stride is whole slices, the one closest to ``context_mm`` (ties to the smaller), at least 1.

Shards store the result of steps 1 and 2 (float16, within 0.125 HU over the default window);
step 3 runs in the input pipeline with the manifest's statistics, so the statistics can be
computed in the same single pass that writes the shards.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

NORMALIZATIONS = ("foreground", "volume", "none")
#: Bumped whenever the same parameters give other model inputs (2: antialiased spacing
#: resampling), so that cached shards are prepared again instead of silently reused.
PREPROCESSING_VERSION = 2
DEFAULT_WINDOW = (-200.0, 250.0)


def _millimetres_or_none(value: Any, what: str) -> float | None:
    """A positive finite distance as float, or ``None`` (also from TOML's ``"none"``, as it has no null).

    ``what`` is the error message's start, naming the setting and an example value.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    try:
        millimetres = float(value)
    except (TypeError, ValueError):
        millimetres = float("nan")
    if not (np.isfinite(millimetres) and millimetres > 0):
        raise ValueError(f"{what}, got {value}")
    return millimetres


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Every parameter of the preprocessing, as stored in ``manifest.json``.

    Attributes:
        window: HU window ``(low, high)``.
        image_size: model input ``(height, width)``.
        context: number of adjacent slices stacked as channels (odd; 1 = plain 2D).
        normalization: ``"foreground"``, ``"volume"`` or ``"none"``.
        mean: standardization mean (HU, after windowing).
        std: standardization standard deviation (HU).
        spacing_mm: target in-plane pixel spacing in mm, or ``None`` (default) to resize every
            slice to ``image_size`` whatever its spacing.
        context_mm: distance in mm between context slices, or ``None`` (default) for adjacent
            slices whatever their thickness (see :meth:`context_stride`).

    Example:
        >>> prep = Preprocessing(window=(-200.0, 250.0), image_size=(64, 64), mean=100.0, std=50.0)
        >>> float(prep.standardize(np.array([150.0]))[0])
        1.0
    """

    window: tuple[float, float] = DEFAULT_WINDOW
    image_size: tuple[int, int] = (256, 256)
    context: int = 1
    normalization: str = "foreground"
    mean: float = 0.0
    std: float = 1.0
    spacing_mm: float | None = None
    context_mm: float | None = None

    def __post_init__(self) -> None:
        low, high = (float(v) for v in self.window)
        if not low < high:
            raise ValueError(f"HU window must be low < high, got {self.window}; e.g. --window -200,250")
        object.__setattr__(self, "window", (low, high))
        size = self.image_size
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 8:
            raise ValueError(f"image_size must be (height, width) of at least 8 pixels, got {self.image_size}")
        object.__setattr__(self, "image_size", size)
        if self.context < 1 or self.context % 2 == 0:
            raise ValueError(f"context must be an odd number of slices (1, 3, 5...), got {self.context}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.normalization == "none":
            # Map the window onto [-1, 1]: mean at the window's centre, std half its width.
            object.__setattr__(self, "mean", (low + high) / 2.0)
            object.__setattr__(self, "std", (high - low) / 2.0)
        if not self.std > 0:
            raise ValueError(f"standardization std must be positive, got {self.std}")
        object.__setattr__(self, "spacing_mm", _millimetres_or_none(
            self.spacing_mm, "spacing_mm must be a positive number of millimetres per pixel (e.g. 1.5) or none"))
        object.__setattr__(self, "context_mm", _millimetres_or_none(
            self.context_mm, "context_mm must be a positive distance in millimetres between context slices (e.g. 4.5) or none"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": list(self.window),
            "image_size": list(self.image_size),
            "context": self.context,
            "normalization": self.normalization,
            "mean": float(self.mean),
            "std": float(self.std),
            "spacing_mm": self.spacing_mm,
            "context_mm": self.context_mm,
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "Preprocessing":
        return cls(
            window=tuple(config["window"]),
            image_size=tuple(config["image_size"]),
            context=int(config["context"]),
            normalization=config["normalization"],
            mean=float(config["mean"]),
            std=float(config["std"]),
            spacing_mm=config.get("spacing_mm"),  # absent in files written before resampling existed
            context_mm=config.get("context_mm"),  # absent before context strides existed: adjacent slices
        )

    def with_statistics(self, mean: float, std: float) -> "Preprocessing":
        return dataclasses.replace(self, mean=float(mean), std=float(std))

    def context_stride(self, slice_mm: float | None) -> int:
        """Slices between context channels for slices ``slice_mm`` apart: 1 without ``context_mm``.

        The whole number of slices whose distance is closest to ``context_mm``, ties going to
        the smaller stride, and at least 1.

        Example:
            >>> prep = Preprocessing(context=3, context_mm=4.5)
            >>> [prep.context_stride(mm) for mm in (0.7, 1.6, 3.0, 4.5, 6.0)]
            [6, 3, 1, 1, 1]
        """
        if self.context_mm is None or self.context == 1:
            return 1
        mm = float("nan") if slice_mm is None else float(slice_mm)
        if not (np.isfinite(mm) and mm > 0):
            raise ValueError(
                f"slice spacing {slice_mm} mm is not positive: this model takes context slices "
                f"{self.context_mm:g} mm apart and needs the volume's slice spacing; fix the file's header "
                "(pixdim[3]) or prepare without preprocessing.context_mm"
            )
        return max(1, math.ceil(self.context_mm / mm - 0.5))

    def context_offsets(self, slice_mm: float | None) -> np.ndarray:
        """Offsets of the context channels from the centre slice, feet to head.

        Example:
            >>> Preprocessing(context=3, context_mm=4.5).context_offsets(1.6).tolist()
            [-3, 0, 3]
        """
        half = self.context // 2
        return self.context_stride(slice_mm) * np.arange(-half, half + 1)

    # -- NumPy path ---------------------------------------------------------------------
    def window_hu(self, hu: np.ndarray) -> np.ndarray:
        """Clip raw HU to the window, as a new float32 array (``hu`` is left as it was)."""
        # One new array, clipped in place: a second fresh array costs more in page faults than
        # the clip itself (a 16-slice chunk at 512 px: 0.6 ms against 3.7 ms).
        windowed = hu.astype(np.float32, copy=True)
        return np.clip(windowed, np.float32(self.window[0]), np.float32(self.window[1]), out=windowed)

    def standardize(self, windowed: np.ndarray, mean: float | None = None, std: float | None = None) -> np.ndarray:
        """Z-score windowed HU with the stored (or given per-volume) statistics."""
        mean = self.mean if mean is None else mean
        std = self.std if std is None else std
        return ((windowed - np.float32(mean)) / np.float32(std)).astype(np.float32, copy=False)

    def resampled_size(self, rows: int, cols: int, spacing: Sequence[float] | None) -> tuple[int, int]:
        """The size a ``rows × cols`` slice of pixel ``spacing`` (mm) takes before the crop/pad.

        Without ``spacing_mm`` this is ``image_size``. Computed in float32 as the TF twin does.

        Example:
            >>> Preprocessing(image_size=64, spacing_mm=2.0).resampled_size(512, 512, (0.5, 0.5))
            (128, 128)
        """
        if self.spacing_mm is None:
            return self.image_size
        if spacing is None:
            raise ValueError(
                "this model resamples to a pixel spacing of "
                f"{self.spacing_mm} mm and needs each slice's spacing; pass the volume's header spacing"
            )
        row_mm, col_mm = (float(v) for v in spacing[:2])
        if not (np.isfinite(row_mm) and np.isfinite(col_mm) and row_mm > 0 and col_mm > 0):
            raise ValueError(
                f"pixel spacing {row_mm} x {col_mm} mm is not positive; fix the file's header (pixdim) "
                "or prepare without preprocessing.spacing_mm"
            )
        target = np.float32(self.spacing_mm)
        height = np.round(np.float32(rows) * np.float32(row_mm) / target)
        width = np.round(np.float32(cols) * np.float32(col_mm) / target)
        return max(int(height), 1), max(int(width), 1)

    def slices_to_model_grid(self, hu_slices: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
        """Window and resize raw HU slices ``[rows, cols, N]`` to ``[H, W, N]`` (not standardized).

        With ``spacing_mm`` set, ``spacing`` (the slices' ``(row, col)`` mm) is required: the
        slices are resampled to ``spacing_mm`` and centre-cropped/padded with air to ``H × W``.
        """
        windowed = self.window_hu(hu_slices)
        # Slices first: CT slices are contiguous in NIfTI's (Fortran) order.
        stack = np.moveaxis(windowed.reshape(windowed.shape[:2] + (-1,)), -1, 0)
        gridded = self.stack_to_model_grid(stack, spacing)
        return np.moveaxis(gridded, 0, -1).reshape(gridded.shape[1:] + windowed.shape[2:])

    def stack_to_model_grid(self, windowed: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
        """Windowed slices first, ``[n, rows, cols]`` → ``[n, H, W]``: the one resize of every path.

        ``prepare`` calls it on chunks of a volume, :meth:`slices_to_model_grid` on stacks of
        slices; with ``spacing_mm`` it resamples (antialiased) and centre-crops/pads with air.
        """
        if self.spacing_mm is None:
            return resize_stack(windowed, self.image_size)
        resampled = resize_stack_antialiased(windowed, self.resampled_size(windowed.shape[1], windowed.shape[2], spacing))
        return np.moveaxis(crop_or_pad(np.moveaxis(resampled, 0, -1), self.image_size, fill=self.window[0]), -1, 0)

    def labels_to_model_grid(self, labels: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
        """Nearest-neighbour twin of :meth:`slices_to_model_grid` for label maps ``[rows, cols, ...]``."""
        if self.spacing_mm is None:
            return resize_nearest(labels, self.image_size)
        resampled = resize_nearest(labels, self.resampled_size(*labels.shape[:2], spacing))
        return crop_or_pad(resampled, self.image_size, fill=0)

    def model_grid_to_slices(self, probabilities: np.ndarray, size: Sequence[int],
                             spacing: Sequence[float] | None = None) -> np.ndarray:
        """Undo the crop/pad of :meth:`slices_to_model_grid` on ``[B, H, W, C]`` probabilities.

        Returns ``[B, h, w, C]`` on the resampled grid (``h, w`` = :meth:`resampled_size` of
        ``size``); pixels the model never saw (cropped away) are background. The caller resizes
        bilinearly to ``size``. Without ``spacing_mm`` the input comes back unchanged.
        """
        if self.spacing_mm is None:
            return probabilities
        height, width = self.resampled_size(int(size[0]), int(size[1]), spacing)
        probabilities = np.asarray(probabilities, np.float32)
        restored = np.zeros((probabilities.shape[0], height, width, probabilities.shape[-1]), np.float32)
        restored[..., 0] = 1.0  # one-hot background where the model saw nothing
        # The inverse of the input's crop/pad: the same offsets, source and target swapped.
        source, target = crop_or_pad_slices(probabilities.shape[1:3], (height, width))
        restored[(slice(None), *target)] = probabilities[(slice(None), *source)]
        return restored

    def model_input(self, hu_volume: np.ndarray, indices: Sequence[int],
                    spacing: Sequence[float] | None = None) -> np.ndarray:
        """Raw canonical volume ``[rows, cols, slices]`` → standardized ``[n, H, W, context]``.

        In ``"volume"`` mode the volume's own windowed statistics are used (see
        :func:`volume_statistics`). ``spacing`` is the volume's ``(row, col[, slice])`` mm,
        required with ``spacing_mm`` (row, col) and with ``context_mm`` (slice).
        """
        mean = std = None
        if self.normalization == "volume":
            mean, std = volume_statistics(self.window_hu(hu_volume))
        stride = self.context_stride(spacing[2] if spacing is not None and len(spacing) > 2 else None)
        stacks = [self.slices_to_model_grid(context_stack(hu_volume, int(i), self.context, stride), spacing)
                  for i in indices]
        return self.standardize(np.stack(stacks, axis=0), mean, std)

    # -- TensorFlow path ------------------------------------------------------------------
    def tf_model_input(self, hu_slices, mean=None, std=None, spacing=None):
        """Raw HU ``[B, rows, cols, K]`` (any size) → standardized ``[B, H, W, K]`` float32, in TF.

        ``spacing``: the slices' ``(row, col)`` pixel spacing in mm (a tensor), required with
        ``spacing_mm``.
        """
        import tensorflow as tf  # only the data and export stages import TensorFlow

        windowed = tf.clip_by_value(tf.cast(hu_slices, tf.float32), self.window[0], self.window[1])
        if self.spacing_mm is None:
            resized = tf.image.resize(windowed, self.image_size, method="bilinear")
        else:
            resized = tf.image.resize(windowed, self.tf_resampled_size(tf.shape(windowed)[1:3], spacing),
                                      method="bilinear", antialias=True)
            # resize_with_crop_or_pad pads with zeros: shift so that zero is the window's low end (air).
            low = tf.constant(self.window[0], tf.float32)
            resized = tf.image.resize_with_crop_or_pad(resized - low, *self.image_size) + low
        return self.tf_standardize(resized, mean, std)

    def tf_resampled_size(self, size, spacing):
        """TF twin of :meth:`resampled_size`: ``size`` int32 ``[2]``, ``spacing`` float ``[2]`` mm."""
        import tensorflow as tf

        scaled = tf.round(tf.cast(size, tf.float32) * tf.cast(spacing, tf.float32)[:2] / tf.constant(self.spacing_mm, tf.float32))
        return tf.maximum(tf.cast(scaled, tf.int32), 1)

    def tf_model_grid_to_slices(self, probabilities, size, spacing):
        """TF twin of :meth:`model_grid_to_slices` followed by the bilinear resize to ``size``."""
        import tensorflow as tf

        if self.spacing_mm is not None:
            resampled = self.tf_resampled_size(size, spacing)
            background = tf.one_hot(0, tf.shape(probabilities)[-1], dtype=tf.float32)
            probabilities = tf.image.resize_with_crop_or_pad(probabilities - background, resampled[0], resampled[1])
            probabilities = probabilities + background
        return tf.image.resize(probabilities, size, method="bilinear")

    def tf_standardize(self, windowed, mean=None, std=None):
        import tensorflow as tf

        mean = tf.constant(self.mean, tf.float32) if mean is None else tf.cast(mean, tf.float32)
        std = tf.constant(self.std, tf.float32) if std is None else tf.cast(std, tf.float32)
        return (tf.cast(windowed, tf.float32) - mean) / std


def context_stack(volume: np.ndarray, index: int, context: int, stride: int = 1) -> np.ndarray:
    """Slices ``index + stride * (-context//2 .. context//2)`` as channels, edges repeated.

    Args:
        volume: canonical ``[rows, cols, slices]`` array.
        index: the centre slice.
        context: odd number of slices.
        stride: slices between channels (:meth:`Preprocessing.context_stride`; 1: adjacent).

    Returns:
        ``[rows, cols, context]``, channels ordered feet to head.

    Example:
        >>> v = np.arange(3)[None, None, :] * np.ones((2, 2, 1))
        >>> context_stack(v, 0, 3)[0, 0].tolist()
        [0.0, 0.0, 1.0]
    """
    half = context // 2
    picks = np.clip(index + stride * np.arange(-half, half + 1), 0, volume.shape[2] - 1)
    return volume[:, :, picks]


def crop_or_pad(array: np.ndarray, size: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """Centre-crop or pad the first two axes of ``array`` to ``size``, as
    ``tf.image.resize_with_crop_or_pad`` does (offset ``(larger - smaller) // 2``).

    Example:
        >>> crop_or_pad(np.arange(4.0).reshape(4, 1), (2, 3), fill=-1.0).tolist()
        [[-1.0, 1.0, -1.0], [-1.0, 2.0, -1.0]]
    """
    out = np.full(tuple(int(s) for s in size[:2]) + array.shape[2:], fill, dtype=array.dtype)
    source, target = crop_or_pad_slices(array.shape[:2], out.shape[:2])
    out[target] = array[source]
    return out


def crop_or_pad_slices(have: Sequence[int], want: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The ``(source, target)`` index slices of :func:`crop_or_pad` from shape ``have`` to ``want``.

    Swapping ``have`` and ``want`` gives the inverse: where the model's grid came from.

    Example:
        >>> crop_or_pad_slices((4, 1), (2, 3))
        ((slice(1, 3, None), slice(0, 1, None)), (slice(0, 2, None), slice(1, 2, None)))
    """
    source, target = [], []
    for size_in, size_out in zip(have, want):
        length = min(size_in, size_out)
        start_in, start_out = max(size_in - size_out, 0) // 2, max(size_out - size_in, 0) // 2
        source.append(slice(start_in, start_in + length))
        target.append(slice(start_out, start_out + length))
    return tuple(source), tuple(target)


@functools.lru_cache(maxsize=64)
def antialias_weights(in_size: int, out_size: int) -> np.ndarray:
    """The ``[out_size, in_size]`` matrix of ``tf.image.resize(method="bilinear", antialias=True)``.

    TensorFlow's ``scale_and_translate`` with a triangle kernel widened by the reduction factor
    (never narrower than 1 pixel), weights normalized per output pixel; float32 as in TF.

    Example:
        >>> [round(w, 4) for w in antialias_weights(4, 2)[0].tolist()]
        [0.4286, 0.4286, 0.1429, 0.0]
    """
    inverse = np.float32(in_size) / np.float32(out_size)
    width = max(inverse, np.float32(1.0))
    weights = np.zeros((out_size, in_size), np.float32)
    for x in range(out_size):
        centre = (np.float32(x) + np.float32(0.5)) * inverse
        start = min(max(int(np.ceil(centre - width - np.float32(0.5))), 0), in_size - 1)
        end = min(max(int(np.floor(centre + width - np.float32(0.5))), 0), in_size - 1) + 1
        source = np.arange(start, end, dtype=np.float32)
        row = np.maximum(np.float32(0.0), np.float32(1.0) - np.abs((source + np.float32(0.5) - centre) / width))
        total = row.sum(dtype=np.float32)
        weights[x, start:end] = row / total if total > 0 else row
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=64)
def _sparse_antialias_weights(in_size: int, out_size: int):
    from scipy import sparse

    return sparse.csr_array(antialias_weights(in_size, out_size))


def resize_stack_antialiased(slices: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Antialiased twin of :func:`resize_stack`: ``[n, rows, cols]`` → ``[n, H, W]``.

    Products with the sparse weight matrices: a 512 → 137 row has 7 non-zero taps out of 512,
    so dense products spent over 95 % of their time on zeros. Each slice is first resized
    along its axis that is slowest in memory (for NIfTI's Fortran-ordered slices, the
    columns), which a sparse product reads in place; only the smaller intermediate is then
    transposed for the other axis. (Resizing rows first on a Fortran-ordered stack
    transposed the whole input, and then the intermediate: 2-4x the time.)

    Example:
        >>> resize_stack_antialiased(np.ones((2, 8, 6), np.float32), (4, 3)).shape
        (2, 4, 3)
    """
    slices = np.asarray(slices, dtype=np.float32)
    n, height, width = slices.shape
    out_h, out_w = int(size[0]), int(size[1])
    rows = _sparse_antialias_weights(height, out_h)  # [H, rows]
    cols = _sparse_antialias_weights(width, out_w)  # [W, cols]
    if n == 0:
        return np.zeros((0, out_h, out_w), np.float32)
    if slices[0].flags.f_contiguous and not slices[0].flags.c_contiguous:
        by_cols = np.stack([cols @ slices[k].T for k in range(n)])  # [n, W, rows]; slices[k].T is C-ordered
        resized = rows @ _transposed(by_cols.reshape(n * out_w, height))  # [H, n * W]
        return np.asarray(resized, np.float32).reshape(out_h, n, out_w).transpose(1, 0, 2)
    by_rows = np.stack([rows @ np.ascontiguousarray(slices[k]) for k in range(n)])  # [n, H, cols]
    resized = cols @ _transposed(by_rows.reshape(n * out_h, width))  # [W, n * H]
    return np.asarray(resized, np.float32).reshape(out_w, n, out_h).transpose(1, 2, 0)


def _transposed(matrix: np.ndarray, block: int = 32) -> np.ndarray:
    """``matrix.T`` as a C-ordered copy, ``block`` source rows at a time.

    NumPy copies a transposed view element by element across the whole matrix, a cache miss
    a write; a band of 32 rows stays in cache: 3-7x faster on 512-wide matrices.
    """
    out = np.empty(matrix.shape[::-1], matrix.dtype)
    for start in range(0, matrix.shape[0], block):
        out[:, start:start + block] = matrix[start:start + block].T
    return out


def _linear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # tf.image.resize (bilinear, half-pixel centres): in = (out + 0.5) * scale - 0.5, in float32.
    scale = np.float32(in_size) / np.float32(out_size)
    position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(position)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(position), in_size - 1).astype(np.intp)
    return lower, upper, (position - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of ``[rows, cols, ...]`` to ``size``, matching ``tf.image.resize``.

    Example:
        >>> resize_bilinear(np.ones((4, 6, 2), np.float32), (2, 3)).shape
        (2, 3, 2)
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        return resize_stack(image[None], size)[0]
    # Slices first: CT slices are contiguous in NIfTI's (Fortran) order, so the gathers
    # below then read memory in order.
    moved = np.moveaxis(image.reshape(image.shape[:2] + (-1,)), -1, 0)
    out = resize_stack(moved, size)
    return np.moveaxis(out, 0, -1).reshape(out.shape[1:] + image.shape[2:])


def labels_at_size(probabilities: np.ndarray, size: Sequence[int],
                   resize: Callable[[np.ndarray, tuple[int, int]], np.ndarray] | None = None) -> np.ndarray:
    """``argmax`` of the bilinear resize of ``[B, h, w, C]`` probabilities to ``size``, as uint8.

    The same labels as resizing every pixel and taking the argmax, but only the output pixels
    within reach of a non-background source pixel are computed: bilinear weights are
    non-negative, so an output pixel whose (up to four) source pixels all rank background
    first ranks it first too (ties go to the lowest class, as ``np.argmax`` does). A trained
    model labels a few per cent of a scan, and this skips the rest.

    ``resize``, when given, is a faster whole-image bilinear resize with the same result
    (``[B, h, w, C]`` → ``[B, rows, cols, C]``, e.g. TensorFlow's multithreaded kernel), used
    instead when the foreground's surroundings cover more than half of the output.

    Example:
        >>> p = np.zeros((1, 4, 4, 3), np.float32); p[..., 0] = 1; p[0, 1, 1] = [0, 1, 0]
        >>> labels_at_size(p, (8, 8))[0, 1:5, 1:5].max(), labels_at_size(p, (8, 8))[0, 6:, 6:].max()
        (np.uint8(1), np.uint8(0))
    """
    batch, height, width, classes = probabilities.shape
    rows, cols = int(size[0]), int(size[1])
    labels = np.zeros((batch, rows, cols), np.uint8)
    if classes < 2:  # one output channel: every pixel is class 0, as np.argmax says
        return labels
    # argmax > 0: some class beats background strictly (a tie goes to background, as in argmax).
    foreground = probabilities[..., 1]
    for k in range(2, classes):
        foreground = np.maximum(foreground, probabilities[..., k])
    foreground = foreground > probabilities[..., 0]
    source_rows = np.flatnonzero(foreground.any(axis=(0, 2)))
    if source_rows.size == 0:
        return labels
    source_cols = np.flatnonzero(foreground.any(axis=(0, 1)))
    top, bottom, y_lerp = _linear_weights(height, rows)
    left, right, x_lerp = _linear_weights(width, cols)
    # Output rows and columns that read a source row/column inside the foreground's box.
    ys = np.flatnonzero((bottom >= source_rows[0]) & (top <= source_rows[-1]))
    xs = np.flatnonzero((right >= source_cols[0]) & (left <= source_cols[-1]))
    if resize is not None and ys.size * xs.size > 0.5 * rows * cols:
        return argmax_classes(resize(probabilities, (rows, cols)))
    p = np.asarray(probabilities, np.float32)
    upper, lower = p[:, top[ys]], p[:, bottom[ys]]
    by_rows = upper + (lower - upper) * y_lerp[ys][None, :, None, None]
    first, second = by_rows[:, :, left[xs]], by_rows[:, :, right[xs]]
    resized = first + (second - first) * x_lerp[xs][None, None, :, None]
    labels[:, ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] = argmax_classes(resized)
    return labels


def argmax_classes(probabilities: np.ndarray) -> np.ndarray:
    """``np.argmax(probabilities, axis=-1)`` as uint8, for a few classes on the last axis.

    One comparison pass per class: NumPy's argmax over a short, innermost axis runs ~2x slower
    (3 classes). Ties go to the lowest class, as with ``np.argmax``.

    Example:
        >>> argmax_classes(np.array([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.1, 0.3, 0.6]], np.float32)).tolist()
        [1, 0, 2]
    """
    classes = probabilities.shape[-1]
    if classes == 1:
        return np.zeros(probabilities.shape[:-1], np.uint8)
    best = probabilities[..., 0]
    labels = (probabilities[..., 1] > best).view(np.uint8)  # bool and uint8 share their 0/1 bytes
    if classes > 2:
        best = np.maximum(best, probabilities[..., 1])
    for k in range(2, classes):
        better = probabilities[..., k] > best
        labels[better] = k
        if k + 1 < classes:
            np.maximum(best, probabilities[..., k], out=best)
    return labels


def resize_stack(slices: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a stack ``[n, rows, cols]`` → ``[n, H, W]`` (tf.image.resize semantics)."""
    out_h, out_w = int(size[0]), int(size[1])
    slices = np.asarray(slices, dtype=np.float32)
    if slices.shape[1] == out_h and slices.shape[2] == out_w:
        return slices.copy()
    top_i, bottom_i, y_lerp = _linear_weights(slices.shape[1], out_h)
    left_i, right_i, x_lerp = _linear_weights(slices.shape[2], out_w)
    # Rows first (fewer after downsampling), then columns; bilinear is separable.
    top_rows, bottom_rows = _take(slices, top_i, 1), _take(slices, bottom_i, 1)
    rows = top_rows + (bottom_rows - top_rows) * y_lerp[None, :, None]
    left, right = _take(rows, left_i, 2), _take(rows, right_i, 2)
    return left + (right - left) * x_lerp[None, None, :]


def _take(array: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    # Evenly spaced indices (integer zoom factors: 512 -> 256) become a strided view, not a gather copy.
    if index.size > 1:
        steps = np.diff(index)
        if steps[0] > 0 and np.all(steps == steps[0]):
            picker = [slice(None)] * array.ndim
            picker[axis] = slice(int(index[0]), int(index[-1]) + 1, int(steps[0]))
            return array[tuple(picker)]
    return np.take(array, index, axis=axis)


def resize_nearest(labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of ``[rows, cols, ...]``, matching ``tf.image.resize(method="nearest")``."""
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = labels.shape[:2]
    rows = np.minimum(
        np.floor((np.arange(out_h, dtype=np.float32) + 0.5) * (np.float32(in_h) / np.float32(out_h))), in_h - 1
    ).astype(np.intp)
    cols = np.minimum(
        np.floor((np.arange(out_w, dtype=np.float32) + 0.5) * (np.float32(in_w) / np.float32(out_w))), in_w - 1
    ).astype(np.intp)
    return labels[rows][:, cols]


def volume_statistics(windowed: np.ndarray) -> tuple[float, float]:
    """Mean and std of a windowed volume's voxels above its minimum (the body, not air).

    Used by ``normalization="volume"``; a volume with no voxel above its minimum gives
    ``(minimum, 1.0)``. :class:`BodyStatistics` computes the same chunk by chunk.
    """
    stats = BodyStatistics(float(windowed.min()))
    stats.update(windowed)
    return stats.result()


class BodyStatistics:
    """Running mean and std of windowed voxels above ``floor``, in float64, chunk by chunk.

    The one definition of per-volume statistics: ``prepare`` feeds it the chunks it windows
    anyway, ``predict`` streams a volume through it, :func:`volume_statistics` takes a whole
    array. ``floor`` is the windowed volume's minimum (see :func:`body_floor`).

    Example:
        >>> stats = BodyStatistics(floor=-200.0)
        >>> stats.update(np.array([-200.0, 40.0, 60.0]))
        >>> stats.result()
        (50.0, 10.0)
    """

    def __init__(self, floor: float) -> None:
        self.floor = float(floor)
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0

    def update(self, windowed: np.ndarray) -> None:
        body = np.asarray(windowed)[np.asarray(windowed) > self.floor]
        self.count += body.size
        # Accumulated in float64 without float64 copies (and not through BLAS, whose threads
        # would contend with prepare's other workers): exact for integer HU.
        self.total += float(body.sum(dtype=np.float64))
        self.total_sq += float(np.einsum("i,i->", body.ravel(), body.ravel(), dtype=np.float64))

    def result(self) -> tuple[float, float]:
        if self.count == 0:
            return self.floor, 1.0
        mean = self.total / self.count
        std = float(np.sqrt(max(self.total_sq / self.count - mean * mean, 0.0)))
        return mean, std if std > 0 else 1.0


def body_floor(volume: np.ndarray, window: Sequence[float]) -> float:
    """The windowed minimum of a raw HU volume, without windowing all of it."""
    return float(min(max(float(volume.min()), window[0]), window[1]))


class ForegroundStatistics:
    """Mergeable statistics of windowed foreground HU: exact mean/std and 1-HU histogram.

    One instance per case is computed in the worker that reads the case; the training
    split's instances are merged into the manifest's standardization statistics.

    Example:
        >>> stats = ForegroundStatistics((-200.0, 250.0))
        >>> stats.update(np.array([50.0, 70.0]))
        >>> stats.mean, round(stats.std, 3)
        (60.0, 10.0)
    """

    def __init__(self, window: Sequence[float]) -> None:
        self.window = (float(window[0]), float(window[1]))
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.bins = int(np.ceil(self.window[1] - self.window[0])) + 1
        self.histogram = np.zeros(self.bins, dtype=np.int64)

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        self.count += int(values.size)
        self.total += float(values.sum())
        self.total_sq += float(np.square(values).sum())
        index = np.clip(np.round(values - self.window[0]).astype(np.int64), 0, self.bins - 1)
        self.histogram += np.bincount(index, minlength=self.bins)

    def merge(self, other: "ForegroundStatistics") -> None:
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        self.histogram += other.histogram

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        if not self.count:
            return 1.0
        variance = max(self.total_sq / self.count - self.mean**2, 0.0)
        return float(np.sqrt(variance)) or 1.0

    def percentile(self, q: float) -> float:
        if not self.count:
            return float("nan")
        cumulative = np.cumsum(self.histogram)
        return float(np.searchsorted(cumulative, q / 100.0 * self.count) + self.window[0])

    def to_dict(self) -> dict[str, float]:
        return {
            "voxels": self.count,
            "mean": self.mean,
            "std": self.std,
            "percentile_00_5": self.percentile(0.5),
            "percentile_99_5": self.percentile(99.5),
        }


class StatisticsSum:
    """Exact sum of per-case :class:`ForegroundStatistics` parts, whatever the order of adding.

    Sums of floats depend on their order in the last bits; a parallel engine (Beam's combine)
    adds the cases in any order, and its manifest must equal the local engine's. Totals are
    therefore kept as exact fractions (every float is one) and rounded once, at the end.

    Example:
        >>> parts = [{"count": 1, "total": 0.1, "total_sq": 0.01, "histogram": [1, 0]},
        ...          {"count": 1, "total": 0.2, "total_sq": 0.04, "histogram": [0, 1]}]
        >>> a, b = StatisticsSum((0.0, 1.0)), StatisticsSum((0.0, 1.0))
        >>> a.add(parts[0]); a.add(parts[1]); b.add(parts[1]); b.add(parts[0])
        >>> a.result().total == b.result().total
        True
    """

    def __init__(self, window: Sequence[float]) -> None:
        self.window = (float(window[0]), float(window[1]))
        self.count = 0
        self.total = Fraction(0)
        self.total_sq = Fraction(0)
        self.histogram: np.ndarray | None = None

    def add(self, part: Mapping[str, Any]) -> None:
        """Add one case's ``{"count", "total", "total_sq", "histogram"}`` (as in prepare's summaries)."""
        self.count += int(part["count"])
        self.total += Fraction(float(part["total"]))
        self.total_sq += Fraction(float(part["total_sq"]))
        histogram = np.asarray(part["histogram"], dtype=np.int64)
        self.histogram = histogram.copy() if self.histogram is None else self.histogram + histogram

    def merge(self, other: "StatisticsSum") -> "StatisticsSum":
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        if other.histogram is not None:
            self.histogram = other.histogram.copy() if self.histogram is None else self.histogram + other.histogram
        return self

    def result(self) -> ForegroundStatistics:
        stats = ForegroundStatistics(self.window)
        stats.count = self.count
        stats.total = float(self.total)
        stats.total_sq = float(self.total_sq)
        if self.histogram is not None:
            stats.histogram = self.histogram.copy()
        return stats


def merge_foreground(window: Sequence[float], parts: Iterable[Mapping[str, Any]]) -> ForegroundStatistics:
    """The foreground statistics of several cases from their parts (exact, order-independent)."""
    total = StatisticsSum(window)
    for part in parts:
        total.add(part)
    return total.result()


PREPROCESSING_FILE = "preprocessing.json"
#: Entries of a run's ``preprocessing.json`` that describe the trained model and travel with it
#: into an export: the post-processing chosen on validation cases
#: (:mod:`keras_livseg.inference.tuning`) and the flips it was trained with, the only ones
#: test-time augmentation may average over (:attr:`~keras_livseg.inference.SegmentationModel.tta_flips`).
MODEL_RECORD_KEYS = ("postprocessing", "tta_flips")


def model_record(metadata: dict[str, Any]) -> dict[str, Any]:
    """The :data:`MODEL_RECORD_KEYS` entries of a ``preprocessing.json``'s metadata.

    Example:
        >>> model_record({"postprocessing": {"min_lesion_mm3": 10.0}, "tta_flips": [], "model": "unet"})
        {'postprocessing': {'min_lesion_mm3': 10.0}, 'tta_flips': []}
    """
    return {key: metadata[key] for key in MODEL_RECORD_KEYS if metadata.get(key) is not None}


def write_preprocessing_json(path, prep: Preprocessing, **metadata: Any) -> None:
    """Write ``{"preprocessing": ..., **metadata}`` atomically (run folders, exports).

    ``fit`` writes ``<run>/preprocessing.json`` beside ``checkpoints/``; the export copies it
    into the SavedModel's ``assets.extra/``. ``predict`` finds it with :func:`find_preprocessing_json`.
    """
    from keras_livseg.data.atomic import atomic_write_json

    atomic_write_json(path, {"preprocessing": prep.to_dict(), **metadata}, sort_keys=True)


def read_preprocessing_json(path) -> tuple[Preprocessing, dict[str, Any]]:
    """Read a file written by :func:`write_preprocessing_json`: ``(Preprocessing, metadata)``."""
    import json
    from pathlib import Path

    payload = json.loads(Path(path).read_text())
    return Preprocessing.from_dict(payload.pop("preprocessing")), payload


def find_preprocessing_json(model_path):
    """Locate the preprocessing of a model: a ``.keras`` file's folder or its parent (the run
    folder), or a SavedModel's ``assets.extra/``. Returns the path or ``None``."""
    from pathlib import Path

    model_path = Path(model_path)
    candidates = [
        model_path / "assets.extra" / PREPROCESSING_FILE,
        model_path.parent / PREPROCESSING_FILE,
        model_path.parent.parent / PREPROCESSING_FILE,
    ]
    return next((c for c in candidates if c.is_file()), None)
