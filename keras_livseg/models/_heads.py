"""The shared pieces of every model: the named input, head checks and the float32 head."""

from __future__ import annotations

import keras
from keras import layers

from keras_livseg.models._utils import check_positive_int

INPUT_NAME = "ct_slices"
OUTPUT_NAME = "probabilities"
HEADS = ("softmax", "sigmoid")


def check_head(head: str, num_classes: int, owner: str) -> None:
    """Validate ``head`` and ``num_classes`` together."""
    check_positive_int("num_classes", num_classes, owner)
    if head not in HEADS:
        raise ValueError(f"{owner}: `head` must be one of {HEADS}, got head={head!r}.")
    if head == "softmax" and num_classes < 2:
        raise ValueError(
            f"{owner}: a softmax head needs num_classes >= 2, got num_classes={num_classes}; "
            f"use head='sigmoid' for a single foreground channel."
        )


def ct_input(input_shape) -> keras.KerasTensor:
    """The model input, named ``"ct_slices"`` (the name the export stage expects)."""
    return keras.Input(shape=tuple(input_shape), name=INPUT_NAME, dtype="float32")


def probabilities(logits, head: str):
    """Softmax over classes or per-class sigmoid, computed in float32 under any policy."""
    if head == "softmax":
        axis = -1 if keras.config.image_data_format() == "channels_last" else 1
        return layers.Softmax(axis=axis, dtype="float32", name=OUTPUT_NAME)(logits)
    return layers.Activation("sigmoid", dtype="float32", name=OUTPUT_NAME)(logits)
