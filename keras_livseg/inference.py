"""Whole-volume inference: a trained model on CT volumes → uint8 label maps on the input's grid.

Three pieces, usable alone:

- :class:`SegmentationModel` loads a ``.keras`` checkpoint (with the ``preprocessing.json`` of its
  run), an exported SavedModel folder, or a TF Serving base folder (highest version), and
  exposes one call, :meth:`SegmentationModel.predict_slices`: raw HU slices of any size in,
  class probabilities at the same size out. Preprocessing (window, resize, standardization)
  is the one defined in :mod:`keras_livseg.data.preprocessing`, or the one built into the
  exported graph, so training and inference cannot drift apart.
- :func:`predict_volume` streams a canonical volume through the model ``batch_size`` slices at a
  time. Memory stays bounded: only one batch of float32 probabilities exists at a time; the
  volume keeps uint8 labels and, on request, uint8 probabilities (0–255 per class), so a
  512×512×800 scan needs 200 MB of labels (+600 MB with probabilities) beyond the CT itself.
  Optional flip test-time augmentation averages the prediction with that of the
  left-right-flipped slices, and :func:`postprocess_labels` cleans the result.
- :func:`predict_paths` finds the cases (a NIfTI file, a folder of them, a LiTS or MSD dataset),
  predicts each and writes the label map **on the input's own grid, shape and affine**
  (``volume-N.nii.gz`` → ``segmentation-N.nii.gz``, any other name unchanged), plus optional 4D
  uint8 probability maps.

Post-processing (:class:`PostProcessing`), in this order, each step optional:

1. **Largest liver component**: only the largest 3D connected component (face connectivity) of
   the liver (label >= 1, tumor included, as LiTS) is kept; every other island becomes 0.
2. **Tumor inside the liver**: tumor components (lesions) whose nearest voxel is farther than
   ``liver_margin_mm`` from the liver parenchyma (label 1) become background: a lesion is by
   definition in the liver, and a "tumor" blob outside it is a false positive (bowel, kidney
   cyst). Judged per lesion, so a large lesion keeps its centre and an exophytic one its bulge.
3. **Minimum lesion size**: tumor components smaller than ``min_lesion_mm3`` (in mm³ from the
   voxel spacing) or ``min_lesion_voxels`` become liver (label 1): they sit inside the liver, so
   the likeliest truth is parenchyma. The default, 10 mm³, is below the volume of a 3 mm sphere
   (14 mm³): it removes speckle but no lesion a radiologist could report.

Example:
    >>> model = SegmentationModel.load("runs/demo/checkpoints/best.keras")  # doctest: +SKIP
    >>> written = predict_paths(model, ["data/LiTS/volume-3.nii"], "predictions")  # doctest: +SKIP
    >>> written[0].output.name  # doctest: +SKIP
    'segmentation-3.nii'
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from keras_livseg.data.preprocessing import (
    BodyStatistics,
    Preprocessing,
    body_floor,
    context_stack,
    find_preprocessing_json,
    read_preprocessing_json,
)
from keras_livseg.data.cases import output_names, resolve_inputs
from keras_livseg.data.volumes import (
    Case,
    DataError,
    NUM_CLASSES,
    apply_label_map,
    load_case,
    load_nifti,
    save_like,
)

logger = logging.getLogger(__name__)

#: Default minimum lesion volume kept by post-processing (mm³), see the module docstring.
DEFAULT_MIN_LESION_MM3 = 10.0
#: Default distance (mm) from the liver parenchyma within which tumor is kept.
DEFAULT_LIVER_MARGIN_MM = 5.0
#: The export's second signature input when the model resamples to a fixed pixel spacing.
SPACING_INPUT = "pixel_spacing_mm"


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class SegmentationModel:
    """A trained segmenter behind one call: raw HU slices in, class probabilities out.

    Build it with :meth:`load`. ``kind`` is ``"keras"`` (a ``.keras`` checkpoint, preprocessed
    here in NumPy with the run's :class:`Preprocessing`) or ``"saved_model"`` (an exported
    SavedModel whose ``serving_default`` signature takes raw HU and preprocesses in its graph).

    Attributes:
        path: The file or folder loaded.
        kind: ``"keras"`` or ``"saved_model"``.
        preprocessing: The model's :class:`Preprocessing` (for a SavedModel the copy in
            ``assets.extra/preprocessing.json``, or ``None`` when it has none).
        context: Adjacent slices the model takes as channels (1 for plain 2D).
        name: A short name for reports (the run or export name).
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        preprocessing: Preprocessing | None,
        forward: Callable[[np.ndarray, tuple[float, float] | None, tuple[float, float] | None], np.ndarray],
        context: int,
        name: str,
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.preprocessing = preprocessing
        self.context = int(context)
        self.name = name
        self._forward = forward

    def __repr__(self) -> str:
        return f"SegmentationModel({str(self.path)!r}, kind={self.kind!r}, context={self.context})"

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, preprocessing: Preprocessing | None = None) -> "SegmentationModel":
        """Load a ``.keras`` checkpoint, a SavedModel folder or a TF Serving base folder.

        Args:
            path: ``<run>/checkpoints/*.keras`` (its ``preprocessing.json`` is found beside it
                or in the run folder), ``saved_models/<name>/<version>/``, or
                ``saved_models/<name>/`` (the highest numbered version is used).
            preprocessing: Use this instead of the stored ``preprocessing.json``.

        Returns:
            The loaded model.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: ``path`` is neither a ``.keras`` file nor a SavedModel, or a ``.keras``
                checkpoint has no ``preprocessing.json`` to go with it.

        Example:
            >>> model = SegmentationModel.load("saved_models/tam_unet")  # doctest: +SKIP
            >>> model.kind  # doctest: +SKIP
            'saved_model'
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"model {path} does not exist; pass a .keras checkpoint or a SavedModel folder"
            )
        if path.is_file() and path.suffix == ".keras":
            return cls._load_keras(path, preprocessing)
        if path.is_dir():
            saved_model = _saved_model_dir(path)
            if saved_model is not None:
                return cls._load_saved_model(saved_model, preprocessing)
        raise ValueError(
            f"model {path} is neither a .keras checkpoint nor a SavedModel folder (one with "
            "saved_model.pb, or a TF Serving base folder of numbered versions); pass "
            "runs/<name>/checkpoints/<file>.keras or saved_models/<name>[/<version>]"
        )

    @classmethod
    def _load_keras(cls, path: Path, preprocessing: Preprocessing | None) -> "SegmentationModel":
        import keras

        # The custom layers, losses and metrics must be registered before deserializing.
        import keras_livseg.models  # noqa: F401
        import keras_livseg.training.losses  # noqa: F401
        import keras_livseg.training.metrics  # noqa: F401

        if preprocessing is None:
            found = find_preprocessing_json(path)
            if found is None:
                raise ValueError(
                    f"{path} has no preprocessing.json beside it or in its run folder "
                    f"({path.parent} or {path.parent.parent}); copy the training run's "
                    "preprocessing.json there (predicting with other HU window or statistics "
                    "than training would give wrong labels)"
                )
            preprocessing, _ = read_preprocessing_json(found)
        try:
            network = keras.saving.load_model(str(path), compile=False)
        except Exception as error:  # Keras raises many types for damaged or foreign files
            raise ValueError(f"{path} could not be loaded as a Keras model ({error}); re-save it") from None
        shape = tuple(network.input_shape)
        channels = shape[-1] if keras.config.image_data_format() == "channels_last" else shape[1]
        if channels is not None and channels != preprocessing.context:
            raise ValueError(
                f"{path} takes {channels} input channels but its preprocessing.json says "
                f"context={preprocessing.context}; use the preprocessing.json of the same run"
            )
        prep = preprocessing
        padding: dict[str, int] = {}

        def forward(raw: np.ndarray, statistics: tuple[float, float] | None,
                    spacing: tuple[float, float] | None) -> np.ndarray:
            batch, rows, cols, k = raw.shape
            # [B, rows, cols, K] → [rows, cols, B*K]: the shared resize works on trailing axes.
            stacked = np.transpose(raw, (1, 2, 0, 3)).reshape(rows, cols, batch * k)
            gridded = prep.slices_to_model_grid(stacked, spacing)
            height, width = gridded.shape[:2]
            x = np.transpose(gridded.reshape(height, width, batch, k), (2, 0, 1, 3))
            mean, std = statistics if statistics is not None else (None, None)
            x = prep.standardize(x, mean, std)
            # A volume's last batch is usually short; padding it to the first batch's size
            # spares a second trace of the whole network (seconds for a U-Net).
            full = padding.setdefault("batch", batch)
            if batch < full:
                x = np.concatenate([x, np.zeros((full - batch,) + x.shape[1:], x.dtype)])
            probabilities = network.predict_on_batch(x)[:batch]
            probabilities = prep.model_grid_to_slices(np.asarray(probabilities, np.float32), (rows, cols), spacing)
            return _resize_probabilities(probabilities, (rows, cols))

        name = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
        return cls(path, "keras", prep, forward, prep.context, name)

    @classmethod
    def _load_saved_model(cls, path: Path, preprocessing: Preprocessing | None) -> "SegmentationModel":
        import tensorflow as tf  # a SavedModel is a TensorFlow graph

        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as error:  # TF raises many types for damaged folders
            raise ValueError(f"{path} could not be loaded as a SavedModel ({error}); re-export it") from None
        if "serving_default" not in loaded.signatures:
            raise ValueError(
                f"{path} has no serving_default signature (it has {sorted(loaded.signatures)}); "
                "export it with python -m keras_livseg.export"
            )
        signature = loaded.signatures["serving_default"]
        if preprocessing is None:
            found = find_preprocessing_json(path)
            preprocessing = read_preprocessing_json(found)[0] if found is not None else None
        spec = signature.structured_input_signature[1].get("ct_slices")
        if spec is None:
            raise ValueError(
                f"{path}'s serving_default takes {sorted(signature.structured_input_signature[1])}, "
                "not ct_slices; export it with python -m keras_livseg.export"
            )
        rank = spec.shape.rank
        context = preprocessing.context if preprocessing is not None else 1
        if rank == 4 and spec.shape[-1] is not None:
            context = int(spec.shape[-1])
        takes_spacing = SPACING_INPUT in signature.structured_input_signature[1]

        def forward(raw: np.ndarray, statistics: tuple[float, float] | None,
                    spacing: tuple[float, float] | None) -> np.ndarray:
            del statistics  # the exported graph standardizes with its own statistics
            x = raw[..., 0] if (rank != 4 and raw.shape[-1] == 1) else raw
            inputs = {"ct_slices": tf.constant(x, tf.float32)}
            if takes_spacing:
                if spacing is None:
                    raise ValueError(f"{path} resamples to a fixed pixel spacing and needs the slices' spacing in mm")
                inputs[SPACING_INPUT] = tf.constant([float(v) for v in spacing[:2]], tf.float32)
            outputs = signature(**inputs)
            return outputs["probabilities"].numpy().astype(np.float32, copy=False)

        forward.keep_alive = loaded  # the signature needs its object's variables alive
        name = path.parent.name if path.name.isdigit() else path.name
        return cls(path, "saved_model", preprocessing, forward, context, name)

    # -- prediction ------------------------------------------------------------------------
    def predict_slices(
        self,
        raw_hu_slices: np.ndarray,
        statistics: tuple[float, float] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> np.ndarray:
        """Class probabilities of raw HU slices, at the slices' own size.

        Args:
            raw_hu_slices: ``[B, rows, cols]`` or ``[B, rows, cols, context]`` in Hounsfield
                units (any numeric dtype, any size; canonical orientation as in training).
            statistics: ``(mean, std)`` for ``normalization="volume"`` models (the volume's own
                windowed statistics); ignored otherwise and by SavedModels.
            spacing: the slices' ``(row, col)`` pixel spacing in mm; required by models that
                resample to a fixed spacing (``preprocessing.spacing_mm``), ignored by others.

        Returns:
            float32 ``[B, rows, cols, 3]``, softmax probabilities (background, liver, tumor).

        Example:
            >>> model.predict_slices(np.full((2, 40, 48), -1000.0)).shape  # doctest: +SKIP
            (2, 40, 48, 3)
        """
        raw = np.asarray(raw_hu_slices)
        if raw.ndim == 3:
            raw = raw[..., None]
        if raw.ndim != 4 or raw.shape[-1] != self.context:
            raise ValueError(
                f"predict_slices takes [B, rows, cols] or [B, rows, cols, {self.context}] raw HU, "
                f"got shape {tuple(np.shape(raw_hu_slices))}; this model has context={self.context}"
            )
        pixel = None if spacing is None else (float(spacing[0]), float(spacing[1]))
        return self._forward(raw.astype(np.float32, copy=False), statistics, pixel)


def _saved_model_dir(path: Path) -> Path | None:
    """``path`` itself when it is a SavedModel, else its highest numbered version, else None."""
    if (path / "saved_model.pb").is_file():
        return path
    versions = [
        child for child in path.iterdir()
        if child.is_dir() and child.name.isdigit() and (child / "saved_model.pb").is_file()
    ]
    if not versions:
        return None
    chosen = max(versions, key=lambda child: int(child.name))
    logger.info("%s: using version %s of %d", path, chosen.name, len(versions))
    return chosen


def _resize_probabilities(probabilities, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of ``[B, H, W, C]`` probabilities to ``[B, rows, cols, C]`` (float32).

    ``keras.ops.image.resize`` runs in the backend's multithreaded kernels (``tf.image.resize``
    under TensorFlow, the function the exported signature uses): several times faster than
    NumPy at 512x512 and identical to the SavedModel path.
    """
    import keras

    height, width = probabilities.shape[1:3]
    if (height, width) == tuple(size):
        return np.asarray(probabilities, dtype=np.float32)
    resized = keras.ops.image.resize(
        keras.ops.cast(probabilities, "float32"), tuple(int(s) for s in size), interpolation="bilinear"
    )
    return np.asarray(keras.ops.convert_to_numpy(resized), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


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

    @property
    def enabled(self) -> bool:
        return bool(
            self.largest_liver_component or self.tumor_in_liver
            or self.min_lesion_mm3 > 0 or self.min_lesion_voxels > 0
        )


def _bounding_box(mask: np.ndarray, margins: Sequence[int] = (0, 0, 0)) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        if present.size == 0:
            return None
        box.append(slice(max(int(present[0]) - margins[axis], 0), int(present[-1]) + margins[axis] + 1))
    return tuple(box)


def _drop_lesions_away_from_liver(view: np.ndarray, spacing: Sequence[float], margin_mm: float) -> None:
    """Remove tumor components farther than ``margin_mm`` from the liver parenchyma.

    Judged per lesion, by its nearest voxel: a large lesion inside the liver keeps its
    centre however far that is from parenchyma. Lesions touching parenchyma (the usual
    case) are kept without computing any distance.
    """
    parenchyma = view == 1
    if not parenchyma.any():
        view[view == 2] = 0
        return
    lesions, count = ndimage.label(view == 2)
    touching = np.unique(lesions[ndimage.binary_dilation(parenchyma) & (lesions > 0)])
    detached = np.setdiff1d(np.arange(1, count + 1), touching)
    if detached.size == 0:
        return
    distance = ndimage.distance_transform_edt(~parenchyma, sampling=spacing)
    nearest = ndimage.minimum(distance, lesions, index=detached)
    far = detached[np.asarray(nearest) > margin_mm]
    if far.size:
        view[np.isin(lesions, far)] = 0
        logger.debug("post-processing: removed %d lesions beyond %.1f mm of the liver", far.size, margin_mm)


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
    liver = labels >= 1
    box = _bounding_box(liver)
    if box is None:
        return labels
    view = labels[box]  # a view: writes go to ``labels``
    if options.largest_liver_component:
        components, count = ndimage.label(view >= 1)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            view[(components != int(np.argmax(sizes))) & (components > 0)] = 0
            logger.debug("post-processing: removed %d liver islands", count - 1)
        del components
    if options.tumor_in_liver and (view == 2).any():
        _drop_lesions_away_from_liver(view, spacing, options.liver_margin_mm)
    min_voxels = max(options.min_lesion_voxels, 0)
    if options.min_lesion_mm3 > 0:
        min_voxels = max(min_voxels, int(math.ceil(options.min_lesion_mm3 / float(np.prod(spacing)) - 1e-9)))
    if min_voxels > 1 and (view == 2).any():
        components, count = ndimage.label(view == 2)
        sizes = np.bincount(components.ravel())
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small > 0]
        if small.size:
            view[np.isin(components, small)] = 1
            logger.debug("post-processing: %d lesions under %d voxels became liver", small.size, min_voxels)
    return labels


# ---------------------------------------------------------------------------------------------
# One volume
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VolumePrediction:
    """The result of :func:`predict_volume`, in canonical orientation.

    Attributes:
        labels: uint8 ``[rows, cols, slices]``.
        probabilities: uint8 ``[rows, cols, slices, 3]`` (probability × 255, rounded) when asked
            for, else ``None``.
        sample_probabilities: float16 ``[n, 3]`` probabilities of ``sample_voxels`` random voxels
            (for precision–recall and ROC curves), else ``None``.
        sample_indices: int64 ``[n]`` flat indices of those voxels in ``labels``, else ``None``.
        seconds: Wall time of the prediction.
        forward_calls: How many batches went through the model (TTA counts twice).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    sample_probabilities: np.ndarray | None = None
    sample_indices: np.ndarray | None = None
    seconds: float = 0.0
    forward_calls: int = 0


def _streaming_volume_statistics(volume: np.ndarray, window: Sequence[float], chunk: int = 16) -> tuple[float, float]:
    """Per-volume statistics chunk by chunk (no float32 copy of the whole volume), with the
    same :class:`~keras_livseg.data.preprocessing.BodyStatistics` that ``prepare`` uses."""
    stats = BodyStatistics(body_floor(volume, window))
    for start in range(0, volume.shape[2], chunk):
        stats.update(np.clip(volume[:, :, start:start + chunk].astype(np.float32), window[0], window[1]))
    return stats.result()


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=description, unit="slice", leave=False,
        disable=not (enabled and sys.stderr.isatty()),
    )


def predict_volume(
    model: SegmentationModel,
    case: Case,
    batch_size: int = 8,
    tta_flip: bool = False,
    postprocess: PostProcessing | None = PostProcessing(),
    return_probabilities: bool = False,
    sample_voxels: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> VolumePrediction:
    """Segment one canonical volume, ``batch_size`` slices at a time.

    Args:
        model: The loaded :class:`SegmentationModel`.
        case: A case from :func:`~keras_livseg.data.volumes.load_case` (image in HU,
            ``[rows, cols, slices]`` canonical).
        batch_size: Slices per forward pass (default 8); memory per batch is about
            ``batch_size × rows × cols × 3 × 4`` bytes (×2 with TTA).
        tta_flip: Average with the prediction of the left-right-flipped slices (default False).
        postprocess: Clean-up steps (default :class:`PostProcessing()`); ``None`` for none.
        return_probabilities: Keep uint8 probabilities ``[rows, cols, slices, 3]`` (default False).
        sample_voxels: Keep the probabilities of about this many random voxels (default 0),
            spread over the slices in proportion, for curves; see :class:`VolumePrediction`.
        seed: Seed of that sample.
        progress: Show a progress bar when stderr is a terminal (default True).

    Returns:
        A :class:`VolumePrediction`.

    Example:
        >>> case = load_case(discover_cases("data/LiTS")[0], with_labels=False)  # doctest: +SKIP
        >>> predict_volume(model, case, tta_flip=True).labels.shape == case.image.shape  # doctest: +SKIP
        True
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1 (e.g. 8).")
    started = time.perf_counter()
    image = case.image
    rows, cols, n_slices = image.shape
    statistics = None
    prep = model.preprocessing
    if model.kind == "keras" and prep is not None and prep.normalization == "volume":
        statistics = _streaming_volume_statistics(image, prep.window)
    labels = np.empty((rows, cols, n_slices), dtype=np.uint8)
    probabilities = np.empty((rows, cols, n_slices, NUM_CLASSES), np.uint8) if return_probabilities else None
    rng = np.random.default_rng(seed)
    sample_p: list[np.ndarray] = []
    sample_i: list[np.ndarray] = []
    calls = 0
    with _progress(n_slices, case.case_id, progress) as bar:
        for start in range(0, n_slices, batch_size):
            stop = min(start + batch_size, n_slices)
            raw = np.stack([context_stack(image, k, model.context) for k in range(start, stop)], axis=0)
            batch_p = model.predict_slices(raw, statistics, case.spacing[:2])
            calls += 1
            if tta_flip:
                flipped = model.predict_slices(raw[:, :, ::-1], statistics, case.spacing[:2])[:, :, ::-1]
                calls += 1
                batch_p += flipped
                batch_p *= 0.5
                del flipped
            del raw
            # [B, rows, cols, C] → the volume's [rows, cols, B] slab.
            labels[:, :, start:stop] = np.argmax(batch_p, axis=-1).transpose(1, 2, 0)
            if probabilities is not None:
                probabilities[:, :, start:stop] = np.rint(
                    np.clip(batch_p, 0.0, 1.0) * 255.0
                ).astype(np.uint8).transpose(1, 2, 0, 3)
            if sample_voxels > 0:
                share = sample_voxels * (stop - start) / n_slices
                count = int(share) + int(rng.random() < share - int(share))
                if count:
                    b, r, c = (rng.integers(0, n, count) for n in (stop - start, rows, cols))
                    sample_p.append(batch_p[b, r, c].astype(np.float16))
                    sample_i.append(np.ravel_multi_index((r, c, b + start), (rows, cols, n_slices)))
            del batch_p
            bar.update(stop - start)
    if postprocess is not None and postprocess.enabled:
        postprocess_labels(labels, case.spacing, postprocess)
    seconds = time.perf_counter() - started
    logger.debug("%s: %d slices in %.2f s (%d forward calls)", case.case_id, n_slices, seconds, calls)
    return VolumePrediction(
        labels=labels,
        probabilities=probabilities,
        sample_probabilities=np.concatenate(sample_p) if sample_p else (np.zeros((0, NUM_CLASSES), np.float16) if sample_voxels else None),
        sample_indices=np.concatenate(sample_i).astype(np.int64) if sample_i else (np.zeros(0, np.int64) if sample_voxels else None),
        seconds=seconds,
        forward_calls=calls,
    )


def check_hounsfield(image: np.ndarray, source: str | Path) -> bool:
    """Warn (and return False) when intensities are clearly not Hounsfield units.

    CT in HU has air near -1000 and soft tissue at 0–100; an 8-bit image (0–255) or a volume
    whose maximum is below 100 HU (no bone, no contrast) was exported or rescaled for display.

    Args:
        image: The volume, any shape.
        source: The file, for the message.

    Returns:
        True when the range looks like HU.

    Example:
        >>> check_hounsfield(np.array([0, 255]), "photo.nii.gz")
        False
    """
    low, high = float(np.min(image)), float(np.max(image))
    if (low >= 0 and high <= 255) or high < 100:
        logger.warning(
            "%s: intensities %.0f..%.0f do not look like Hounsfield units (CT has air at about "
            "-1000 and bone above 300); the prediction will be meaningless unless this is CT in HU. "
            "Convert it to HU (apply the DICOM rescale slope/intercept) and predict again",
            source, low, high,
        )
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PredictedCase:
    """What :func:`predict_paths` wrote for one input.

    Attributes:
        case_id: The case id.
        input: The CT file.
        output: The label map written (uint8, the input's grid).
        probabilities: The 4D uint8 probability map written, or ``None``.
        label: The case's reference label file when the dataset has one, else ``None``.
        shape: The input's shape.
        seconds: Prediction time (without reading and writing).
        hounsfield_ok: False when the input's intensities did not look like HU.
    """

    case_id: str
    input: Path
    output: Path
    probabilities: Path | None
    label: Path | None
    shape: tuple[int, int, int]
    seconds: float
    hounsfield_ok: bool


def predict_paths(
    model: SegmentationModel,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    batch_size: int = 8,
    tta_flip: bool = False,
    postprocess: PostProcessing | None = PostProcessing(),
    save_probabilities: bool = False,
    label_map: Mapping[int, int] | None = None,
    progress: bool = True,
    sample_voxels: int = 0,
    on_case: Callable[[Case, VolumePrediction, PredictedCase], Any] | None = None,
) -> list[PredictedCase]:
    """Predict every case behind ``inputs`` and write label maps on each input's own grid.

    Args:
        model: The loaded :class:`SegmentationModel`.
        inputs: NIfTI files, folders of them, LiTS/MSD datasets (see :func:`resolve_inputs`).
        out_dir: Output folder (created); see :func:`output_names` for the file names.
        batch_size: Slices per forward pass (default 8).
        tta_flip: Left-right flip test-time augmentation (default False).
        postprocess: Clean-up steps (default :class:`PostProcessing()`); ``None`` for none.
        save_probabilities: Also write uint8 ``[..., 3]`` probability maps (0–255 per class).
        label_map: Values written for the model's classes, ``{class: value}`` (unlisted classes
            become 0); default: 0 background, 1 liver, 2 tumor.
        progress: Progress bar on a terminal (default True).
        sample_voxels: Per case, keep probabilities of this many random voxels (for ``on_case``).
        on_case: Called with ``(case, prediction, record)`` after each case is written, while its
            arrays are still in memory (``evaluate`` samples probabilities there).

    Returns:
        One :class:`PredictedCase` per input, in order.

    Raises:
        DataError: no case found, an unreadable input, or an output that would overwrite its input.

    Example:
        >>> predict_paths(model, ["../shared/data/real/dcmqi-ct-3slice"], "out")[0].output.name  # doctest: +SKIP
        'segmentation-3slice.nii.gz'
    """
    cases = resolve_inputs(inputs)
    out_dir = Path(out_dir)
    written = []
    for files in cases:
        label_name, probability_name = output_names(files)
        output = out_dir / label_name
        if output.resolve() == files.image.resolve() or (files.label and output.resolve() == files.label.resolve()):
            raise DataError(
                f"writing {output} would overwrite the input {files.image} or its label; choose "
                "another --out folder"
            )
        case = load_case(files, with_labels=False)  # references are the evaluation's business
        hounsfield_ok = check_hounsfield(case.image, files.image)
        prediction = predict_volume(
            model, case, batch_size=batch_size, tta_flip=tta_flip, postprocess=postprocess,
            return_probabilities=save_probabilities, sample_voxels=sample_voxels, progress=progress,
        )
        header = load_nifti(files.image).header
        values = prediction.labels if label_map is None else apply_label_map(prediction.labels, label_map, str(output))
        save_like(values, case.original_affine, output, reference_header=header)
        probability_path = None
        if prediction.probabilities is not None:
            probability_path = save_like(
                prediction.probabilities, case.original_affine, out_dir / probability_name,
                reference_header=header,
            )
        record = PredictedCase(
            case_id=case.case_id, input=files.image, output=output, probabilities=probability_path,
            label=files.label, shape=case.original_shape, seconds=prediction.seconds,
            hounsfield_ok=hounsfield_ok,
        )
        logger.info("%s: %d slices in %.1f s -> %s", files.image.name, case.image.shape[2], prediction.seconds, output)
        if on_case is not None:
            on_case(case, prediction, record)
        written.append(record)
        del case, prediction, values
    return written
