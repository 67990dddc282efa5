"""Tests for keras_livseg.training.metrics: hand-computed counts, epoch accumulation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_livseg.training.losses import CombinedCEDiceLoss
from keras_livseg.training.metrics import (
    DiceScore,
    IoUScore,
    MeanIoU,
    PixelAccuracy,
    PrecisionScore,
    RecallScore,
    default_metrics,
    region_counts,
    score_from_counts,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# A 4x4 slice. Truth and predicted labels:
#   truth            prediction
#   0 0 1 1          0 1 1 1
#   0 1 1 1          0 1 1 2
#   0 1 2 2          0 1 1 2
#   0 0 2 0          0 0 2 2
TRUTH = np.array([[[0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 2, 2], [0, 0, 2, 0]]])
PRED = np.array([[[0, 1, 1, 1], [0, 1, 1, 2], [0, 1, 1, 2], [0, 0, 2, 2]]])
# Liver (label >= 1): truth 9 pixels, prediction 11; TP 9, FP 2 ((0,1), (3,3)), FN 0.
LIVER_DICE = 2 * 9 / (2 * 9 + 2 + 0)  # 0.9
LIVER_IOU = 9 / (9 + 2 + 0)
# Tumor (label 2): truth (2,2) (2,3) (3,2); prediction (1,3) (2,3) (3,2) (3,3);
# TP 2, FP 2, FN 1.
TUMOR_DICE = 2 * 2 / (2 * 2 + 2 + 1)  # 4/7
TUMOR_IOU = 2 / (2 + 2 + 1)
TUMOR_PRECISION = 2 / (2 + 2)
TUMOR_RECALL = 2 / (2 + 1)
# Exact classes for mIoU: class 0 truth 7 pixels, prediction 5, TP 5 FP 0 FN 2 -> 5/7;
# class 1 truth 6, prediction 7, TP 5 FP 2 FN 1 -> 5/8; class 2 -> 2/5.
MEAN_IOU = (5 / 7 + 5 / 8 + 2 / 5) / 3
# Wrong pixels: (0,1) (1,3) (2,2) (3,3) -> 12 of 16 right.
PIXEL_ACCURACY = 12 / 16

EXPECTED = {
    "liver_dice": LIVER_DICE,
    "tumor_dice": TUMOR_DICE,
    "liver_iou": LIVER_IOU,
    "tumor_iou": TUMOR_IOU,
    "mean_iou": MEAN_IOU,
    "tumor_precision": TUMOR_PRECISION,
    "tumor_recall": TUMOR_RECALL,
    "pixel_accuracy": PIXEL_ACCURACY,
}


def softmax_like(labels):
    """Probabilities whose argmax is ``labels`` (0.8 on the class, 0.1 elsewhere)."""
    return (np.eye(3, dtype="float32")[labels] * 0.7 + 0.1).astype("float32")


def scores(metrics):
    return {m.name: float(m.result()) for m in metrics}


def test_default_metric_names():
    assert [m.name for m in default_metrics()] == list(EXPECTED)


def test_metrics_hand_computed_4x4():
    metrics = default_metrics()
    for metric in metrics:
        metric.update_state(TRUTH, softmax_like(PRED))
    assert scores(metrics) == pytest.approx(EXPECTED, abs=1e-6)


def test_region_counts_and_score_from_counts():
    counts = [float(c) for c in region_counts(TRUTH, PRED, "tumor")]
    assert counts == [2.0, 2.0, 1.0]
    assert float(score_from_counts(*counts, score="dice")) == pytest.approx(TUMOR_DICE)
    assert float(score_from_counts(0.0, 0.0, 0.0, "iou", empty_score=0.0)) == 0.0
    with pytest.raises(ValueError, match="'f1'"):
        score_from_counts(1.0, 0.0, 0.0, "f1")


def test_int_region_is_exact_class():
    # Class 1 exactly (liver parenchyma): TP 5, FP 2, FN 1 -> Dice 10 / 13.
    metric = DiceScore(1)
    assert metric.name == "class1_dice"
    metric.update_state(TRUTH, softmax_like(PRED))
    assert float(metric.result()) == pytest.approx(10 / 13)


def test_label_layouts_and_logits_agree():
    for y_true in (TRUTH[..., None], TRUTH.astype("float32"), np.eye(3)[TRUTH]):
        metric = DiceScore("tumor")
        # argmax of logits is the argmax of probabilities
        metric.update_state(y_true, np.log(softmax_like(PRED)))
        assert float(metric.result()) == pytest.approx(TUMOR_DICE)


def test_empty_tumor_in_both_scores_one():
    y_true = np.array([[[0, 1], [1, 0]]])
    metrics = [DiceScore("tumor"), IoUScore("tumor"), PrecisionScore(), RecallScore()]
    for metric in metrics:
        metric.update_state(y_true, softmax_like(y_true))
    assert [float(m.result()) for m in metrics] == [1.0, 1.0, 1.0, 1.0]
    custom = DiceScore("tumor", empty_score=0.0)
    custom.update_state(y_true, softmax_like(y_true))
    assert float(custom.result()) == 0.0


def test_tumor_on_one_side_only_scores_zero():
    y_true = np.array([[[0, 1], [1, 0]]])
    false_alarm = np.array([[[2, 1], [1, 0]]])  # tumor predicted, none in truth
    metrics = [DiceScore("tumor"), PrecisionScore(), RecallScore()]
    for metric in metrics:
        metric.update_state(y_true, softmax_like(false_alarm))
    assert [float(m.result()) for m in metrics] == [0.0, 0.0, 0.0]
    missed = DiceScore("tumor")  # tumor in truth, none predicted
    missed.update_state(false_alarm, softmax_like(y_true))
    assert float(missed.result()) == 0.0


def test_empty_in_one_batch_but_not_epoch_is_not_empty():
    # Batch 1 has no tumor anywhere (its own Dice would be the empty score 1);
    # batch 2 misses its only tumor pixel. The epoch has TP 0, FN 1 -> Dice 0.
    metric = DiceScore("tumor")
    empty = np.array([[[0, 1], [1, 0]]])
    metric.update_state(empty, softmax_like(empty))
    metric.update_state(np.array([[[2, 1], [1, 0]]]), softmax_like(empty))
    assert float(metric.result()) == 0.0


def test_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, size=(4, 8, 8))
    y_pred = rng.dirichlet(np.ones(3), size=(4, 8, 8)).astype("float32")
    whole, parts = default_metrics(), default_metrics()
    for metric in whole:
        metric.update_state(y_true, y_pred)
    for metric in parts:
        for start in (0, 1, 3):  # uneven batches: 1, 2, 1 images
            stop = {0: 1, 1: 3, 3: 4}[start]
            metric.update_state(y_true[start:stop], y_pred[start:stop])
    assert scores(parts) == pytest.approx(scores(whole), abs=1e-6)


def test_accumulated_dice_differs_from_mean_of_batch_dice():
    # Batch A: 1 tumor pixel, missed -> batch Dice 0.
    # Batch B: 8 tumor pixels, all found -> batch Dice 1.
    # Mean of batch Dice 0.5; epoch Dice 2*8 / (2*8 + 0 + 1) = 16/17.
    a_true = np.zeros((1, 4, 4), "int32")
    a_true[0, 0, 0] = 2
    a_pred = np.zeros_like(a_true)
    b_true = np.zeros((1, 4, 4), "int32")
    b_true[0, :2, :] = 2
    b_pred = b_true.copy()
    metric = DiceScore("tumor")
    batch_dice = []
    for y_true, y_pred in ((a_true, a_pred), (b_true, b_pred)):
        single = DiceScore("tumor")
        single.update_state(y_true, softmax_like(y_pred))
        batch_dice.append(float(single.result()))
        metric.update_state(y_true, softmax_like(y_pred))
    assert batch_dice == [0.0, 1.0]
    assert float(metric.result()) == pytest.approx(16 / 17)
    assert float(metric.result()) != pytest.approx(np.mean(batch_dice))


def test_reset_state():
    metrics = default_metrics()
    for metric in metrics:
        metric.update_state(TRUTH, softmax_like(PRED))
        metric.reset_state()
        assert all(float(np.sum(np.asarray(v))) == 0.0 for v in metric.variables)
        # After a reset, only the new data counts: a perfect prediction scores 1.
        metric.update_state(TRUTH, softmax_like(TRUTH))
        assert float(metric.result()) == pytest.approx(1.0)


def test_sample_weight_excludes_images():
    # Image 0 is the 4x4 example, image 1 is all wrong; weight 0 drops image 1.
    y_true = np.concatenate([TRUTH, TRUTH])
    y_pred = softmax_like(np.concatenate([PRED, (TRUTH + 1) % 3]))
    for weights in (np.array([1.0, 0.0]), np.array([1.0, 0.0])[:, None, None] * np.ones((2, 4, 4))):
        metrics = default_metrics()
        for metric in metrics:
            metric.update_state(y_true, y_pred, sample_weight=weights)
        assert scores(metrics) == pytest.approx(EXPECTED, abs=1e-6)


def test_sigmoid_head_decoding():
    # liver channel on where predicted label >= 1, tumor channel on where it is 2.
    liver = np.where(PRED >= 1, 0.9, 0.1)
    tumor = np.where(PRED == 2, 0.9, 0.1)
    y_pred = np.stack([liver, tumor], axis=-1).astype("float32")
    metrics = default_metrics(head="sigmoid")
    for metric in metrics:
        metric.update_state(TRUTH, y_pred)
    assert scores(metrics) == pytest.approx(EXPECTED, abs=1e-6)
    # Channel order is configurable; a background channel does not take part.
    reordered = np.stack([np.full_like(liver, 0.9), tumor, liver], -1).astype("float32")
    metric = DiceScore("tumor", head="sigmoid", channels=("background", "tumor", "liver"))
    metric.update_state(TRUTH, reordered)
    assert float(metric.result()) == pytest.approx(TUMOR_DICE)
    # Logits: threshold 0.
    logit_metric = DiceScore("liver", head="sigmoid", threshold=0.0)
    logit_metric.update_state(TRUTH, np.log(y_pred / (1 - y_pred)))
    assert float(logit_metric.result()) == pytest.approx(LIVER_DICE)


def test_mean_iou_empty_policy():
    # No tumor in truth nor prediction; classes 0 and 1 perfect.
    y_true = np.array([[[0, 1], [1, 0]]])
    with_one = MeanIoU()
    without = MeanIoU(empty_score=None)
    for metric in (with_one, without):
        metric.update_state(y_true, softmax_like(y_true))
    assert float(with_one.result()) == 1.0
    assert float(without.result()) == 1.0
    # Now pixel (0,1) is predicted background: with the empty tumor class counted as 1
    # or left out, the means differ.
    pred = np.array([[[0, 0], [1, 0]]])
    with_one, without = MeanIoU(), MeanIoU(empty_score=None)
    for metric in (with_one, without):
        metric.update_state(y_true, softmax_like(pred))
    # class 0: TP 2, FP 1 -> 2/3; class 1: TP 1, FN 1 -> 1/2; class 2 empty.
    assert float(with_one.result()) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert float(without.result()) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_pixel_accuracy_is_zero_before_updates():
    assert float(PixelAccuracy().result()) == 0.0


@pytest.mark.parametrize(
    "metric",
    [
        DiceScore("tumor", name="val_like", empty_score=0.0),
        IoUScore(1, head="sigmoid", channels=("tumor", "liver"), threshold=0.3),
        PrecisionScore(),
        RecallScore("liver"),
        MeanIoU(empty_score=None),
        PixelAccuracy(head="sigmoid"),
    ],
    ids=lambda m: m.name,
)
def test_config_round_trip(metric):
    config = metric.get_config()
    clone = type(metric).from_config(config)
    assert clone.get_config() == config
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert type(restored) is type(metric) and restored.get_config() == config


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="'kidney'"):
        DiceScore("kidney")
    with pytest.raises(ValueError, match="region=5"):
        IoUScore(5)
    with pytest.raises(ValueError, match="head='relu'"):
        DiceScore(head="relu")
    with pytest.raises(ValueError, match="empty_score=nan"):
        DiceScore(empty_score=float("nan"))
    with pytest.raises(ValueError, match="num_classes=4"):
        MeanIoU(num_classes=4)
    with pytest.raises(ValueError, match="3 channels"):
        DiceScore(head="sigmoid").update_state(TRUTH, softmax_like(PRED))


def test_tiny_model_fits_and_round_trips_as_keras_file(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8, 8, 1)).astype("float32")
    masks = rng.integers(0, 3, size=(4, 8, 8, 1))
    inputs = keras.Input((8, 8, 1), name="ct_slices")
    outputs = keras.layers.Conv2D(3, 1, activation="softmax", dtype="float32",
                                  name="probabilities")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=CombinedCEDiceLoss(class_weights=(1.0, 1.0, 2.0)),
                  metrics=default_metrics())
    history = model.fit(images, masks, batch_size=4, epochs=1, verbose=0,
                        validation_data=(images, masks))
    logs = {key: values[-1] for key, values in history.history.items()}
    for name in EXPECTED:
        assert 0.0 <= logs[name] <= 1.0 and 0.0 <= logs[f"val_{name}"] <= 1.0
    assert np.isfinite(logs["loss"])

    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # custom objects found through the registry
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0),
                               rtol=1e-6)
    assert isinstance(loaded.loss, CombinedCEDiceLoss)
    assert loaded.loss.get_config() == model.loss.get_config()
    before = model.evaluate(images, masks, verbose=0, return_dict=True)
    after = loaded.evaluate(images, masks, verbose=0, return_dict=True)
    assert after == pytest.approx(before, abs=1e-6)
    assert set(EXPECTED) <= set(after)


JAX_SCRIPT = r"""
import json, math
import jax, keras
import numpy as np
from keras_livseg.training.losses import CombinedCEDiceLoss
from keras_livseg.training.metrics import DiceScore, MeanIoU
truth = np.array(TRUTH)
probs = (np.eye(3, dtype="float32")[np.array(PRED)] * 0.7 + 0.1).astype("float32")
loss = CombinedCEDiceLoss()
value = float(loss(truth, probs))
grad = jax.grad(lambda p: loss(truth, p))(jax.numpy.asarray(probs))
dice = DiceScore("tumor")
dice.update_state(truth, probs)
miou = MeanIoU()
miou.update_state(truth[:, :2], probs[:, :2])
miou.update_state(truth[:, 2:], probs[:, 2:])
print(json.dumps({"backend": keras.backend.backend(), "loss": value,
                  "grad_finite": bool(np.isfinite(np.asarray(grad)).all()),
                  "tumor_dice": float(dice.result()), "mean_iou": float(miou.result())}))
"""


@pytest.mark.slow
def test_loss_and_metrics_under_jax_backend(jax_env):
    script = JAX_SCRIPT.replace("TRUTH", repr(TRUTH.tolist())).replace("PRED", repr(PRED.tolist()))
    proc = subprocess.run([sys.executable, "-c", script], env=jax_env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax"
    assert result["grad_finite"]
    assert result["tumor_dice"] == pytest.approx(TUMOR_DICE, abs=1e-6)
    assert result["mean_iou"] == pytest.approx(MEAN_IOU, abs=1e-6)
    # Same loss as the TensorFlow backend computes here.
    assert result["loss"] == pytest.approx(float(CombinedCEDiceLoss()(TRUTH, softmax_like(PRED))),
                                           rel=1e-5)
