"""Training callbacks: learning rate in the logs, NaN stop, TensorBoard prediction grids.

TensorBoard is Keras's own; its ModelCheckpoint, EarlyStopping and CSVLogger come with the
changes :class:`Checkpoint`, :class:`EarlyStopping` and :class:`HistoryLogger` describe (epochs
without validation, writes that a kill cannot leave half-done), and :class:`RunBackup` takes
the place of its BackupAndRestore; :func:`standard_callbacks` assembles them for a run folder.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import keras
import numpy as np

from keras_livseg.data.atomic import atomic_path, atomic_write_json, atomic_write_text, partial_path

logger = logging.getLogger(__name__)

# RGBA overlay colours: liver green, tumor red.
_CLASS_COLOURS = np.array([[0, 0, 0], [0, 200, 0], [230, 0, 0]], dtype=np.float32) / 255.0


class TimeBudget(keras.callbacks.Callback):
    """Stop at the end of the first epoch that ends ``minutes`` or more after training began.

    The budget of ``compare --minutes``: models of different speeds get the same wall time.
    Counted in this process (a resumed run gets the budget again); ``stopped_at`` is the epoch
    it stopped after, or None.

    Example:
        >>> TimeBudget(0.5).seconds
        30.0
    """

    def __init__(self, minutes: float) -> None:
        super().__init__()
        self.seconds = float(minutes) * 60.0
        self.stopped_at: int | None = None
        self._started = time.perf_counter()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if time.perf_counter() - self._started >= self.seconds:
            self.stopped_at = epoch
            self.model.stop_training = True
            logger.info("time budget of %.1f min reached after epoch %d: stopping", self.seconds / 60, epoch + 1)


class UploadRun(keras.callbacks.Callback):
    """After every epoch, upload what changed in the run folder to object storage (``run.runs_dir`` a URL).

    Last in the callback list, so that the epoch's checkpoints, backup and history are written;
    a job killed mid-epoch resumes from the bucket's last epoch (``fit --resume`` downloads it).
    """

    def __init__(self, run_dir: str | Path, url: str) -> None:
        super().__init__()
        self.run_dir, self.url = Path(run_dir), url

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from keras_livseg.data import storage

        storage.upload(self.run_dir, self.url, last=("complete.json",))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds ``learning_rate`` to the epoch logs (so TensorBoard and the CSV history show it).

    Placed before TensorBoard and CSVLogger in the callback list. Under a schedule the
    value is the rate at the epoch's last step.
    """

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        optimizer = self.model.optimizer
        rate = optimizer.learning_rate
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            rate = rate(optimizer.iterations)
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(rate))


class NaNStop(keras.callbacks.Callback):
    """Stop at the first NaN or infinite loss, keeping the model's last good weights.

    Unlike ``TerminateOnNaN`` it records the epoch and batch so that ``fit`` can report them,
    puts back the weights from the start of the failing epoch (Keras still runs validation
    and the checkpoint callbacks after ``stop_training``), and marks that epoch's validation
    results NaN so that ``save_best_only`` never picks it. The optimizer's moments may be
    NaN too: continue from ``best.keras``, not from the backup.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stopped_at: tuple[int, int] | None = None
        self._epoch = 0
        self._good_weights: list | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._good_weights = self.model.get_weights()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if self.stopped_at is None and loss is not None and not math.isfinite(float(loss)):
            self.stopped_at = (self._epoch, batch)
            if self._good_weights is not None:
                self.model.set_weights(self._good_weights)
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.stopped_at is not None and logs is not None:
            for key in list(logs):
                if key.startswith("val_"):
                    logs[key] = float("nan")


def overlay(ct: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """CT slice ``[H, W]`` (any range) with labels ``[H, W]`` blended in colour → RGB ``[H, W, 3]`` in [0, 1].

    Example:
        >>> overlay(np.zeros((4, 4)), np.full((4, 4), 2)).shape
        (4, 4, 3)
    """
    low, high = np.percentile(ct, [1, 99])
    grey = np.clip((ct - low) / max(high - low, 1e-6), 0, 1)[..., None].repeat(3, axis=-1)
    colour = _CLASS_COLOURS[np.clip(labels, 0, 2)]
    weight = (labels > 0)[..., None] * alpha
    return grey * (1 - weight) + colour * weight


def prediction_grid(images: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Rows of (CT, ground truth overlay, prediction overlay) → one RGB image ``[n*H, 3*W, 3]``."""
    rows = []
    for image, true_labels, pred_labels in zip(images, truth, predicted):
        ct = image[..., image.shape[-1] // 2]
        grey = overlay(ct, np.zeros_like(true_labels))
        rows.append(np.concatenate([grey, overlay(ct, true_labels), overlay(ct, pred_labels)], axis=1))
    return np.concatenate(rows, axis=0)


def heat(ct: np.ndarray, value: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """CT slice ``[H, W]`` with a map in [0, 1] blended as a black-red-yellow heat → RGB in [0, 1]."""
    low, high = np.percentile(ct, [1, 99])
    grey = np.clip((ct - low) / max(high - low, 1e-6), 0, 1)[..., None].repeat(3, axis=-1)
    v = np.clip(np.asarray(value, np.float32), 0, 1)[..., None]
    colour = np.concatenate([np.clip(2 * v, 0, 1), np.clip(2 * v - 1, 0, 1), np.zeros_like(v)], axis=-1)
    return grey * (1 - alpha) + colour * alpha


def attention_grid(images: np.ndarray, maps: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of (CT, then each map over it as heat) → one RGB image ``[n*H, (1+len(maps))*W, 3]``."""
    rows = []
    for index, image in enumerate(images):
        ct = image[..., image.shape[-1] // 2]
        panels = [overlay(ct, np.zeros(ct.shape, np.int64))] + [heat(ct, m[index]) for m in maps.values()]
        rows.append(np.concatenate(panels, axis=1))
    return np.concatenate(rows, axis=0)


class PredictionImages(keras.callbacks.Callback):
    """Every ``every`` epochs, write a CT / ground truth / prediction grid to TensorBoard, and
    what the model attends to (:func:`~keras_livseg.models.attention_maps.attention_maps`: its
    gates, Grad-CAM) as a second grid.

    Args:
        images: fixed validation slices ``[n, H, W, C]`` (standardized), chosen to contain tumor.
        masks: their labels ``[n, H, W]``.
        log_dir: TensorBoard folder (the grid goes to ``<log_dir>/images``).
        every: epochs between grids.
        model: the model to draw, when it is not the one trained (patch training trains
            :func:`~keras_livseg.models.any_size`'s twin of it).
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, log_dir: str | Path, every: int = 1,
                 model: keras.Model | None = None) -> None:
        super().__init__()
        self._drawn = model
        self.images = np.asarray(images, dtype=np.float32)
        self.masks = np.asarray(masks)
        self.log_dir = Path(log_dir) / "images"
        self.every = max(1, int(every))
        self._writer = None
        self._maps = None  # AttentionMaps of the drawn model, prepared at the first grid

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every or len(self.images) == 0:
            return
        import tensorflow as tf  # TensorBoard's summary writer is TensorFlow's

        network = self._drawn if self._drawn is not None else self.model
        probabilities = network.predict(self.images, verbose=0)
        predicted = np.argmax(np.asarray(probabilities), axis=-1)
        grid = prediction_grid(self.images, self.masks, predicted)
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        if self._maps is None or self._maps.model is not network:
            from keras_livseg.models.attention_maps import AttentionMaps

            self._maps = AttentionMaps(network)
        maps = self._maps(self.images)
        with self._writer.as_default():
            tf.summary.image("validation/ct_truth_prediction", grid[None].astype(np.float32), step=epoch)
            if maps:
                # Columns: CT, then each map of attention_maps() (gates, Grad-CAM tumour, liver).
                tf.summary.image("validation/attention", attention_grid(self.images, maps)[None].astype(np.float32),
                                 step=epoch, description=" | ".join(["CT", *maps]))
        self._writer.flush()


def pick_tumor_slices(dataset, count: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` slices with the most tumor from a finite (validation) dataset."""
    best: list[tuple[int, np.ndarray, np.ndarray]] = []
    for images, masks in dataset:
        images, masks = np.asarray(images), np.asarray(masks)
        for image, mask in zip(images, masks):
            tumor = int((mask == 2).sum())
            if tumor > 0:
                best.append((tumor, image, mask))
        best = sorted(best, key=lambda item: -item[0])[: count * 4]
    chosen = best[:count]
    if not chosen:
        return np.zeros((0,)), np.zeros((0,))
    return np.stack([c[1] for c in chosen]), np.stack([c[2] for c in chosen])


def best_value_in_history(history_csv: Path, monitor: str) -> float | None:
    """The best (max) value of ``monitor`` in a CSV history, for resuming a checkpoint's threshold."""
    if not history_csv.is_file():
        return None
    from keras_livseg.data.errors import DataError
    from keras_livseg.evaluation.report import read_history  # epochs without the value read as NaN

    try:
        values = read_history(history_csv).get(monitor, np.zeros(0))
    except DataError:  # no epoch written yet
        return None
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else None


class Checkpoint(keras.callbacks.ModelCheckpoint):
    """Keras' ``ModelCheckpoint``, with two changes for ``fit``'s runs.

    - ``saves``: the model the file holds, when it is not the one trained. Patch training fits
      :func:`~keras_livseg.models.any_size`'s twin; the checkpoints hold the fixed-size model
      (the same weights) that ``predict``, ``evaluate`` and the export read.
    - With ``save_best_only``, an epoch that was not validated (``training.validate_last``)
      is skipped: Keras' own would save it as the best, with a warning, whatever it scored.
    - The file is written under a temporary name and then renamed: Keras writes the ``.keras``
      archive in place, so a run killed while saving lost its previous best checkpoint.
    """

    def __init__(self, *args, saves: keras.Model | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._saves = saves

    def set_model(self, model: keras.Model) -> None:
        super().set_model(self._saves if self._saves is not None else model)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.save_best_only and self.monitor not in (logs or {}):
            return
        super().on_epoch_end(epoch, logs)

    def _save_model(self, epoch, batch, logs) -> None:
        final = self.filepath
        partial = partial_path(final)  # Keras saves to self.filepath; not every epoch is saved
        partial.unlink(missing_ok=True)  # a half file of a killed save must not be renamed in later
        self.filepath = str(partial)
        try:
            super()._save_model(epoch, batch, logs)
        finally:
            self.filepath = final
        if partial.is_file():
            os.replace(partial, final)


class BestIsLast(keras.callbacks.Callback):
    """``best.keras`` as the last epoch's checkpoint, for runs that validate nothing.

    After each epoch's ``last.keras`` is saved (the callback before this one), ``best.keras``
    becomes a hard link to it (a copy where the filesystem has no links), made under a temporary
    name and renamed: the same file as saving the model twice, without the second save (~0.35 s an
    epoch for the demo's 2-million-parameter model). A run killed at any point keeps a
    ``best.keras`` of a whole epoch. ``last.keras`` is replaced by a rename each epoch, so the link
    keeps the previous epoch's file until it is made again.

    Example:
        >>> BestIsLast("runs/x/checkpoints/last.keras", "runs/x/checkpoints/best.keras")  # doctest: +ELLIPSIS
        <...BestIsLast object at ...>
    """

    def __init__(self, last: str | Path, best: str | Path) -> None:
        super().__init__()
        self.last, self.best = Path(last), Path(best)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.last.is_file():
            return
        with atomic_path(self.best) as partial:
            partial.unlink(missing_ok=True)  # a killed run's leftover: a link cannot be made over it
            try:
                os.link(self.last, partial)
            except OSError:  # no hard links here (some network and FUSE filesystems)
                shutil.copy2(self.last, partial)


class EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' ``EarlyStopping``, counting validated epochs only, without a warning for the others."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.monitor in (logs or {}):
            super().on_epoch_end(epoch, logs)


class HistoryLogger(keras.callbacks.CSVLogger):
    """Keras' ``CSVLogger`` with columns that stay put when not every epoch is validated.

    Keras takes the columns from the first epoch it logs. When that epoch was not validated
    (``training.validate_last``) this adds the ``val_`` twin of each metric (not of the
    learning rate), in the order a validated epoch would give; when a resumed run appends, the
    file's own header is kept, so that its rows stay under the right columns whichever epoch
    comes first. A missing value is written ``NA``.

    ``validates=False`` (a run with no validation pass at all): no ``val_`` columns.

    ``epochs_kept``: on a resumed run, the epochs the restored backup holds (:class:`RunBackup`).
    Rows of later epochs (written before a kill, whose epoch now runs again) and a row cut
    short by the kill are dropped first, so that every epoch appears once.
    """

    def __init__(self, filename: str, append: bool = False, epochs_kept: int | None = None, validates: bool = True,
                 **kwargs) -> None:
        super().__init__(filename, append=append, **kwargs)
        self.epochs_kept = epochs_kept
        self.validates = validates

    def on_train_begin(self, logs: dict | None = None) -> None:
        path = Path(self.filename)
        if self.append and self.epochs_kept is not None and path.is_file():
            _keep_history_rows(path, self.epochs_kept, self.sep)
        super().on_train_begin(logs)
        if self.append and path.is_file():
            with path.open() as handle:
                header = handle.readline().strip()
            if header:
                self.keys = [key for key in header.split(self.sep) if key != "epoch"]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if self.keys is None and not any(key.startswith("val_") for key in logs):
            self.keys = sorted([*logs, *(f"val_{key}" for key in logs if key != "learning_rate" and self.validates)])
        super().on_epoch_end(epoch, logs)


def _keep_history_rows(path: Path, epochs: int, sep: str = ",") -> None:
    """Rewrite the CSV history at ``path`` with its whole rows of epochs ``0 .. epochs - 1`` only."""
    lines = path.read_text().splitlines()
    if not lines:
        return
    width = len(lines[0].split(sep))
    kept = [lines[0]]
    for line in lines[1:]:
        cells = line.split(sep)
        if len(cells) == width and cells[0].isdigit() and int(cells[0]) < epochs:
            kept.append(line)
    if len(kept) == len(lines):
        return
    logger.info("history.csv: dropped %d row(s) of epochs the backup does not hold", len(lines) - len(kept))
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class RunBackup(keras.callbacks.Callback):
    """The training state after every epoch, for ``fit --resume``; each write is atomic.

    Takes the place of Keras' ``BackupAndRestore``, which writes its weights file in place and
    its epoch number in a second file, and deletes both when training ends: a run killed inside
    the weights write could not resume (an unreadable HDF5 file), one killed between the two
    writes paired one epoch's weights with the previous epoch's number, and one killed after the
    deletion, before ``complete.json``, started again at epoch 0. Here each epoch's weights
    (with the optimizer's state) go to a file of their own, ``epoch-0004.weights.h5``, written
    under a temporary name and renamed; then ``state.json`` (``{"epoch", "weights"}``),
    replaced atomically, names it. That replacement is the commit: a run killed at any moment
    restores the last epoch whose ``state.json`` was written. The folder outlives training;
    ``fit`` removes it once the run's ``complete.json`` is written.

    Args:
        folder: the backup folder (``<run>/backup``).

    Example:
        >>> backup = RunBackup("runs/demo/backup")  # doctest: +SKIP
        >>> model.fit(data, epochs=10, callbacks=[backup])  # doctest: +SKIP
        >>> backup.restored_epoch  # epochs already done when this fit began  # doctest: +SKIP
    """

    STATE = "state.json"

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.restored_epoch = 0

    @classmethod
    def saved_epochs(cls, folder: str | Path) -> int | None:
        """The epochs the backup in ``folder`` holds, or None when there is none."""
        state = cls._state(Path(folder))
        return None if state is None else int(state["epoch"])

    @classmethod
    def _state(cls, folder: Path) -> dict | None:
        path = folder / cls.STATE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if not (folder / state["weights"]).is_file():
            raise FileNotFoundError(f"{path} names {state['weights']}, which is missing: the backup is damaged; "
                                    "delete the run's backup folder to start the run again from epoch 0")
        return state

    def on_train_begin(self, logs: dict | None = None) -> None:
        state = self._state(self.folder)
        if state is None:
            return
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)  # its variables must exist to be loaded
        self.model.load_weights(self.folder / state["weights"])
        self.restored_epoch = int(state["epoch"])
        self.model._initial_epoch = self.restored_epoch  # where Keras' fit starts its epoch loop
        logger.info("resumed from the backup of epoch %d", self.restored_epoch)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch + 1:04d}.weights.h5"
        with atomic_path(self.folder / name) as partial:
            self.model.save_weights(partial, overwrite=True)
        atomic_write_json(self.folder / self.STATE, {"epoch": epoch + 1, "weights": name})  # the commit
        for old in self.folder.glob("*.weights.h5"):  # earlier epochs and partial files of a killed write
            if old.name != name:
                old.unlink(missing_ok=True)


def validation_epochs(epochs: int, validate_last: int) -> int | list[int]:
    """Keras' ``validation_freq`` for a run of ``epochs`` that validates only its last ``validate_last``.

    The best checkpoint is chosen among the validated epochs; with a one-cycle schedule the
    early epochs' weights are never the best, and validating them costs time that training
    could use. ``0`` (or ``validate_last >= epochs``) validates every epoch.

    Example:
        >>> validation_epochs(10, 3), validation_epochs(10, 0), validation_epochs(4, 9)
        ([8, 9, 10], 1, 1)
    """
    if isinstance(validate_last, bool) or not isinstance(validate_last, int) or validate_last < 0:
        raise ValueError(f"training.validate_last={validate_last!r} must be a whole number of epochs >= 0 "
                         "(0 validates every epoch), e.g. --set training.validate_last=4")
    if validate_last == 0 or validate_last >= epochs:
        return 1
    return list(range(epochs - validate_last + 1, epochs + 1))


def standard_callbacks(
    run_dir: Path,
    monitor: str | None = "val_tumor_dice",
    resume: bool = False,
    early_stopping_patience: int | None = None,
    extra: Sequence[keras.callbacks.Callback] = (),
    saves: keras.Model | None = None,
) -> tuple[list[keras.callbacks.Callback], NaNStop]:
    """The run's callbacks, in order: LR logger, NaN stop, extras, checkpoints, CSV, backup, TensorBoard.

    ``monitor=None`` (training without validation): ``best.keras`` is the last epoch, as
    nnU-Net keeps its final checkpoint, and there is no early stopping. ``saves``: the model
    the checkpoints hold, when it is not the one trained (patch training).
    """
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    nan_stop = NaNStop()
    threshold = best_value_in_history(run_dir / "history.csv", monitor) if resume and monitor else None
    callbacks: list[keras.callbacks.Callback] = [LearningRateLogger(), nan_stop, *extra]
    checkpoint = functools.partial(Checkpoint, saves=saves)
    if monitor is None:
        callbacks += [checkpoint(str(checkpoints / "last.keras")),
                      BestIsLast(checkpoints / "last.keras", checkpoints / "best.keras")]
    else:
        callbacks.append(
            checkpoint(
                str(checkpoints / "best.keras"),
                monitor=monitor,
                mode="max",
                save_best_only=True,
                initial_value_threshold=threshold,
            )
        )
        callbacks.append(checkpoint(str(checkpoints / "last.keras")))
    # The history row before the backup: the backup's commit then always has its epoch's row,
    # and a resumed run drops the rows of epochs the backup does not hold.
    kept = (RunBackup.saved_epochs(run_dir / "backup") or 0) if resume else None
    callbacks.append(HistoryLogger(str(run_dir / "history.csv"), append=resume, epochs_kept=kept,
                                   validates=monitor is not None))
    callbacks.append(RunBackup(run_dir / "backup"))
    if early_stopping_patience and monitor is not None:
        callbacks.append(
            EarlyStopping(monitor=monitor, mode="max", patience=int(early_stopping_patience))
        )
    callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False))
    return callbacks, nan_stop
