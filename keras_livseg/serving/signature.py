"""The raw-HU serving signature: the names a client sees and the ``tf.function`` behind them.

See :mod:`keras_livseg.serving` for the signature's inputs and outputs.
"""

from __future__ import annotations

import keras
import tensorflow as tf  # the export stage writes a TF graph (DESIGN.md: only data/ and export)

from keras_livseg.data.labels import CLASS_NAMES
from keras_livseg.data.preprocessing import Preprocessing

INPUT_NAME = "ct_slices"
PROBABILITIES = "probabilities"
MASK = "mask"
SPACING_INPUT = "pixel_spacing_mm"
SIGNATURES = ("serving_default", "serve")
#: Largest slice side a request may have (CT is 512, rarely 1024): beyond it, a clear refusal.
MAX_SLICE_SIDE = 2048
#: Most values one request may hold (256 slices of 512x512): the server's memory stays bounded.
MAX_REQUEST_VALUES = 256 * 512 * 512
CLASSES = CLASS_NAMES
# Sigmoid heads have one channel per nested LiTS region; the decoding below assumes this order.
SIGMOID_CHANNELS = {2: ("liver", "tumor"), 3: ("background", "liver", "tumor")}



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


def guard_request(ct_slices: tf.Tensor) -> tf.Tensor:
    """``ct_slices`` unchanged, or an ``InvalidArgumentError`` saying what is wrong with it.

    Refused: NaN or Inf values, a slice side over :data:`MAX_SLICE_SIDE`, more than
    :data:`MAX_REQUEST_VALUES` values, an empty request. (Rank and dtype are checked by the
    signature and :func:`context_from_request`.)
    """
    shape = tf.shape(ct_slices)
    checks = [
        tf.debugging.assert_positive(tf.size(ct_slices), message="ct_slices is empty; send at least one slice"),
        tf.debugging.assert_less_equal(
            tf.reduce_max(shape[1:3]), MAX_SLICE_SIDE,
            message=f"ct_slices has a slice side over {MAX_SLICE_SIDE} pixels; send CT slices as scanned (512 x 512 typically)",
        ),
        tf.debugging.assert_less_equal(
            tf.size(ct_slices, out_type=tf.int64), tf.constant(MAX_REQUEST_VALUES, tf.int64),
            message=f"ct_slices holds more than {MAX_REQUEST_VALUES} values; split the scan into requests of fewer slices",
        ),
        tf.debugging.assert_all_finite(ct_slices, message="ct_slices holds NaN or Inf; send finite Hounsfield units"),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(ct_slices)


def context_from_request(ct_slices: tf.Tensor, context: int) -> tf.Tensor:
    """``[B, H, W, context]`` stacks from a request of stacks or of plain consecutive slices.

    A rank-3 request ``[B, H, W]`` is read as B consecutive axial slices in the volume's order
    (feet to head, as ``predict`` and the shards order them); each slice gets its neighbours
    *within the request* as context channels, the first and last slice repeating themselves
    (:func:`~keras_livseg.data.preprocessing.context_stack`'s rule at a volume's edges). So a
    request of one slice gets that slice in every channel, which is what the model saw at the
    first and last slice of a volume, not what it saw inside one: send the neighbours too, or
    send ``[B, H, W, context]`` stacks built from the whole volume.

    Example:
        >>> x = tf.reshape(tf.range(3.0), [3, 1, 1])
        >>> context_from_request(x, 3)[:, 0, 0].numpy().tolist()
        [[0.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 2.0]]
    """
    rank = tf.rank(ct_slices)
    tf.debugging.assert_equal(
        tf.logical_or(tf.equal(rank, 3), tf.equal(rank, 4)), True,
        message=f"ct_slices must be [batch, height, width] consecutive slices or [batch, height, width, {context}]",
    )

    def from_consecutive():
        half = context // 2
        count = tf.shape(ct_slices)[0]
        picks = tf.clip_by_value(tf.range(count)[:, None] + tf.range(-half, half + 1)[None, :], 0, count - 1)
        return tf.transpose(tf.gather(ct_slices, picks), [0, 2, 3, 1])  # [B, context, H, W] -> channels last

    def as_stacks():
        tf.debugging.assert_equal(
            tf.shape(ct_slices)[-1], context,
            message=f"ct_slices [batch, height, width, channels] must have {context} channels (the model's context)",
        )
        return ct_slices

    stacks = tf.cond(tf.equal(rank, 3), from_consecutive, as_stacks)
    return tf.ensure_shape(tf.reshape(stacks, tf.shape(stacks)), [None, None, None, context])


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
    # 2.5D models take either stacks [B, H, W, context] or plain consecutive slices [B, H, W]
    # (unknown rank in the signature), so that a client need not know the model's context.
    spec_shape = [None, None, None] if context == 1 else None
    signature = [tf.TensorSpec(spec_shape, tf.float32, name=INPUT_NAME)]
    if prep.spacing_mm is not None:
        signature.append(tf.TensorSpec([2], tf.float32, name=SPACING_INPUT))

    def serve_slices(ct_slices, pixel_spacing_mm=None):
        ct_slices = guard_request(ct_slices)
        hu = ct_slices[..., tf.newaxis] if context == 1 else context_from_request(ct_slices, context)
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
