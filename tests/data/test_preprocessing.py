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
    hu = np.array([[-500.5, 0.25], [260.0, np.nan]], np.float32)
    windowed = prep.window_hu(hu)
    assert windowed.dtype == np.float32 and windowed is not hu
    np.testing.assert_array_equal(windowed, [[-200.0, 0.25], [250.0, np.nan]])  # NaN stays NaN, as np.clip
    assert hu[0, 0] == -500.5 and hu[1, 0] == 260.0  # a float32 input is not clipped in place


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


# -- resampling to a fixed pixel spacing ---------------------------------------------------


@pytest.mark.parametrize("shape, spacing", [((300, 280), (0.57, 0.57)), ((122, 101), (3.0, 3.0)), ((90, 200), (1.0, 2.0))])
def test_spacing_paths_agree_numpy_and_tensorflow(shape, spacing):
    rng = np.random.default_rng(3)
    raw = rng.normal(40, 300, shape + (3,)).astype(np.float32)
    prep = Preprocessing(image_size=(64, 64), context=3, mean=60.0, std=40.0, spacing_mm=3.2)
    numpy_path = prep.model_input(raw, [1], spacing)[0]
    export_path = prep.tf_model_input(raw[None], spacing=tf.constant(spacing, tf.float32)).numpy()[0]
    np.testing.assert_allclose(numpy_path, export_path, atol=1e-4)
    probabilities = rng.dirichlet(np.ones(3), (2, 64, 64)).astype(np.float32)
    back = tf.image.resize(prep.model_grid_to_slices(probabilities, shape, spacing), shape).numpy()
    tf_back = prep.tf_model_grid_to_slices(tf.constant(probabilities), shape, tf.constant(spacing, tf.float32)).numpy()
    np.testing.assert_allclose(back, tf_back, atol=1e-5)


def test_spacing_keeps_millimetres_per_pixel():
    """A 100 mm disc is 50 px across on a 2 mm grid whether scanned at 0.5 mm or 1.25 mm."""
    prep = Preprocessing(image_size=(96, 96), spacing_mm=2.0)
    widths = []
    for pixel_mm, size in ((0.5, 512), (1.25, 160)):
        centre = (size - 1) / 2.0
        yy, xx = np.mgrid[0:size, 0:size]
        disc = (((yy - centre) * pixel_mm) ** 2 + ((xx - centre) * pixel_mm) ** 2 < 50.0**2).astype(np.uint8)
        gridded = prep.labels_to_model_grid(disc, (pixel_mm, pixel_mm))
        assert gridded.shape == (96, 96)
        widths.append(int(gridded[48].sum()))
    assert all(abs(w - 50) <= 1 for w in widths), widths


def test_spacing_crop_pad_round_trip_puts_labels_back_on_their_voxels():
    """Model grid → back to the slice: a one-hot map returns onto the same voxels."""
    prep = Preprocessing(image_size=(40, 40), spacing_mm=1.0)
    labels = np.zeros((60, 30), np.uint8)  # at 1 mm: cropped in rows (60 > 40), padded in columns
    labels[25:35, 5:15] = 1
    labels[28:31, 8:11] = 2
    gridded = prep.labels_to_model_grid(labels, (1.0, 1.0))
    one_hot = np.eye(3, dtype=np.float32)[gridded][None]
    restored = prep.model_grid_to_slices(one_hot, labels.shape, (1.0, 1.0))[0]
    assert restored.shape == (60, 30, 3)
    np.testing.assert_array_equal(restored.argmax(-1), labels)  # the cropped rows held background
    assert restored[:10, :, 0].min() == 1.0  # rows the model never saw are background


def test_spacing_needs_the_slice_spacing_and_a_positive_value():
    prep = Preprocessing(image_size=(32, 32), spacing_mm=1.5)
    with pytest.raises(ValueError, match="needs each slice's spacing"):
        prep.slices_to_model_grid(np.zeros((40, 40, 1), np.float32))
    with pytest.raises(ValueError, match="not positive"):
        prep.slices_to_model_grid(np.zeros((40, 40, 1), np.float32), (0.0, 1.0))
    with pytest.raises(ValueError, match="spacing_mm must be a positive"):
        Preprocessing(spacing_mm=0.0)
    assert Preprocessing(spacing_mm="none").spacing_mm is None
    assert Preprocessing.from_dict(prep.to_dict()).spacing_mm == 1.5


def test_context_slices_are_the_nearest_whole_stride_to_context_mm():
    prep = Preprocessing(context=3, context_mm=4.5)
    # 4.5 mm over 1.6 mm slices is 2.8 slices: 3; over 3 mm, 1.5: a tie goes to the nearer slices.
    assert [prep.context_stride(mm) for mm in (0.7, 1.0, 1.6, 2.0, 3.0, 3.2, 4.5, 9.0)] == [6, 4, 3, 2, 1, 1, 1, 1]
    assert Preprocessing(context=3).context_stride(0.5) == 1  # without context_mm: adjacent slices
    assert Preprocessing(context=1, context_mm=4.5).context_stride(0.5) == 1  # one slice has no neighbours
    assert prep.context_offsets(1.6).tolist() == [-3, 0, 3]
    assert Preprocessing(context=5, context_mm=2.0).context_offsets(1.0).tolist() == [-4, -2, 0, 2, 4]
    with pytest.raises(ValueError, match="needs the volume's slice spacing"):
        prep.context_stride(0.0)
    with pytest.raises(ValueError, match="context_mm must be a positive"):
        Preprocessing(context=3, context_mm=-1.0)
    assert Preprocessing(context=3, context_mm="none").context_mm is None
    assert Preprocessing.from_dict(prep.to_dict()).context_mm == 4.5
    legacy = {k: v for k, v in prep.to_dict().items() if k != "context_mm"}  # a preprocessing.json from before
    assert Preprocessing.from_dict(legacy).context_mm is None

    volume = np.arange(10, dtype=np.float32)[None, None, :] * np.ones((8, 8, 1), np.float32)
    assert context_stack(volume, 1, 3, stride=3)[0, 0].tolist() == [0, 1, 4]  # the edge repeats
    assert context_stack(volume, 8, 5, stride=2)[0, 0].tolist() == [4, 6, 8, 9, 9]
    stacked = Preprocessing(image_size=(8, 8), context=3, normalization="none", window=(-100.0, 100.0),
                            context_mm=4.5).model_input(volume, [5], (1.0, 1.0, 1.5))
    np.testing.assert_allclose(stacked[0, 0, 0] * 100.0, [2.0, 5.0, 8.0], atol=1e-5)  # [-1, 1] back to HU


@pytest.mark.parametrize("src, dst", [((512, 512), (150, 150)), ((300, 280), (64, 70)), ((40, 48), (64, 64)), ((90, 200), (28, 117))])
def test_antialiased_resize_matches_tensorflow(src, dst):
    from keras_livseg.data.preprocessing import resize_stack_antialiased

    image = np.random.default_rng(4).normal(0, 100, (2,) + src).astype(np.float32)
    expected = tf.image.resize(image[..., None], dst, method="bilinear", antialias=True).numpy()[..., 0]
    np.testing.assert_allclose(resize_stack_antialiased(image, dst), expected, atol=1e-3)
    # The same values whatever the slices' memory order: Fortran slices (NIfTI's order, seen
    # slices first), slices from a C-ordered volume (strided), and a reversed view.
    fortran_slices = np.moveaxis(np.asfortranarray(np.moveaxis(image, 0, -1)), -1, 0)
    strided = np.moveaxis(np.ascontiguousarray(np.moveaxis(image, 0, -1)), -1, 0)
    assert fortran_slices[0].flags.f_contiguous and not strided[0].flags.c_contiguous
    for layout in (fortran_slices, strided, image[:, ::-1][:, ::-1]):
        np.testing.assert_allclose(resize_stack_antialiased(layout, dst), expected, atol=1e-3)
    assert resize_stack_antialiased(image[:0], dst).shape == (0,) + tuple(dst)


@pytest.mark.parametrize("shape", [(1, 1), (31, 7), (32, 64), (65, 33), (0, 5)])
def test_blocked_transpose_is_the_transpose(shape):
    from keras_livseg.data.preprocessing import _transposed

    matrix = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    out = _transposed(matrix)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, matrix.T)


@pytest.mark.parametrize("classes", [1, 2, 3, 4])
def test_argmax_classes_is_numpys_argmax_ties_included(classes):
    from keras_livseg.data.preprocessing import argmax_classes

    # Values from a coarse set make ties common: they go to the lowest class, as in np.argmax.
    probabilities = np.random.default_rng(classes).integers(0, 3, (5, 7, 9, classes)).astype(np.float32) / 2
    got = argmax_classes(probabilities)
    assert got.dtype == np.uint8 and got.shape == (5, 7, 9)
    np.testing.assert_array_equal(got, np.argmax(probabilities, axis=-1))
    assert classes == 1 or len(np.unique(got)) == classes


def test_spacing_downsampling_averages_noise_instead_of_picking_pixels():
    """0.5 mm noise brought to 3 mm: antialiasing averages ~6x6 pixels, so the std falls ~6x."""
    noise = np.random.default_rng(5).normal(0, 60, (384, 384, 1)).astype(np.float32)
    prep = Preprocessing(image_size=(64, 64), window=(-1000, 1000), spacing_mm=3.0)
    gridded = prep.slices_to_model_grid(noise, (0.5, 0.5))
    assert gridded.std() < 60 / 4  # point sampling would keep ~60


def test_labels_at_size_is_the_argmax_of_the_full_bilinear_resize():
    """Computing only around the foreground changes no label, up- or downsampling."""
    import tensorflow as tf

    from keras_livseg.data.preprocessing import labels_at_size

    rng = np.random.default_rng(0)
    for height, width, rows, cols in ((9, 13, 40, 31), (24, 20, 7, 11), (16, 16, 16, 16), (5, 30, 50, 12)):
        logits = rng.normal(size=(2, height, width, 3)).astype(np.float32)
        logits[..., 0] += 2.0  # mostly background, as on a scan
        probabilities = tf.nn.softmax(logits).numpy()
        expected = tf.argmax(tf.image.resize(probabilities, (rows, cols), method="bilinear"), axis=-1).numpy()
        got = labels_at_size(probabilities, (rows, cols))
        assert got.dtype == np.uint8 and 0 < (got > 0).mean() < 0.9
        np.testing.assert_array_equal(got, expected)
        resized = lambda p, size: tf.image.resize(p, size, method="bilinear").numpy()  # noqa: E731
        np.testing.assert_array_equal(labels_at_size(probabilities, (rows, cols), resize=resized), expected)
    empty = np.zeros((1, 4, 4, 3), np.float32)
    empty[..., 0] = 1.0
    assert not labels_at_size(empty, (9, 9)).any()
    # A tie with background is background (np.argmax's first maximum), here and after resizing.
    tied = empty.copy()
    tied[0, 1, 1] = [0.5, 0.5, 0.0]
    tied[0, 2, 2] = [0.4, 0.2, 0.4]
    assert not labels_at_size(tied, (4, 4)).any() and not labels_at_size(tied, (9, 9)).any()
    # One output channel (a sigmoid head with one class): class 0 everywhere, as np.argmax says.
    one = labels_at_size(np.random.default_rng(1).random((2, 4, 4, 1)).astype(np.float32), (9, 9))
    assert one.shape == (2, 9, 9) and not one.any()
