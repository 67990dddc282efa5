import numpy as np
import pytest
import tensorflow as tf

from keras_livseg.data.preprocessing import (
    ForegroundStatistics,
    Preprocessing,
    context_stack,
    resize_bilinear,
    resize_nearest,
)


@pytest.mark.parametrize("src, dst", [((40, 48), (32, 32)), ((17, 23), (64, 40)), ((64, 64), (64, 64)), ((512, 512), (256, 256))])
def test_numpy_resize_matches_tensorflow(src, dst):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 100, src + (3,)).astype(np.float32)
    expected = tf.image.resize(image[None], dst, method="bilinear").numpy()[0]
    np.testing.assert_allclose(resize_bilinear(image, dst), expected, atol=1e-3)
    labels = rng.integers(0, 3, src).astype(np.uint8)
    nearest = tf.image.resize(labels[None, ..., None], dst, method="nearest").numpy()[0, ..., 0]
    np.testing.assert_array_equal(resize_nearest(labels, dst), nearest)


def test_context_stack_repeats_edges_and_keeps_order():
    volume = np.arange(5, dtype=np.float32)[None, None, :] * np.ones((2, 2, 1), np.float32)
    assert context_stack(volume, 0, 3)[0, 0].tolist() == [0, 0, 1]
    assert context_stack(volume, 4, 5)[0, 0].tolist() == [2, 3, 4, 4, 4]
    assert context_stack(volume, 2, 1).shape == (2, 2, 1)


def test_every_path_gives_the_same_model_input():
    """One raw slice through the NumPy path (prepare + pipeline) and the TF path (export)."""
    rng = np.random.default_rng(1)
    raw = rng.normal(40, 400, (300, 280, 3)).astype(np.float32)
    raw[:20] = -3024
    prep = Preprocessing(image_size=(64, 64), context=3, mean=60.0, std=40.0)
    numpy_path = prep.model_input(raw, [1])[0]
    stored = prep.slices_to_model_grid(raw).astype(np.float16).astype(np.float32)  # what shards hold
    pipeline_path = prep.tf_standardize(stored).numpy()
    export_path = prep.tf_model_input(raw[None]).numpy()[0]
    np.testing.assert_allclose(numpy_path, export_path, atol=1e-4)
    # float16 storage costs at most 0.125 HU in the default window: 0.125/40 standardized units.
    np.testing.assert_allclose(pipeline_path, export_path, atol=0.125 / 40 + 1e-5)


def test_window_clips_padding_and_bone():
    prep = Preprocessing()
    assert prep.window_hu(np.array([-3024, -1000, 50, 3000])).tolist() == [-200, -200, 50, 250]


def test_normalization_none_maps_window_to_unit_range():
    prep = Preprocessing(normalization="none")
    assert prep.standardize(prep.window_hu(np.array([-500.0, 25.0, 900.0]))).tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"window": (250, -200)}, "low < high"), ({"context": 2}, "odd"), ({"normalization": "zscore"}, "normalization"), ({"image_size": 4}, "at least 8")],
)
def test_bad_parameters(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Preprocessing(**kwargs)


def test_foreground_statistics_merge_equals_pooled():
    rng = np.random.default_rng(2)
    a, b = rng.normal(60, 20, 1000), rng.normal(90, 10, 3000)
    left, right, pooled = (ForegroundStatistics((-200, 250)) for _ in range(3))
    left.update(a)
    right.update(b)
    left.merge(right)
    pooled.update(np.concatenate([a, b]))
    everything = np.concatenate([a, b])
    assert left.mean == pytest.approx(everything.mean()) == pooled.mean
    assert left.std == pytest.approx(everything.std())
    assert abs(left.percentile(99.5) - np.percentile(everything, 99.5)) <= 1.0
