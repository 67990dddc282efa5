"""Export a trained model as a SavedModel for TF Serving that takes raw Hounsfield units.

The exported ``serving_default`` signature (also under the name ``serve``) is::

    ct_slices:      float32 [batch, height, width]          (context 1), or
                    float32 [batch, height, width, context] (2.5D models)
                    raw HU, any height and width
    ->
    probabilities:  float32 [batch, height, width, 3]       at the input's size
    mask:           uint8   [batch, height, width]          0 background, 1 liver, 2 tumor

Inside the graph, the request goes through the same preprocessing as training
(:meth:`Preprocessing.tf_model_input`: HU window, bilinear resize to the model's size,
standardization), the model, and a bilinear resize of the probabilities back to the
input's height × width; the mask is the argmax of the resized probabilities. Keeping the
preprocessing inside the graph is what makes train/serve skew impossible: a client sends
the CT as it comes from the scanner and never needs to know the window or statistics.

Models that resample to a fixed pixel spacing (``preprocessing.spacing_mm``) need the spacing
of the slices sent: their signature has a second input, ``pixel_spacing_mm: float32 [2]``
(row and column spacing in mm, from the DICOM PixelSpacing or the NIfTI header), and the
graph resamples, crops/pads, and maps the probabilities back exactly as ``prepare`` and
``predict`` do.

Models trained with ``normalization="volume"`` (each volume standardized with its own
statistics) are refused: a request holds slices, not the volume, and statistics of the slices
sent would differ from those of training. Retrain with ``normalization="foreground"`` (the
default) to serve, or predict whole volumes with the ``.keras`` checkpoint
(``python -m keras_livseg.predict``), which computes them per volume.

The SavedModel is written in TF Serving's layout ``<out_base>/<version>/``, into a hidden
temporary folder beside it first and renamed when complete, so the server (which polls the
base folder) never sees a half-written version. ``<version>/assets.extra/preprocessing.json``
records the preprocessing, model name, classes and signature names.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf  # the export stage writes a TF graph (DESIGN.md: only data/ and export)

import keras_livseg
from keras_livseg.data.preprocessing import PREPROCESSING_FILE, Preprocessing, write_preprocessing_json

logger = logging.getLogger(__name__)

INPUT_NAME = "ct_slices"
PROBABILITIES = "probabilities"
MASK = "mask"
SPACING_INPUT = "pixel_spacing_mm"
SIGNATURES = ("serving_default", "serve")
CLASSES = ("background", "liver", "tumor")
# Sigmoid heads have one channel per nested LiTS region; the decoding below assumes this order.
SIGMOID_CHANNELS = {2: ("liver", "tumor"), 3: ("background", "liver", "tumor")}


def load_keras_model(path) -> keras.Model:
    """Load a ``.keras`` checkpoint for inference (no optimizer state).

    Args:
        path: a ``.keras`` file, e.g. ``runs/demo/checkpoints/best.keras``.

    Returns:
        The ``keras.Model``, with its custom layers resolved.

    Raises:
        ValueError: the path is not a ``.keras`` file (SavedModels and ``.h5`` are refused).
        FileNotFoundError: the file does not exist.

    Example:
        >>> import tempfile
        >>> from keras_livseg.models import build_model
        >>> path = Path(tempfile.mkdtemp()) / "tiny.keras"
        >>> build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(path)
        >>> load_keras_model(path).input.name
        'ct_slices'
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(
            f"{path} is not a .keras model file; pass a Keras 3 checkpoint such as "
            f"RUN/checkpoints/best.keras (SavedModels and .h5 files cannot be exported)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist; pass a checkpoint such as RUN/checkpoints/best.keras")
    # Importing these registers the project's custom layers, losses, metrics and schedules.
    import keras_livseg.models  # noqa: F401
    import keras_livseg.training.losses  # noqa: F401
    import keras_livseg.training.metrics  # noqa: F401
    import keras_livseg.training.schedules  # noqa: F401

    # compile=False: serving needs the weights, not the optimizer state or the loss.
    return keras.saving.load_model(path, compile=False)


def next_version(out_base) -> int:
    """1 + the largest integer version folder under ``out_base``, or 1 when there is none.

    Example:
        >>> import tempfile
        >>> base = Path(tempfile.mkdtemp())
        >>> (base / "3").mkdir(); (base / ".partial-7").mkdir()
        >>> next_version(base)
        4
    """
    base = Path(out_base)
    if not base.is_dir():
        return 1
    versions = [int(child.name) for child in base.iterdir() if child.is_dir() and child.name.isdigit()]
    return max(versions, default=0) + 1


def _model_geometry(model: keras.Model, prep: Preprocessing) -> tuple[bool, int, str]:
    """Check the model against the preprocessing: ``(channels_first, num_classes, head)``."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            f"the export expects one CT input and one probability output (build it with build_model)"
        )
    input_shape = tuple(model.inputs[0].shape)
    output_shape = tuple(model.outputs[0].shape)
    if len(input_shape) != 4 or len(output_shape) != 4:
        raise ValueError(
            f"model {model.name!r} has input shape {input_shape} and output shape {output_shape}; "
            f"expected 2D slices (batch, height, width, channels)"
        )
    channels_first = keras.config.image_data_format() == "channels_first"
    if channels_first:
        channels, height, width = input_shape[1:]
        num_classes = output_shape[1]
    else:
        height, width, channels = input_shape[1:]
        num_classes = output_shape[-1]
    if channels != prep.context:
        raise ValueError(
            f"model {model.name!r} takes {channels} input channel(s) but the preprocessing has context "
            f"{prep.context}; pass the preprocessing.json of the run that trained this model (--preprocessing)"
        )
    for axis, model_size, prep_size in (("height", height, prep.image_size[0]), ("width", width, prep.image_size[1])):
        if model_size is not None and model_size != prep_size:
            raise ValueError(
                f"model {model.name!r} has input {axis} {model_size} but the preprocessing resizes to "
                f"{prep.image_size}; pass the preprocessing.json of the run that trained this model"
            )
    head_layer = model.outputs[0]._keras_history.operation
    activation = getattr(getattr(head_layer, "activation", None), "__name__", "")
    head = "sigmoid" if activation == "sigmoid" else "softmax"
    if head == "softmax" and num_classes != len(CLASSES):
        raise ValueError(
            f"model {model.name!r} outputs {num_classes} classes; the export serves the LiTS classes {CLASSES}"
        )
    if head == "sigmoid" and num_classes not in SIGMOID_CHANNELS:
        raise ValueError(
            f"model {model.name!r} has a sigmoid head with {num_classes} channel(s); the export decodes "
            f"{sorted(SIGMOID_CHANNELS)} channels {list(SIGMOID_CHANNELS.values())}"
        )
    return channels_first, int(num_classes), head


def make_serving_function(model: keras.Model, prep: Preprocessing) -> tf.types.experimental.GenericFunction:
    """The raw-HU serving function of ``model``, as a ``tf.function`` with its input signature.

    Args:
        model: a segmentation model from :func:`keras_livseg.models.build_model` (input
            ``[B, H, W, context]``, output ``[B, H, W, 3]`` probabilities).
        prep: the preprocessing the model was trained with.

    Returns:
        A ``tf.function`` taking ``ct_slices`` float32 ``[B, h, w]`` (context 1) or
        ``[B, h, w, context]`` raw HU of any ``h``, ``w`` and returning
        ``{"probabilities": float32 [B, h, w, 3], "mask": uint8 [B, h, w]}``.

    Raises:
        ValueError: the model's channels, size or classes disagree with ``prep``.

    Example:
        >>> from keras_livseg.models import build_model
        >>> model = build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2)
        >>> serve = make_serving_function(model, Preprocessing(image_size=(32, 32)))
        >>> out = serve(tf.zeros([2, 50, 40]))
        >>> tuple(out["probabilities"].shape), out["mask"].dtype.name
        ((2, 50, 40, 3), 'uint8')
    """
    if prep.normalization == "volume":
        raise ValueError(
            "this model was trained with normalization='volume' (statistics of each whole volume), which a "
            "serving request of slices cannot reproduce; retrain with preprocessing.normalization='foreground' "
            "to serve it, or predict volumes with the .keras checkpoint (python -m keras_livseg.predict)"
        )
    channels_first, num_classes, head = _model_geometry(model, prep)
    context = prep.context
    spec_shape = [None, None, None] if context == 1 else [None, None, None, context]
    signature = [tf.TensorSpec(spec_shape, tf.float32, name=INPUT_NAME)]
    if prep.spacing_mm is not None:
        signature.append(tf.TensorSpec([2], tf.float32, name=SPACING_INPUT))

    def serve_slices(ct_slices, pixel_spacing_mm=None):
        hu = ct_slices[..., tf.newaxis] if context == 1 else ct_slices
        size = tf.shape(hu)[1:3]
        inputs = prep.tf_model_input(hu, spacing=pixel_spacing_mm)
        if channels_first:
            inputs = tf.transpose(inputs, [0, 3, 1, 2])
        # The model casts to its compute dtype (bfloat16/float16 under mixed precision) itself;
        # its head is float32, and the cast below keeps the signature float32 regardless.
        probabilities = tf.cast(model(inputs, training=False), tf.float32)
        if channels_first:
            probabilities = tf.transpose(probabilities, [0, 2, 3, 1])
        probabilities = prep.tf_model_grid_to_slices(probabilities, size, pixel_spacing_mm)
        if head == "softmax":
            # Bilinear weights are convex, so the sum stays 1 up to rounding; renormalize anyway
            # so that clients can rely on it.
            probabilities = probabilities / tf.reduce_sum(probabilities, axis=-1, keepdims=True)
            labels = tf.argmax(probabilities, axis=-1)
        else:
            from keras_livseg.training.losses import label_map

            labels = label_map(probabilities, head="sigmoid", channels=SIGMOID_CHANNELS[num_classes])
        return {PROBABILITIES: probabilities, MASK: tf.cast(labels, tf.uint8)}

    if prep.spacing_mm is None:
        return tf.function(lambda ct_slices: serve_slices(ct_slices), input_signature=signature)
    return tf.function(serve_slices, input_signature=signature)


def export_saved_model(
    model: keras.Model | str | os.PathLike,
    out_base: str | os.PathLike,
    prep: Preprocessing,
    version: int | None = None,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a raw-HU SavedModel in TF Serving's ``<out_base>/<version>/`` layout.

    Args:
        model: a ``keras.Model`` or the path of a ``.keras`` checkpoint.
        out_base: the model's base folder, e.g. ``saved_models/livseg``
            (``tensorflow_model_server --model_base_path`` points here).
        prep: the preprocessing the model was trained with (``<run>/preprocessing.json``).
        version: positive integer version. Defaults to 1 + the largest existing version, or 1.
        overwrite: replace an existing ``<out_base>/<version>/``. Defaults to False.
        metadata: extra entries for ``assets.extra/preprocessing.json`` (e.g. the run folder).

    Returns:
        The path of the written version folder.

    Raises:
        ValueError: ``version`` exists and ``overwrite`` is False, a bad ``version``, a model
            path that is not ``.keras``, or a model that disagrees with ``prep``.
        FileNotFoundError: the model file does not exist.

    Example:
        >>> import tempfile
        >>> from keras_livseg.models import build_model
        >>> model = build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2)
        >>> prep = Preprocessing(image_size=(32, 32), mean=60.0, std=40.0)
        >>> base = Path(tempfile.mkdtemp()) / "livseg"
        >>> export_saved_model(model, base, prep).name
        '1'
        >>> served = tf.saved_model.load(str(base / "1")).signatures["serving_default"]
        >>> out = served(ct_slices=tf.fill([1, 300, 280], 60.0))
        >>> tuple(out["mask"].shape), out["probabilities"].dtype.name
        ((1, 300, 280), 'float32')
    """
    if not isinstance(prep, Preprocessing):
        raise ValueError(f"prep must be a Preprocessing, got {type(prep).__name__}; read it with read_preprocessing_json")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ValueError(f"version must be a positive integer (TF Serving's version folders), got {version!r}")
    model_path = None
    if not isinstance(model, keras.Model):
        model_path = Path(model)
        model = load_keras_model(model_path)

    base = Path(out_base)
    version = next_version(base) if version is None else version
    target = base / str(version)
    if target.exists() and not overwrite:
        raise ValueError(f"export version {target} already exists; pass --overwrite to replace it, or another --version")

    serve = make_serving_function(model, prep)  # checks the model before anything is written
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name in SIGNATURES:
        archive.add_endpoint(name, serve)

    base.mkdir(parents=True, exist_ok=True)
    # Hidden, non-integer names: TF Serving only loads all-digit folder names.
    token = uuid.uuid4().hex[:8]
    partial = base / f".partial-{version}-{token}"
    tf_logger = logging.getLogger("tensorflow")
    tf_level = tf_logger.level
    try:
        # TensorFlow logs "Assets written to <temporary folder>" at INFO: misleading, so quiet it.
        tf_logger.setLevel(max(tf_level, logging.WARNING))
        try:
            archive.write_out(str(partial), verbose=False)
        finally:
            tf_logger.setLevel(tf_level)
        write_preprocessing_json(
            partial / "assets.extra" / PREPROCESSING_FILE,
            prep,
            **{
                **(metadata or {}),
                "model_name": model.name,
                "model_file": str(model_path.resolve()) if model_path else None,
                "classes": list(CLASSES),
                "input_name": INPUT_NAME,
                "input_shape": ["batch", "height", "width"] + (["context"] if prep.context > 1 else []),
                "spacing_input": SPACING_INPUT if prep.spacing_mm is not None else None,
                "output_names": [PROBABILITIES, MASK],
                "signatures": list(SIGNATURES),
                "keras_livseg_version": keras_livseg.__version__,
                "keras_version": keras.__version__,
                "tensorflow_version": tf.__version__,
            },
        )
        if target.exists():
            # Move the old version aside first so the swap is two renames, then delete it.
            retired = base / f".retired-{version}-{token}"
            target.rename(retired)
            partial.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            partial.rename(target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    logger.info("exported %s (%s, context %d) -> %s", model.name, "x".join(map(str, prep.image_size)), prep.context, target)
    return target
