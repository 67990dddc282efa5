"""keras_livseg.training.optimizers: Adam and AdamW with one fused update per variable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_livseg.training.optimizers import FusedAdam, FusedAdamW, build_optimizer_variables


def _tiny_model():
    return keras.Sequential([
        keras.Input((8, 8, 2)),
        keras.layers.Conv2D(4, 3, padding="same", use_bias=False),  # a bias before BN gets rounding noise as gradient
        keras.layers.BatchNormalization(),
        keras.layers.Conv2D(3, 1, activation="softmax"),
    ])


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 8, 2)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, (4, 8, 8)), 3)
    return x, y


def _train(optimizer, steps: int, prebuild: bool = True):
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    if prebuild:
        build_optimizer_variables(model)
    x, y = _data()
    losses = [float(model.train_on_batch(x, y)) for _ in range(steps)]
    return model, losses


@pytest.mark.parametrize("keras_cls, fused_cls, options", [
    (keras.optimizers.Adam, FusedAdam, {}),
    (keras.optimizers.AdamW, FusedAdamW, {"weight_decay": 0.1}),
    (keras.optimizers.Adam, FusedAdam, {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-3}),
])
def test_the_fused_update_equals_keras_update(keras_cls, fused_cls, options):
    """Two steps (bias correction at t = 1 and 2): weights and moments equal Keras' to float32 rounding."""
    reference, _ = _train(keras_cls(learning_rate=1e-2, **options), steps=2)
    fused, _ = _train(fused_cls(learning_rate=1e-2, **options), steps=2)
    for expected, got in zip(reference.weights, fused.weights):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-6, err_msg=expected.path)
    for expected, got in zip(reference.optimizer.variables, fused.optimizer.variables):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-8, err_msg=expected.path)
    assert int(fused.optimizer.iterations.numpy()) == 2
    # The weights moved: a step that did nothing would also "equal" an untrained reference.
    untrained = _tiny_model()
    assert max(np.abs(w.numpy() - u.numpy()).max() for w, u in zip(fused.trainable_weights, untrained.trainable_weights)) > 1e-3


def test_amsgrad_and_a_learning_rate_schedule_follow_keras():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=1, decay_rate=0.5)
    reference, ref_losses = _train(keras.optimizers.Adam(schedule, amsgrad=True), steps=3)
    fused, losses = _train(FusedAdam(keras.optimizers.schedules.ExponentialDecay(1e-2, 1, 0.5), amsgrad=True), steps=3)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    scheduled_ref, _ = _train(keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(1e-2, 1, 0.5)), steps=3)
    scheduled, _ = _train(FusedAdam(keras.optimizers.schedules.ExponentialDecay(1e-2, 1, 0.5)), steps=3)
    for expected, got in zip(scheduled_ref.weights, scheduled.weights):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-5)


def test_adamw_with_a_schedule_and_exclusions_decays_as_keras():
    """The learning rate is read once a step for the decay; the result is Keras' AdamW's."""
    def schedule():
        return keras.optimizers.schedules.PiecewiseConstantDecay([1], [1e-2, 5e-3])

    def optimizer(cls):
        opt = cls(learning_rate=schedule(), weight_decay=0.5)
        opt.exclude_from_weight_decay(var_names=["beta"])
        return opt

    reference, _ = _train(optimizer(keras.optimizers.AdamW), steps=3)
    fused, _ = _train(optimizer(FusedAdamW), steps=3)
    for expected, got in zip(reference.weights, fused.weights):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-6, err_msg=expected.path)
    undecayed, _ = _train(FusedAdamW(learning_rate=schedule(), weight_decay=0.0), steps=3)
    kernel = fused.layers[0].kernel.numpy()
    assert np.abs(kernel).sum() < np.abs(undecayed.layers[0].kernel.numpy()).sum()  # the decay did shrink it


def test_half_precision_variables_take_keras_path():
    """In bfloat16, ResourceApplyAdam's 1 - beta_2 would round to 0 and freeze the velocity."""
    def train(cls):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, dtype="bfloat16"),
                                  keras.layers.Dense(2, dtype="float16")])
        model.compile(optimizer=cls(learning_rate=1e-2), loss="mse")
        build_optimizer_variables(model)
        x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
        for _ in range(2):
            model.train_on_batch(x, np.ones((8, 2), "float32"))
        return [v.numpy().astype("float32") for v in model.optimizer.variables]

    reference, fused = train(keras.optimizers.Adam), train(FusedAdam)
    for expected, got in zip(reference, fused):
        np.testing.assert_array_equal(got, expected)
    assert any(np.abs(v).max() > 0 for v in fused[2:])  # the moments moved


def test_build_optimizer_variables_creates_the_moments_before_the_first_step():
    model = _tiny_model()
    model.compile(optimizer=FusedAdamW(1e-3, weight_decay=1e-4), loss="categorical_crossentropy")
    assert not model.optimizer.built
    build_optimizer_variables(model)
    assert model.optimizer.built
    # iterations, learning rate, then a momentum and a velocity per trainable variable
    assert len(model.optimizer.variables) == 2 + 2 * len(model.trainable_variables)
    build_optimizer_variables(model)  # a second call changes nothing
    assert len(model.optimizer.variables) == 2 + 2 * len(model.trainable_variables)


def test_a_saved_model_reloads_with_its_fused_optimizer_and_state(tmp_path):
    model, _ = _train(FusedAdamW(1e-2, weight_decay=1e-3), steps=2)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.optimizer, FusedAdamW)
    assert restored.optimizer.get_config()["weight_decay"] == pytest.approx(1e-3)
    for expected, got in zip(model.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())
    x, y = _data()
    np.testing.assert_allclose(float(restored.train_on_batch(x, y)), float(model.train_on_batch(x, y)), rtol=1e-5)


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras
    import numpy as np
    from keras_livseg.training.optimizers import FusedAdamW, build_optimizer_variables

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 2)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, (8, 8, 8)), 3)

    def train(cls):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
                                      keras.layers.BatchNormalization(), keras.layers.Conv2D(3, 1, activation="softmax")])
            model.compile(optimizer=cls(learning_rate=1e-2, weight_decay=0.1), loss="categorical_crossentropy")
            build_optimizer_variables(model)
        initial = [v.numpy() for v in model.trainable_weights]
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        train.initial = initial  # the same seed: both runs start from these weights
        replicas = [[v.value.values[i].numpy() for v in model.trainable_weights] for i in range(2)]
        moments = [[v.value.values[i].numpy() for v in model.optimizer.variables[2:]] for i in range(2)]
        return replicas, moments

    fused, fused_moments = train(FusedAdamW)
    keras_, keras_moments = train(keras.optimizers.AdamW)
    def gap(a, b):
        return max(float(np.abs(p - q).max()) for p, q in zip(a, b))
    print(json.dumps({"replicas_apart": gap(fused[0], fused[1]), "moments_apart": gap(fused_moments[0], fused_moments[1]),
                      "vs_keras": max(gap(fused[i], keras_[i]) for i in range(2)),
                      "moments_vs_keras": max(gap(fused_moments[i], keras_moments[i]) for i in range(2)),
                      "moved": gap(fused[0], train.initial)}))
    """
)


@pytest.mark.slow
def test_under_a_mirrored_strategy_every_replica_gets_keras_update():
    """Two logical CPUs: each replica's copy of every weight and moment is updated, and equals Keras' AdamW."""
    done = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas_apart"] == 0.0 and result["moments_apart"] == 0.0
    assert result["vs_keras"] < 1e-6 and result["moments_vs_keras"] < 1e-6
    assert result["moved"] > 1e-3
