"""Small shared helpers for the model code: channel axis, argument checks, size checks."""

from __future__ import annotations

import keras


def channel_axis() -> int:
    """The channel axis of a 4D image tensor under ``keras.config.image_data_format()``."""
    return -1 if keras.config.image_data_format() == "channels_last" else 1


def spatial_axes() -> tuple[int, int]:
    """The (height, width) axes of a 4D image tensor under the current data format."""
    return (1, 2) if keras.config.image_data_format() == "channels_last" else (2, 3)


def spatial_shape(shape) -> tuple:
    """``(height, width)`` of a 4D shape tuple in the current data format."""
    h_axis, w_axis = spatial_axes()
    return shape[h_axis], shape[w_axis]


def check_positive_int(name: str, value, owner: str) -> int:
    """Return ``value`` if it is a positive int, else raise ``ValueError`` quoting it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: `{name}` must be a positive integer, got {name}={value!r}.")
    return value


def check_choice(name: str, value, choices, owner: str):
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` quoting it and them."""
    if isinstance(value, bool) or value not in tuple(choices):
        raise ValueError(f"{owner}: `{name}` must be one of {tuple(choices)}, got {name}={value!r}.")
    return value


def check_rate(name: str, value, owner: str) -> float:
    """Return ``value`` if it is a float in [0, 1), else raise ``ValueError`` quoting it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: `{name}` must be a number in [0, 1), got {name}={value!r}.")
    return float(value)


def nearest_multiple(size: int, multiple: int) -> int:
    """The multiple of ``multiple`` closest to ``size`` (ties go up), never below ``multiple``."""
    lower = (size // multiple) * multiple
    upper = lower + multiple
    best = lower if size - lower < upper - size else upper
    return max(best, multiple)


def check_input_shape(input_shape, multiple: int, owner: str, why: str) -> tuple[int, int, int]:
    """Validate an image ``input_shape`` and return ``(height, width, channels)``.

    ``input_shape`` follows ``keras.config.image_data_format()``: ``(H, W, C)`` for
    channels_last, ``(C, H, W)`` for channels_first. Height and width must be known
    multiples of ``multiple``; the error names the nearest valid size.
    """
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3:
        raise ValueError(
            f"{owner}: `input_shape` must be a 3-tuple (height, width, channels), got "
            f"input_shape={input_shape!r}."
        )
    if keras.config.image_data_format() == "channels_last":
        height, width, channels = input_shape
    else:
        channels, height, width = input_shape
    check_positive_int("channels", channels, owner)
    for label, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"{owner}: input {label} must be a known positive integer, got {label}={size!r} in "
                f"input_shape={tuple(input_shape)!r}; build with a fixed size (resize or pad slices to it)."
            )
        if size % multiple:
            raise ValueError(
                f"{owner}: input {label} {size} is not a multiple of {multiple} ({why}); the nearest "
                f"valid {label} is {nearest_multiple(size, multiple)} (resize or pad to it)."
            )
    return height, width, channels
