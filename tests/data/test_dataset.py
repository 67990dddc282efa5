import copy
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from keras_livseg.data.dataset import Augmentation, make_dataset, parse_batch, parse_example
from keras_livseg.data.prepare import PrepareOptions, load_manifest, prepare_dataset
from keras_livseg.data.volumes import DataError

from data_helpers import make_volume, write_case


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    for i in range(6):
        write_case(root / "src", str(i), seed=i, tumor=i % 3 != 2)
    prepare_dataset(PrepareOptions(root / "src", root / "out", image_size=32, workers=1, progress=False, split=(4, 1, 1)))
    return root / "out"


def test_validation_mode_yields_every_slice_once_unaugmented(shard_dir):
    manifest = load_manifest(shard_dir)
    ds = make_dataset(manifest, "val", batch_size=5)
    images, masks = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    assert sum(len(x) for x in images) == manifest["splits"]["val"]["slices"] == 12
    assert images[0].shape == (5, 32, 32, 1) and images[-1].shape[0] == 2 and masks[0].dtype == np.int32
    again = np.concatenate([x.numpy() for x, _ in make_dataset(manifest, "val", batch_size=5)])
    np.testing.assert_array_equal(np.concatenate(images), again)
    # Standardized with the manifest's statistics: the liver (60 HU + noise) sits near +-1 std of the foreground.
    prep = manifest["preprocessing"]
    liver_value = np.concatenate(images)[np.concatenate(masks) == 1].mean() * prep["std"] + prep["mean"]
    assert liver_value == pytest.approx(60, abs=3)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_foreground_share_matches_request(shard_dir, fraction):
    manifest = load_manifest(shard_dir)
    ds = make_dataset(manifest, "train", batch_size=4, augmentation=Augmentation.none(), foreground_fraction=fraction, seed=3)
    has_tumor = np.array([[(m == 2).any() for m in masks.numpy()] for _, masks in ds.take(60)])
    natural = manifest["splits"]["train"]["tumor_slices"] / manifest["splits"]["train"]["slices"]
    if fraction > 0:
        # The first round(fraction * batch) slices of every batch carry tumor, always.
        assert has_tumor[:, : int(round(fraction * 4))].all()
        assert has_tumor.mean() >= fraction
    else:
        assert abs(has_tumor.mean() - natural) < 0.12


@pytest.mark.parametrize("fused", [True, False])
def test_augmentation_moves_image_and_mask_together(tmp_path, fused):
    # A case whose label is the image thresholded: after augmentation it must still be.
    src = tmp_path / "src"
    src.mkdir()
    hu = np.full((48, 48, 6), -150, np.int16)
    r, c = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    blob = ((r - 20) / 9) ** 2 + ((c - 27) / 13) ** 2 < 1
    hu[blob] = 200
    nib.save(nib.Nifti1Image(hu, np.diag([-0.8, -0.8, 2.5, 1])), str(src / "volume-0.nii.gz"))
    nib.save(nib.Nifti1Image(np.where(hu > 0, 1, 0).astype(np.uint8), np.diag([-0.8, -0.8, 2.5, 1])), str(src / "segmentation-0.nii.gz"))
    manifest = prepare_dataset(PrepareOptions(src, tmp_path / "out", image_size=48, workers=1, progress=False, split=(1, 0, 0)))
    strong = Augmentation(flip="horizontal_and_vertical", rotation=0.1, zoom=0.2, translation=0.15,
                          intensity_scale=0, intensity_shift=0, gamma=0, noise_std=0, fused=fused, probability=1.0)
    ds = make_dataset(manifest, "train", batch_size=6, augmentation=strong, foreground_fraction=0, seed=5)
    threshold = (0 - manifest["preprocessing"]["mean"]) / manifest["preprocessing"]["std"]
    for images, masks in ds.take(4):
        images, masks = images.numpy()[..., 0], masks.numpy()
        agreement = ((images > threshold) == (masks == 1)).mean(axis=(1, 2))
        assert agreement.min() > 0.97, agreement
        assert set(np.unique(masks)) <= {0, 1}
    # ...and the augmentation really moved things: masks differ from the untouched one.
    plain = next(iter(make_dataset(manifest, "train", batch_size=6, training=False)))[1].numpy()
    augmented = next(iter(ds))[1].numpy()
    assert (plain != augmented).mean() > 0.01


def test_deterministic_option_repeats_exactly(shard_dir):
    # Full augmentation, batches augmented in parallel: each batch has its own seed.
    def batches(seed):
        ds = make_dataset(shard_dir, "train", batch_size=4, deterministic=True, seed=seed)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(6)]

    first, again = batches(11), batches(11)
    for (x1, y1), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other = batches(12)
    assert not np.array_equal(first[0][0], other[0][0])


def test_training_batches_keep_integral_labels(shard_dir):
    everything = Augmentation(flip="horizontal_and_vertical", rotation=0.1, zoom=0.2, translation=0.15, probability=1.0)
    ds = make_dataset(shard_dir, "train", batch_size=6, augmentation=everything, foreground_fraction=0.5, seed=2)
    labels = set()
    for images, masks in ds.take(8):
        assert masks.dtype == tf.int32 and images.dtype == tf.float32 and images.shape == (6, 32, 32, 1)
        labels |= set(np.unique(masks.numpy()).tolist())
    assert labels == {0, 1, 2}


def test_batch_parsing_matches_single_example_parsing(shard_dir):
    manifest = load_manifest(shard_dir)
    path = str(shard_dir / manifest["splits"]["train"]["shards"][0])
    records = tf.stack(list(tf.data.TFRecordDataset(path).take(5)))
    batch = parse_batch(records, 1, (32, 32))
    for k in range(5):
        single = parse_example(records[k], 1, (32, 32))
        np.testing.assert_array_equal(batch["image"][k].numpy(), single["image"].numpy())
        np.testing.assert_array_equal(batch["mask"][k].numpy(), single["mask"].numpy())
        assert float(batch["volume_std"][k]) == float(single["volume_std"])


def test_intensity_augmentation_changes_image_only(shard_dir):
    only_intensity = Augmentation(rotation=0, zoom=0, translation=0, flip=None)
    a = next(iter(make_dataset(shard_dir, "train", batch_size=4, augmentation=only_intensity, deterministic=True, seed=1)))
    b = next(iter(make_dataset(shard_dir, "train", batch_size=4, augmentation=Augmentation.none(), deterministic=True, seed=1)))
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert np.abs(a[0].numpy() - b[0].numpy()).mean() > 0.01


def test_cache_gives_the_same_data(shard_dir):
    plain = np.concatenate([x.numpy() for x, _ in make_dataset(shard_dir, "val", batch_size=4)])
    cached_ds = make_dataset(shard_dir, "val", batch_size=4, cache=True)
    for _ in range(2):
        np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in cached_ds]), plain)


@pytest.mark.parametrize("cache", [True, "file"])
def test_cached_training_stream_matches_the_shards(shard_dir, tmp_path, cache):
    # Both streams (all slices, tumor slices) cached: the same batches as reading the shards.
    cache = True if cache is True else str(tmp_path / "train-cache")
    plain = make_dataset(shard_dir, "train", batch_size=4, deterministic=True, seed=3)
    cached = make_dataset(shard_dir, "train", batch_size=4, deterministic=True, seed=3, cache=cache)
    for (x1, y1), (x2, y2) in zip(plain.take(30), cached.take(30)):  # 120 slices: past the first epoch (48)
        np.testing.assert_array_equal(x1.numpy(), x2.numpy())
        np.testing.assert_array_equal(y1.numpy(), y2.numpy())


def test_folder_without_manifest_is_refused(tmp_path):
    with pytest.raises(DataError, match="not a finished prepare output"):
        make_dataset(tmp_path, "train", batch_size=2)


def test_augmentation_probability_is_the_share_of_changed_samples(shard_dir):
    spatial_only = Augmentation(intensity_scale=0, intensity_shift=0, gamma=0, noise_std=0, probability=0.25)
    augmented = make_dataset(shard_dir, "train", batch_size=8, augmentation=spatial_only, deterministic=True, seed=4)
    plain = make_dataset(shard_dir, "train", batch_size=8, augmentation=Augmentation.none(), deterministic=True, seed=4)
    changed = []
    for (a, _), (b, _) in zip(augmented.take(40), plain.take(40)):
        changed.extend(np.abs(a.numpy() - b.numpy()).max(axis=(1, 2, 3)) > 1e-6)
    assert 0.15 < np.mean(changed) < 0.35


# --- patches (training.crop_size) ----------------------------------------------------------------


def _coordinate_batch(batch: int = 6, size: int = 32) -> tuple[tf.Tensor, tf.Tensor]:
    """Images whose channels are the pixel's row and column; one tumour pixel per slice at
    a different place, liver around it."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    images = np.stack([rows, cols], -1).astype(np.float32)[None].repeat(batch, 0)
    masks = np.zeros((batch, size, size), np.uint8)
    for b in range(batch):
        r, c = (3 + 5 * b) % size, (size - 2 - 7 * b) % size
        masks[b, max(r - 2, 0):r + 3, max(c - 2, 0):c + 3] = 1
        masks[b, r, c] = 2
    return tf.constant(images), tf.constant(masks)


def test_random_crops_cut_image_and_mask_at_the_same_place_inside_the_slice():
    from keras_livseg.data.dataset import random_crops

    images, masks = _coordinate_batch()
    for seed in range(20):
        crops, crop_masks = random_crops(images, masks, 12, 3, tf.constant([seed, 1]))
        crops, crop_masks = crops.numpy(), crop_masks.numpy()
        assert crops.shape == (6, 12, 12, 2) and crop_masks.shape == (6, 12, 12) and crop_masks.dtype == np.uint8
        for b in range(6):
            top, left = int(crops[b, 0, 0, 0]), int(crops[b, 0, 0, 1])
            assert 0 <= top <= 20 and 0 <= left <= 20
            # One contiguous window: rows and columns step by one, and the mask is the same window.
            np.testing.assert_array_equal(crops[b, :, 0, 0], np.arange(top, top + 12))
            np.testing.assert_array_equal(crops[b, 0, :, 1], np.arange(left, left + 12))
            np.testing.assert_array_equal(crop_masks[b], masks.numpy()[b, top:top + 12, left:left + 12])


def test_random_crops_hold_the_quotas_tumour_always_and_the_others_by_chance():
    from keras_livseg.data.dataset import random_crops

    images, masks = _coordinate_batch()
    quota_hits, other_hits, centred, tops = [], [], [], set()
    for seed in range(200):
        crops, crop_masks = random_crops(images, masks, 12, 3, tf.constant([seed, 7]))
        has_tumour = (crop_masks.numpy() == 2).any(axis=(1, 2))
        quota_hits.extend(has_tumour[:3])
        other_hits.extend(has_tumour[3:])
        for b in range(3):  # where the tumour sits in the quota's patches: not always the middle
            r, c = np.argwhere(crop_masks.numpy()[b] == 2)[0]
            centred.append((r, c) == (6, 6))
        tops.update(int(t) for t in crops.numpy()[3:, 0, 0, 0])
    assert all(quota_hits)
    # Anywhere: a 12-pixel patch placed uniformly in a 32-pixel slice holds these tumour pixels (near
    # the borders) about 1/8 of the time; far from always.
    assert 0.03 < np.mean(other_hits) < 0.4
    assert np.mean(centred) < 0.2
    assert tops == set(range(21))  # every position is drawn


def test_random_crops_place_the_others_uniformly_and_find_one_tumour_pixel_among_much_liver():
    from keras_livseg.data.dataset import random_crops

    # 128 px slices that are nearly all liver with a single tumour pixel in a corner.
    masks = np.ones((8, 128, 128), np.uint8)
    masks[:, 120, 5] = 2
    masks[4:] = 0  # the others: background only
    masks[2] = 1  # a quota slice whose tumour is gone (say, zoomed out): its patch is cut around liver
    masks[2, :, :64] = 0
    images = tf.zeros((8, 128, 128, 1))
    tops, lefts, liver_share = [], [], []
    for seed in range(100):
        crops, crop_masks = random_crops(images, tf.constant(masks), 64, 4, tf.constant([seed, 3]))
        crop_masks = crop_masks.numpy()
        assert (crop_masks[[0, 1, 3]] == 2).any(axis=(1, 2)).all()
        liver_share.append((crop_masks[2] == 1).mean())
        assert liver_share[-1] >= 0.25  # cut around a liver pixel (column >= 64): a quarter patch of liver at least
        rows, cols = np.asarray(crops.numpy().shape[1:3])
        assert rows == cols == 64
        # Where the others were cut: recover the offsets from a coordinate image.
        coords = np.stack(np.meshgrid(np.arange(128), np.arange(128), indexing="ij"), -1).astype(np.float32)
        placed, _ = random_crops(tf.constant(coords[None].repeat(8, 0)), tf.constant(masks), 64, 4, tf.constant([seed, 3]))
        tops.extend(placed.numpy()[4:, 0, 0, 0])
        lefts.extend(placed.numpy()[4:, 0, 0, 1])
    assert np.mean(liver_share) > 0.65  # a uniform placement would give 0.5
    tops, lefts = np.asarray(tops), np.asarray(lefts)
    # 65 positions per axis, 400 draws: each border position about 1/65 of them, not a quarter.
    assert (tops == 0).mean() < 0.05 and (tops == 64).mean() < 0.05 and (lefts == 0).mean() < 0.05
    assert abs(tops.mean() - 32) < 4 and abs(lefts.mean() - 32) < 4


def test_training_batches_are_patches_and_evaluation_batches_whole_slices(shard_dir):
    manifest = load_manifest(shard_dir)
    train = make_dataset(manifest, "train", batch_size=4, foreground_fraction=0.5, seed=1, crop_size=16,
                         augmentation=Augmentation.none())  # a zoom could push a lesion out of the slice
    for images, masks in train.take(10):
        assert images.shape == (4, 16, 16, 1) and masks.shape == (4, 16, 16) and masks.dtype == tf.int32
        assert (masks.numpy()[:2] == 2).any(axis=(1, 2)).all()  # the quota's tumour is in the patch
    images, _ = next(iter(make_dataset(manifest, "val", batch_size=4, crop_size=16)))
    assert images.shape == (4, 32, 32, 1)
    with pytest.raises(ValueError, match="crop_size 40 must be between 1 and the slices' size 32"):
        make_dataset(manifest, "train", batch_size=4, crop_size=40)


def _lesion_case(folder, case_id: str, slices: int, lesion_hu: float) -> None:
    """A case whose lesion has its own HU (the case can be told from a training slice) and
    ``slices - 8`` tumour slices."""
    hu, labels = make_volume((40, 48, slices), seed=len(case_id) + slices, tumor=True)
    hu[labels == 2] = lesion_hu
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), str(folder / f"volume-{case_id}.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(folder / f"segmentation-{case_id}.nii.gz"))


@pytest.fixture(scope="module")
def three_lesion_cases(tmp_path_factory):
    """Cases with 24, 12 and 4 tumour slices; the last one's lesion is darker (-100 HU against 0)."""
    tmp_path = tmp_path_factory.mktemp("three_lesion_cases")
    (tmp_path / "src").mkdir()
    _lesion_case(tmp_path / "src", "large", 32, lesion_hu=0.0)
    _lesion_case(tmp_path / "src", "medium", 20, lesion_hu=0.0)
    _lesion_case(tmp_path / "src", "small", 12, lesion_hu=-100.0)
    prepare_dataset(PrepareOptions(tmp_path / "src", tmp_path / "out", image_size=32, workers=1, progress=False,
                                   split=(1.0, 0.0, 0.0), window=(-200.0, 250.0)))
    manifest = load_manifest(tmp_path / "out")
    assert sorted(manifest["splits"]["train"]["cases"]) == ["large", "medium", "small"]
    return manifest


@pytest.mark.parametrize("sampling, expected_share_of_the_small_case",
                         [("slice", 4 / 40), ("case", 1 / 3), ("stratum", 1 / 2)])
def test_tumour_quota_samples_slices_cases_or_strata_alike(three_lesion_cases, sampling,
                                                           expected_share_of_the_small_case):
    manifest = copy.deepcopy(three_lesion_cases)
    for cid, stratum in (("large", "portal"), ("medium", "portal"), ("small", "arterial")):
        manifest["cases"][cid]["stratum"] = stratum
    ds = make_dataset(manifest, "train", batch_size=4, augmentation=Augmentation.none(), foreground_fraction=1.0,
                      seed=1, tumor_sampling=sampling)
    prep = manifest["preprocessing"]
    lesion_hu = [float(image[..., 0][mask == 2].mean()) * prep["std"] + prep["mean"]
                 for images, masks in ds.take(150) for image, mask in zip(images.numpy(), masks.numpy())]
    share = np.mean(np.asarray(lesion_hu) < -50.0)
    # 600 draws: the binomial standard error is at most 0.02.
    assert share == pytest.approx(expected_share_of_the_small_case, abs=0.07)


def test_stratum_sampling_without_strata_says_how_to_stratify(three_lesion_cases):
    with pytest.raises(DataError, match=r"3 tumor-bearing case\(s\) have none \(e.g. large\): prepare with --stratify"):
        make_dataset(three_lesion_cases, "train", batch_size=4, tumor_sampling="stratum")


def test_an_unknown_tumour_sampling_is_refused(shard_dir):
    with pytest.raises(ValueError, match="tumor_sampling must be 'slice', 'case' or 'stratum', got 'lesion'"):
        make_dataset(shard_dir, "train", batch_size=4, tumor_sampling="lesion")
