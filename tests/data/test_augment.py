"""Batched joint augmentation: alignment, labels, the distribution of transforms, independence."""

import doctest
import math

import numpy as np
import pytest
import tensorflow as tf

from keras_livseg.data import augment
from keras_livseg.data.augment import (
    IDENTITY,
    Augmentation,
    JointAugmenter,
    affine_transforms,
    augment_batch,
    draw_parameters,
    sample_parameters,
)

SQUARE = 16
STRONG_WARP = Augmentation(flip="horizontal_and_vertical", rotation=0.1, zoom=0.2, translation=0.15,
                           intensity_scale=0, intensity_shift=0, gamma=0, noise_std=0, probability=1.0)
EVERYTHING = Augmentation(flip="horizontal_and_vertical", rotation=0.1, zoom=0.2, translation=0.15, probability=1.0)
FLAGS = ("warp_on", "gamma_on", "intensity_on", "noise_on")


@pytest.fixture(params=["opencv", "tensorflow"])
def backend(request, monkeypatch):
    """Runs a test on the OpenCV pass and again on TensorFlow's kernels (used without OpenCV)."""
    if request.param == "opencv":
        assert augment._opencv() is not None, "opencv-python-headless is an install requirement"
    else:
        monkeypatch.setattr(augment, "_opencv", lambda: None)
    return request.param


def checkerboard(size=64, batch=6):
    """Labels 0, 1, 2 in 16-pixel squares; the image is the label as a float."""
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    labels = ((r // SQUARE + c // SQUARE) % 3).astype(np.int32)
    return np.repeat(labels[None, ..., None].astype(np.float32), batch, 0), np.repeat(labels[None], batch, 0)


def test_warped_checkerboard_keeps_image_and_mask_aligned(backend):
    images, masks = checkerboard()
    batch, size = images.shape[0], images.shape[1]
    params = draw_parameters(STRONG_WARP, batch, [3, 4])
    out_images, out_masks = augment_batch(tf.constant(images), tf.constant(masks), [5, 6], STRONG_WARP, parameters=params)
    out_images, out_masks = out_images.numpy()[..., 0], out_masks.numpy()
    # Where each output pixel samples the input, from the same parameters.
    t = affine_transforms(params, size, size).numpy()
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    source_x = t[:, 0, None, None] * cols + t[:, 1, None, None] * rows + t[:, 2, None, None]
    source_y = t[:, 3, None, None] * cols + t[:, 4, None, None] * rows + t[:, 5, None, None]

    def edge_distance(coordinate):  # to the nearest square edge or frame edge (pixel centres are integers)
        return np.abs((coordinate + 0.5 + SQUARE / 2) % SQUARE - SQUARE / 2)

    away = (edge_distance(source_x) >= 1.5) & (edge_distance(source_y) >= 1.5)
    inside = (source_x > -0.5) & (source_x < size - 0.5) & (source_y > -0.5) & (source_y < size - 0.5)
    expected = np.where(inside, masks[0][np.clip(np.round(source_y), 0, size - 1).astype(int),
                                         np.clip(np.round(source_x), 0, size - 1).astype(int)], 0)
    for k in range(batch):
        assert away[k].mean() > 0.3, away[k].mean()  # enough pixels to judge by
        np.testing.assert_array_equal(out_masks[k][away[k]], np.round(out_images[k][away[k]]))
        np.testing.assert_array_equal(out_masks[k][away[k]], expected[k][away[k]])
        assert (out_masks[k] != masks[k]).mean() > 0.05  # really warped
    # Different transforms per sample, so different outputs from the same input.
    assert len({out_masks[k].tobytes() for k in range(batch)}) == batch


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
@pytest.mark.parametrize("fused", [True, False])
def test_labels_stay_integral_and_within_the_label_set(dtype, fused, backend):
    images, labels = checkerboard(size=32, batch=8)
    masks = (labels * (labels != 1)).astype(dtype)  # labels {0, 2}: an interpolating warp would make 1s
    augmentation = Augmentation(**{**EVERYTHING.__dict__, "fused": fused})
    out_images, out_masks = JointAugmenter(augmentation, seed=1)(tf.constant(images), tf.constant(masks), [7, 8])
    assert out_masks.dtype == tf.as_dtype(dtype) and out_masks.shape == masks.shape
    assert set(np.unique(out_masks.numpy())) <= {0, 2}
    assert (out_masks.numpy() == 2).any() and (out_masks.numpy() != masks).any()
    assert out_images.dtype == tf.float32 and np.isfinite(out_images.numpy()).all()


@pytest.mark.parametrize("channels, mask_dtype", [(1, np.uint8), (5, np.int32)])
def test_opencv_and_tensorflow_paths_agree(channels, mask_dtype, monkeypatch):
    """The same parameters through both paths: the same points sampled, the same fill, the
    same gamma and contrast (noise aside: each path draws its own)."""
    size, batch = 48, 12
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    # A smooth image (OpenCV quantizes bilinear weights to 1/32 pixel: < 0.01 here), offset
    # per sample so that the fill value (each image's minimum) differs.
    smooth = np.stack([np.sin(rows / 7 + c) * np.cos(cols / 9 - c) for c in range(channels)], -1)
    images = tf.constant((smooth[None] + np.arange(batch)[:, None, None, None] * 3 - 5).astype(np.float32))
    masks = tf.constant(np.repeat((((rows // 12 + cols // 12) % 3) * 2)[None], batch, 0).astype(mask_dtype))
    a = Augmentation(**{**EVERYTHING.__dict__, "noise_std": 0.0, "probability": 0.6})
    params = draw_parameters(a, batch, [8, 9])
    assert 0 < params["warp_on"].numpy().sum() < batch and 0 < params["gamma_on"].numpy().sum() < batch
    cv_images, cv_masks = (t.numpy() for t in augment_batch(images, masks, [1, 2], a, parameters=params))
    monkeypatch.setattr(augment, "_opencv", lambda: None)
    tf_images, tf_masks = (t.numpy() for t in augment_batch(images, masks, [1, 2], a, parameters=params))
    assert cv_images.dtype == np.float32 and cv_masks.dtype == mask_dtype
    assert np.abs(cv_images - tf_images).max() < 0.03
    # Nearest: a pixel whose source lies within 1/32 pixel of a square's edge may round either way.
    assert (cv_masks != tf_masks).mean() < 0.01
    assert set(np.unique(cv_masks)) <= {0, 2, 4}
    untouched = ~(params["warp_on"] | params["gamma_on"] | params["intensity_on"]).numpy()
    assert untouched.any()
    np.testing.assert_array_equal(cv_images[untouched], images.numpy()[untouched])
    warped = params["warp_on"].numpy()
    plain = warped & ~(params["gamma_on"] | params["intensity_on"]).numpy()
    fill = images.numpy().min(axis=(1, 2, 3))[:, None, None, None]
    outside = plain[:, None, None] & np.all(np.isclose(tf_images, fill), -1)
    assert outside.sum() > 0.02 * plain.sum() * size * size  # the strong warp leaves frame corners to fill
    np.testing.assert_allclose(cv_images[outside], np.broadcast_to(fill, tf_images.shape)[outside])


def _per_sample_draws(augmentation, n, seed):
    seeds = tf.random.split(tf.constant(seed, tf.int64), n)
    signature = {k: tf.TensorSpec([], tf.bool if k in FLAGS else tf.float32) for k in IDENTITY}
    draw = tf.function(lambda s: tf.map_fn(lambda one: sample_parameters(augmentation, one), s, fn_output_signature=signature))
    return {k: v.numpy() for k, v in draw(seeds).items()}


def _batched_draws(augmentation, n, seed, batch=32):
    seeds = tf.random.split(tf.constant(seed, tf.int64), math.ceil(n / batch))
    batches = [draw_parameters(augmentation, batch, s) for s in seeds]
    return {k: np.concatenate([b[k].numpy() for b in batches])[:n] for k in IDENTITY}


#: Which flag each parameter belongs to.
OWNER = {"angle": "warp_on", "zoom": "warp_on", "shift_x": "warp_on", "shift_y": "warp_on", "flip_x": "warp_on",
         "flip_y": "warp_on", "gamma": "gamma_on", "intensity_scale": "intensity_on", "intensity_shift": "intensity_on",
         "noise_std": "noise_on"}


def test_batched_draws_match_the_per_sample_distribution():
    a = Augmentation(flip="horizontal_and_vertical")
    n = 4000
    per_sample, batched = _per_sample_draws(a, n, [1, 2]), _batched_draws(a, n, [3, 4])
    # Each parameter, among the samples that drew it, is uniform on (low, high) in some unit.
    uniforms = {
        "angle": (lambda v: v / (2 * np.pi), -a.rotation, a.rotation),
        "zoom": (lambda v: v, 1 - a.zoom, 1 + a.zoom),
        "shift_x": (lambda v: v, -a.translation, a.translation),
        "shift_y": (lambda v: v, -a.translation, a.translation),
        "gamma": (np.log, -a.gamma, a.gamma),
        "intensity_scale": (lambda v: v, 1 - a.intensity_scale, 1 + a.intensity_scale),
        "intensity_shift": (lambda v: v, -a.intensity_shift, a.intensity_shift),
        "noise_std": (lambda v: v, 0.0, a.noise_std),
    }

    def drawn(draws, name):
        unit = uniforms[name][0]
        return unit(draws[name][draws[OWNER[name]]].astype(np.float64))

    for draws in (per_sample, batched):
        for flag in FLAGS:  # applied with the probability: binomial, 5 standard errors
            assert abs(draws[flag].mean() - a.probability) < 5 * math.sqrt(a.probability * (1 - a.probability) / n), flag
        for name, flag in OWNER.items():  # samples that did not draw a transform get its identity
            assert (draws[name][~draws[flag]] == IDENTITY[name]).all(), name
        for name, (_, low, high) in uniforms.items():
            values = drawn(draws, name)
            m, sigma = len(values), (high - low) / math.sqrt(12)
            assert low - 1e-6 <= values.min() and values.max() <= high + 1e-6, name
            assert abs(values.mean() - (low + high) / 2) < 5 * sigma / math.sqrt(m), name
            # Standard error of a standard deviation: sigma * sqrt((kurtosis - 1) / 4m), kurtosis 9/5.
            assert abs(values.std() - sigma) < 5 * sigma * math.sqrt(0.2 / m), name
        for name in ("flip_x", "flip_y"):
            flips = draws[name][draws["warp_on"]]
            assert set(np.unique(flips)) == {-1.0, 1.0}
            assert abs((flips < 0).mean() - 0.5) < 5 * 0.5 / math.sqrt(len(flips)), name
    # And the two paths against each other: 5 standard errors of the difference.
    for flag in FLAGS:
        se = math.sqrt(2 * a.probability * (1 - a.probability) / n)
        assert abs(per_sample[flag].mean() - batched[flag].mean()) < 5 * se, flag
    for name, (_, low, high) in uniforms.items():
        one, two = drawn(per_sample, name), drawn(batched, name)
        sigma = (high - low) / math.sqrt(12)
        assert abs(one.mean() - two.mean()) < 5 * sigma * math.sqrt(1 / len(one) + 1 / len(two)), name
        assert abs(one.std() - two.std()) < 5 * sigma * math.sqrt(0.2 / len(one) + 0.2 / len(two)), name


def test_samples_in_a_batch_draw_independent_transforms():
    n = 4000
    a = Augmentation(flip="horizontal", probability=0.5)
    p = {k: v.numpy().astype(np.float64) for k, v in draw_parameters(a, n, [9, 9]).items()}
    bound = 5 / math.sqrt(n)  # standard error of a correlation of independent variables: 1/sqrt(n)
    # Neighbours in the batch: uncorrelated, for flags and for values.
    for name in FLAGS + ("angle", "zoom", "shift_x", "flip_x", "gamma", "noise_std"):
        assert abs(np.corrcoef(p[name][:-1], p[name][1:])[0, 1]) < bound, name
    # Within a sample, the transforms are drawn independently too.
    for one, two in (("warp_on", "gamma_on"), ("gamma_on", "noise_on"), ("intensity_on", "warp_on")):
        assert abs(np.corrcoef(p[one], p[two])[0, 1]) < bound, (one, two)
    warped = p["warp_on"] > 0
    assert abs(np.corrcoef(p["angle"][warped], p["zoom"][warped])[0, 1]) < 5 / math.sqrt(warped.sum())
    # A batch of identical slices comes out as as many different slices.
    images, masks = checkerboard(size=32, batch=8)
    out_images, _ = augment_batch(tf.constant(images), tf.constant(masks), [1, 1], EVERYTHING)
    assert len({x.tobytes() for x in out_images.numpy()}) == 8


def test_same_seed_same_augmentation(backend):
    images, masks = checkerboard(size=32, batch=4)
    first = augment_batch(tf.constant(images), tf.constant(masks), [2, 3], EVERYTHING)
    again = augment_batch(tf.constant(images), tf.constant(masks), [2, 3], EVERYTHING)
    other = augment_batch(tf.constant(images), tf.constant(masks), [2, 4], EVERYTHING)
    np.testing.assert_array_equal(first[0].numpy(), again[0].numpy())
    np.testing.assert_array_equal(first[1].numpy(), again[1].numpy())
    assert not np.array_equal(first[0].numpy(), other[0].numpy())


def test_noise_is_gaussian_with_the_drawn_std(backend):
    batch, size = 4, 64
    images = tf.zeros([batch, size, size, 1])
    parameters = draw_parameters(Augmentation.none(), batch, [0, 0])
    parameters = {**parameters, "noise_on": tf.ones([batch], tf.bool), "noise_std": tf.constant([1.0, 1.0, 1.0, 2.0])}
    noisy, _ = augment_batch(images, tf.zeros([batch, size, size], tf.uint8), [4, 5],
                             Augmentation(**{**Augmentation.none().__dict__, "noise_std": 1.0}), parameters=parameters)
    z = noisy.numpy()[:3].ravel().astype(np.float64)
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * n)
    tail = 2 * 0.5 * math.erfc(2 / math.sqrt(2))  # P(|z| > 2)
    assert abs((np.abs(z) > 2).mean() - tail) < 5 * math.sqrt(tail * (1 - tail) / n)
    assert noisy.numpy()[3].std() == pytest.approx(2, rel=0.05)


def test_intensity_only_leaves_unchosen_samples_bit_for_bit(backend):
    images, masks = checkerboard(size=32, batch=16)
    images = images + np.random.default_rng(0).normal(size=images.shape).astype(np.float32)
    a = Augmentation(rotation=0, zoom=0, translation=0, probability=0.25)
    params = draw_parameters(a, 16, [6, 6])
    out, out_masks = augment_batch(tf.constant(images), tf.constant(masks), [1, 2], a, parameters=params)
    touched = (params["gamma_on"] | params["intensity_on"] | params["noise_on"]).numpy()
    assert 0 < touched.sum() < 16
    changed = np.abs(out.numpy() - images).max(axis=(1, 2, 3)) > 0
    np.testing.assert_array_equal(changed, touched)
    np.testing.assert_array_equal(out_masks.numpy(), masks)


def test_docstring_examples_run():
    result = doctest.testmod(augment)
    assert result.attempted >= 6 and result.failed == 0
