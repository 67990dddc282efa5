"""Joint image/mask augmentation of whole batches, for the tf.data input pipeline.

Every sample of a batch draws its own transform, independently: a spatial warp (flip,
rotation, zoom and translation composed into one affine matrix) with probability
``Augmentation.probability``, then, each with the same probability and independently,
gamma, contrast/brightness and Gaussian noise on the image only.

:func:`sample_parameters` draws one slice's transform and is the definition of the
distribution; :func:`draw_parameters` draws a whole batch's at once (one tensor per
parameter, ``[batch]``), the same distribution, and is what :func:`augment_batch` uses. A
sample that does not draw a transform gets its identity (angle 0, zoom 1, gamma 1, ...).

Only the samples that drew a transform are computed; the others are left untouched, which
is what the identity transform would give, at a third of the work. With OpenCV installed (an
install requirement) the whole batch goes through **one** NumPy call that copies it once and
changes each chosen sample in place: ``cv2.warpAffine`` (image bilinear, mask nearest on its
own integer dtype, so labels stay exactly the labels they were), gamma, contrast/brightness,
then ``cv2.randn`` noise. Without OpenCV the same transforms run on TensorFlow's kernels
(``ImageProjectiveTransformV3``, one call for all warped samples; Box-Muller noise), about
twice the CPU time: there each transform gathers its samples and scatters them back. Both
paths sample the same points with the same fill, and compute the same gamma and contrast;
each draws its own noise.

Randomness is stateless: :func:`augment_batch` takes a ``[2]`` seed, and ``make_dataset``
feeds each batch its own seed from a seeded stream, so a seeded pipeline is reproducible
even with the batches augmented in parallel.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

#: The per-sample parameters of :func:`draw_parameters` and :func:`sample_parameters`, each
#: with the value a sample gets when it does not draw that transform.
IDENTITY = {
    "warp_on": False,
    "angle": 0.0,  # radians
    "zoom": 1.0,
    "shift_x": 0.0,  # fraction of the width
    "shift_y": 0.0,  # fraction of the height
    "flip_x": 1.0,  # -1 mirrors left-right
    "flip_y": 1.0,  # -1 mirrors up-down
    "gamma_on": False,
    "gamma": 1.0,
    "intensity_on": False,
    "intensity_scale": 1.0,
    "intensity_shift": 0.0,
    "noise_on": False,
    "noise_std": 0.0,
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
            (all of a batch's warps in one batched call, see :func:`augment_batch`) instead of
            one Keras preprocessing layer per transform. Same distribution of transforms, a
            third of the interpolation work; ``False`` uses ``RandomFlip``/``RandomRotation``/
            ``RandomZoom``/``RandomTranslation`` in sequence.
        probability: chance that a sample gets the spatial warp, and, independently, each
            intensity change (nnU-Net applies its transforms with probabilities of 0.1-0.3,
            MONAI's examples 0.1-0.5; a third sits in between). Only the chosen samples are
            computed, so the cost drops with it. The Keras-layer path (``fused=False``)
            warps every sample; its intensity changes follow ``probability``.
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

    @property
    def flip_x(self) -> bool:
        return self.flip in ("horizontal", "horizontal_and_vertical")

    @property
    def flip_y(self) -> bool:
        return self.flip in ("vertical", "horizontal_and_vertical")

    @property
    def flips(self) -> list[str]:
        """The mirrorings training draws, ``"horizontal"`` (columns) and ``"vertical"`` (rows):
        the only ones a model trained so may be averaged over at test time.

        Example:
            >>> Augmentation(flip="horizontal_and_vertical").flips, Augmentation().flips
            (['horizontal', 'vertical'], [])
        """
        return [name for name, on in (("horizontal", self.flip_x), ("vertical", self.flip_y)) if on]

    @property
    def intensity(self) -> bool:
        return self.intensity_scale > 0 or self.intensity_shift > 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> "Augmentation":
        if not config:
            return cls()
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - valid)
        if unknown:
            raise ValueError(f"unknown augmentation key(s) {unknown}; valid: {sorted(valid)}")
        return cls(**config)


def sample_parameters(augmentation: Augmentation, seed: tf.Tensor | Sequence[int]) -> dict[str, tf.Tensor]:
    """One slice's random transform, parameter by parameter: the distribution's definition.

    Args:
        augmentation: the strengths and the probability.
        seed: a stateless seed, shape ``[2]``.

    Returns:
        The scalars named in :data:`IDENTITY`; a transform the sample does not draw (or that
        ``augmentation`` switches off) has its identity value.

    Example:
        >>> p = sample_parameters(Augmentation(probability=1.0), [1, 2])
        >>> 1 - 0.15 <= float(p["zoom"]) <= 1 + 0.15
        True
    """
    a = augmentation
    seeds = iter(tf.unstack(tf.random.split(tf.convert_to_tensor(seed, tf.int64), len(IDENTITY))))

    def uniform(low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([], next(seeds), minval=low, maxval=high)

    def drawn(enabled: bool) -> tf.Tensor:
        return tf.logical_and(enabled, uniform(0.0, 1.0) < a.probability)

    def value(on: tf.Tensor, enabled: bool, draw: Callable[[], tf.Tensor], name: str) -> tf.Tensor:
        identity = tf.constant(IDENTITY[name], tf.float32)
        return tf.where(on, draw(), identity) if enabled else identity

    warp = drawn(a.spatial)
    gamma_on, intensity_on, noise_on = drawn(a.gamma > 0), drawn(a.intensity), drawn(a.noise_std > 0)
    mirror = lambda: tf.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)  # noqa: E731
    return {
        "warp_on": warp,
        "angle": value(warp, a.rotation > 0, lambda: uniform(-a.rotation, a.rotation) * (2 * math.pi), "angle"),
        "zoom": value(warp, a.zoom > 0, lambda: uniform(1 - a.zoom, 1 + a.zoom), "zoom"),
        "shift_x": value(warp, a.translation > 0, lambda: uniform(-a.translation, a.translation), "shift_x"),
        "shift_y": value(warp, a.translation > 0, lambda: uniform(-a.translation, a.translation), "shift_y"),
        "flip_x": value(warp, a.flip_x, mirror, "flip_x"),
        "flip_y": value(warp, a.flip_y, mirror, "flip_y"),
        "gamma_on": gamma_on,
        "gamma": value(gamma_on, a.gamma > 0, lambda: tf.exp(uniform(-a.gamma, a.gamma)), "gamma"),
        "intensity_on": intensity_on,
        "intensity_scale": value(
            intensity_on, a.intensity, lambda: uniform(1 - a.intensity_scale, 1 + a.intensity_scale), "intensity_scale"
        ),
        "intensity_shift": value(
            intensity_on, a.intensity, lambda: uniform(-a.intensity_shift, a.intensity_shift), "intensity_shift"
        ),
        "noise_on": noise_on,
        "noise_std": value(noise_on, a.noise_std > 0, lambda: uniform(0.0, a.noise_std), "noise_std"),
    }


def draw_parameters(
    augmentation: Augmentation, batch_size: int | tf.Tensor, seed: tf.Tensor | Sequence[int]
) -> dict[str, tf.Tensor]:
    """A whole batch's transforms at once: :func:`sample_parameters`'s distribution, vectorized.

    Every sample draws independently of the others (one uniform per parameter and sample).

    Args:
        augmentation: the strengths and the probability.
        batch_size: samples in the batch.
        seed: a stateless seed, shape ``[2]``.

    Returns:
        The tensors named in :data:`IDENTITY`, each ``[batch_size]`` (bool for the ``*_on``
        flags, float32 otherwise).

    Example:
        >>> p = draw_parameters(Augmentation(), 32, [0, 1])
        >>> p["angle"].shape
        TensorShape([32])
    """
    a = augmentation
    u = tf.random.stateless_uniform([len(IDENTITY), batch_size], tf.convert_to_tensor(seed, tf.int64))
    rows = dict(zip(IDENTITY, tf.unstack(u)))

    def between(name: str, low: float, high: float) -> tf.Tensor:
        return low + (high - low) * rows[name]

    def value(on: tf.Tensor, enabled: bool, drawn: Callable[[], tf.Tensor], name: str) -> tf.Tensor:
        identity = tf.fill([batch_size], tf.constant(IDENTITY[name], tf.float32))
        return tf.where(on, drawn(), identity) if enabled else identity

    def mirror(name: str) -> tf.Tensor:
        return tf.where(rows[name] < 0.5, -1.0, 1.0)

    def drawn(name: str, enabled: bool) -> tf.Tensor:
        return rows[name] < a.probability if enabled else tf.zeros([batch_size], tf.bool)

    warp = drawn("warp_on", a.spatial)
    gamma_on, intensity_on = drawn("gamma_on", a.gamma > 0), drawn("intensity_on", a.intensity)
    noise_on = drawn("noise_on", a.noise_std > 0)
    return {
        "warp_on": warp,
        "angle": value(warp, a.rotation > 0, lambda: between("angle", -a.rotation, a.rotation) * (2 * math.pi), "angle"),
        "zoom": value(warp, a.zoom > 0, lambda: between("zoom", 1 - a.zoom, 1 + a.zoom), "zoom"),
        "shift_x": value(warp, a.translation > 0, lambda: between("shift_x", -a.translation, a.translation), "shift_x"),
        "shift_y": value(warp, a.translation > 0, lambda: between("shift_y", -a.translation, a.translation), "shift_y"),
        "flip_x": value(warp, a.flip_x, lambda: mirror("flip_x"), "flip_x"),
        "flip_y": value(warp, a.flip_y, lambda: mirror("flip_y"), "flip_y"),
        "gamma_on": gamma_on,
        "gamma": value(gamma_on, a.gamma > 0, lambda: tf.exp(between("gamma", -a.gamma, a.gamma)), "gamma"),
        "intensity_on": intensity_on,
        "intensity_scale": value(
            intensity_on, a.intensity,
            lambda: between("intensity_scale", 1 - a.intensity_scale, 1 + a.intensity_scale), "intensity_scale",
        ),
        "intensity_shift": value(
            intensity_on, a.intensity,
            lambda: between("intensity_shift", -a.intensity_shift, a.intensity_shift), "intensity_shift",
        ),
        "noise_on": noise_on,
        "noise_std": value(noise_on, a.noise_std > 0, lambda: between("noise_std", 0.0, a.noise_std), "noise_std"),
    }


def affine_transforms(parameters: Mapping[str, tf.Tensor], height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """``[batch, 8]`` projective transforms mapping output pixels to input pixels.

    Output point ``p`` samples the input at ``c + M (p - c) - t`` around the centre ``c``,
    with ``M = diag(flip) R(-angle) / zoom``: the inverse of "zoom, rotate, flip, shift".
    Identity parameters give exactly the identity matrix.
    """
    w, h = tf.cast(width, tf.float32), tf.cast(height, tf.float32)
    angle, zoom = parameters["angle"], parameters["zoom"]
    fx, fy = parameters["flip_x"], parameters["flip_y"]
    tx, ty = parameters["shift_x"] * w, parameters["shift_y"] * h
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    m00, m01, m10, m11 = fx * cos, fx * sin, -fy * sin, fy * cos
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    zeros = tf.zeros_like(angle)
    return tf.stack(
        [m00, m01, cx - tx - (m00 * cx + m01 * cy), m10, m11, cy - ty - (m10 * cx + m11 * cy), zeros, zeros], axis=1
    )


def augment_batch(
    images: tf.Tensor,
    masks: tf.Tensor,
    seed: tf.Tensor | Sequence[int],
    augmentation: Augmentation,
    parameters: Mapping[str, tf.Tensor] | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Augment a batch: per-sample warps in one batched call, then vectorized intensity changes.

    Out-of-frame pixels get each image's minimum (the window's floor: air) and background (0)
    in the mask.

    Args:
        images: ``[batch, height, width, channels]`` float32.
        masks: ``[batch, height, width]`` uint8, int32 or int64; returned in the same dtype.
        seed: a stateless seed, shape ``[2]``: the same seed, the same augmentation.
        augmentation: the strengths; ``fused=False`` is ignored here (see :class:`JointAugmenter`).
        parameters: the per-sample transforms (:func:`draw_parameters`); drawn from ``seed``
            when not given.

    Returns:
        ``(images, masks)`` with the shapes and dtypes given.

    Example:
        >>> images, masks = tf.zeros([4, 32, 32, 1]), tf.zeros([4, 32, 32], tf.uint8)
        >>> out = augment_batch(images, masks, [0, 1], Augmentation())
        >>> out[1].dtype
        tf.uint8
    """
    seed = tf.convert_to_tensor(seed, tf.int64)
    params_seed, noise_seed = tf.unstack(tf.random.split(seed, 2))
    shape = tf.shape(images)
    if parameters is None:
        parameters = draw_parameters(augmentation, shape[0], params_seed)
    warp = augmentation.spatial and augmentation.fused
    if _opencv() is not None:
        return _augment_with_opencv(images, masks, parameters, augmentation, noise_seed, warp)
    if warp:
        transforms = affine_transforms(parameters, shape[1], shape[2])
        images, masks = _on_chosen(parameters["warp_on"], _warp, images, masks, transforms)
    return intensity_changes(images, parameters, augmentation, noise_seed), masks


def intensity_changes(
    images: tf.Tensor, parameters: Mapping[str, tf.Tensor], augmentation: Augmentation, seed: tf.Tensor
) -> tf.Tensor:
    """Gamma, contrast/brightness, then Gaussian noise, each on the samples that drew it."""
    a = augmentation
    if a.gamma > 0:
        (images,) = _on_chosen(parameters["gamma_on"], _gamma, images, parameters["gamma"])
    if a.intensity:
        # A multiply-add over the whole batch costs less than picking the chosen samples out;
        # the others have scale 1 and shift 0, which leave them bit for bit as they were.
        per_sample = lambda name: parameters[name][:, None, None, None]  # noqa: E731
        images = images * per_sample("intensity_scale") + per_sample("intensity_shift")
    if a.noise_std > 0:
        noise = lambda x, std: (x + _normal(tf.shape(x), seed) * std[:, None, None, None],)  # noqa: E731
        (images,) = _on_chosen(parameters["noise_on"], noise, images, parameters["noise_std"])
    return images


def _on_chosen(
    chosen: tf.Tensor, change: Callable[..., tuple[tf.Tensor, ...]], *tensors: tf.Tensor
) -> tuple[tf.Tensor, ...]:
    """``change`` applied to the chosen samples only; the rest pass through untouched.

    ``change`` takes the chosen rows of every tensor and returns new rows for the leading
    tensors it changes (the others are per-sample arguments).
    """
    index = tf.where(chosen)  # [k, 1]
    changed = change(*(tf.gather_nd(t, index) for t in tensors))
    return tuple(tf.tensor_scatter_nd_update(t, index, c) for t, c in zip(tensors, changed))


def _warp(images: tf.Tensor, masks: tf.Tensor, transforms: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    # One fill value serves the whole call: shift each image so that its floor (minimum) is 0.
    floor = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    size = tf.shape(images)[1:3]
    images = tf.raw_ops.ImageProjectiveTransformV3(
        images=images - floor, transforms=transforms, output_shape=size, fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT",
    ) + floor
    # Nearest on the labels' own dtype: every output label is one of the input's labels.
    masks = tf.raw_ops.ImageProjectiveTransformV3(
        images=masks[..., None], transforms=transforms, output_shape=size, fill_value=0.0,
        interpolation="NEAREST", fill_mode="CONSTANT",
    )[..., 0]
    return images, masks


@functools.cache
def _opencv() -> ModuleType | None:
    try:
        import cv2
    except ImportError:
        logger.info("OpenCV is not installed: augmentation runs on TensorFlow's kernels (~3x slower on a CPU)")
        return None
    return cv2


def _augment_with_opencv(
    images: tf.Tensor, masks: tf.Tensor, parameters: Mapping[str, tf.Tensor], augmentation: Augmentation,
    seed: tf.Tensor, warp: bool,
) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`augment_batch`'s transforms in one pass over each sample, with OpenCV and NumPy.

    One copy of the batch, each chosen sample changed in place while it sits in cache: the
    TensorFlow path's gathers and scatters (a copy of the batch per transform) cost more than
    its arithmetic.
    """
    a = augmentation
    shape = tf.shape(images)
    if warp:
        transforms = affine_transforms(parameters, shape[1], shape[2])
    else:
        transforms = tf.zeros([shape[0], 8])
    off = tf.zeros([shape[0]], tf.bool)
    flags = tf.stack([
        parameters["warp_on"] if warp else off,
        parameters["gamma_on"] if a.gamma > 0 else off,
        parameters["intensity_on"] if a.intensity else off,
        parameters["noise_on"] if a.noise_std > 0 else off,
    ], axis=1)
    values = tf.stack([parameters[name] for name in ("gamma", "intensity_scale", "intensity_shift", "noise_std")], 1)
    out_images, out_masks = tf.numpy_function(
        _augment_opencv, [images, masks, transforms, flags, values, seed], [images.dtype, masks.dtype], stateful=False
    )
    out_images.set_shape(images.shape)
    out_masks.set_shape(masks.shape)
    return out_images, out_masks


#: Mask dtypes OpenCV warps as they are; others go through float32 (exact for labels below 2**24).
_OPENCV_MASK_DTYPES = (np.uint8, np.uint16, np.int16)


def _augment_opencv(
    images: np.ndarray, masks: np.ndarray, transforms: np.ndarray, flags: np.ndarray, values: np.ndarray,
    seed: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The NumPy side of :func:`_augment_with_opencv`: ``flags`` ``[batch, 4]`` (warp, gamma,
    intensity, noise), ``values`` ``[batch, 4]`` (gamma, scale, shift, noise std)."""
    cv2 = _opencv()
    out_images = np.array(images, dtype=np.float32)  # our own copy: the inputs may be TensorFlow's memory
    out_masks = np.array(masks)
    height, width = images.shape[1:3]
    # transforms map output to input (a0 a1 a2 / b0 b1 b2), as WARP_INVERSE_MAP reads its matrix.
    matrices = transforms[:, :6].reshape(-1, 2, 3).astype(np.float64)
    bilinear, nearest = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP
    mask_dtype = masks.dtype if masks.dtype in _OPENCV_MASK_DTYPES else np.float32
    # OpenCV's default generator is per thread and randn fills serially: seeding it here makes
    # the noise a function of the seed alone, whichever tf.data thread runs the call.
    cv2.setRNGSeed((int(seed[0]) * 0x9E3779B1 + int(seed[1])) % 0x7FFFFFFF + 1)
    noise = np.empty(images.shape[1:], np.float32)
    for k in np.flatnonzero(flags.any(axis=1)):
        warp, gamma, intensity, noisy = flags[k]
        image = out_images[k]
        if warp:
            floor = float(image.min())
            # OpenCV warps up to 4 channels a call: wider context stacks go 4 at a time.
            for first in range(0, image.shape[-1], 4):
                channels = np.ascontiguousarray(images[k, ..., first:first + 4], dtype=np.float32)
                warped = cv2.warpAffine(channels, matrices[k], (width, height), flags=bilinear,
                                        borderMode=cv2.BORDER_CONSTANT, borderValue=(floor,) * 4)
                image[..., first:first + 4] = warped.reshape(height, width, -1)
            mask = np.ascontiguousarray(masks[k], dtype=mask_dtype)
            out_masks[k] = cv2.warpAffine(mask, matrices[k], (width, height), flags=nearest,
                                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if gamma:
            low, high = image.min(), image.max()
            span = np.float32(max(high - low, 1e-6))
            unit = (image - low) / span
            with np.errstate(divide="ignore"):  # log(0) = -inf, and exp(-inf) = 0 = 0**gamma
                np.log(unit, out=unit)
            unit *= values[k, 0]
            np.exp(unit, out=unit)
            image[...] = unit * span + low
        if intensity:
            image *= values[k, 1]
            image += values[k, 2]
        if noisy:
            cv2.randn(noise.reshape(1, -1), 0.0, 1.0)
            noise *= values[k, 3]
            image += noise
    return out_images, out_masks


def _gamma(images: tf.Tensor, gamma: tf.Tensor) -> tuple[tf.Tensor]:
    # Gamma needs a positive range: rescale each image to [0, 1], apply, map back.
    low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    high = tf.reduce_max(images, axis=[1, 2, 3], keepdims=True)
    span = tf.maximum(high - low, 1e-6)
    # exp(g log x) rather than tf.pow: 4x faster on CPU; x = 0 gives exp(-inf) = 0 = 0**g.
    unit = (images - low) / span
    return (tf.exp(tf.math.log(unit) * gamma[:, None, None, None]) * span + low,)


def _normal(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Standard normal samples by Box-Muller on vectorized ops: 2x faster than
    ``tf.random.stateless_normal`` on CPU, where Philox's uniforms are the remaining cost."""
    n = tf.reduce_prod(shape)
    u = tf.random.stateless_uniform([2, (n + 1) // 2], seed)
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - u[0]))  # 1 - u in (0, 1]: no log(0)
    angle = (2.0 * math.pi) * u[1]
    return tf.reshape(tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 0)[:n], shape)


class JointAugmenter:
    """Batched joint image/mask augmentation as a callable: ``augmenter(images, masks, seed)``.

    With ``Augmentation(fused=True)`` (the default) it is :func:`augment_batch`. With
    ``fused=False`` the spatial transforms are Keras's preprocessing layers in sequence, given
    ``{"images", "segmentation_masks"}`` (masks nearest), on every sample; built once here,
    outside ``tf.data.Dataset.map`` (a layer created inside the mapped function fails on its
    seed variable). Those layers keep their own random state, so only the intensity changes
    follow a call's ``seed`` there.

    Args:
        augmentation: the strengths.
        seed: seeds the Keras layers (``fused=False`` only).

    Example:
        >>> augmenter = JointAugmenter(Augmentation(fused=False), seed=1)
        >>> images, masks = augmenter(tf.zeros([2, 32, 32, 1]), tf.zeros([2, 32, 32], tf.int32), seed=[0, 7])
        >>> masks.shape, masks.dtype
        (TensorShape([2, 32, 32]), tf.int32)
    """

    def __init__(self, augmentation: Augmentation, seed: int | None = None) -> None:
        self.augmentation = augmentation
        self.seed = seed
        a = augmentation
        # float32 whatever the global mixed-precision policy: this is input data, not model compute.
        common = {"dtype": "float32", "fill_mode": "constant"}
        layers: list[keras.layers.Layer] = []
        if not a.fused:
            if a.flip:
                layers.append(keras.layers.RandomFlip(a.flip, seed=seed, dtype="float32"))
            if a.rotation > 0:
                layers.append(keras.layers.RandomRotation(a.rotation, seed=_offset(seed, 1), **common))
            if a.zoom > 0:
                layers.append(keras.layers.RandomZoom(a.zoom, seed=_offset(seed, 2), **common))
            if a.translation > 0:
                layers.append(
                    keras.layers.RandomTranslation(a.translation, a.translation, seed=_offset(seed, 3), **common)
                )
        self.layers = layers

    @property
    def stateful(self) -> bool:
        """Whether calls depend on state as well as on their seed (the Keras layers do)."""
        return bool(self.layers)

    def __call__(self, images: tf.Tensor, masks: tf.Tensor, seed: tf.Tensor | Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
        if not self.layers:
            return augment_batch(images, masks, seed, self.augmentation)
        seed = tf.convert_to_tensor(seed, tf.int64)
        params_seed, noise_seed = tf.unstack(tf.random.split(seed, 2))
        floor = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
        data = {"images": images - floor, "segmentation_masks": tf.cast(masks[..., None], tf.float32)}
        for layer in self.layers:
            data = layer(data, training=True)
        images = data["images"] + floor
        masks = tf.cast(tf.round(data["segmentation_masks"][..., 0]), masks.dtype)
        parameters = draw_parameters(self.augmentation, tf.shape(images)[0], params_seed)
        return intensity_changes(images, parameters, self.augmentation, noise_seed), masks


def _offset(seed: int | None, k: int) -> int | None:
    return None if seed is None else seed + k
