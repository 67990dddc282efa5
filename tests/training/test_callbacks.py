"""Tests for ``keras_livseg.training.callbacks``: runs that validate only their last epochs."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_livseg.training.callbacks import (
    BestIsLast,
    Checkpoint,
    EarlyStopping,
    HistoryLogger,
    RunBackup,
    best_value_in_history,
    validation_epochs,
)


def tiny_model() -> keras.Model:
    inputs = keras.Input((2,))
    return keras.Model(inputs, keras.layers.Dense(1)(inputs))


def rows(path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("epochs, last, expected", [(10, 4, [7, 8, 9, 10]), (10, 1, [10]), (10, 0, 1), (3, 3, 1),
                                                    (3, 7, 1)])
def test_validation_epochs_are_the_last_ones(epochs, last, expected):
    assert validation_epochs(epochs, last) == expected


@pytest.mark.parametrize("value", [-1, 2.5, "4", True])
def test_a_bad_validate_last_names_the_key_and_an_example(value):
    with pytest.raises(ValueError, match=r"training.validate_last=.* must be a whole number of epochs >= 0"):
        validation_epochs(10, value)


def test_the_best_checkpoint_skips_epochs_without_validation(tmp_path):
    model = tiny_model()
    path = tmp_path / "best.keras"
    checkpoint = Checkpoint(str(path), monitor="val_score", mode="max", save_best_only=True)
    checkpoint.set_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras' own warns "Can save best model only with ..." and saves
        checkpoint.on_epoch_end(0, {"loss": 1.0})
    assert not path.exists()
    model.layers[-1].set_weights([np.full((2, 1), 3.0, np.float32), np.zeros(1, np.float32)])
    checkpoint.on_epoch_end(1, {"loss": 0.5, "val_score": 0.4})
    model.layers[-1].set_weights([np.zeros((2, 1), np.float32), np.zeros(1, np.float32)])
    checkpoint.on_epoch_end(2, {"loss": 0.4})  # not validated: the 0.4 epoch stays the best
    checkpoint.on_epoch_end(3, {"loss": 0.3, "val_score": 0.2})  # validated, worse
    saved = keras.saving.load_model(path, compile=False)
    np.testing.assert_array_equal(saved.layers[-1].get_weights()[0], np.full((2, 1), 3.0))


def test_a_checkpoint_can_hold_another_model_than_the_trained_one(tmp_path):
    trained, held = tiny_model(), tiny_model()
    held.layers[-1].set_weights([np.full((2, 1), 7.0, np.float32), np.zeros(1, np.float32)])
    checkpoint = Checkpoint(str(tmp_path / "last.keras"), saves=held)
    checkpoint.set_model(trained)
    checkpoint.on_epoch_end(0, {"loss": 1.0})
    saved = keras.saving.load_model(tmp_path / "last.keras", compile=False)
    np.testing.assert_array_equal(saved.layers[-1].get_weights()[0], np.full((2, 1), 7.0))


def test_early_stopping_counts_validated_epochs_only():
    stopping = EarlyStopping(monitor="val_score", mode="max", patience=2)
    model = tiny_model()
    model.stop_training = False  # as fit sets it
    stopping.set_model(model)
    stopping.on_train_begin()
    stopping.on_epoch_end(0, {"val_score": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in (1, 2, 3):
            stopping.on_epoch_end(epoch, {"loss": 0.1})  # not validated: no patience used up
    assert stopping.wait == 0 and not stopping.model.stop_training
    stopping.on_epoch_end(4, {"val_score": 0.4})
    stopping.on_epoch_end(5, {"val_score": 0.4})
    assert stopping.model.stop_training


def test_history_keeps_val_columns_from_an_unvalidated_first_epoch_and_across_a_resume(tmp_path):
    path = tmp_path / "history.csv"
    logger = HistoryLogger(str(path))
    logger.set_model(tiny_model())
    logger.on_train_begin()
    logger.on_epoch_end(0, {"loss": 0.9, "learning_rate": 0.01})
    logger.on_train_end()
    # The resumed run's first epoch is validated: its columns must land under the file's header.
    resumed = HistoryLogger(str(path), append=True)
    resumed.set_model(tiny_model())
    resumed.on_train_begin()
    resumed.on_epoch_end(1, {"loss": 0.5, "learning_rate": 0.001, "val_loss": 0.6})
    resumed.on_train_end()
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["epoch", "learning_rate", "loss", "val_loss"]  # no val_learning_rate
    assert rows(path) == [{"epoch": "0", "learning_rate": "0.01", "loss": "0.9", "val_loss": "NA"},
                          {"epoch": "1", "learning_rate": "0.001", "loss": "0.5", "val_loss": "0.6"}]
    assert best_value_in_history(path, "val_loss") == 0.6  # the NA epoch is skipped, not an error


def compiled_model() -> keras.Model:
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_run_backup_restores_the_last_committed_epoch_whatever_a_kill_left(tmp_path):
    folder = tmp_path / "backup"
    model = compiled_model()
    backup = RunBackup(folder)
    backup.set_model(model)
    backup.on_train_begin()
    assert backup.restored_epoch == 0 and RunBackup.saved_epochs(folder) is None  # nothing to restore yet
    backup.on_epoch_end(0)
    model.set_weights([w + 1.0 for w in model.get_weights()])
    model.optimizer.iterations.assign(7)
    backup.on_epoch_end(1)
    committed = [w.copy() for w in model.get_weights()]
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0002.weights.h5", "state.json"]  # epoch 1's file is gone
    assert json.loads((folder / "state.json").read_text()) == {"epoch": 2, "weights": "epoch-0002.weights.h5"}
    # Killed inside epoch 3's weights write, and inside its state write: neither is read.
    (folder / ".partial-epoch-0003.weights.h5").write_bytes(b"\x89HDF\r\n half a file")
    (folder / ".partial-state.json").write_text('{"epoch": 3, "wei')
    assert RunBackup.saved_epochs(folder) == 2

    fresh = compiled_model()
    restored = RunBackup(folder)
    restored.set_model(fresh)
    restored.on_train_begin()
    assert restored.restored_epoch == 2 and fresh._initial_epoch == 2
    for got, want in zip(fresh.get_weights(), committed):
        np.testing.assert_array_equal(got, want)
    assert int(fresh.optimizer.iterations.numpy()) == 7  # the optimizer's state comes back with the weights
    restored.on_epoch_end(2)
    restored.on_train_end()
    # The next commit clears the dead partial weights; the folder outlives training (fit removes it).
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".h5")) == ["epoch-0003.weights.h5"]
    assert RunBackup.saved_epochs(folder) == 3


def test_a_checkpoint_killed_while_saving_keeps_the_previous_file(tmp_path, monkeypatch):
    best = tmp_path / "best.keras"
    model = tiny_model()
    checkpoint = Checkpoint(str(best))
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {})
    before = best.read_bytes()
    assert keras.saving.load_model(best).count_params() == model.count_params()

    def dies_halfway(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as handle:
            handle.write(b"PK half an archive")
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(keras.Model, "save", dies_halfway)
        with pytest.raises(RuntimeError, match="killed"):
            checkpoint.on_epoch_end(1, {})
    assert best.read_bytes() == before  # Keras' own writes the archive in place: it would be ruined
    checkpoint.on_epoch_end(2, {})
    assert keras.saving.load_model(best).count_params() == model.count_params()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras"]  # the dead partial file was written over


def test_a_half_file_of_a_killed_save_never_replaces_the_best_checkpoint(tmp_path):
    best = tmp_path / "best.keras"
    model = tiny_model()
    checkpoint = Checkpoint(str(best), monitor="val_loss", save_best_only=True)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_loss": 1.0})
    before = best.read_bytes()
    (tmp_path / ".partial-best.keras").write_bytes(b"PK half an archive")  # a run killed while saving
    checkpoint.on_epoch_end(1, {"val_loss": 2.0})  # not better: Keras saves nothing
    assert best.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras"]


def test_a_resumed_history_drops_the_rows_the_backup_does_not_hold(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n0,0.9\n1,0.7\n2,0.5\n3,0.")  # epoch 2 ran again after the kill; 3 was cut short
    logger = HistoryLogger(str(path), append=True, epochs_kept=2)
    logger.set_model(tiny_model())
    logger.on_train_begin()
    logger.on_epoch_end(2, {"loss": 0.4})
    logger.on_train_end()
    assert rows(path) == [{"epoch": "0", "loss": "0.9"}, {"epoch": "1", "loss": "0.7"}, {"epoch": "2", "loss": "0.4"}]


@pytest.mark.parametrize("links", [True, False])
def test_without_validation_best_is_the_last_epochs_file_saved_once(tmp_path, monkeypatch, links):
    from keras_livseg.training.callbacks import standard_callbacks

    if not links:  # a filesystem without hard links: copied instead
        def no_link(*args):
            raise OSError("hard links not supported")

        monkeypatch.setattr("os.link", no_link)
    saves = []
    real_save = keras.Model.save
    monkeypatch.setattr(keras.Model, "save", lambda self, path, *a, **k: (saves.append(Path(path).name), real_save(self, path, *a, **k)))
    callbacks, _ = standard_callbacks(tmp_path, monitor=None)
    assert [type(c) for c in callbacks if isinstance(c, (Checkpoint, BestIsLast))] == [Checkpoint, BestIsLast]
    model = tiny_model()
    checkpoints = tmp_path / "checkpoints"
    from keras_livseg.data.atomic import partial_path

    partial_path(checkpoints / "best.keras").write_bytes(b"a killed run's half file")  # written over, never read
    for epoch, value in enumerate((2.0, 5.0)):
        model.layers[-1].set_weights([np.full((2, 1), value, np.float32), np.zeros(1, np.float32)])
        for callback in callbacks:
            if isinstance(callback, (Checkpoint, BestIsLast)):
                callback.set_model(model)
                callback.on_epoch_end(epoch, {"loss": 1.0})
        best = keras.saving.load_model(checkpoints / "best.keras", compile=False)
        np.testing.assert_array_equal(best.layers[-1].get_weights()[0], np.full((2, 1), value))
        assert (checkpoints / "best.keras").read_bytes() == (checkpoints / "last.keras").read_bytes()
    assert len(saves) == 2  # one save an epoch (last.keras's), not two
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.keras", "last.keras"]
    assert ((checkpoints / "best.keras").stat().st_ino == (checkpoints / "last.keras").stat().st_ino) == links
