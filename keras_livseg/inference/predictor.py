"""The model behind inference: a ``.keras`` checkpoint or an exported SavedModel, one call.

:class:`SegmentationModel` takes raw HU slices ``[n, rows, cols]`` of any size and returns class
probabilities ``[n, rows, cols, 3]`` at the same size, with the preprocessing of its run.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from keras_livseg.data.preprocessing import (
    Preprocessing,
    find_preprocessing_json,
    labels_at_size,
    read_preprocessing_json,
)
from keras_livseg.inference.postprocess import PostProcessing
from keras_livseg.models.saving import load_keras_model
# The export's second signature input, present when the model resamples to a fixed pixel spacing.
from keras_livseg.serving.signature import SPACING_INPUT

logger = logging.getLogger(__name__)


#: ``labels_on_grid(windowed, statistics, size, spacing)``: windowed HU ``[B, H, W, context]`` on
#: the model's grid, the volume's statistics (or ``None``), the slices' ``(rows, cols)`` and
#: spacing → uint8 labels ``[B, rows, cols]``.
GridLabels = Callable[[np.ndarray, "tuple[float, float] | None", "tuple[int, int]", "tuple[float, float] | None"], np.ndarray]


class SegmentationModel:
    """A trained segmenter behind one call: raw HU slices in, class probabilities out.

    Build it with :meth:`load`. ``kind`` is ``"keras"`` (a ``.keras`` checkpoint, preprocessed
    here in NumPy with the run's :class:`Preprocessing`) or ``"saved_model"`` (an exported
    SavedModel whose ``serving_default`` signature takes raw HU and preprocesses in its graph);
    :meth:`ensemble` averages several.

    Attributes:
        path: The file or folder loaded.
        kind: ``"keras"``, ``"saved_model"`` or ``"ensemble"`` (:meth:`ensemble`).
        preprocessing: The model's :class:`Preprocessing` (for a SavedModel the copy in
            ``assets.extra/preprocessing.json``, or ``None`` when it has none).
        context: Adjacent slices the model takes as channels (1 for plain 2D).
        name: A short name for reports (the run or export name).
        labels_on_grid: Labels from input already windowed and resampled to the model's grid
            with :attr:`preprocessing` (:data:`GridLabels`): whole-volume prediction resamples
            each slice once and brings back only the foreground's surroundings
            (:func:`~keras_livseg.data.preprocessing.labels_at_size`). ``None`` for SavedModels,
            whose graph preprocesses raw HU itself, and for ensembles.
        needs_volume_statistics: Whether :meth:`predict_slices` takes the volume's windowed
            statistics (``normalization="volume"``).
        members: The models an ensemble averages; empty otherwise.
        postprocessing: The clean-up this model's run chose on its validation cases (the
            ``postprocessing`` entry of its ``preprocessing.json``, see
            :mod:`keras_livseg.inference.tuning`), else :class:`PostProcessing()`;
            ``predict`` applies it unless told otherwise.
        tta_flips: The mirrorings the model was trained with (``"horizontal"``, ``"vertical"``;
            the ``tta_flips`` entry of its ``preprocessing.json``), the only ones test-time
            augmentation may average over; ``None`` when the model has no such record (runs
            from before it was kept, foreign SavedModels).
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        preprocessing: Preprocessing | None,
        forward: Callable[[np.ndarray, tuple[float, float] | None, tuple[float, float] | None], np.ndarray],
        context: int,
        name: str,
        labels_on_grid: GridLabels | None = None,
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.preprocessing = preprocessing
        self.context = int(context)
        self.name = name
        self._forward = forward
        self.labels_on_grid = labels_on_grid
        # A SavedModel standardizes in its own graph.
        self.needs_volume_statistics = kind == "keras" and preprocessing is not None and preprocessing.normalization == "volume"
        self.members: list[SegmentationModel] = []
        self.postprocessing = stored_postprocessing(self.path) if kind != "ensemble" else PostProcessing()
        self.tta_flips = stored_tta_flips(self.path) if kind != "ensemble" else None

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
            saved_model = saved_model_dir(path)
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
        network = load_keras_model(path)
        shape = tuple(network.input_shape)
        channels = shape[-1] if keras.config.image_data_format() == "channels_last" else shape[1]
        if channels is not None and channels != preprocessing.context:
            raise ValueError(
                f"{path} takes {channels} input channels but its preprocessing.json says "
                f"context={preprocessing.context}; use the preprocessing.json of the same run"
            )
        prep = preprocessing
        padding: dict[str, int] = {}

        def grid_probabilities(windowed: np.ndarray, statistics: tuple[float, float] | None) -> np.ndarray:
            # [B, H, W, K] windowed HU on the model's grid → [B, H, W, C] float32.
            batch = windowed.shape[0]
            mean, std = statistics if statistics is not None else (None, None)
            x = prep.standardize(windowed, mean, std)
            # A volume's last batch is usually short; padding it to the first batch's size
            # spares a second trace of the whole network (seconds for a U-Net).
            full = padding.setdefault("batch", batch)
            if batch < full:
                x = np.concatenate([x, np.zeros((full - batch,) + x.shape[1:], x.dtype)])
            return np.asarray(network.predict_on_batch(x)[:batch], np.float32)

        def forward(raw: np.ndarray, statistics: tuple[float, float] | None,
                    spacing: tuple[float, float] | None) -> np.ndarray:
            batch, rows, cols, k = raw.shape
            # [B, rows, cols, K] → [rows, cols, B*K]: the shared resize works on trailing axes.
            stacked = np.transpose(raw, (1, 2, 0, 3)).reshape(rows, cols, batch * k)
            gridded = prep.slices_to_model_grid(stacked, spacing)
            height, width = gridded.shape[:2]
            x = np.transpose(gridded.reshape(height, width, batch, k), (2, 0, 1, 3))
            probabilities = prep.model_grid_to_slices(grid_probabilities(x, statistics), (rows, cols), spacing)
            return _resize_probabilities(probabilities, (rows, cols))

        def labels(windowed: np.ndarray, statistics: tuple[float, float] | None, size: tuple[int, int],
                   spacing: tuple[float, float] | None) -> np.ndarray:
            probabilities = prep.model_grid_to_slices(grid_probabilities(windowed, statistics), size, spacing)
            return labels_at_size(probabilities, size, resize=_resize_probabilities)

        name = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
        return cls(path, "keras", prep, forward, prep.context, name,
                   labels_on_grid=labels)

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

    @classmethod
    def ensemble(cls, members: Sequence["SegmentationModel"]) -> "SegmentationModel":
        """One model that averages its members' probabilities (nnU-Net's ensemble of folds or seeds).

        Each member keeps its own preprocessing (HU window, spacing, size, context): the
        ensemble takes the widest context and hands each member its own centre channels, and
        the averaged probabilities are at the slices' size. Three demo models (seeds 0-2)
        together score above their mean on every real scan (``benchmarks/bench_real.py sim2real``).

        Args:
            members: Loaded models (:meth:`load`), at least one; one is returned as it is.

        Returns:
            A model of kind ``"ensemble"`` (whole-volume prediction takes the slice-by-slice path).

        Raises:
            ValueError: no member, or members with per-volume normalization in different HU
                windows (the volume's statistics are computed once, in one window), or members
                whose context slices lie at different distances (``context_mm``).

        Example:
            >>> paths = [f"runs/demo-seed{s}/checkpoints/best.keras" for s in range(3)]  # doctest: +SKIP
            >>> SegmentationModel.ensemble([SegmentationModel.load(p) for p in paths]).kind  # doctest: +SKIP
            'ensemble'
        """
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one model")
        if len(members) == 1:
            return members[0]
        by_volume = [m for m in members if m.needs_volume_statistics]
        if len({tuple(m.preprocessing.window) for m in by_volume}) > 1:
            raise ValueError(
                "ensemble members with normalization='volume' use different HU windows "
                f"({', '.join(f'{m.name}: {m.preprocessing.window}' for m in by_volume)}); "
                "ensemble models trained with the same window"
            )
        context = max(m.context for m in members)
        # One stack of context slices feeds every member: their slices must lie equally far apart.
        distances = {m.preprocessing.context_mm for m in members if m.context > 1 and m.preprocessing is not None}
        if len(distances) > 1:
            raise ValueError(
                "ensemble members take their context slices at different distances (context_mm "
                f"{', '.join(f'{m.name}: {m.preprocessing.context_mm}' for m in members if m.preprocessing)}); "
                "ensemble models trained with the same preprocessing.context_mm"
            )

        def forward(raw: np.ndarray, statistics: tuple[float, float] | None,
                    spacing: tuple[float, float] | None) -> np.ndarray:
            total = None
            for member in members:
                first = (context - member.context) // 2
                p = member.predict_slices(raw[..., first:first + member.context], statistics, spacing)
                if total is None:
                    total = np.array(p, np.float32)  # a copy: the sum accumulates in place
                else:
                    total += p
            total /= np.float32(len(members))
            return total

        # The preprocessing that decides the volume statistics (the members' shared window), else the first's.
        preprocessing = by_volume[0].preprocessing if by_volume else members[0].preprocessing
        if preprocessing is not None and distances:  # the stack's stride: the members' shared context_mm
            preprocessing = dataclasses.replace(preprocessing, context=context, context_mm=distances.pop())
        model = cls(members[0].path, "ensemble", preprocessing, forward, context,
                    "+".join(m.name for m in members))
        model.members = members
        model.needs_volume_statistics = bool(by_volume)
        # Members of different runs may have chosen different sizes: take their median.
        sizes = sorted(m.postprocessing.min_lesion_mm3 for m in members)
        median = statistics.median(sizes)
        model.postprocessing = dataclasses.replace(members[0].postprocessing, min_lesion_mm3=float(median))
        if len(set(sizes)) > 1:
            logger.info("ensemble members chose minimum lesion sizes %s mm³; the ensemble uses their median, %g mm³",
                        ", ".join(f"{v:g}" for v in sizes), median)
        # A flip is safe for the ensemble only where every member was trained with it.
        known = [m.tta_flips for m in members if m.tta_flips is not None]
        model.tta_flips = tuple(f for f in FLIPS if all(f in flips for flips in known)) if known else None
        return model

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


def stored_postprocessing(model_path: str | Path) -> PostProcessing:
    """The post-processing recorded with a model (``preprocessing.json``'s ``postprocessing``
    entry, beside a checkpoint, in its run folder or in a SavedModel's ``assets.extra/``), else
    the default.

    Raises:
        ValueError: the entry is there but not valid (names the file and the fix).
    """
    found = find_preprocessing_json(model_path)
    if found is None:
        return PostProcessing()
    entry = read_preprocessing_json(found)[1].get("postprocessing")
    if not entry:
        return PostProcessing()
    try:
        return PostProcessing.from_dict(entry)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{found}: its postprocessing entry is not valid ({error}); delete the entry to use the "
                         "default post-processing") from None


#: The mirrorings a model may be trained with and test-time augmentation may use, in that order.
FLIPS = ("horizontal", "vertical")


def stored_tta_flips(model_path: str | Path) -> tuple[str, ...] | None:
    """The flips a model was trained with (``preprocessing.json``'s ``tta_flips`` entry), or
    ``None`` when it has no record.

    Raises:
        ValueError: the entry is there but not a list of :data:`FLIPS` (names the file).
    """
    found = find_preprocessing_json(model_path)
    if found is None:
        return None
    entry = read_preprocessing_json(found)[1].get("tta_flips")
    if entry is None:
        return None
    if not isinstance(entry, list) or not set(entry) <= set(FLIPS):
        raise ValueError(f"{found}: tta_flips must be a list of {', '.join(FLIPS)} (the flips the model was trained "
                         f"with), got {entry!r}; write the run's flips or delete the entry")
    return tuple(f for f in FLIPS if f in entry)


def saved_model_dir(path: Path, announce: bool = True) -> Path | None:
    """``path`` itself when it is a SavedModel, else its highest numbered version, else None.

    ``announce`` logs which version of several is used (once, where the model is loaded).
    """
    if (path / "saved_model.pb").is_file():
        return path
    versions = [
        child for child in path.iterdir()
        if child.is_dir() and child.name.isdigit() and (child / "saved_model.pb").is_file()
    ]
    if not versions:
        return None
    chosen = max(versions, key=lambda child: int(child.name))
    if announce:
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
