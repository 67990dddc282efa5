"""Tests for keras_livseg.training.losses: values checked against hand arithmetic."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_livseg.training.losses import (
    BCEDiceLoss,
    CombinedCEDiceLoss,
    cross_entropy,
    label_map,
    region_mask,
    soft_dice,
    soft_tversky,
    sparse_labels,
)

# A 2x2 slice (batch of 1): labels and softmax probabilities per pixel.
#   labels      [[0, 1],      probabilities (bg, liver, tumor)
#                [2, 1]]      (0,0) 0.8 0.2 0.0   (0,1) 0.0 0.5 0.5
#                             (1,0) 0.0 0.5 0.5   (1,1) 0.0 1.0 0.0
Y_TRUE = np.array([[[0, 1], [2, 1]]], dtype="int32")
Y_PRED = np.array(
    [[[[0.8, 0.2, 0.0], [0.0, 0.5, 0.5]], [[0.0, 0.5, 0.5], [0.0, 1.0, 0.0]]]],
    dtype="float32",
)
# CE per pixel: -ln 0.8, -ln 0.5, -ln 0.5, -ln 1 -> mean (0.22314 + 2 * 0.69315 + 0) / 4
CE_MEAN = (-math.log(0.8) - 2 * math.log(0.5)) / 4
# Liver channel (class 1): truth at (0,1), (1,1); p1 = 0.2, 0.5, 0.5, 1.0
#   intersection 0.5 + 1.0 = 1.5, sum truth 2, sum pred 2.2 -> Dice 3 / 4.2
DICE_LIVER = 2 * 1.5 / (2 + 2.2)
# Tumor channel (class 2): truth at (1,0); p2 = 0, 0.5, 0.5, 0
#   intersection 0.5, sum truth 1, sum pred 1 -> Dice 1 / 2
DICE_TUMOR = 2 * 0.5 / (1 + 1.0)
DICE_LOSS = 1 - (DICE_LIVER + DICE_TUMOR) / 2  # 1 - 0.607143 = 0.392857


def onehot(labels, num_classes=3):
    return np.eye(num_classes, dtype="float32")[labels]


def test_soft_dice_hand_computed():
    # One 2x2 channel: truth [[1, 0], [1, 1]], prediction [[1, 0.5], [0, 1]]
    # intersection 1 + 0 + 1 = 2; sums 3 and 2.5 -> Dice 4 / 5.5
    truth = np.array([[[[1], [0]], [[1], [1]]]], "float32")
    pred = np.array([[[[1.0], [0.5]], [[0.0], [1.0]]]], "float32")
    dice = np.asarray(soft_dice(truth, pred, smooth=0.0))
    np.testing.assert_allclose(dice, [4 / 5.5], rtol=1e-6)


def test_soft_dice_is_batch_level_not_mean_of_images():
    # Image A: tumor 1 pixel, predicted 0 -> own Dice 0.
    # Image B: tumor 3 pixels, predicted exactly -> own Dice 1.
    # Batch-level: intersection 3, sums 4 + 3 -> 6 / 7, not (0 + 1) / 2.
    truth = np.zeros((2, 2, 2, 1), "float32")
    truth[0, 0, 0, 0] = 1
    truth[1, :, :, 0] = [[1, 1], [1, 0]]
    pred = truth.copy()
    pred[0] = 0
    dice = float(soft_dice(truth, pred, smooth=0.0)[0])
    assert dice == pytest.approx(6 / 7, rel=1e-6)
    assert dice != pytest.approx(0.5)


def test_combined_loss_hand_computed():
    loss = CombinedCEDiceLoss()
    assert float(loss(Y_TRUE, Y_PRED)) == pytest.approx(CE_MEAN + DICE_LOSS, abs=1e-4)


def test_combined_loss_weights():
    loss = CombinedCEDiceLoss(ce_weight=2.0, dice_weight=0.5)
    assert float(loss(Y_TRUE, Y_PRED)) == pytest.approx(2 * CE_MEAN + 0.5 * DICE_LOSS, abs=1e-4)
    ce_only = CombinedCEDiceLoss(dice_weight=0.0)
    assert float(ce_only(Y_TRUE, Y_PRED)) == pytest.approx(CE_MEAN, abs=1e-5)
    dice_only = CombinedCEDiceLoss(ce_weight=0.0)
    assert float(dice_only(Y_TRUE, Y_PRED)) == pytest.approx(DICE_LOSS, abs=1e-4)


def test_soft_tversky_hand_computed_and_equal_to_dice_at_one_half():
    # Liver channel of Y_PRED: TP 1.5, FP 2.2 - 1.5 = 0.7, FN 2 - 1.5 = 0.5.
    # Tumor channel: TP 0.5, FP 0.5, FN 0.5.
    truth, pred = onehot(Y_TRUE), Y_PRED
    half = np.asarray(soft_tversky(truth, pred, (1, 2), fn_weight=0.5, smooth=0.0))
    np.testing.assert_allclose(half, [DICE_LIVER, DICE_TUMOR], rtol=1e-6)
    np.testing.assert_allclose(half, np.asarray(soft_dice(truth, pred, (1, 2), smooth=0.0)), rtol=1e-6)
    per_class = np.asarray(soft_tversky(truth, pred, (1, 2), fn_weight=(0.5, 0.8), smooth=0.0))
    np.testing.assert_allclose(per_class, [DICE_LIVER, 0.5 / (0.5 + 0.2 * 0.5 + 0.8 * 0.5)], rtol=1e-6)
    # beta = 1: false positives cost nothing, the index is the recall TP / (TP + FN).
    recall = np.asarray(soft_tversky(truth, pred, (1,), fn_weight=1.0, smooth=0.0))
    np.testing.assert_allclose(recall, [1.5 / 2.0], rtol=1e-6)


def test_tversky_weights_charge_a_missed_voxel_more_than_a_false_one():
    # A 4-pixel tumor predicted with one pixel missed, and with one false pixel added.
    labels = np.array([[[2, 2], [2, 2], [1, 1]]], "int32")  # [1, 3, 2]
    missed, extra = labels.copy(), labels.copy()
    missed[0, 1, 1] = 1
    extra[0, 2, 0] = 2
    # Tumor channel only: the liver channel's own error differs between the two.
    dice = CombinedCEDiceLoss(ce_weight=0.0, dice_classes=(2,))
    tversky = CombinedCEDiceLoss(ce_weight=0.0, dice_classes=(2,), fn_weights=(0.7,))
    # Dice: missed 1 - 6 / 7, extra 1 - 8 / 9. Tversky, beta 0.7: missed (TP 3, FN 1)
    # 1 - 3 / (3 + 0.7), extra (TP 4, FP 1) 1 - 4 / (4 + 0.3).
    assert float(dice(labels, onehot(missed))) == pytest.approx(1 / 7, abs=1e-5)
    assert float(dice(labels, onehot(extra))) == pytest.approx(1 / 9, abs=1e-5)
    assert float(tversky(labels, onehot(missed))) == pytest.approx(1 - 3 / 3.7, abs=1e-5)
    assert float(tversky(labels, onehot(extra))) == pytest.approx(1 - 4 / 4.3, abs=1e-5)
    config = tversky.get_config()
    assert config["fn_weights"] == [0.7]
    assert CombinedCEDiceLoss.from_config(config).fn_weights == [0.7]


@pytest.mark.parametrize("weights", [(0.7,), (0.5, 1.5), (0.5, -0.1), 0.7, ("a", "b"), (True, 0.5)])
def test_tversky_weights_outside_zero_one_or_of_the_wrong_count_are_refused(weights):
    with pytest.raises(ValueError, match=r"fn_weights must hold one number in \[0, 1\] per Dice class"):
        CombinedCEDiceLoss(fn_weights=weights)


def test_combined_loss_class_weights():
    # Weights (1, 1, 4): pixel CE times the weight of its true class,
    # (0.22314 + 0.69315 + 4 * 0.69315 + 0) / 4
    loss = CombinedCEDiceLoss(dice_weight=0.0, class_weights=(1.0, 1.0, 4.0))
    expected = (-math.log(0.8) - math.log(0.5) - 4 * math.log(0.5)) / 4
    assert float(loss(Y_TRUE, Y_PRED)) == pytest.approx(expected, abs=1e-5)


def test_cross_entropy_per_pixel_and_finite_at_zero_probability():
    ce = np.asarray(cross_entropy(Y_TRUE, Y_PRED))
    np.testing.assert_allclose(
        ce, [[[-math.log(0.8), -math.log(0.5)], [-math.log(0.5), 0.0]]], atol=1e-5
    )
    wrong = np.asarray(cross_entropy(np.array([[[2]]]), np.array([[[[1.0, 0.0, 0.0]]]], "float32")))
    assert wrong[0, 0, 0] == pytest.approx(-math.log(keras.config.epsilon()), rel=1e-5)  # clipped at epsilon


def test_perfect_prediction_without_tumor_scores_zero():
    # No tumor in truth nor prediction: tumor Dice is smooth / smooth = 1, liver
    # Dice 1, CE -log(1 - eps) ~ 1e-7 -> loss ~0.
    y_true = np.array([[[1, 1], [0, 0]]])
    loss = CombinedCEDiceLoss()
    assert float(loss(y_true, onehot(y_true))) == pytest.approx(0.0, abs=1e-5)


def test_false_tumor_on_empty_truth_is_penalised():
    # Truth [[1, 1], [0, 0]], no tumor. Prediction: liver exact, and pixel (1,0)
    # split 0.5 background / 0.5 tumor.
    #   liver Dice: intersection 2, sums 2 + 2 -> 1
    #   tumor Dice: (0 + s) / (0 + 0.5 + s) ~ 0 -> Dice loss 1 - (1 + 0) / 2 = 0.5
    y_true = np.array([[[1, 1], [0, 0]]])
    y_pred = onehot(y_true)
    y_pred[0, 1, 0] = [0.5, 0.0, 0.5]
    loss = CombinedCEDiceLoss(ce_weight=0.0)
    assert float(loss(y_true, y_pred)) == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize(
    "y_true",
    [
        Y_TRUE,
        Y_TRUE[..., None],
        Y_TRUE.astype("float32"),
        Y_TRUE[..., None].astype("float32") - 1e-4,  # float labels that went through a resize
        onehot(Y_TRUE),
    ],
    ids=["bhw_int", "bhw1_int", "bhw_float", "bhw1_float_rounded", "onehot"],
)
def test_label_layouts_agree(y_true):
    loss = CombinedCEDiceLoss()
    assert float(loss(y_true, Y_PRED)) == pytest.approx(CE_MEAN + DICE_LOSS, abs=1e-4)


def test_sparse_labels_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 2\)"):
        sparse_labels(np.zeros((1, 2, 2, 2)), num_channels=3)
    with pytest.raises(ValueError, match="rank 2"):
        sparse_labels(np.zeros((2, 2)), num_channels=3)


def test_from_logits_matches_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 4, 4))
    probs = np.asarray(keras.ops.softmax(logits, axis=-1))
    from_probs = float(CombinedCEDiceLoss()(labels, probs))
    from_logits = float(CombinedCEDiceLoss(from_logits=True)(labels, logits))
    assert from_logits == pytest.approx(from_probs, rel=1e-5)


def test_mixed_float16_inputs_finite_and_match_float32():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 8, 8))
    probs32 = np.asarray(keras.ops.softmax(logits, axis=-1))
    probs16 = probs32.astype("float16")
    loss32 = float(CombinedCEDiceLoss()(labels, probs32))
    for loss in (CombinedCEDiceLoss(), CombinedCEDiceLoss(dtype="mixed_float16")):
        value = float(loss(labels, probs16))
        assert math.isfinite(value)
        # float16 keeps ~3 decimal digits of each probability.
        assert value == pytest.approx(loss32, rel=2e-3)


def test_dice_float16_sums_do_not_overflow_or_underflow():
    # 2 x 200 x 200 = 80,000 liver pixels: a float16 sum would pass 65,504 (inf).
    truth = np.zeros((2, 200, 200, 2), "float16")
    truth[..., 0] = 1
    pred = truth.copy()
    dice = np.asarray(soft_dice(truth, pred))
    np.testing.assert_allclose(dice, [1.0, 1.0], atol=1e-6)  # empty tumor: s / s = 1
    # smooth = 1e-8 is 0 in float16; computed in float32 the empty class is still 1, not 0/0.
    dice_tiny = np.asarray(soft_dice(truth[:1, :2, :2], pred[:1, :2, :2], smooth=1e-8))
    np.testing.assert_allclose(dice_tiny, [1.0, 1.0], atol=1e-6)


def test_gradient_is_finite_even_at_saturated_probabilities():
    labels = np.array([[[0, 1], [2, 2]]])
    # +-60 logits saturate softmax to exact 0 and 1 in float32.
    logits = tf.Variable(
        np.array([[[[60, -60, -60], [-60, -60, 60]], [[-60, 60, -60], [0, 0, 0]]]], "float32")
    )
    for loss in (CombinedCEDiceLoss(), CombinedCEDiceLoss(from_logits=True)):
        with tf.GradientTape() as tape:
            y_pred = logits if loss.from_logits else tf.nn.softmax(logits)
            value = loss(labels, y_pred)
        grad = tape.gradient(value, logits).numpy()
        assert np.isfinite(float(value)) and np.isfinite(grad).all()
        assert np.abs(grad).sum() > 0


def test_reduction_none_returns_per_pixel_values():
    values = np.asarray(CombinedCEDiceLoss(reduction=None)(Y_TRUE, Y_PRED))
    assert values.shape == (1, 2, 2)
    assert values.mean() == pytest.approx(CE_MEAN + DICE_LOSS, abs=1e-4)


def test_combined_loss_config_round_trip():
    loss = CombinedCEDiceLoss(
        ce_weight=0.7, dice_weight=1.3, class_weights=(1.0, 2.0, 5.0), dice_classes=(2,),
        smooth=1e-4, from_logits=True, name="my_loss",
    )
    config = loss.get_config()
    clone = CombinedCEDiceLoss.from_config(config)
    assert clone.get_config() == config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, CombinedCEDiceLoss)
    assert restored.get_config() == config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ce_weight": -1.0}, "ce_weight=-1.0"),
        ({"dice_weight": float("nan")}, "dice_weight=nan"),
        ({"dice_classes": ()}, r"dice_classes=\[\]"),
        ({"smooth": -1e-5}, "smooth=-1e-05"),
        ({"class_weights": ()}, "class_weights"),
    ],
)
def test_combined_loss_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CombinedCEDiceLoss(**kwargs)


def test_combined_loss_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="class_weights has 2 entries"):
        CombinedCEDiceLoss(class_weights=(1.0, 2.0))(Y_TRUE, Y_PRED)
    with pytest.raises(ValueError, match=r"dice_classes=\[3\]"):
        CombinedCEDiceLoss(dice_classes=(3,))(Y_TRUE, Y_PRED)


# ---------------------------------------------------------------------------
# BCEDiceLoss (sigmoid head)
# ---------------------------------------------------------------------------


def test_bce_targets_follow_lits_nesting():
    loss = BCEDiceLoss(channels=("background", "liver", "tumor"))
    targets = np.asarray(loss.targets(Y_TRUE))  # labels [[0, 1], [2, 1]]
    np.testing.assert_array_equal(targets[0, ..., 0], [[1, 0], [0, 0]])  # label == 0
    np.testing.assert_array_equal(targets[0, ..., 1], [[0, 1], [1, 1]])  # label >= 1
    np.testing.assert_array_equal(targets[0, ..., 2], [[0, 0], [1, 0]])  # label == 2


def test_bce_dice_hand_computed():
    # Every channel predicts 0.5 everywhere: BCE = ln 2 for every pixel and channel.
    # Liver target [0, 1, 1, 1]: intersection 1.5, sums 3 + 2 -> Dice 0.6
    # Tumor target [0, 0, 1, 0]: intersection 0.5, sums 1 + 2 -> Dice 1/3
    y_pred = np.full((1, 2, 2, 2), 0.5, "float32")
    expected = math.log(2) + 1 - (0.6 + 1 / 3) / 2
    assert float(BCEDiceLoss()(Y_TRUE, y_pred)) == pytest.approx(expected, abs=1e-4)
    # Dice over the tumor channel only: 1 - 1/3
    tumor_only = BCEDiceLoss(bce_weight=0.0, dice_channels=(1,))
    assert float(tumor_only(Y_TRUE, y_pred)) == pytest.approx(2 / 3, abs=1e-4)


def test_bce_dice_perfect_and_logits():
    y_true = np.array([[[0, 1], [2, 1]], [[0, 0], [1, 1]]])  # second image: no tumor
    targets = np.stack([y_true >= 1, y_true == 2], axis=-1).astype("float32")
    assert float(BCEDiceLoss()(y_true, targets)) == pytest.approx(0.0, abs=1e-5)
    logits = (targets * 2 - 1) * 30.0
    assert float(BCEDiceLoss(from_logits=True)(y_true, logits)) == pytest.approx(0.0, abs=1e-5)


def test_bce_dice_config_and_errors():
    loss = BCEDiceLoss(bce_weight=0.5, channels=("tumor", "liver"), dice_channels=(0,))
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, BCEDiceLoss) and restored.get_config() == loss.get_config()
    with pytest.raises(ValueError, match="kidney"):
        BCEDiceLoss(channels=("liver", "kidney"))
    with pytest.raises(ValueError, match=r"dice_channels=\[2\]"):
        BCEDiceLoss(dice_channels=(2,))
    with pytest.raises(ValueError, match="3 channels"):
        BCEDiceLoss()(Y_TRUE, Y_PRED)


def test_region_mask_and_label_map():
    labels = np.array([0, 1, 2])
    assert np.asarray(region_mask(labels, "liver")).tolist() == [False, True, True]
    assert np.asarray(region_mask(labels, "tumor")).tolist() == [False, False, True]
    assert np.asarray(region_mask(labels, 1)).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="'kidney'"):
        region_mask(labels, "kidney")
    # Sigmoid decoding: tumor wins over liver; exactly 0.5 is "off".
    p = np.array([[[[0.9, 0.9], [0.1, 0.9], [0.9, 0.5], [0.5, 0.1]]]], "float32")
    assert np.asarray(label_map(p, head="sigmoid")).tolist() == [[[2, 2, 1, 0]]]


def test_fit_step_under_mixed_float16_with_float16_head_is_finite():
    # A head left in float16 (against DESIGN.md's advice) still trains: the loss casts to float32.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 1))
        outputs = keras.layers.Conv2D(3, 1, activation="softmax")(inputs)
        assert outputs.dtype == "float16"
        model = keras.Model(inputs, outputs)
        model.compile(optimizer="adam", loss=CombinedCEDiceLoss())
        images = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype("float32")
        history = model.fit(images, np.tile(Y_TRUE, (2, 4, 4)), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
    finally:
        keras.config.set_dtype_policy(previous)
