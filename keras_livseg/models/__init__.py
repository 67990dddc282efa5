"""Models, built through one registry: the papers' networks and their competitors.

- ``unet``, ``tam_unet``: the TAM-U-Net paper's baseline and network.
- ``effb0_pan``: the Enhanced PAN paper's EfficientNetB0-PAN.
- ``attention_unet`` (Oktay et al. 2018), ``unet_cbam`` (U-Net with CBAM, Woo et al. 2018),
  ``linknet`` (Chaurasia and Culurciello 2017), ``pspnet`` (Zhao et al. 2017), ``manet`` (Fan
  et al. 2020): the competitors of both papers, the ResNet ones matching
  segmentation_models.pytorch layer for layer.
- ``deeplabv3plus``, ``segformer``: keras-cv models, with the ``[cv]`` extra.

Every model takes the input ``"ct_slices"`` (1 channel, or 3 for 2.5D) and returns float32
``"probabilities"``; :func:`build_model` checks the options and the input size.

>>> from keras_livseg.models import build_model
>>> model = build_model("tam_unet", input_shape=(32, 32, 1), filters=4, depth=2)
>>> model.inputs[0].name, model.output_names
('ct_slices', ['probabilities'])
"""

from __future__ import annotations

import inspect

import keras

from keras_livseg.models.efficientnet_pan import build_effb0_pan
from keras_livseg.models.keras_cv_models import build_deeplabv3plus, build_segformer
from keras_livseg.models.linknet import build_linknet
from keras_livseg.models.manet import build_manet
from keras_livseg.models.pspnet import build_pspnet
from keras_livseg.models.unet import build_attention_unet, build_tam_unet, build_unet, build_unet_cbam

MODEL_BUILDERS = {
    "unet": build_unet,
    "tam_unet": build_tam_unet,
    "effb0_pan": build_effb0_pan,
    "attention_unet": build_attention_unet,
    "unet_cbam": build_unet_cbam,
    "linknet": build_linknet,
    "pspnet": build_pspnet,
    "manet": build_manet,
    "deeplabv3plus": build_deeplabv3plus,
    "segformer": build_segformer,
}


#: Models that can train on patches and predict whole slices (:func:`any_size`): the U-Nets.
#: The others hold an encoder built for one input size.
PATCH_TRAINABLE = frozenset({"unet", "tam_unet", "attention_unet", "unet_cbam"})

#: Models that need an optional extra: name -> (the package they import, the extra that installs it).
EXTRAS: dict[str, tuple[str, str]] = {"deeplabv3plus": ("keras_cv", "cv"), "segformer": ("keras_cv", "cv")}


class MissingExtraError(ImportError, ValueError):
    """A model needs an optional package that is not installed; the message names the extra.

    An ``ImportError`` for Python, a ``ValueError`` for the commands (one line, exit status 2).
    """


def missing_extra(name: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra when ``name`` needs a package that is absent."""
    import importlib.util

    package, extra = EXTRAS.get(name, (None, None))
    if package is not None and importlib.util.find_spec(package) is None:
        raise MissingExtraError(
            f"model {name!r} needs {package}, which is not installed: pip install \"keras_livseg[{extra}]\""
        )


def available_models() -> tuple[str, ...]:
    """Names accepted by :func:`build_model`."""
    return tuple(MODEL_BUILDERS)


def build_model(name: str, input_shape=(256, 256, 1), num_classes: int = 3, **options) -> keras.Model:
    """Build a segmentation model by name.

    Args:
        name: one of :func:`available_models`.
        input_shape: ``(height, width, channels)`` (``(C, H, W)`` under channels_first).
            Defaults to ``(256, 256, 1)``.
        num_classes: int. Defaults to 3 (background, liver, tumor).
        **options: the builder's own arguments (see each ``build_<name>``).

    Returns:
        A ``keras.Model`` with input ``"ct_slices"`` and output ``"probabilities"``
        ``(batch, H, W, num_classes)`` in float32.

    Raises:
        ValueError: an unknown name or option, or a bad option value.

    Example:

    >>> model = build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2)
    >>> tuple(model.output.shape)
    (None, 32, 32, 3)
    """
    builder = MODEL_BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown model name {name!r}; valid names are {available_models()}.")
    missing_extra(name)
    accepted = set(inspect.signature(builder).parameters) - {"input_shape", "num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"build_model({name!r}): unknown option(s) {unknown}; valid options are {sorted(accepted)}."
        )
    return builder(input_shape=tuple(input_shape), num_classes=num_classes, **options)


def any_size(model: keras.Model, size: int) -> keras.Model:
    """The same network on slices of any height and width: the same layers, so the same weights.

    Training on patches (nnU-Net's way) and validating on whole slices needs a model that
    takes both; the fixed-size ``model`` stays the one that is saved, exported and served.
    What one learns, the other has at once. The models of :data:`PATCH_TRAINABLE` can; the
    ones with an encoder built for one size cannot.

    Args:
        model: a functional model from :func:`build_model`.
        size: a patch side the twin must take (checked with one forward pass of zeros).

    Returns:
        A ``keras.Model`` with input ``"ct_slices"`` ``(batch, None, None, channels)``.

    Raises:
        ValueError: the network cannot run at ``size`` (a layer built for one size).

    Example:

    >>> model = build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2)
    >>> twin = any_size(model, 16)
    >>> tuple(twin.input.shape), twin.weights[0] is model.weights[0]
    ((None, None, None, 1), True)
    """
    channels_first = keras.config.image_data_format() == "channels_first"
    shape = list(model.inputs[0].shape[1:])
    spatial = [1, 2] if channels_first else [0, 1]
    probe = [1, *shape]
    for axis in spatial:
        shape[axis] = None
        probe[axis + 1] = int(size)
    try:
        twin = keras.models.clone_model(model, input_tensors=keras.Input(tuple(shape), name=model.inputs[0].name),
                                        clone_function=lambda layer: layer)
        twin(keras.ops.zeros(probe), training=False)
    except ValueError as error:  # a layer's shape check: say which model and what to do
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"model {model.name!r} cannot run on {size}x{size} patches ({first.strip()}): it holds a "
                         "part built for one input size; train it on whole slices (training.crop_size = 0), or "
                         f"use a U-Net ({', '.join(sorted(PATCH_TRAINABLE))})") from None
    return twin


__all__ = [
    "MODEL_BUILDERS",
    "MissingExtraError",
    "PATCH_TRAINABLE",
    "any_size",
    "available_models",
    "build_attention_unet",
    "build_deeplabv3plus",
    "build_effb0_pan",
    "build_linknet",
    "build_manet",
    "build_pspnet",
    "build_segformer",
    "build_model",
    "build_tam_unet",
    "build_unet",
    "build_unet_cbam",
    "missing_extra",
]
