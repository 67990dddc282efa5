"""The tf.data input pipeline: shards → parsed, standardized, oversampled, augmented batches.

``make_dataset(manifest, split, batch_size)`` returns a ``tf.data.Dataset`` of
``(images, masks)`` with ``images`` float32 ``[batch, height, width, context]`` standardized
with the manifest's statistics and ``masks`` int32 ``[batch, height, width]`` in ``{0, 1, 2}``.

Training mode (the default for the ``train`` split):

1. shards are read interleaved (parallel, AUTOTUNE), examples parsed and standardized;
2. **foreground oversampling**: ``foreground_fraction`` of every batch is drawn from the
   slices that contain tumor (nnU-Net forces a third of each batch to contain foreground),
   the rest from all slices; both streams are shuffled and repeated;
3. **joint augmentation**, batched: Keras 3's own ``RandomFlip``, ``RandomRotation``,
   ``RandomZoom`` and ``RandomTranslation`` get ``{"images", "segmentation_masks"}`` so that
   image and mask move together (masks with nearest interpolation); then intensity scale and
   shift, gamma and Gaussian noise on the image only;
4. prefetch (AUTOTUNE).

The foreground guarantee holds before spatial augmentation (a zoom can push a small
lesion out of the frame, as in every pipeline that crops after sampling).

Validation mode (``training=False``): shards in order, no oversampling, no augmentation,
no repetition: every slice exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import keras
import numpy as np
import tensorflow as tf

from keras_livseg.data.prepare import load_manifest
from keras_livseg.data.preprocessing import Preprocessing
from keras_livseg.data.volumes import DataError

logger = logging.getLogger(__name__)

FEATURE_SPEC = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "mask": tf.io.FixedLenFeature([], tf.string),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "context": tf.io.FixedLenFeature([], tf.int64),
    "case_id": tf.io.FixedLenFeature([], tf.string),
    "slice_index": tf.io.FixedLenFeature([], tf.int64),
    "liver_pixels": tf.io.FixedLenFeature([], tf.int64),
    "tumor_pixels": tf.io.FixedLenFeature([], tf.int64),
    "volume_mean": tf.io.FixedLenFeature([], tf.float32),
    "volume_std": tf.io.FixedLenFeature([], tf.float32),
}


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Augmentation strengths; ``Augmentation.none()`` switches everything off.

    Attributes:
        flip: ``"horizontal"``, ``"vertical"``, ``"horizontal_and_vertical"`` or ``None``. Off
            by default: left and right are anatomically meaningful in canonical CT (liver on
            the image's left), flipping teaches the model a liver that never occurs.
        rotation: max rotation as a fraction of a full turn (0.04 ≈ ±15°).
        zoom: max zoom as a fraction (0.15 = ±15 %).
        translation: max shift as a fraction of the size.
        intensity_scale: max relative contrast change (multiplies the standardized image).
        intensity_shift: max shift in standardized units.
        gamma: max |log gamma| (gamma in [exp(-g), exp(g)]), applied on the [0, 1]-rescaled image.
        noise_std: max standard deviation of additive Gaussian noise (standardized units).
        fused: apply flip, rotation, zoom and translation as **one** affine warp per sample
            (``keras.ops.image.affine_transform`` with the composed matrix) instead of one
            Keras preprocessing layer per transform. Same distribution of transforms, a third
            of the interpolation work; ``False`` uses ``RandomFlip``/``RandomRotation``/
            ``RandomZoom``/``RandomTranslation`` in sequence.
        probability: chance that a sample gets the spatial warp, and, independently, each
            intensity change (nnU-Net applies its transforms with probabilities of 0.1-0.3,
            MONAI's examples 0.1-0.5; a third sits in between). Only the chosen samples are
            computed, so the cost drops with it. Applies to the fused path; the Keras-layer
            path transforms every sample.
    """

    flip: str | None = None
    rotation: float = 0.04
    zoom: float = 0.15
    translation: float = 0.08
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    gamma: float = 0.3
    noise_std: float = 0.05
    fused: bool = True
    probability: float = 0.33

    @classmethod
    def none(cls) -> "Augmentation":
        return cls(None, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, True, 0.0)

    @property
    def spatial(self) -> bool:
        return bool(self.flip) or self.rotation > 0 or self.zoom > 0 or self.translation > 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> "Augmentation":
        if not config:
            return cls()
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - valid)
        if unknown:
            raise ValueError(f"unknown augmentation key(s) {unknown}; valid: {sorted(valid)}")
        return cls(**config)


class JointAugmenter:
    """Batched joint image/mask augmentation: Keras 3 image ops, then intensity changes.

    Spatial transforms move image and mask together: by default one composed affine warp per
    sample (``keras.ops.image.affine_transform``: bilinear for the image, nearest for the
    mask); with ``Augmentation(fused=False)``, Keras's preprocessing layers in sequence, given
    ``{"images", "segmentation_masks"}``. The layers are built once here, outside ``tf.data.Dataset.map`` (a layer created inside
    the mapped function fails on its seed variable). Out-of-frame pixels are filled with the
    window's floor (air) in the image and background (0) in the mask: the image is shifted
    so that its floor is 0 before the spatial transforms, since the layers take one fill
    value for both. The floor is each image's minimum: the window clips air and padding to
    the window's low end, which every abdominal slice contains.

    Example:
        >>> augmenter = JointAugmenter(Augmentation(), seed=1)  # doctest: +SKIP
        >>> images, masks = augmenter(images, masks)  # [B, H, W, C] float32, [B, H, W] int32
    """

    def __init__(self, augmentation: Augmentation, seed: int | None = None) -> None:
        self.augmentation = augmentation
        self.seed = seed
        a = augmentation
        # float32 whatever the global mixed-precision policy: this is input data, not model compute.
        common = {"dtype": "float32"}
        spatial: list[keras.layers.Layer] = []
        if a.flip:
            spatial.append(keras.layers.RandomFlip(a.flip, seed=seed, **common))
        if a.rotation > 0:
            spatial.append(
                keras.layers.RandomRotation(a.rotation, fill_mode="constant", seed=_offset(seed, 1), **common)
            )
        if a.zoom > 0:
            spatial.append(keras.layers.RandomZoom(a.zoom, fill_mode="constant", seed=_offset(seed, 2), **common))
        if a.translation > 0:
            spatial.append(
                keras.layers.RandomTranslation(
                    a.translation, a.translation, fill_mode="constant", seed=_offset(seed, 3), **common
                )
            )
        self.spatial = spatial if not a.fused else []
        self._generator = tf.random.Generator.from_seed(seed) if seed is not None else tf.random.Generator.from_non_deterministic_state()

    def _affine(self, batch: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
        """Per-sample ``[batch, 8]`` transforms mapping output pixels to input pixels.

        Output point ``p`` samples the input at ``c + M (p - c) - t`` around the centre ``c``,
        with ``M = diag(flip) R(-angle) / zoom``: the inverse of "zoom, rotate, flip, shift".
        """
        a = self.augmentation
        uniform = lambda low, high: self._generator.uniform([batch], low, high)  # noqa: E731
        angle = uniform(-a.rotation, a.rotation) * (2.0 * np.pi) if a.rotation > 0 else tf.zeros([batch])
        zoom = uniform(1.0 - a.zoom, 1.0 + a.zoom) if a.zoom > 0 else tf.ones([batch])
        w, h = tf.cast(width, tf.float32), tf.cast(height, tf.float32)
        tx = uniform(-a.translation, a.translation) * w if a.translation > 0 else tf.zeros([batch])
        ty = uniform(-a.translation, a.translation) * h if a.translation > 0 else tf.zeros([batch])

        def flip_sign(enabled: bool) -> tf.Tensor:
            if not enabled:
                return tf.ones([batch])
            return tf.where(self._generator.uniform([batch]) < 0.5, -1.0, 1.0)

        fx = flip_sign(a.flip in ("horizontal", "horizontal_and_vertical"))
        fy = flip_sign(a.flip in ("vertical", "horizontal_and_vertical"))
        cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
        m00, m01, m10, m11 = fx * cos, fx * sin, -fy * sin, fy * cos
        cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        zeros = tf.zeros([batch])
        return tf.stack(
            [m00, m01, cx - tx - (m00 * cx + m01 * cy), m10, m11, cy - ty - (m10 * cx + m11 * cy), zeros, zeros], axis=1
        )

    def _chosen(self, batch: tf.Tensor) -> tf.Tensor:
        """Indices ``[k, 1]`` of the samples a transform applies to (each with ``probability``)."""
        return tf.where(self._generator.uniform([batch]) < self.augmentation.probability)

    def _warp(self, images: tf.Tensor, masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        shape = tf.shape(images)
        transform = self._affine(shape[0], shape[1], shape[2])
        floor = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
        images = keras.ops.image.affine_transform(
            images - floor, transform, interpolation="bilinear", fill_mode="constant", fill_value=0.0
        ) + floor
        masks = keras.ops.image.affine_transform(
            tf.cast(masks[..., None], tf.float32), transform, interpolation="nearest", fill_mode="constant"
        )
        return images, tf.cast(tf.round(masks[..., 0]), tf.int32)

    def _gamma(self, images: tf.Tensor) -> tf.Tensor:
        # Gamma needs a positive range: rescale each image to [0, 1], apply, map back.
        g = self.augmentation.gamma
        low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
        high = tf.reduce_max(images, axis=[1, 2, 3], keepdims=True)
        span = tf.maximum(high - low, 1e-6)
        gamma = tf.exp(self._per_sample(images, -g, g))
        return tf.pow((images - low) / span, gamma) * span + low

    def _scale_shift(self, images: tf.Tensor) -> tf.Tensor:
        a = self.augmentation
        scale = self._per_sample(images, 1 - a.intensity_scale, 1 + a.intensity_scale)
        return images * scale + self._per_sample(images, -a.intensity_shift, a.intensity_shift)

    def _noise(self, images: tf.Tensor) -> tf.Tensor:
        std = self._per_sample(images, 0.0, self.augmentation.noise_std)
        return images + self._generator.normal(tf.shape(images)) * std

    def _per_sample(self, images: tf.Tensor, low: float, high: float) -> tf.Tensor:
        return self._generator.uniform([tf.shape(images)[0], 1, 1, 1], low, high)

    def __call__(self, images: tf.Tensor, masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        a = self.augmentation
        batch = tf.shape(images)[0]
        if a.fused and a.spatial:
            chosen = self._chosen(batch)
            warped_images, warped_masks = self._warp(tf.gather_nd(images, chosen), tf.gather_nd(masks, chosen))
            images = tf.tensor_scatter_nd_update(images, chosen, warped_images)
            masks = tf.tensor_scatter_nd_update(masks, chosen, warped_masks)
        if self.spatial:
            floor = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
            data = {
                "images": images - floor,
                "segmentation_masks": tf.cast(masks[..., None], tf.float32),
            }
            for layer in self.spatial:
                data = layer(data, training=True)
            images = data["images"] + floor
            masks = tf.cast(tf.round(data["segmentation_masks"][..., 0]), tf.int32)
        for enabled, change in (
            (a.gamma > 0, self._gamma),
            (a.intensity_scale > 0 or a.intensity_shift > 0, self._scale_shift),
            (a.noise_std > 0, self._noise),
        ):
            if enabled:
                chosen = self._chosen(batch)
                images = tf.tensor_scatter_nd_update(images, chosen, change(tf.gather_nd(images, chosen)))
        return images, masks


def _offset(seed: int | None, k: int) -> int | None:
    return None if seed is None else seed + k


def parse_example(record: tf.Tensor, context: int, image_size: tuple[int, int]) -> dict[str, tf.Tensor]:
    """Parse one serialized slice example into tensors (image float32, mask int32)."""
    parsed = tf.io.parse_single_example(record, FEATURE_SPEC)
    height, width = image_size
    image = tf.io.decode_raw(parsed["image"], tf.float16)
    image = tf.cast(tf.reshape(image, [height, width, context]), tf.float32)
    mask = tf.reshape(tf.io.decode_raw(parsed["mask"], tf.uint8), [height, width])
    parsed["image"] = image
    parsed["mask"] = tf.cast(mask, tf.int32)
    return parsed


def _shard_paths(manifest: Mapping[str, Any], split: str) -> list[str]:
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in the manifest; use one of {sorted(manifest['splits'])}")
    names = manifest["splits"][split]["shards"]
    paths = [str(Path(manifest["_dir"]) / name) for name in names]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"shard {missing[0]} listed in the manifest is missing; run prepare again with --overwrite")
    return paths


def make_dataset(
    manifest: str | Path | Mapping[str, Any],
    split: str = "train",
    batch_size: int = 8,
    *,
    training: bool | None = None,
    augmentation: Augmentation | None = None,
    foreground_fraction: float = 0.33,
    shuffle_buffer: int = 2048,
    cache: bool | str = False,
    deterministic: bool = False,
    seed: int | None = None,
    drop_remainder: bool | None = None,
) -> tf.data.Dataset:
    """Build the input pipeline for one split.

    Args:
        manifest: a prepare output folder, its ``manifest.json``, or the loaded manifest.
        split: ``"train"``, ``"val"`` or ``"test"``.
        batch_size: slices per batch (the global batch under a distribution strategy).
        training: shuffle, oversample, augment and repeat forever. Defaults to ``split == "train"``.
        augmentation: strengths (training only); defaults to :class:`Augmentation`'s defaults.
        foreground_fraction: share of each training batch drawn from tumor slices (0 turns
            oversampling off); at least one slice per batch when positive.
        shuffle_buffer: examples in each shuffle buffer.
        cache: cache parsed, standardized examples in memory (``True``) or in a file (a path).
        deterministic: fixed order and fixed augmentation for a given ``seed`` (slower).
        seed: seed for shuffling and augmentation (required for ``deterministic``).
        drop_remainder: drop a final partial batch (default: ``training``).

    Returns:
        ``tf.data.Dataset`` of ``(images [B, H, W, C] float32, masks [B, H, W] int32)``.

    Example:
        >>> ds = make_dataset("shards/phantom", "train", batch_size=8, seed=0)  # doctest: +SKIP
        >>> images, masks = next(iter(ds))
    """
    if not isinstance(manifest, Mapping):
        manifest = load_manifest(manifest)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
    if deterministic and seed is None:
        seed = 0
    training = (split == "train") if training is None else training
    drop_remainder = training if drop_remainder is None else drop_remainder
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    paths = _shard_paths(manifest, split)
    if not paths:
        raise DataError(f"split {split!r} of {manifest['_dir']} has no slices; change --split when preparing")
    compression = "GZIP" if manifest.get("compression") == "GZIP" else ""
    autotune = tf.data.AUTOTUNE
    options = tf.data.Options()
    options.deterministic = bool(deterministic or not training)

    def standardized(parsed: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        if prep.normalization == "volume":
            image = prep.tf_standardize(parsed["image"], parsed["volume_mean"], parsed["volume_std"])
        else:
            image = prep.tf_standardize(parsed["image"])
        return {"image": image, "mask": parsed["mask"], "tumor_pixels": parsed["tumor_pixels"]}

    files = tf.data.Dataset.from_tensor_slices(paths)
    if training and len(paths) > 1:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    records = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type=compression, buffer_size=1 << 22),
        cycle_length=min(len(paths), 8),
        num_parallel_calls=autotune,
        deterministic=options.deterministic,
    )
    def parsed(only_tumor: bool = False) -> tf.data.Dataset:
        examples = records.map(
            lambda r: standardized(parse_example(r, prep.context, prep.image_size)),
            num_parallel_calls=autotune,
            deterministic=options.deterministic,
        )
        if only_tumor:
            examples = examples.filter(lambda e: e["tumor_pixels"] > 0)
        if cache:
            # One cache per stream: two iterators sharing a cache that is still being
            # filled can cut an epoch short ("Your input ran out of data").
            suffix = ".tumor" if only_tumor else ""
            examples = examples.cache("" if cache is True else f"{cache}{suffix}")
        return examples

    examples = parsed()

    def pair(example: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        return example["image"], example["mask"]

    if not training:
        dataset = examples.map(pair).batch(batch_size, drop_remainder=drop_remainder)
        return dataset.prefetch(autotune).with_options(options)

    tumor_slices = int(manifest["splits"][split].get("tumor_slices", 0))
    n_foreground = 0
    if foreground_fraction > 0:
        if tumor_slices == 0:
            logger.warning("split %s has no tumor slices: foreground oversampling is off", split)
        else:
            n_foreground = min(batch_size, max(1, int(math.floor(foreground_fraction * batch_size + 0.5))))
    buffer = max(1, min(shuffle_buffer, int(manifest["splits"][split]["slices"])))
    everything = examples.repeat().shuffle(buffer, seed=seed).map(pair)
    if n_foreground:
        tumor = (
            parsed(only_tumor=True)
            .repeat()
            .shuffle(max(1, min(shuffle_buffer, tumor_slices)), seed=_offset(seed, 7))
            .map(pair)
            .batch(n_foreground, drop_remainder=True)
        )
        rest = everything.batch(batch_size - n_foreground, drop_remainder=True) if n_foreground < batch_size else None
        if rest is None:
            batches = tumor
        else:
            batches = tf.data.Dataset.zip((tumor, rest)).map(
                lambda a, b: (tf.concat([a[0], b[0]], 0), tf.concat([a[1], b[1]], 0))
            )
    else:
        batches = everything.batch(batch_size, drop_remainder=True)

    augmentation = Augmentation() if augmentation is None else augmentation
    if augmentation != Augmentation.none():
        augmenter = JointAugmenter(augmentation, seed=seed)
        # A stateful generator draws the random numbers: one call at a time keeps them reproducible.
        batches = batches.map(augmenter, num_parallel_calls=None if deterministic else autotune)
    return batches.prefetch(autotune).with_options(options)


def steps_per_epoch(manifest: Mapping[str, Any], split: str, batch_size: int) -> int:
    """Batches that cover the split's slices once (at least 1)."""
    return max(1, int(manifest["splits"][split]["slices"]) // batch_size)
