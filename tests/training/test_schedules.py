"""Tests for keras_livseg.training.schedules.OneCycle: shape, clamping, serialization."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest

from keras_livseg.training.schedules import OneCycle

MAX_LR = 1e-3
TOTAL = 100
# Defaults: warm-up over 0.3 * 100 = 30 steps from 1e-3 / 25 = 4e-5 to 1e-3,
# then cosine down to 4e-5 / 1e4 = 4e-9 at step 100.
INITIAL = MAX_LR / 25
MINIMUM = MAX_LR / (25 * 1e4)


def lr(schedule, step):
    return float(schedule(step))


@pytest.mark.parametrize("warmup_mode", ["cosine", "linear"])
def test_shape(warmup_mode):
    schedule = OneCycle(MAX_LR, TOTAL, warmup_mode=warmup_mode)
    values = np.asarray(schedule(np.arange(TOTAL + 1)), dtype="float64")
    assert values[0] == pytest.approx(INITIAL, rel=1e-6)
    assert values[30] == pytest.approx(MAX_LR, rel=1e-6)
    assert values.argmax() == 30
    assert np.all(np.diff(values[:31]) > 0)  # rises during warm-up
    assert np.all(np.diff(values[30:]) <= 0)  # never rises after the peak
    assert values[TOTAL] == pytest.approx(MINIMUM, rel=1e-4)


def test_warmup_modes_differ_as_specified():
    # At step 6 the warm-up is 0.2 done: linear 0.2, half-cosine (1 - cos(0.2 pi)) / 2.
    linear = OneCycle(MAX_LR, TOTAL, warmup_mode="linear")
    cosine = OneCycle(MAX_LR, TOTAL, warmup_mode="cosine")
    assert lr(linear, 6) == pytest.approx(INITIAL + 0.2 * (MAX_LR - INITIAL), rel=1e-5)
    cosine_share = (1 - math.cos(0.2 * math.pi)) / 2  # 0.0955
    assert lr(cosine, 6) == pytest.approx(INITIAL + cosine_share * (MAX_LR - INITIAL), rel=1e-5)


def test_annealing_midpoint_is_halfway():
    # Step 65 is halfway between the peak (30) and the end (100): cos(pi / 2) = 0.
    schedule = OneCycle(MAX_LR, TOTAL)
    assert lr(schedule, 65) == pytest.approx((MAX_LR + MINIMUM) / 2, rel=1e-5)


def test_steps_past_the_end_clamp_at_minimum():
    schedule = OneCycle(MAX_LR, TOTAL)
    for step in (TOTAL, TOTAL + 1, 10 * TOTAL, 10**7):
        assert lr(schedule, step) == pytest.approx(MINIMUM, rel=1e-4)
    assert schedule.min_lr == pytest.approx(MINIMUM)
    assert schedule.initial_lr == pytest.approx(INITIAL)


def test_no_warmup_starts_at_peak():
    schedule = OneCycle(MAX_LR, TOTAL, warmup_fraction=0.0)
    assert lr(schedule, 0) == pytest.approx(MAX_LR, rel=1e-6)
    assert lr(schedule, TOTAL) == pytest.approx(MINIMUM, rel=1e-4)
    single = OneCycle(MAX_LR, 1)
    # One step: the warm-up ends 0.3 steps in, so step 0 is still at the initial rate.
    assert lr(single, 0) == pytest.approx(INITIAL, rel=1e-6) and lr(single, 1) == pytest.approx(MINIMUM, rel=1e-4)


def test_custom_divisors():
    schedule = OneCycle(0.01, 10, warmup_fraction=0.5, div_factor=10, final_div_factor=100)
    assert lr(schedule, 0) == pytest.approx(0.001, rel=1e-6)
    assert lr(schedule, 5) == pytest.approx(0.01, rel=1e-6)
    assert lr(schedule, 10) == pytest.approx(1e-5, rel=1e-4)


def test_config_round_trip():
    schedule = OneCycle(3e-4, 1234, warmup_fraction=0.25, div_factor=10.0,
                        final_div_factor=100.0, warmup_mode="linear", name="pan")
    config = schedule.get_config()
    clone = OneCycle.from_config(config)
    assert clone.get_config() == config
    steps = np.arange(0, 1300, 50)
    np.testing.assert_allclose(np.asarray(clone(steps)), np.asarray(schedule(steps)))
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, OneCycle) and restored.get_config() == config


def test_survives_optimizer_serialization():
    schedule = OneCycle(MAX_LR, TOTAL, warmup_fraction=0.2)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=1e-4)
    serialized = keras.optimizers.serialize(optimizer)
    restored = keras.optimizers.deserialize(json.loads(json.dumps(serialized)))
    assert isinstance(restored, keras.optimizers.AdamW)
    assert isinstance(restored._learning_rate, OneCycle)
    assert restored._learning_rate.get_config() == schedule.get_config()
    # The optimizer evaluates the schedule at its iteration count (0 before any step).
    assert float(restored.learning_rate) == pytest.approx(INITIAL, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_lr": 0.0}, "max_lr=0.0"),
        ({"max_lr": float("inf")}, "max_lr=inf"),
        ({"total_steps": 0}, "total_steps=0"),
        ({"total_steps": 10.5}, "total_steps=10.5"),
        ({"warmup_fraction": 1.0}, "warmup_fraction=1.0"),
        ({"warmup_fraction": -0.1}, "warmup_fraction=-0.1"),
        ({"div_factor": 0.5}, "div_factor=0.5"),
        ({"final_div_factor": 0}, "final_div_factor=0"),
        ({"warmup_mode": "exp"}, "warmup_mode='exp'"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    arguments = {"max_lr": MAX_LR, "total_steps": TOTAL, **kwargs}
    with pytest.raises(ValueError, match=match):
        OneCycle(**arguments)
