"""One canonical volume ``[rows, cols, slices]`` through the model, a batch of slices at a time."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from keras_livseg.data.preprocessing import (
    BodyStatistics,
    argmax_classes,
    body_floor,
    context_stack,
)
from keras_livseg.data.volumes import (
    Case,
    NUM_CLASSES,
)
from keras_livseg.inference.postprocess import PostProcessing, postprocess_labels
from keras_livseg.inference.predictor import SegmentationModel

logger = logging.getLogger(__name__)


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


#: Axes of a ``[B, rows, cols, context]`` batch that each flip mirrors.
_FLIP_AXES = {"horizontal": 2, "vertical": 1}


#: Models already warned about an unrecorded flip set (the warning would repeat for every volume).
_WARNED_NO_FLIPS: set[str] = set()


def tta_mirrorings(model: SegmentationModel) -> tuple[tuple[int, ...], ...]:
    """The mirrorings test-time augmentation averages over: every combination of the flips the
    model was trained with (:attr:`SegmentationModel.tta_flips`), as nnU-Net mirrors only along
    the axes its training mirrored. A model trained without flips never saw the liver on the
    image's right, so a mirrored slice is one it was never taught to read.

    Returns:
        Tuples of axes of a ``[B, rows, cols, context]`` batch, one per extra prediction.

    Raises:
        ValueError: the model was trained without flips (names the model and the fix).

    Example:
        >>> class Trained: tta_flips, name = ("horizontal", "vertical"), "m"
        >>> tta_mirrorings(Trained())
        ((2,), (1,), (1, 2))
    """
    flips = model.tta_flips
    if flips is None:  # no record (an older run or a foreign export): the left-right flip, as before
        if model.name not in _WARNED_NO_FLIPS:  # once per model, not once per volume of a batch
            _WARNED_NO_FLIPS.add(model.name)
            logger.warning("%s does not record the flips it was trained with; test-time augmentation mirrors left-right, "
                           "which is wrong for a model trained without flips", model.name)
        flips = ("horizontal",)
    if not flips:
        raise ValueError(
            f"test-time augmentation (--tta) averages mirrored slices, but model {model.name} was trained without flips "
            "(training.augmentation.flip is off: the liver's side is anatomy) and mirrored it misses the liver; "
            "leave out --tta, or train with training.augmentation.flip = \"horizontal\""
        )
    axes = [_FLIP_AXES[f] for f in flips]
    combos = [tuple(sorted(c)) for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
    return tuple(combos)


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
    postprocess: PostProcessing | None | str = "model",
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
            ``batch_size × rows × cols × 3 × 4`` bytes (twice that with TTA: one mirrored batch at a time).
        tta_flip: Average with the predictions of the slices mirrored as the model was trained
            (default False; :func:`tta_mirrorings`): a model trained without flips is refused.
        postprocess: Clean-up steps: ``"model"`` (default) for the model's own
            (:attr:`SegmentationModel.postprocessing`: what its run chose on validation cases,
            else :class:`PostProcessing()`), a :class:`PostProcessing`, or ``None`` for none.
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
    postprocess = resolve_postprocess(model, postprocess)
    mirrorings = tta_mirrorings(model) if tta_flip else ()
    started = time.perf_counter()
    image = case.image
    rows, cols, n_slices = image.shape
    statistics = None
    prep = model.preprocessing
    if model.needs_volume_statistics:
        statistics = _streaming_volume_statistics(image, prep.window)
    # Context slices as far apart as in training (context_mm); a SavedModel without its
    # preprocessing.json takes adjacent ones.
    stride = 1 if prep is None else prep.context_stride(case.spacing[2])
    # Slice-major memory under the [rows, cols, slices] shape: each batch is written as one
    # block, and on a LiTS-oriented (DICOM LPS) scan the native grid is Fortran-ordered, as
    # NIfTI stores it, so writing the file needs no transposing copy.
    labels = np.empty((n_slices, rows, cols), dtype=np.uint8).transpose(1, 2, 0)
    probabilities = np.empty((rows, cols, n_slices, NUM_CLASSES), np.uint8) if return_probabilities else None
    rng = np.random.default_rng(seed)
    sample_p: list[np.ndarray] = []
    sample_i: list[np.ndarray] = []
    calls = 0
    # Labels alone: each slice is windowed and resampled once, and only the foreground's
    # surroundings are brought back to the scan's size (see SegmentationModel.labels_on_grid).
    on_grid = model.labels_on_grid is not None and not tta_flip and probabilities is None and sample_voxels <= 0
    with _progress(n_slices, case.case_id, progress) as bar:
        if on_grid:
            calls = _labels_on_grid(model, image, case.spacing, statistics, batch_size, labels, bar)
        else:
            for start in range(0, n_slices, batch_size):
                stop = min(start + batch_size, n_slices)
                raw = np.stack([context_stack(image, k, model.context, stride) for k in range(start, stop)], axis=0)
                batch_p = model.predict_slices(raw, statistics, case.spacing[:2])
                calls += 1
                for axes in mirrorings:
                    batch_p += np.flip(model.predict_slices(np.flip(raw, axes), statistics, case.spacing[:2]), axes)
                    calls += 1
                if mirrorings:
                    batch_p *= np.float32(1.0 / (1 + len(mirrorings)))
                del raw
                # [B, rows, cols, C] → the volume's [rows, cols, B] slab.
                labels[:, :, start:stop] = argmax_classes(batch_p).transpose(1, 2, 0)
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


def resolve_postprocess(model: SegmentationModel, postprocess: PostProcessing | None | str) -> PostProcessing | None:
    """``"model"`` → the model's own post-processing; a :class:`PostProcessing` or ``None`` as given."""
    if isinstance(postprocess, str):
        if postprocess != "model":
            raise ValueError(f"postprocess={postprocess!r}: pass 'model', a PostProcessing or None")
        return model.postprocessing
    return postprocess


def _labels_on_grid(model: SegmentationModel, image: np.ndarray, spacing: Sequence[float],
                    statistics: tuple[float, float] | None, batch_size: int, labels: np.ndarray, bar) -> int:
    """Fill ``labels`` batch by batch through ``model.labels_on_grid``; returns the forward calls made.

    ``spacing`` is the volume's ``(row, col, slice)`` mm. Each slice is windowed and resampled
    once and the context channels are picked from the result. (Preparing the next batch in a
    thread while the network runs gained nothing on 2 cores, where the network already uses both.)
    """
    rows, cols, n_slices = image.shape
    offsets = model.preprocessing.context_offsets(spacing[2])
    reach = int(offsets[-1])
    pixel = (float(spacing[0]), float(spacing[1]))

    def model_input(start: int) -> np.ndarray:
        stop = min(start + batch_size, n_slices)
        low, high = max(start - reach, 0), min(stop + reach, n_slices)
        gridded = model.preprocessing.slices_to_model_grid(image[:, :, low:high], pixel)  # [H, W, high - low]
        picks = np.clip(np.arange(start, stop)[:, None] + offsets[None], 0, n_slices - 1)
        return np.transpose(gridded[:, :, picks - low], (2, 0, 1, 3))  # [B, H, W, context]

    starts = range(0, n_slices, batch_size)
    for start in starts:
        windowed = model_input(start)
        stop = start + windowed.shape[0]
        labels[:, :, start:stop] = model.labels_on_grid(windowed, statistics, (rows, cols), pixel).transpose(1, 2, 0)
        bar.update(stop - start)
    return len(starts)


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
